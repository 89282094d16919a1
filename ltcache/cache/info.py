"""``ltcache info``: a readable summary of a cache."""
from __future__ import annotations

from pathlib import Path

from ltcache.cache.manifest import read_manifest


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
    path = Path(path)
    man = read_manifest(path)
    ds = man.get("dataset", {})
    ex = man.get("extraction", {})
    gs = man.get("group_sizes", {})
    counts = man["class_counts"]
    lines = [
        f"cache        {path}",
        f"dataset      {ds.get('source')}  profile {ds.get('profile')}  IR {ds.get('imb_ratio'):g}  "
        f"selection {ds.get('selection')}  seed {ds.get('seed')}" if ds.get("imb_ratio") is not None
        else f"dataset      {ds.get('source')}",
        f"classes      {man['num_classes']}  (many {gs.get('many', 0)} / medium {gs.get('medium', 0)} / few {gs.get('few', 0)}); "
        f"train counts {max(counts)} .. {min(counts)}",
        f"features     dim {man['feature_dim']}  dtype {man['dtype']}  backbone {man['arch']}",
    ]
    for name, block in man["splits"].items():
        lines.append(f"split {name:<6} {block['rows']:>8} rows  views {','.join(block['views'])}  "
                     f"shards {len(block['shards'])}")
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
