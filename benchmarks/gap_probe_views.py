"""Gap probe (README, cached vs image pipeline): LOS and CE trained on only the first n augmented
views of a cache (no clean view), n = 1..V-1. Run from the repository root after the real run:

    python benchmarks/gap_probe_views.py [CACHE]     # default: runs/gpu/ir100/cache
"""
import statistics as st
import sys

from ltcache.cache import load
from ltcache.stage2 import api

path = sys.argv[1] if len(sys.argv) > 1 else "runs/gpu/ir100/cache"
views = len(load(path, splits=("train",), quiet=True).splits["train"].views)
for n in range(1, views):
    c = load(path, device="cpu", quiet=True)
    tr = c.splits["train"]
    tr.features = tr.features[:, 1:1 + n].contiguous()
    tr.views = tr.views[1:1 + n]
    for m in ("los", "ce"):
        r = api.retrain(c, m, seeds=(0, 1, 2), quiet=True, device="cpu", jobs=1)
        a = [x["metrics"]["all"] for x in r["runs"]]
        print(f"aug views {n}: {m} {st.mean(a):.2f} +- {st.pstdev(a):.2f}", flush=True)
