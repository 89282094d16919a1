"""Where a sweep's time goes: each engine group of ``bench --all-methods`` timed on its own.

Run by hand:  python benchmarks/profile_groups.py --shape c100 [--device cuda] [--epochs-cap E]

For one synthetic feature shape of ``bench_engine.py``, the trained configurations of every
method x seed are split into the engine's groups (:func:`ltcache.stage2.sweep.group_key`) and
each group is trained alone (in this process, no worker processes). Per group it prints the
members, steps, FLOPs (4 B D K per member-step for heads that train W; the frozen-base table
for LWS/MARC), wall time, and the fraction of this machine's fp32 matmul rate; the total
line is the engine's training work without evaluation or closed-form methods.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_engine import matmul_rate, synthetic_cache  # noqa: E402

from ltcache.stage2 import api  # noqa: E402
from ltcache.stage2.methods import METHODS, choose_preset  # noqa: E402
from ltcache.stage2.heads import get_head  # noqa: E402
from ltcache.stage2.losses import loss_signature  # noqa: E402
from ltcache.stage2.samplers import steps_per_epoch  # noqa: E402
from ltcache.stage2.sweep import TrainData, frozen_base, group_key, train_group  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="c100", help="c10, c100 or imnet")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs-cap", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma list (default: all)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    seeds = [int(s) for s in a.seeds.split(",")]
    cache = synthetic_cache(a.shape, dev)
    tr = cache.splits["train"]
    n, v, d = tr.features.shape
    k = cache.num_classes
    preset = choose_preset(k, d)
    overrides = {"epochs": a.epochs_cap} if a.epochs_cap else None
    methods = a.methods.split(",") if a.methods else list(METHODS)
    cfgs = [api.make_config(m, p, s, m.name, cache.class_counts)
            for m, p, _ in api.expand(methods, overrides, None, preset, n) if not m.closed_form for s in seeds]
    data = TrainData(x=tr.features.float(), labels=tr.labels.long(), w0=cache.weight.float(), b0=cache.bias.float())
    groups: dict[tuple, list] = {}
    for c in cfgs:
        groups.setdefault(group_key(c), []).append(c)
    rate = matmul_rate(dev)
    rows = []
    for key, members in groups.items():
        family, base, bsz = key
        steps = [sum(steps_per_epoch(c.sampler, n, bsz) for _ in range(c.epochs)) for c in members]
        flops = 2.0 * n * v * d * k if base else 4.0 * bsz * d * k * sum(steps)
        sync(dev)
        t = time.perf_counter()
        train_group(sorted(members, key=lambda c: (loss_signature(c.loss), "s" in get_head(c.head).trained)),
                    data, quiet=True)
        sync(dev)
        wall = time.perf_counter() - t
        rows.append({"group": f"{'frozen-base ' if base else ''}{family} B={bsz}", "members": len(members),
                     "steps": max(steps), "flops": flops, "wall_s": wall,
                     "ms_per_step": 1e3 * wall / max(steps), "fraction": flops / wall / rate})
    rate = max(rate, matmul_rate(dev))
    for r in rows:
        r["fraction"] = r["flops"] / r["wall_s"] / rate
    tot_f, tot_w = sum(r["flops"] for r in rows), sum(r["wall_s"] for r in rows)
    print(f"{a.shape} on {dev}: fp32 matmul rate {rate / 1e9:.0f} GFLOP/s")
    print(f"{'group':<26}{'members':>8}{'steps':>7}{'GFLOP':>10}{'wall s':>9}{'ms/step':>9}{'fraction':>9}")
    for r in rows:
        print(f"{r['group']:<26}{r['members']:>8}{r['steps']:>7}{r['flops'] / 1e9:>10.0f}{r['wall_s']:>9.2f}"
              f"{r['ms_per_step']:>9.2f}{100 * r['fraction']:>8.1f}%")
    print(f"{'all groups':<26}{len(cfgs):>8}{'':>7}{tot_f / 1e9:>10.0f}{tot_w:>9.2f}{'':>9}"
          f"{100 * tot_f / tot_w / rate:>8.1f}%")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"shape": a.shape, "device": str(dev), "matmul_gflops": rate / 1e9, "groups": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
