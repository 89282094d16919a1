"""Gap probe (README, cached vs image pipeline): LOS and CE on the paper-like cache trained on
only the first n augmented views (no clean view). Run from the repository root after the real run."""
import statistics as st
from ltcache.cache import load
from ltcache.stage2 import api
for n in (1, 2, 3, 4):
    c = load("runs/cifar10_lt_ir100/cache", device="cpu")
    tr = c.splits["train"]
    tr.features = tr.features[:, 1:1 + n].contiguous()
    tr.views = tr.views[1:1 + n]
    for m in ("los", "ce"):
        r = api.retrain(c, m, seeds=(0, 1, 2), quiet=True, device="cpu", jobs=1)
        a = [x["metrics"]["all"] for x in r["runs"]]
        print(f"aug views {n}: {m} {st.mean(a):.2f} +- {st.pstdev(a):.2f}", flush=True)
