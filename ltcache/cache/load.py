"""Reading a cache straight onto the compute device, verifying what is read."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import torch

from ltcache.cache.manifest import CLASSIFIER, read_manifest, sha256_file
from ltcache.errors import LtcacheError
from ltcache.progress import progress

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "default_cache"


@dataclass
class SplitFeatures:
    features: torch.Tensor      # [N, V, D]
    labels: torch.Tensor        # [N] long
    index: torch.Tensor         # [N] long, row in the source split
    views: list = field(default_factory=list)


@dataclass
class FeatureCache:
    path: Path
    manifest: dict
    splits: dict
    weight: torch.Tensor        # stage-1 classifier [K, D]
    bias: torch.Tensor          # [K]
    class_counts: torch.Tensor  # [K] long
    class_names: list
    num_classes: int
    feature_dim: int
    groups: list


def default_cache_path() -> Path:
    """``$LTCACHE_CACHE``, else the cache bundled with the package."""
    env = os.environ.get("LTCACHE_CACHE")
    if env:
        return Path(env)
    if (BUNDLED / "manifest.json").is_file():
        return BUNDLED
    raise LtcacheError("no default cache is available; make one with `ltcache train ...` then "
                       "`ltcache extract --ckpt RUN/stage1.pt`, and pass --cache DIR (or set LTCACHE_CACHE)")


def _fix(path: Path, cache_dir: Path) -> str:
    return (f"re-run `ltcache extract` for {cache_dir} (same options) to recompute it, "
            "or `ltcache extract --force` to rebuild the cache")


def _read_split(cache_dir: Path, name: str, block: dict, man: dict, verify: bool, quiet: bool) -> tuple:
    views, d = block["views"], int(man["feature_dim"])
    np_dtype = np.float16 if man["dtype"] == "float16" else np.float32
    n = int(block["rows"])
    feats = np.empty((n, len(views), d), dtype=np_dtype)
    labels = np.empty(n, dtype=np.int64)
    index = np.empty(n, dtype=np.int64)
    row = 0
    for rec in progress(block["shards"], desc=f"load {name}", quiet=quiet, unit="shard"):
        path = cache_dir / rec["file"]
        if not path.is_file():
            raise LtcacheError(f"shard {path} is missing; {_fix(path, cache_dir)}")
        if verify and sha256_file(path) != rec["sha256"]:
            raise LtcacheError(f"shard {path} is corrupt (checksum mismatch: truncated or altered); {_fix(path, cache_dir)}")
        try:
            with h5py.File(path, "r") as f:
                ds = f["features"]
                m = int(rec["rows"])
                if ds.shape != (m, len(views), d) or ds.dtype != np_dtype:
                    raise LtcacheError(f"shard {path} holds features {ds.shape} {ds.dtype}, the manifest says "
                                       f"({m}, {len(views)}, {d}) {man['dtype']}; {_fix(path, cache_dir)}")
                ds.read_direct(feats, dest_sel=np.s_[row:row + m])
                f["labels"].read_direct(labels, dest_sel=np.s_[row:row + m])
                f["index"].read_direct(index, dest_sel=np.s_[row:row + m])
        except LtcacheError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise LtcacheError(f"shard {path} is unreadable ({exc.__class__.__name__}); {_fix(path, cache_dir)}") from None
        row += m
    if row != n:
        raise LtcacheError(f"split {name} of {cache_dir} has {row} rows in its shards, the manifest says {n}; "
                           f"{_fix(cache_dir, cache_dir)}")
    k = int(man["num_classes"])
    if n and (labels.min() < 0 or labels.max() >= k):
        raise LtcacheError(f"split {name} of {cache_dir} has labels outside [0, {k - 1}]; {_fix(cache_dir, cache_dir)}")
    if not np.isfinite(feats).all():
        raise LtcacheError(f"split {name} of {cache_dir} holds non-finite features (NaN/inf): the backbone "
                           "diverged or the shard is damaged; check the checkpoint and re-extract with --force")
    return feats, labels, index, views


def load(path=None, splits: Sequence[str] = ("train", "val", "test"), device="cpu",
         dtype: torch.dtype = torch.float32, verify: bool = True, quiet: bool = True) -> FeatureCache:
    """Load a cache: per split one preallocated host buffer (pinned for CUDA), moved to the device
    once. ``verify=False`` skips the checksums (explicit, never the default)."""
    cache_dir = Path(path) if path is not None else default_cache_path()
    man = read_manifest(cache_dir)
    device = torch.device(device)
    out = {}
    for name in splits:
        if name not in man["splits"]:
            if name == "val" and tuple(splits) == ("train", "val", "test"):
                continue       # a cache without val is fine unless val is asked for explicitly
            raise LtcacheError(f"cache {cache_dir} has no '{name}' split (it has: {', '.join(man['splits'])}); "
                               f"extract it with `ltcache extract --splits ...,{name}`")
        feats, labels, index, views = _read_split(cache_dir, name, man["splits"][name], man, verify, quiet)
        t = torch.from_numpy(feats)
        if device.type == "cuda":
            t = t.pin_memory()
        out[name] = SplitFeatures(t.to(device, non_blocking=True).to(dtype), torch.from_numpy(labels).to(device),
                                  torch.from_numpy(index).to(device), list(views))
    clf = cache_dir / man["classifier"]["file"]
    if not clf.is_file():
        raise LtcacheError(f"{clf} is missing; {_fix(clf, cache_dir)}")
    if verify and sha256_file(clf) != man["classifier"]["sha256"]:
        raise LtcacheError(f"{clf} is corrupt (checksum mismatch); {_fix(clf, cache_dir)}")
    with h5py.File(clf, "r") as f:
        weight = torch.from_numpy(f["weight"][()]).to(device)
        bias = torch.from_numpy(f["bias"][()]).to(device)
    return FeatureCache(path=cache_dir, manifest=man, splits=out, weight=weight, bias=bias,
                        class_counts=torch.tensor(man["class_counts"], dtype=torch.long),
                        class_names=list(man["class_names"]), num_classes=int(man["num_classes"]),
                        feature_dim=int(man["feature_dim"]), groups=list(man["groups"]))
