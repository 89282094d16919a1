"""The step through static buffers on a CPU: eager, and compiled whole by ``torch.compile``; and
the groups stepped in turn (the CUDA-stream driver, ``ltcache.stage2.streams``) against one
after another. What the GPU paths cost or buy where they can be run here.

Run by hand (not by CI):  python benchmarks/probe_static_step.py --shape c10 [--steps 40] [--out F]

For one synthetic shape of ``bench_engine.py`` (all methods x 5 seeds, every engine group at
its preset batch size, one thread), per group:
* ms per step of the plain eager step (``GroupTrainer.step``) over the first epoch's steps;
* the same step through the static buffers, eagerly (what a step adds to load its inputs: on
  a GPU the copies that precede a graph replay), and whether its weights equal the eager ones;
* the static-buffer step compiled whole (``graphs`` mode ``compile``: on a CPU this is Inductor's
  C++ kernels, no CUDA graphs): the seconds of the first three calls (the compile) and ms per
  step after them, and the largest difference of the trained weights from the eager ones after
  the same steps;
then the whole sweep's groups trained in this process one after another and stepped in turn
(``streams.train_groups``; on a CPU there are no streams, so this measures the driver's own
cost), CPU seconds, at ``--epochs`` epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import synthetic_cache  # noqa: E402

from ltcache.stage2 import api, graphs  # noqa: E402
from ltcache.stage2.graphs import StaticStep  # noqa: E402
from ltcache.stage2.group import GroupTrainer, train_group  # noqa: E402
from ltcache.stage2.grouping import make_groups  # noqa: E402
from ltcache.stage2.methods import METHODS, choose_preset  # noqa: E402
from ltcache.stage2.plan import TrainData  # noqa: E402
from ltcache.stage2.streams import train_groups  # noqa: E402


def setup(shape: str, epochs: int):
    cache = synthetic_cache(shape, torch.device("cpu"))
    tr = cache.splits["train"]
    n = int(tr.labels.numel())
    preset = choose_preset(cache.num_classes, cache.feature_dim)
    cfgs = [api.make_config(m, p, s, m.name, cache.class_counts)
            for m, p, _ in api.expand(list(METHODS), {"epochs": epochs}, None, preset, n) if not m.closed_form
            for s in range(5)]
    data = TrainData(x=tr.features.float(), labels=tr.labels.long(), w0=cache.weight.float(), b0=cache.bias.float())
    return [[cfgs[i] for i in members] for members in make_groups(cfgs)], data


def static_compiled(g: GroupTrainer, ep, steps: range) -> tuple[float, float]:
    """(seconds of the first three compiled steps, ms per step after them)."""
    st = StaticStep(g)
    st.cuda = True          # take StaticStep's CUDA branch, which in mode "compile" only calls torch.compile
    with graphs.step_graphs("compile"):
        def one(s):
            st.step(ep, s)
        t = time.perf_counter()
        for s in steps[:3]:
            one(s)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for s in steps[3:]:
            one(s)
    return first, 1e3 * (time.perf_counter() - t) / max(1, len(steps) - 3)


def per_group(groups, data, n_steps: int) -> list[dict]:
    rows = []
    for cfgs in groups:
        eager, comp = GroupTrainer(cfgs, data), GroupTrainer(cfgs, data)
        ep = eager.prepare_epoch(0)
        steps = range(min(ep.s_max, n_steps))
        t = time.perf_counter()
        for s in steps:
            eager.step(ep, s)
        eager_ms = 1e3 * (time.perf_counter() - t) / len(steps)
        failed = len(graphs.STATS["failed"])
        buffered = GroupTrainer(cfgs, data)
        st, bep = StaticStep(buffered), buffered.prepare_epoch(0)
        with graphs.step_graphs("on"):
            t = time.perf_counter()
            for s in steps:
                st.step(bep, s)
            static_ms = 1e3 * (time.perf_counter() - t) / len(steps)
        try:
            first, comp_ms = static_compiled(comp, comp.prepare_epoch(0), steps)
            diff = float((eager.p["W"] - comp.p["W"]).abs().max())
        except Exception as exc:                       # no C++ toolchain for Inductor, ...
            first = comp_ms = diff = None
            print(f"compile failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        row = {"group": f"{'frozen-base ' if eager.base else ''}{eager.family} B={eager.bsz}", "members": eager.m,
               "eager_ms_per_step": eager_ms, "static_buffers_ms_per_step": static_ms,
               "static_equal": torch.equal(eager.p["W"], buffered.p["W"]), "compiled_ms_per_step": comp_ms, "compile_first_3_steps_s": first,
               "max_abs_weight_diff": diff, "compile_failures": graphs.STATS["failed"][failed:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def interleaved(groups, data, reps: int) -> dict:
    """CPU seconds of the sweep's groups one after another vs stepped in turn, alternated."""
    seq, turn = [], []
    for _ in range(reps):
        t = cpu_seconds()
        a = [train_group(c, data, quiet=True) for c in groups]
        seq.append(cpu_seconds() - t)
        t = cpu_seconds()
        b = train_groups(groups, data, quiet=True)
        turn.append(cpu_seconds() - t)
    same = all(torch.equal(x.layer["weight"], y.layer["weight"]) for ga, gb in zip(a, b) for x, y in zip(ga, gb))
    return {"sequential_cpu_s": sorted(seq)[len(seq) // 2], "in_turn_cpu_s": sorted(turn)[len(turn) // 2],
            "reps": reps, "identical_heads": same}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="c10")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per group")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the interleaving comparison")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    groups, data = setup(a.shape, a.epochs)
    out = {"shape": a.shape, "threads": 1, "groups": per_group(groups, data, a.steps),
           "interleaved": interleaved(groups, data, a.reps)}
    print(json.dumps(out["interleaved"]))
    if a.out:
        with open(a.out + ".part", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(a.out + ".part", a.out)
    return out


if __name__ == "__main__":
    main()
