"""Epoch preparation and the samplers on their own: CPU seconds, one thread.

Run by hand:  python benchmarks/bench_prepare.py [--shape c10] [--reps 3]

Builds every engine group of ``bench --all-methods`` x 5 seeds on a synthetic shape of
``bench_engine.py``, runs ``prepare_epoch`` for every epoch of every group (no training), and
times one epoch of each sampler (B 128). CPU time (``time.process_time``), best of ``--reps``:
on a busy machine it moves far less than wall time. Compare two checkouts by running it with
``PYTHONPATH`` pointing at each, interleaved.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import synthetic_cache  # noqa: E402

from ltcache.stage2 import api  # noqa: E402
from ltcache.stage2 import samplers as S  # noqa: E402
from ltcache.stage2.methods import METHODS, choose_preset  # noqa: E402
from ltcache.stage2.sweep import GroupTrainer, TrainData, make_groups  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="c10")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cache = synthetic_cache(a.shape, torch.device("cpu"))
    tr = cache.splits["train"]
    n, _, d = tr.features.shape
    preset = choose_preset(cache.num_classes, d)
    cfgs = [api.make_config(m, p, s, m.name, cache.class_counts)
            for m, p, _ in api.expand(list(METHODS), None, None, preset, n) if not m.closed_form for s in range(5)]
    data = TrainData(x=tr.features.float(), labels=tr.labels.long(), w0=cache.weight.float(), b0=cache.bias.float())
    groups = [GroupTrainer([cfgs[i] for i in members], data) for members in make_groups(cfgs)]
    best: dict = {}
    for _ in range(a.reps):
        t = time.process_time()
        for g in groups:
            for e in range(g.epochs):
                g.prepare_epoch(e)
        best["prepare_all_groups_cpu_s"] = min(best.get("prepare_all_groups_cpu_s", 1e9), time.process_time() - t)
    gen = torch.Generator().manual_seed(0)
    for kind in ("ib", "cb", "sqrt", "progressive"):
        for _ in range(a.reps):
            t = time.process_time()
            for _ in range(20):
                S.epoch_indices(kind, data.class_index, 128, 3, 10, gen)
            key = f"sampler_{kind}_ms"
            best[key] = min(best.get(key, 1e9), (time.process_time() - t) / 20 * 1e3)
    print({k: round(v, 3) for k, v in best.items()})
    return best


if __name__ == "__main__":
    main()
