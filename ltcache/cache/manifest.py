"""The cache manifest: what a cache holds and how it was made (written last, atomically)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ltcache.errors import LtcacheError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CLASSIFIER = "classifier.h5"
PROGRESS = "progress.json"      # an extraction in progress: its key and the shards already complete


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(obj: dict, path: Path) -> None:
    """Write JSON to a temporary name in the same folder, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_manifest(cache_dir) -> dict:
    """The manifest of a complete cache; a one-line error when absent, unreadable or too new."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not cache_dir.is_dir():
        raise LtcacheError(f"cache {cache_dir} not found; make one with `ltcache extract --ckpt stage1.pt --cache {cache_dir}`")
    if not path.is_file():
        hint = " (an extraction is in progress or was interrupted: re-run the same `ltcache extract` to finish it)" \
            if (cache_dir / PROGRESS).exists() else ""
        raise LtcacheError(f"{cache_dir} is not a complete cache: {MANIFEST} is missing{hint}")
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LtcacheError(f"{path} is unreadable ({exc}); re-run `ltcache extract` with --force") from None
    version = man.get("schema_version") if isinstance(man, dict) else None
    if not isinstance(version, int):
        raise LtcacheError(f"{path} is not an ltcache manifest (no schema_version)")
    if version > SCHEMA_VERSION:
        raise LtcacheError(f"{path} has schema version {version}, newer than this ltcache reads ({SCHEMA_VERSION}); upgrade ltcache")
    if version != SCHEMA_VERSION:
        raise LtcacheError(f"{path} has unknown schema version {version} (this ltcache reads {SCHEMA_VERSION}); "
                           f"re-extract it with `ltcache extract --force --cache {cache_dir}`")
    return man
