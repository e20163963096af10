"""Scorers: how well an explanation predicts its latent, on held-out slices it was not written from.

* :mod:`~medsae.interp.scorers.simulator` — simulation and detection: an LLM predicts each slice's
  strength (or whether the latent fires) from the explanation, in batches;
* :mod:`~medsae.interp.scorers.ranking` — the study's 5-way ranking against other latents' explanations;
* :mod:`~medsae.interp.scorers.metrics` — the numbers: correlations, AUROC, balanced accuracy, with n,
  chance level and uncertainty;
* :mod:`~medsae.interp.scorers.sanity` — is a score about the explanation at all (degenerate
  predictions, real-vs-shuffled gap)?
"""
