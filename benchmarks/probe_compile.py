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


if __name__ == "__main__":
    main()
