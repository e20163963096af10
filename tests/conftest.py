"""Test-wide settings: offline everything, a private registry and artifacts folder per test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MEDSAE_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
