"""medsae.sae."""
