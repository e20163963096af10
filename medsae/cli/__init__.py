"""medsae.cli."""
