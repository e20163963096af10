"""medsae.data."""
