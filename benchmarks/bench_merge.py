"""Merged groups (one step stream per head family, batch sizes padded) against one per batch size.

Run by hand:  python benchmarks/bench_merge.py [--shape c10] [--reps 3] [--modes off,frozen,pair-64-128,auto]
              [--epochs-cap E] [--methods a,b] [--seeds 0,1] [--sweep] [--check] [--out FILE]

Builds the trained configurations of ``bench --all-methods`` x 5 seeds on a synthetic shape of
``bench_engine.py`` and, per merge mode (:func:`ltcache.stage2.workers.merge_plan`'s ``off`` / ``on`` / ``auto``, or
``frozen`` / ``pair-B1-B2``: one kind of merge forced, see :func:`make_plan`), prints the
plan: each group's members, batch sizes, steps and the cost model's work. Then it trains every
group of each mode in this process on one thread, the modes alternating ``--reps`` times, and
reports the CPU seconds (``time.process_time``: on a busy machine it moves far less than wall
time) of each run and their median. ``--sweep`` also times the whole sweep as ``bench`` runs
it (``api.bench``, worker processes included: CPU seconds of this process and its waited-for
children). ``--check`` compares every head trained merged with the same head trained unmerged
(the largest absolute difference; the engine's contract is 1e-5).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import synthetic_cache  # noqa: E402

from ltcache.stage2 import api, workers  # noqa: E402
from ltcache.stage2 import sweep as sweep_mod  # noqa: E402
from ltcache.stage2.methods import METHODS, choose_preset  # noqa: E402
from ltcache.stage2.sweep import TrainData, group_key, make_groups, train_group  # noqa: E402


def _cpu_with_children() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def describe(plan, cfgs, data) -> list[dict]:
    """One row per group of ``plan``: members, batch sizes, steps (paused ones), modelled work."""
    n = data.x.shape[0]
    rows = []
    for members in plan:
        c0 = cfgs[members[0]]
        steps, paused = workers._steps(cfgs, members, n)
        frozen = {workers.frozen_base(cfgs[i]) for i in members}
        rows.append({"family": {(True,): "frozen-base ", (False,): "", (False, True): "(+frozen) "}[tuple(sorted(frozen))]
                     + c0.kind.family,
                     "members": len(members), "batch_sizes": sorted({cfgs[i].batch_size for i in members}),
                     "steps": steps, "paused_steps": paused, "model_s": workers._work(cfgs, members, data) / 1.5e10})
    return rows


def make_plan(mode: str, cfgs, data) -> list[list[int]]:
    """``off`` / ``on`` / ``auto`` (:func:`workers.merge_plan`); ``pair-B1-B2``: only the groups of
    batch sizes B1 and B2 merged (per head family and frozen-base or not); ``frozen``: only the
    frozen-base groups merged into their family's group of the same batch size -- whatever the
    cost model says."""
    plan = make_groups(cfgs)
    if mode in workers.MERGE_MODES:
        return workers.merge_plan(plan, cfgs, data, mode)
    sizes = {int(b) for b in mode.split("-")[1:]} if mode.startswith("pair-") else None
    if sizes is None and mode != "frozen":
        raise SystemExit(f"unknown mode {mode}")
    merged: dict = {}
    out = []
    for p in plan:
        c = cfgs[p[0]]
        if sizes is None:
            merged.setdefault((c.kind.family, c.batch_size), []).extend(p)
        elif c.batch_size in sizes:
            merged.setdefault(group_key(c)[:2], []).extend(p)
        else:
            out.append(p)
    return list(merged.values()) + out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="c10")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="off,pair-64-128", help="off, on, auto, frozen or pair-B1-B2 (comma list)")
    ap.add_argument("--epochs-cap", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma list (default: all; e.g. a few with 1 seed: small groups)")
    ap.add_argument("--sweep", action="store_true", help="also time api.bench (all methods, workers included)")
    ap.add_argument("--check", action="store_true", help="compare merged heads with unmerged ones")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = synthetic_cache(a.shape, torch.device("cpu"))
    tr = cache.splits["train"]
    n, _, d = tr.features.shape
    preset = choose_preset(cache.num_classes, d)
    overrides = {"epochs": a.epochs_cap} if a.epochs_cap else None
    methods = a.methods.split(",") if a.methods else list(METHODS)
    cfgs = [api.make_config(m, p, s, m.name, cache.class_counts)
            for m, p, _ in api.expand(methods, overrides, None, preset, n) if not m.closed_form for s in seeds]
    data = TrainData(x=tr.features.float(), labels=tr.labels.long(), w0=cache.weight.float(), b0=cache.bias.float())
    plans = {mode: make_plan(mode, cfgs, data) for mode in modes}
    out: dict = {"shape": a.shape, "configs": len(cfgs), "plans": {}, "train_cpu_s": {}, "sweep_cpu_s": {}}
    for mode, plan in plans.items():
        rows = describe(plan, cfgs, data)
        out["plans"][mode] = rows
        print(f"{mode}: {len(plan)} groups, {sum(r['steps'] for r in rows)} group-steps, "
              f"model {sum(r['model_s'] for r in rows):.2f} s")
        for r in rows:
            print(f"   {r['family']:<20} x{r['members']:<4} B {r['batch_sizes']}  {r['steps']} steps "
                  f"({r['paused_steps']} paused)  model {r['model_s']:.2f} s")
    heads: dict = {}
    for rep in range(a.reps):
        for mode in modes:
            t = time.process_time()
            trained = {}
            for members in plans[mode]:
                for i, h in zip(members, train_group([cfgs[i] for i in members], data, quiet=True)):
                    trained[i] = h
            out["train_cpu_s"].setdefault(mode, []).append(time.process_time() - t)
            heads.setdefault(mode, trained)
            print(f"rep {rep} {mode}: groups trained in {out['train_cpu_s'][mode][-1]:.2f} CPU s (1 thread)", flush=True)
        if a.sweep:
            torch.set_num_threads(threads)
            for mode in modes:
                t = _cpu_with_children()
                real = sweep_mod.merge_plan         # the sweep's plan in this mode (forked workers inherit it)
                sweep_mod.merge_plan = lambda plan, configs, data, mode=mode: make_plan(mode, configs, data)
                try:
                    api.bench(cache, methods, seeds=seeds, overrides=overrides, quiet=True)
                finally:
                    sweep_mod.merge_plan = real
                out["sweep_cpu_s"].setdefault(mode, []).append(_cpu_with_children() - t)
                print(f"rep {rep} {mode}: bench sweep {out['sweep_cpu_s'][mode][-1]:.2f} CPU s (workers incl.)",
                      flush=True)
            torch.set_num_threads(1)
    for key in ("train_cpu_s", "sweep_cpu_s"):
        for mode, xs in out[key].items():
            print(f"{key} {mode}: median {statistics.median(xs):.2f} of {[round(x, 2) for x in xs]}")
    if a.check and "off" in heads:
        for mode in heads:
            if mode == "off":
                continue
            diff = 0.0
            for i, h in heads[mode].items():
                ref = heads["off"][i].layer
                for key, t in h.layer.items():
                    if isinstance(t, torch.Tensor) and key in ref:
                        diff = max(diff, float((t - ref[key]).abs().max()))
            out.setdefault("max_abs_diff_vs_off", {})[mode] = diff
            print(f"{mode} vs off: largest head difference {diff:.2e}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
