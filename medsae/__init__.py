"""medsae."""
