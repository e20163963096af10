"""Patient and series identifiers never leave the ingest: a keyed hash turns them into stable pseudonyms.

DICOM headers carry PatientID and UIDs; a manifest may carry a ``subject`` column. medsae keeps
neither: each becomes ``HMAC-SHA256(key, value)`` cut to 16 hex digits. The key is 32 random bytes
made once per dataset and kept beside it (``<root>/.medsae/pseudonym.key``, readable by its owner
only; ``~/.cache/medsae/keys/`` when the data folder is read-only), so pseudonyms are stable across
runs of one dataset but cannot be recomputed from a patient list without the key (a plain hash of
a medical record number can). This is pseudonymisation of identifiers, not de-identification of
pixel data (burned-in text stays in the images).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "pseudonym.key"


def _key_path(root: Path) -> Path:
    local = root / ".medsae"
    if os.access(root, os.W_OK) or os.access(local, os.W_OK) or (local / KEY_FILE).is_file():
        return local / KEY_FILE
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medsae" / "keys"
    return cache / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.key"


def dataset_key(root: str | Path, create: bool = True) -> bytes:
    """The dataset's pseudonym key (made on first use); without ``create``, a throw-away key if none exists.

    A dry run (``medsae data check``) writes nothing: its pseudonyms are then valid for that run only.
    """
    path = _key_path(Path(root))
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    if not create:
        return secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # never replace a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def pseudonym(key: bytes, value: str, prefix: str = "") -> str:
    """``prefix`` + 16 hex digits of the keyed hash of ``value`` (surrounding blanks ignored)."""
    digest = hmac.new(key, str(value).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return prefix + digest[:16]
