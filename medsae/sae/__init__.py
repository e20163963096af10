"""medsae.sae: sparse autoencoders on embeddings.

``config`` (the ``sae:`` spec section), ``models`` (the SAE family behind one interface), ``ops``
(sparse selections and gradients), ``data`` (train rows on the device), ``train`` (several
configurations in one pass, resumable), ``checkpoint`` (safetensors + cfg.json, SAELens export),
``codes`` (CSR codes of every slice) and ``stage`` (the train and encode stages).
"""
