"""Backbones and the embedding stage: slices -> one vector per slice, stored as sharded ``.npy``.

* :mod:`medsae.embed.backbones` — ``load_backbone(spec)``: timm / transformers / BiomedParse /
  EfficientNet-Lite0 behind one protocol (images in, vectors out), pooling, preprocessing;
* :mod:`medsae.embed.weights` — Hugging Face cache, local checkpoints, seeded random inits;
* :mod:`medsae.embed.store` — ``open_embeddings(embed_dir)``: the shard store readers use;
* :mod:`medsae.embed.stage` — ``run_embed(ctx)``: the resumable stage.

Heavy imports (torch, timm, transformers) happen in those modules, not here.
"""
