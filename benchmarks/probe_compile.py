"""Does ``torch.compile`` shorten an engine step on a CPU? One D 64 group, measured.

Run by hand (not by CI):  python benchmarks/probe_compile.py

The group: ten instance-balanced methods of the registry x 5 seeds at batch 128 on the bundled
CIFAR-10-LT cache (50 members of one linear group, one thread). It times, per step (median of
the first epoch's steps after the first call):
* the whole ``GroupTrainer.step`` eager, and compiled as it is (``torch.compile(step)``): the
  step index is a Python int, so Dynamo specialises on it and recompiles until its limit;
* the tensor part alone -- head forward + the batched loss gradient, given the step's features
  and loss targets as tensors -- eager and compiled.
It prints the compile times and the largest difference from eager.

``python benchmarks/probe_compile.py --groups c10`` (or c100) asks the question for whole
sweeps: every engine group of ``bench --all-methods`` (5 seeds, source epochs) timed alone by
``profile_groups.py``, eager and then with the engine's loss gradient compiled once per group
(``torch.compile(dynamic=False)`` of ``batched_loss_grad`` with the group's stacked losses
bound), the first calls (compile, or Inductor's on-disk cache) timed separately.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltcache.cache import load  # noqa: E402
from ltcache.stage2 import api  # noqa: E402
from ltcache.stage2 import heads as H  # noqa: E402
from ltcache.stage2.losses import batched_loss_grad  # noqa: E402
from ltcache.stage2.methods import get_method, resolve_params  # noqa: E402
from ltcache.stage2.sweep import GroupTrainer, group_key  # noqa: E402

METHODS = ["ce", "los", "la-loss", "focal", "ls", "cb", "vs", "seesaw", "lade", "poly1"]


def group(cache, data):
    n = int(cache.splits["train"].labels.numel())
    cfgs = [api.make_config(get_method(m), resolve_params(get_method(m), "cifar", {"batch_size": 128, "epochs": 2}, n),
                            seed, m, cache.class_counts) for m in METHODS for seed in range(5)]
    key = group_key(cfgs[0])
    return [c for c in cfgs if group_key(c) == key]


def timed(call, args_per_step):
    t0 = time.perf_counter()
    call(*args_per_step[0])
    first = time.perf_counter() - t0
    times = []
    for a in args_per_step[1:]:
        t = time.perf_counter()
        call(*a)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def main(steps: int = 60) -> None:
    torch.set_num_threads(1)
    cache = load(None, quiet=True)
    data = api._train_data(cache, torch.device("cpu"), "all")
    cfgs = group(cache, data)
    print(f"torch {torch.__version__}, 1 thread, group {group_key(cfgs[0])} x{len(cfgs)}")
    for compiled in (False, True):
        g = GroupTrainer(cfgs, data, "last")
        ep = g.prepare_epoch(0)
        step = torch.compile(g.step, dynamic=False) if compiled else g.step
        first, med = timed(step, [(ep, s) for s in range(min(steps, ep.s_max))])
        print(f"whole step {'compiled' if compiled else 'eager   '}: first call {first:.2f} s, median {med * 1e3:.3f} ms")
    for compiled in (False, True):
        g = GroupTrainer(cfgs, data, "last")
        ep = g.prepare_epoch(0)

        def fwd_grad(xb, t, g=g):
            z, _ = H.forward_train(g.family, g.pf, g.tbuf, xb, g.base)
            return batched_loss_grad(z, None, None, g.lb, t)

        f = torch.compile(fwd_grad, dynamic=False) if compiled else fwd_grad
        args = [(g.features(ep, s), ep.targets[s]) for s in range(min(steps, ep.s_max))]
        first, med = timed(f, args)
        diff = (f(*args[-1]) - fwd_grad(*args[-1])).abs().max().item()
        print(f"forward + loss grad {'compiled' if compiled else 'eager   '}: first call {first:.2f} s, "
              f"median {med * 1e3:.3f} ms, max |diff| {diff:.1e}")


def groups(shape: str) -> None:
    """Every group of a sweep, eager vs. its loss gradient compiled (first calls timed apart)."""
    import profile_groups
    from ltcache.stage2 import group as sweep          # where the step calls batched_loss_grad

    print(f"== eager ({shape})")
    eager = profile_groups.main(["--shape", shape])
    plain, compiled, first = sweep.batched_loss_grad, {}, [0.0]

    def loss_grad(z, y, valid, lb, targets=None):
        f = compiled.get(id(lb))
        if f is None:
            f = compiled[id(lb)] = torch.compile(lambda zz, tt, lb=lb: plain(zz, None, None, lb, tt), dynamic=False)
            t = time.perf_counter()
            out = f(z, targets)
            first[0] += time.perf_counter() - t
            return out
        return f(z, targets)

    sweep.batched_loss_grad = loss_grad
    try:
        print(f"== loss gradient compiled per group ({shape})")
        comp = profile_groups.main(["--shape", shape])
    finally:
        sweep.batched_loss_grad = plain
    print(f"first calls (compile / cache load): {first[0]:.1f} s in all")
    for e, c in zip(eager, comp):
        print(f"{e['group']:26s} eager {e['ms_per_step']:7.2f} ms/step   compiled {c['ms_per_step']:7.2f} ms/step "
              "(first call included)")
    print(f"all groups: eager {sum(r['wall_s'] for r in eager):.1f} s, compiled {sum(r['wall_s'] for r in comp):.1f} s "
          f"of which {first[0]:.1f} s first calls")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default=None, help="c10 or c100: time whole sweep groups eager vs compiled loss")
    a = ap.parse_args()
    if a.groups:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        torch.set_num_threads(1)
        groups(a.groups)
    else:
        main()
