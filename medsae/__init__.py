"""medsae: sparse autoencoders on medical image embeddings (slice, embed, train, evaluate, explain).

Importing the package is cheap: submodules (torch, duckdb, litellm, ...) load on first use.
"""

#: The release version; pyproject.toml reads it from here (one source of truth).
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy attributes keep `import medsae` fast
    """``medsae.open(registry)``: the Python API (:mod:`medsae.api`), imported on first use."""
    if name == "open":
        from medsae.api import open as open_registry

        return open_registry
    raise AttributeError(f"module 'medsae' has no attribute {name!r}")
