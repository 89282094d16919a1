"""Reading a cache straight onto the compute device, verifying what is read."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from ltcache.cache.manifest import read_manifest, sha256_file
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
    """``$LTCACHE_CACHE``, else the cache bundled with the package; an error saying how to make
    one when neither holds a cache."""
    env = os.environ.get("LTCACHE_CACHE")
    if env:
        if not (Path(env) / "manifest.json").is_file():
            raise LtcacheError(f"LTCACHE_CACHE={env} holds no cache (no manifest.json); point it at a directory "
                               "made by `ltcache extract --ckpt runs/NAME/stage1/stage1.pt`, or unset it")
        return Path(env)
    if (BUNDLED / "manifest.json").is_file():
        return BUNDLED
    raise LtcacheError("no default cache is available; make one with `ltcache train --name NAME ...` then "
                       "`ltcache extract --ckpt runs/NAME/stage1/stage1.pt`, and pass --cache runs/NAME/cache (or set "
                       "LTCACHE_CACHE)")


def _fix(cache_dir: Path, man: dict) -> str:
    """How to repair a damaged cache: re-run the extraction that made it."""
    if Path(cache_dir).resolve() == BUNDLED.resolve():
        return "the bundled cache is part of the package: reinstall it (pip install -e . in the checkout)"
    ckpt = (man.get("checkpoint") or {}).get("path")
    if not ckpt or not Path(ckpt).is_file():
        where = f"the manifest names {ckpt}, which is not here" if ckpt else "the manifest names none"
        return (f"re-run `ltcache extract --ckpt PATH --cache {cache_dir}` with the checkpoint it was made from "
                f"({where}) and the options it was made with (`ltcache info {cache_dir}` lists them)")
    return (f"re-run `ltcache extract --ckpt {ckpt} --cache {cache_dir}` with the options it was made with "
            "to recompute it (or add --force to rebuild the whole cache)")


_NP_TO_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _host_buffer(shape: tuple, np_dtype, pinned: bool) -> tuple:
    """A preallocated host tensor (page-locked for a CUDA destination) and its numpy view, so
    that h5py's read_direct lands straight in memory the GPU can copy from."""
    t = torch.empty(shape, dtype=_NP_TO_TORCH[np.dtype(np_dtype)], pin_memory=pinned)
    return t, t.numpy()


def _read_split(cache_dir: Path, name: str, block: dict, man: dict, verify: bool, quiet: bool,
                pinned: bool) -> tuple:
    views, d = block["views"], int(man["feature_dim"])
    if man.get("dtype") not in ("float16", "float32"):
        raise LtcacheError(f"{cache_dir / 'manifest.json'} names an unknown dtype {man.get('dtype')!r}; "
                           f"{_fix(cache_dir, man)}")
    np_dtype = np.float16 if man["dtype"] == "float16" else np.float32
    n = int(block["rows"])
    feats_t, feats = _host_buffer((n, len(views), d), np_dtype, pinned)
    labels = np.empty(n, dtype=np.int64)
    index = np.empty(n, dtype=np.int64)
    row = 0
    for rec in progress(block["shards"], desc=f"load {name}", quiet=quiet, unit="shard"):
        path = cache_dir / rec["file"]
        if not path.is_file():
            raise LtcacheError(f"shard {path} is missing; {_fix(cache_dir, man)}")
        if verify and sha256_file(path) != rec["sha256"]:
            raise LtcacheError(f"shard {path} is corrupt (checksum mismatch: truncated or altered); {_fix(cache_dir, man)}")
        m = int(rec["rows"])
        if row + m > n:
            raise LtcacheError(f"split {name} of {cache_dir} lists more shard rows than its {n} rows; {_fix(cache_dir, man)}")
        try:
            with h5py.File(path, "r") as f:
                fs, ls, xs = f["features"], f["labels"], f["index"]
                if fs.shape != (m, len(views), d) or fs.dtype != np_dtype:
                    raise LtcacheError(f"shard {path} holds features {fs.shape} {fs.dtype}, the manifest says "
                                       f"({m}, {len(views)}, {d}) {man['dtype']}; {_fix(cache_dir, man)}")
                if ls.shape != (m,) or xs.shape != (m,) or ls.dtype.kind not in "iu" or xs.dtype.kind not in "iu":
                    raise LtcacheError(f"shard {path} holds labels {ls.shape} {ls.dtype} / index {xs.shape} {xs.dtype}, "
                                       f"the manifest says ({m},) integers; {_fix(cache_dir, man)}")
                if m:
                    fs.read_direct(feats, dest_sel=np.s_[row:row + m])
                    ls.read_direct(labels, dest_sel=np.s_[row:row + m])
                    xs.read_direct(index, dest_sel=np.s_[row:row + m])
        except LtcacheError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise LtcacheError(f"shard {path} is unreadable ({exc.__class__.__name__}); {_fix(cache_dir, man)}") from None
        row += m
    if row != n:
        raise LtcacheError(f"split {name} of {cache_dir} has {row} rows in its shards, the manifest says {n}; "
                           f"{_fix(cache_dir, man)}")
    k = int(man["num_classes"])
    if n and (labels.min() < 0 or labels.max() >= k):
        raise LtcacheError(f"split {name} of {cache_dir} has labels outside [0, {k - 1}]; {_fix(cache_dir, man)}")
    if not torch.isfinite(feats_t).all():
        raise LtcacheError(f"split {name} of {cache_dir} holds non-finite features (NaN/inf): the backbone "
                           f"diverged or a shard is damaged; check the checkpoint, then {_fix(cache_dir, man)}")
    return feats_t, labels, index, views


def load(path=None, splits: Sequence[str] = ("train", "val", "test"), device="cpu",
         dtype: torch.dtype = torch.float32, verify: bool = True, quiet: bool = True) -> FeatureCache:
    """Load a cache: per split one preallocated host buffer (pinned for CUDA), moved to the device
    once. The manifest's own checksum is always checked; ``verify=False`` skips the files'
    checksums (explicit, never the default)."""
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
        t, labels, index, views = _read_split(cache_dir, name, man["splits"][name], man, verify, quiet,
                                              pinned=device.type == "cuda")
        feats = t.to(device, non_blocking=True).to(dtype)       # one host-to-device copy, cast on the device
        out[name] = SplitFeatures(feats, torch.from_numpy(labels).to(device), torch.from_numpy(index).to(device),
                                  list(views))
    clf = cache_dir / man["classifier"]["file"]
    if not clf.is_file():
        raise LtcacheError(f"{clf} is missing; {_fix(cache_dir, man)}")
    if verify and sha256_file(clf) != man["classifier"]["sha256"]:
        raise LtcacheError(f"{clf} is corrupt (checksum mismatch); {_fix(cache_dir, man)}")
    if verify:
        for name, rec in (man.get("extra_files") or {}).items():       # e.g. the shifted BN statistics
            if not (cache_dir / name).is_file() or sha256_file(cache_dir / name) != rec["sha256"]:
                raise LtcacheError(f"{cache_dir / name} is missing or corrupt (checksum mismatch); {_fix(cache_dir, man)}")
    k, d = int(man["num_classes"]), int(man["feature_dim"])
    try:
        with h5py.File(clf, "r") as f:
            weight, bias = f["weight"][()], f["bias"][()]
    except (OSError, KeyError) as exc:
        raise LtcacheError(f"{clf} is unreadable ({exc.__class__.__name__}); {_fix(cache_dir, man)}") from None
    if weight.shape != (k, d) or bias.shape != (k,):
        raise LtcacheError(f"{clf} holds weight {weight.shape} / bias {bias.shape}, the manifest says ({k}, {d}) / "
                           f"({k},); {_fix(cache_dir, man)}")
    weight, bias = torch.from_numpy(weight).to(device), torch.from_numpy(bias).to(device)
    return FeatureCache(path=cache_dir, manifest=man, splits=out, weight=weight, bias=bias,
                        class_counts=torch.tensor(man["class_counts"], dtype=torch.long),
                        class_names=list(man["class_names"]), num_classes=int(man["num_classes"]),
                        feature_dim=int(man["feature_dim"]), groups=list(man["groups"]))
