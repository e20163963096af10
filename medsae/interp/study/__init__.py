"""The study's auto-interpretation, exactly: ``interpret.protocol: study`` (docs/method.md#interpret-study-protocol).

By role, as the study's ``evaluate_autointerp.py`` runs them:

* :mod:`~medsae.interp.study.selection` — the 250 latents by combined monosemanticity and probe
  coefficient rank; always-active latents; distractor eligibility and the seeded draw;
* :mod:`~medsae.interp.study.samples` — the 5 diverse top-activating samples of a latent on a split;
* :mod:`~medsae.interp.study.summarize` — the summarize stage's part: selection, distractors, sample
  sets (no LLM);
* :mod:`~medsae.interp.study.regions`, :mod:`~medsae.interp.study.blocks` — what a prompt says about
  a sample (the study's metadata block and structure -> region table);
* :mod:`~medsae.interp.study.prompting` — the explainer and judge requests (images + text) and the
  explainer answer's post-processing;
* :mod:`~medsae.interp.study.judge` — candidate order, the judge answer's parsing, rank and summary;
* :mod:`~medsae.interp.study.agent` — the interpret stage's part: describe, rank, emit rows.
"""
