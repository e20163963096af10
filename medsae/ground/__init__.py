"""Grounding: where in a slice a latent fires, scored against the TotalSegmentator structure masks.

* :mod:`medsae.ground.config` — the ``ground:`` spec section;
* :mod:`medsae.ground.tokens` — the pooled SAE applied to each spatial token of a slice;
* :mod:`medsae.ground.render` — slices and their structure masks rendered again from the volumes;
* :mod:`medsae.ground.scores` — lift, best-threshold IoU / Dice, pointing game, shuffled-mask baseline;
* :mod:`medsae.ground.names` — does an explanation name a structure (synonyms, laterality);
* :mod:`medsae.ground.stage` — ``run_ground(ctx)``: the stage after ``encode``.

No LLM is involved: a latent that "is the liver" should fire inside the liver mask, and that is
measured directly (docs/method.md#grounding).
"""
