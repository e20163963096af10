"""Auto-interpretation: statistics and example sets per latent, explanations by an LLM, their scores.

By role (as EleutherAI's delphi separates clients, explainers and scorers):

* the ``summarize`` stage — :mod:`~medsae.interp.summary` (per-latent statistics),
  :mod:`~medsae.interp.sampling` (leak-proof example sets), :mod:`~medsae.interp.metadata` (what a
  prompt says about a slice);
* the ``interpret`` stage — :mod:`~medsae.interp.agent` orchestrates, per latent:
  :mod:`~medsae.interp.explainer` writes an explanation (checked by :mod:`~medsae.interp.hygiene`),
  :mod:`~medsae.interp.scorers` score it (simulation, detection, ranking, metrics, sanity) against
  the :mod:`~medsae.interp.baselines` (shuffled explanation, best single attribute), and
  :mod:`~medsae.interp.mask_match` checks explanations against the ground stage's best structures,
  :mod:`~medsae.interp.rows` builds every explanation and score row; :mod:`~medsae.interp.pipeline`
  runs latents concurrently, :mod:`~medsae.interp.journal` keeps what finished,
  :mod:`~medsae.interp.run_stats` sums a run up;
* :mod:`~medsae.interp.study` — the study's own protocol (``interpret.protocol: study``): its latent
  selection, diverse image samples, explainer and 5-way ranking, in both stages;
* :mod:`~medsae.interp.llm` — the one door to language models (gateway, cache, offline models);
* :mod:`~medsae.interp.experiment` (``medsae explain``) and :mod:`~medsae.interp.search` (``medsae
  search``) work on a registered experiment; :mod:`~medsae.interp.stage` holds both stages.
"""
