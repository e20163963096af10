"""The response cache: one JSON file per answered request, so a rerun makes zero calls.

Entries live under ``cache_dir/<hash[:2]>/<hash>.json``, named by the request hash
(:func:`medsae.interp.llm.messages.request_hash`), and hold the canonical request next to the
answer. They are written atomically (temp file + rename): readers never see half a file, and a
torn or foreign file reads as a miss. The folder is ``$MEDSAE_LLM_CACHE`` if set, else
``<artifacts root>/llm_cache``, shared by the ``interpret`` stage, ``medsae explain run`` and search.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medsae.errors import MedsaeError

CACHE_FORMAT = "medsae-llm-cache/1"


def cache_dir_for(artifacts_root: Path | None) -> Path:
    """``$MEDSAE_LLM_CACHE`` if set, else ``<artifacts root>/llm_cache``."""
    env = os.environ.get("MEDSAE_LLM_CACHE")
    if env:
        return Path(env)
    if artifacts_root is None:
        raise MedsaeError("no LLM cache folder: set MEDSAE_LLM_CACHE")
    return Path(artifacts_root) / "llm_cache"


class ResponseCache:
    """Content-addressed store: one JSON file per answered request, named by the request hash."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when absent or unreadable (a torn file is treated as a miss)."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(entry, dict) or entry.get("request_hash") != key or "response" not in entry:
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Write atomically (temp file + rename), so readers never see half a file."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(entry, ensure_ascii=False, sort_keys=True))
        os.replace(tmp, target)

    def store(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        """Write one answered request: its canonical request (``canonical_request``) and the stored answer."""
        entry = {
            "format": CACHE_FORMAT,
            "request_hash": key,
            "request": request,
            "response": response,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.put(key, entry)
