"""medsae.embed."""
