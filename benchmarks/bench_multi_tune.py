"""Wall time of ``tune --all-methods`` over 5 caches against a single-cache ``tune``, measured in
the same sitting. Run by hand (not by CI):

    python benchmarks/bench_multi_tune.py --threads 1 --jobs 1 --out benchmarks/multi_tune.json

The 5 caches are the bundled cache and 4 copies of its features written under made-up stage-1
seeds 1-4 (so that they are distinct caches of one dataset). This measures wall time only: the
copies hold the same features, so they are NOT replicate backbones and the table's numbers
(error bars over "backbones") mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltcache.cache import default_cache_path, load, write_cache  # noqa: E402
from ltcache.stage2 import api  # noqa: E402


def variants(base: Path, n: int) -> list[Path]:
    """The bundled cache and ``n - 1`` copies of its features under stage-1 seeds 1 .. n-1."""
    src = load(default_cache_path())
    man = src.manifest
    out = [default_cache_path()]
    for seed in range(1, n):
        splits = {s: (sp.features, sp.labels, sp.index, sp.views) for s, sp in src.splits.items()}
        out.append(write_cache(base / f"copy-{seed}", splits, src.weight, src.bias, dataset=man["dataset"],
                               class_counts=man["class_counts"], arch=man["arch"],
                               checkpoint_sha256=f"{seed:064x}", dtype="float32", stage1_seed=seed))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = dict(device="cpu", quiet=True, jobs=a.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        caches = variants(Path(tmp), a.caches)
        t = time.perf_counter()
        one = api.tune(caches[0], None, **kw)
        single = time.perf_counter() - t
        n1 = one["tune"]["stage_a"]["configurations"] + one["tune"]["stage_b"]["configurations"]
        t = time.perf_counter()
        many = api.tune([str(c) for c in caches], None, **kw)
        multi = time.perf_counter() - t
        nm = sum(c["results"]["tune"]["stage_a"]["configurations"] + c["results"]["tune"]["stage_b"]["configurations"]
                 for c in many["caches"])
    import os
    rec = {"caches": a.caches, "threads": torch.get_num_threads(), "jobs": a.jobs,
           "load_average_after": os.getloadavg(),
           "single": {"configurations": n1, "wall_s": round(single, 1), "per_configuration_s": single / n1},
           "multi": {"configurations": nm, "wall_s": round(multi, 1), "per_configuration_s": multi / nm},
           "note": "wall time only: the extra caches are copies of the bundled features under made-up seeds"}
    print(json.dumps(rec, indent=1))
    if a.out:
        from ltcache.stage2.results import write_json
        write_json(rec, a.out)


if __name__ == "__main__":
    main()
