"""``--precision bf16`` against fp32: the accuracy change on a real cache, the speed on the
engine's shapes. Run by hand (not by CI):

    python benchmarks/bench_precision.py --accuracy [--cache DIR] --speed c10,c100 --out benchmarks/precision.json

Accuracy: ``bench --all-methods --seeds 0,1,2,3,4`` on the cache (default: the bundled one)
once in fp32 and once in bf16, every method's mean test All (top-1 %) and val-balanced side by
side. Speed: the same all-methods 5-seed sweep on the synthetic shapes of ``bench_engine.py``,
wall time in fp32 and bf16 measured in the same run, with this machine's fp32 and bf16 2048^3
matmul rates, and the accuracy change there too (synthetic float32 features, so bf16's rounding
of them is real; the bundled cache stores float16). Nothing is extrapolated.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_engine import synthetic_cache  # noqa: E402

from ltcache.stage2 import api  # noqa: E402

SEEDS = [0, 1, 2, 3, 4]


def mm_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def per_method(res: dict) -> dict:
    rows: dict[str, list] = {}
    for r in res["runs"]:
        rows.setdefault(r["name"], []).append(r)
    out = {}
    for name, runs in rows.items():
        val = [r["val"]["balanced"] for r in runs if r.get("val") and r["val"].get("balanced") is not None]
        out[name] = {"all": statistics.mean(r["metrics"]["all"] for r in runs),
                     "val_balanced": statistics.mean(val) if val else None}
    return out


def accuracy(cache) -> dict:
    out = {}
    for prec in ("fp32", "bf16"):
        t = time.perf_counter()
        res = api.bench(cache, None, seeds=SEEDS, device="cpu", quiet=True, precision=prec)
        out[prec] = {"wall_s": time.perf_counter() - t, "methods": per_method(res)}
    a, b = out["fp32"]["methods"], out["bf16"]["methods"]
    deltas = {n: b[n]["all"] - a[n]["all"] for n in a}
    out["delta_all"] = deltas
    out["max_abs_delta"] = max(abs(d) for d in deltas.values())
    out["mean_abs_delta"] = statistics.mean(abs(d) for d in deltas.values())
    print(f"{'method':58s} {'fp32 All':>9s} {'bf16 All':>9s} {'delta':>7s}")
    for n in sorted(a, key=lambda n: -a[n]["all"]):
        print(f"{n:58s} {a[n]['all']:9.2f} {b[n]['all']:9.2f} {deltas[n]:+7.2f}")
    print(f"max |delta| {out['max_abs_delta']:.2f}, mean |delta| {out['mean_abs_delta']:.2f} (points, 5-seed means); "
          f"wall fp32 {out['fp32']['wall_s']:.1f} s, bf16 {out['bf16']['wall_s']:.1f} s")
    return out


def speed(shape: str) -> dict:
    cache = synthetic_cache(shape, torch.device("cpu"))
    out = {"fp32_mm_gflops": mm_rate(torch.float32) / 1e9, "bf16_mm_gflops": mm_rate(torch.bfloat16) / 1e9}
    acc = {}
    for prec in ("fp32", "bf16"):
        t = time.perf_counter()
        res = api.bench(cache, None, seeds=SEEDS, device="cpu", quiet=True, precision=prec)
        out[f"{prec}_sweep_s"] = time.perf_counter() - t
        acc[prec] = per_method(res)
    out["speedup"] = out["fp32_sweep_s"] / out["bf16_sweep_s"]
    deltas = [abs(acc["bf16"][n]["all"] - acc["fp32"][n]["all"]) for n in acc["fp32"]]
    out["max_abs_delta_all"], out["mean_abs_delta_all"] = max(deltas), statistics.mean(deltas)
    print(f"{shape}: sweep fp32 {out['fp32_sweep_s']:.1f} s, bf16 {out['bf16_sweep_s']:.1f} s (x{out['speedup']:.2f}); "
          f"2048^3 mm fp32 {out['fp32_mm_gflops']:.0f}, bf16 {out['bf16_mm_gflops']:.0f} GFLOP/s; "
          f"All (synthetic features) max |delta| {out['max_abs_delta_all']:.2f}, mean {out['mean_abs_delta_all']:.3f} points")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--accuracy", action="store_true", help="fp32 vs bf16 accuracy on --cache")
    ap.add_argument("--cache", default=None, help="cache folder (default: the bundled cache)")
    ap.add_argument("--speed", default="", help="comma list of bench_engine shapes (c10, c100) to time")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "seeds": SEEDS}
    if a.accuracy:
        report["accuracy"] = accuracy(a.cache)
    for shape in [s for s in a.speed.split(",") if s]:
        report.setdefault("speed", {})[shape] = speed(shape)
    if a.out:
        from ltcache.stage2.results import write_json
        write_json(report, a.out)                 # a temporary name, then a rename
    return report


if __name__ == "__main__":
    main()
