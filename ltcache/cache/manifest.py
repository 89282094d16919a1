"""The cache manifest: what a cache holds and how it was made (written last, atomically).

The manifest carries a checksum of its own content (``checksum``: sha256 of the canonical JSON of
every other field, see :func:`manifest_checksum`), written by :func:`write_manifest` and checked by
:func:`read_manifest`: an edited or damaged manifest is refused. A manifest without the field (a
cache made before it existed) is still read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ltcache.errors import LtcacheError
from ltcache.outputs import atomic_write

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CLASSIFIER = "classifier.h5"
PROGRESS = "progress.json"      # an extraction in progress: its key and the shards already complete
CHECKSUM = "checksum"           # the manifest's own sha256 (of every other field, canonical JSON)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def manifest_checksum(man: dict) -> str:
    """Hex sha256 of ``json.dumps(sort_keys=True, separators=(",", ":"))`` of the manifest
    without its ``checksum`` field."""
    body = {k: v for k, v in man.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(man: dict) -> dict:
    """A copy of the manifest with its checksum (re)computed."""
    body = {k: v for k, v in man.items() if k != CHECKSUM}
    return {**body, CHECKSUM: manifest_checksum(body)}


def checksum_ok(man: dict) -> bool:
    """True when the manifest's checksum matches its content, or it has none (an older cache)."""
    return CHECKSUM not in man or man[CHECKSUM] == manifest_checksum(man)


def write_json_atomic(obj: dict, path: Path) -> None:
    """Write JSON to a temporary name in the same folder, then rename over ``path``; an OS error
    (e.g. a full disk) is a one-line LtcacheError and leaves the previous file in place."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def write_manifest(man: dict, path: Path) -> dict:
    """Write a manifest with its checksum, atomically; returns what was written."""
    sealed = seal(man)
    write_json_atomic(sealed, path)
    return sealed


def read_manifest(cache_dir) -> dict:
    """The manifest of a complete cache; a one-line error when absent, unreadable, too new, or
    altered since it was written (checksum mismatch)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not cache_dir.is_dir():
        from ltcache.outputs import restore_interrupted_swap
        restore_interrupted_swap(cache_dir)          # a replacement killed between its two renames
    if not cache_dir.is_dir():
        raise LtcacheError(f"cache {cache_dir} not found; make one with `ltcache extract --ckpt runs/NAME/stage1/stage1.pt --cache {cache_dir}`")
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
    if not checksum_ok(man):
        raise LtcacheError(f"{path} is damaged or was edited (checksum mismatch); re-extract the cache with "
                           f"`ltcache extract --force --cache {cache_dir}`")
    return man
