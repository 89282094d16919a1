"""HDF5 shards: ``features`` [n, V, D], ``labels`` [n], ``index`` [n]; built in memory, written
under a temporary name and renamed when complete, so a shard on disk under its final name is always
whole. A failed write (a full disk, ...) removes the temporary file and is a one-line LtcacheError."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from ltcache.errors import LtcacheError, os_error

_ERRNO = re.compile(r"errno\s*=\s*(\d+)")


def shard_name(split: str, i: int) -> str:
    """File name of shard ``i`` of ``split``."""
    return f"{split}-{i:05d}.h5"


def h5_os_error(exc: BaseException) -> Optional[OSError]:
    """The OS error behind an h5py failure, or None when it is not one. h5py reports a failed write
    as an OSError (or a subclass) or, when a file is closed, as a RuntimeError whose message holds
    ``errno = N``."""
    text = str(exc)
    found = _ERRNO.search(text)
    code = int(found.group(1)) if found else None
    if isinstance(exc, OSError):
        code = exc.errno or code or errno.EIO
        return OSError(code, os.strerror(code))
    if isinstance(exc, RuntimeError) and code:
        return OSError(code, os.strerror(code))
    return None


def _write_h5(path: Path, fill: Callable[[h5py.File], None]) -> str:
    """Build an HDF5 file in memory, then write it through a temporary name in the same folder,
    fsync it and rename it; returns its sha256. HDF5 never writes to the disk itself: a write
    failing inside the HDF5 library (a full disk) can crash the process, while a failing Python
    write is an OSError."""
    buf = io.BytesIO()
    try:
        with h5py.File(buf, "w") as f:
            fill(f)
    except (OSError, RuntimeError) as exc:
        err = h5_os_error(exc)
        if err is None:
            raise
        raise os_error(err, path) from None
    data = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return hashlib.sha256(data).hexdigest()
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise os_error(exc, path, len(data) if len(data) >= 1 << 20 else None) from None
        raise


def write_shard(path: Path, features: np.ndarray, labels: np.ndarray, index: np.ndarray) -> dict:
    """Write one shard atomically; return its record {file, rows, sha256}."""
    path = Path(path)

    def fill(f):
        f.create_dataset("features", data=features)
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.create_dataset("index", data=index.astype(np.int64))

    return {"file": path.name, "rows": int(features.shape[0]), "sha256": _write_h5(path, fill)}


def write_classifier(path: Path, weight: np.ndarray, bias: np.ndarray) -> dict:
    """The stage-1 head: weight [K, D] and bias [K] (float32)."""
    path = Path(path)
    w, b = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)

    def fill(f):
        f.create_dataset("weight", data=w)
        f.create_dataset("bias", data=b)

    return {"file": path.name, "sha256": _write_h5(path, fill)}


def check_shard(path: Path, rows: int, views: int, dim: int, dtype: str) -> None:
    """Open a shard and check its datasets' shapes and dtypes against the manifest; a one-line
    LtcacheError naming the file otherwise."""
    try:
        with h5py.File(path, "r") as f:
            fs, ls, xs = f["features"], f["labels"], f["index"]
            if fs.shape != (rows, views, dim) or fs.dtype != np.dtype(dtype):
                raise LtcacheError(f"shard {path} holds features {fs.shape} {fs.dtype}, the manifest says "
                                   f"({rows}, {views}, {dim}) {dtype}")
            if ls.shape != (rows,) or xs.shape != (rows,):
                raise LtcacheError(f"shard {path} holds {ls.shape[0] if ls.shape else '?'} labels / "
                                   f"{xs.shape[0] if xs.shape else '?'} index rows, the manifest says {rows}")
            if rows:
                fs[-1], ls[-1], xs[-1]          # the last row is readable
    except LtcacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise LtcacheError(f"shard {path} is unreadable ({exc.__class__.__name__})") from None
