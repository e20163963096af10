"""Controls every explanation score is reported against (docs/method.md#baselines).

* **Shuffled explanation** (:mod:`~medsae.interp.baselines.shuffled`): latent i is simulated with
  the explanation of a seeded-random other latent through the same scorer. Expect r near 0; the
  gap to the real explanation is the signal.
* **Best single attribute** (:mod:`~medsae.interp.baselines.best_attribute`): the metadata term
  whose indicator correlates most with the latent on the explain partition, applied as a rule to
  the held-out set. An LLM that cannot beat this is a label lookup.
* The **permutation p-value** lives with the scores (:mod:`medsae.interp.scorers.metrics`); the
  ranking's distractors with the ranking (:mod:`medsae.interp.scorers.ranking`).
"""
