"""medsae.report."""
