"""HDF5 shards: ``features`` [n, V, D], ``labels`` [n], ``index`` [n]; written under a temporary
name and renamed when complete, so a shard on disk under its final name is always whole."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ltcache.cache.manifest import sha256_file


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.h5"


def write_shard(path: Path, features: np.ndarray, labels: np.ndarray, index: np.ndarray) -> dict:
    """Write one shard atomically; return its record {file, rows, sha256}."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.create_dataset("index", data=index.astype(np.int64))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "rows": int(features.shape[0]), "sha256": sha256_file(path)}


def write_classifier(path: Path, weight: np.ndarray, bias: np.ndarray) -> dict:
    """The stage-1 head: weight [K, D] and bias [K] (float32)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("weight", data=np.asarray(weight, dtype=np.float32))
        f.create_dataset("bias", data=np.asarray(bias, dtype=np.float32))
    os.replace(tmp, path)
    return {"file": path.name, "sha256": sha256_file(path)}
