"""``ltcache info``: a readable summary of a cache, and ``--verify``: every file checked."""
from __future__ import annotations

from pathlib import Path

import h5py

from ltcache.cache.manifest import CHECKSUM, MANIFEST, read_manifest, sha256_file
from ltcache.cache.shards import check_shard
from ltcache.errors import LtcacheError
from ltcache.progress import progress


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def describe(path) -> str:
    """Dataset and profile, classes and groups, splits, features, size, provenance."""
    from ltcache.cache.feature_sets import present
    from ltcache.imbalance import ir_text
    path = Path(path)
    man = read_manifest(path)
    ds = man.get("dataset", {})
    ex = man.get("extraction", {})
    gs = man.get("group_sizes", {})
    counts = man["class_counts"]
    lines = [
        f"cache        {path}",
        f"dataset      {ds.get('source')}  profile {ds.get('profile')}  {ir_text(ds.get('imb_ratio'), counts)}  "
        f"selection {ds.get('selection')}  seed {ds.get('seed')}" if ds.get("imb_ratio") is not None
        else f"dataset      {ds.get('source')}  {ir_text(None, counts)}",
        f"classes      {man['num_classes']}  (many {gs.get('many', 0)} / medium {gs.get('medium', 0)} / few {gs.get('few', 0)}); "
        f"train counts {max(counts)} .. {min(counts)}",
        f"features     dim {man['feature_dim']}  dtype {man['dtype']}  backbone {man['arch']}",
    ]
    for name, block in man["splits"].items():
        lines.append(f"split {name:<6} {block['rows']:>8} rows  views {','.join(block['views'])}  "
                     f"shards {len(block['shards'])}")
    for name, d in present(path).items():
        ex_set = read_manifest(d).get("extraction", {})
        lines.append(f"feature set  {name} ({d.relative_to(path)}): train_bn={ex_set.get('train_bn')}, "
                     f"bn_shift={ex_set.get('bn_shift')}, batch_size={ex_set.get('batch_size')}, "
                     f"train_views={ex_set.get('train_views')}; "
                     f"{_human(_size(d))}")
    ck = man.get("checkpoint", {}) or {}
    lines.append(f"size         {_human(_size(path))} on disk")
    lines.append(f"checkpoint   {ck.get('path')}  sha256 {str(ck.get('sha256'))[:16]}…")
    how = ", ".join(f"{k}={ex[k]}" for k in ("train_views", "train_bn", "bn_shift", "bn_shift_passes", "batch_size",
                                           "device", "images_per_s", "bare_inference_images_per_s") if k in ex)
    lines.append(f"made         {man.get('created')} by ltcache {man.get('ltcache_version')}" + (f": {how}" if how else ""))
    if man.get("provenance"):
        for k, v in man["provenance"].items():
            lines.append(f"provenance   {k}: {v}")
    return "\n".join(lines)


def verify(path, quiet: bool = True) -> str:
    """Check a whole cache: the manifest's checksum, every shard (sha256, HDF5 readable, rows and
    shape as the manifest says), the classifier and the extra files. Returns
    ``verified: N shards OK``; raises a one-line LtcacheError naming the first damaged file."""
    from ltcache.cache.load import _fix

    path = Path(path)
    man = read_manifest(path)                  # refuses a manifest whose checksum does not match
    dtype, dim = man.get("dtype"), int(man["feature_dim"])
    fix = _fix(path, man)
    shards = [(name, block, rec) for name, block in man["splits"].items() for rec in block["shards"]]
    rows = {name: 0 for name in man["splits"]}
    for name, block, rec in progress(shards, desc="verify", quiet=quiet, unit="shard"):
        file = path / rec["file"]
        if not file.is_file():
            raise LtcacheError(f"shard {file} is missing; {fix}")
        if sha256_file(file) != rec["sha256"]:
            raise LtcacheError(f"shard {file} is corrupt (checksum mismatch: truncated or altered); {fix}")
        try:
            check_shard(file, int(rec["rows"]), len(block["views"]), dim, dtype)
        except LtcacheError as exc:
            raise LtcacheError(f"{exc}; {fix}") from None
        rows[name] += int(rec["rows"])
    for name, block in man["splits"].items():
        if rows[name] != int(block["rows"]):
            raise LtcacheError(f"{path / MANIFEST}: split {name} has {block['rows']} rows but its shards hold "
                               f"{rows[name]}; {fix}")
    clf = path / man["classifier"]["file"]
    if not clf.is_file():
        raise LtcacheError(f"{clf} is missing; {fix}")
    if sha256_file(clf) != man["classifier"]["sha256"]:
        raise LtcacheError(f"{clf} is corrupt (checksum mismatch); {fix}")
    k = int(man["num_classes"])
    try:
        with h5py.File(clf, "r") as f:
            shapes = f["weight"].shape, f["bias"].shape
    except (OSError, KeyError, RuntimeError) as exc:
        raise LtcacheError(f"{clf} is unreadable ({exc.__class__.__name__}); {fix}") from None
    if shapes != ((k, dim), (k,)):
        raise LtcacheError(f"{clf} holds weight {shapes[0]} / bias {shapes[1]}, the manifest says ({k}, {dim}) / "
                           f"({k},); {fix}")
    for name, rec in (man.get("extra_files") or {}).items():
        file = path / name
        if not file.is_file():
            raise LtcacheError(f"{file} is missing; {fix}")
        if sha256_file(file) != rec["sha256"]:
            raise LtcacheError(f"{file} is corrupt (checksum mismatch); {fix}")
    note = "" if CHECKSUM in man else f" ({MANIFEST} has no checksum: a cache made before ltcache wrote one)"
    return f"verified: {len(shards)} shards OK{note}"
