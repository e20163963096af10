"""medsae.eval."""
