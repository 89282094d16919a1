"""The step through static buffers on a CPU: eager, and compiled whole by ``torch.compile``; and
the groups stepped in turn (the CUDA-stream driver, ``ltcache.stage2.streams``) against one
after another. What the GPU paths cost or buy where they can be run here.

Run by hand (not by CI):  python benchmarks/probe_static_step.py --shape c10 [--steps 40] [--out F]

For one synthetic shape of ``bench_engine.py`` (all methods x 5 seeds, every engine group at
its preset batch size, one thread), per group:
* ms per step of the plain eager step (``GroupTrainer.step``) over the first epoch's steps
  (``--steps N``: its first N);
* the same step through the static buffers, eagerly (what a step adds to load its inputs: on
  a GPU the copies that precede a graph replay; the epoch's packing included);
* the static-buffer step compiled whole (``graphs`` mode ``compile``: on a CPU this is Inductor's
  C++ kernels, no CUDA graphs): the seconds of epoch 0 (it compiles each variant of the step it
  meets) and ms per step of epoch 1, and the largest difference of the trained weights from the
  eager ones after the same two epochs;
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


def compiled_epochs(g: GroupTrainer, n_steps: int) -> tuple[float, float]:
    """Epochs 0 and 1 through the compiled static step: (seconds of epoch 0, which compiles every
    variant of the step it meets, ms per step of epoch 1)."""
    st = StaticStep(g)
    st.cuda = True          # take StaticStep's CUDA branch, which in mode "compile" only calls torch.compile
    times = []
    with graphs.step_graphs("compile"):
        for e in (0, 1):
            ep = g.prepare_epoch(e)
            steps = range(min(ep.s_max, n_steps or ep.s_max))
            t = time.perf_counter()
            for s in steps:
                st.step(ep, s)
            times.append((time.perf_counter() - t, len(steps)))
    return times[0][0], 1e3 * times[1][0] / times[1][1]


def timed_epoch(step, ep, n_steps: int) -> float:
    """ms per step of ``step`` over epoch ``ep`` (its first ``n_steps``; 0: all)."""
    steps = range(min(ep.s_max, n_steps or ep.s_max))
    t = time.perf_counter()
    for s in steps:
        step(ep, s)
    return 1e3 * (time.perf_counter() - t) / len(steps)


def per_group(groups, data, n_steps: int) -> list[dict]:
    rows = []
    for cfgs in groups:
        eager, buffered, comp = GroupTrainer(cfgs, data), GroupTrainer(cfgs, data), GroupTrainer(cfgs, data)
        eager_ms = timed_epoch(eager.step, eager.prepare_epoch(0), n_steps)
        timed_epoch(eager.step, eager.prepare_epoch(1), n_steps)          # for the comparison with compiled
        with graphs.step_graphs("on"):
            static_ms = timed_epoch(StaticStep(buffered).step, buffered.prepare_epoch(0), n_steps)
        failed = len(graphs.STATS["failed"])
        try:
            first, comp_ms = compiled_epochs(comp, n_steps)
            diff = float((eager.p["W"] - comp.p["W"]).abs().max())
        except Exception as exc:                       # no C++ toolchain for Inductor, ...
            first = comp_ms = diff = None
            print(f"compile failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        row = {"group": f"{'frozen-base ' if eager.base else ''}{eager.family} B={eager.bsz}", "members": eager.m,
               "eager_ms_per_step": eager_ms, "static_buffers_ms_per_step": static_ms,
               "compiled_ms_per_step": comp_ms, "compiled_first_epoch_s": first,
               "max_abs_weight_diff_compiled": diff, "compile_failures": graphs.STATS["failed"][failed:]}
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
    ap.add_argument("--steps", type=int, default=0, help="steps timed per group (0: the whole first epoch)")
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
