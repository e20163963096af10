"""medsae.interp."""
