"""Cost per step of the autograd fallback (a loss given only as a forward) vs the analytic loss gradient.

Run by hand (not by CI):  python benchmarks/bench_fallback.py [--members 20] [--batch 128] [--classes 10,100]
                                                              [--dim 64] [--repeats 7] [--threads 1]

For a group of M members (batch B, K classes, feature dim D) it times, per step:

* ``dz only``: the loss gradient dL/dz of the group -- the built-in ``ce`` / ``los`` through
  ``batched_loss_grad`` vs the same losses written as plain forwards (``F.cross_entropy``)
  through the fallback, both as ``torch.func.vmap(grad)`` over the members (the default for a
  run of >= VMAP_MIN members with one loss and one set of hyper-parameters) and as one autograd
  call on the summed per-member losses (the default for shorter runs and for forwards vmap
  cannot run); and with a different delta per member (the grid case: M runs of one member),
  as one autograd call (the default) and as vmap per member;
* ``whole step``: ``train_group`` of the M members for one epoch of synthetic features
  (N 12,406 rows, the CIFAR-10-LT size), wall time / steps, which includes the gather, the
  two matmuls, the head backward and the update.

Each number is the median of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltcache.plugins import isolated_registry  # noqa: E402
from ltcache.stage2.losses import batched_loss_grad, build_loss, loss_targets, register_loss, stack_specs  # noqa: E402
from ltcache.stage2.losses._fallback import LOOP, VMAP, VMAP_MIN, AutogradLossGrad  # noqa: E402
from ltcache.stage2.params import Param  # noqa: E402


def median_time(fn, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean seconds of ``inner`` calls."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return statistics.median(out)


def lt_counts(k: int, n_max: int = 5000, ratio: float = 100.0) -> torch.Tensor:
    return torch.tensor([max(1, int(n_max * ratio ** (-j / max(1, k - 1)))) for j in range(k)])


def dz_only(m: int, b: int, k: int, repeats: int) -> dict:
    counts = lt_counts(k)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, k, b, generator=g)
    y = torch.randint(k, (m, b), generator=g)
    valid = torch.ones(m, b)
    out = {}
    for kind, params in (("ce", {}), ("los", {"delta": 0.9})):
        lb = stack_specs([build_loss(kind, params, counts)] * m, counts, "cpu")
        t = loss_targets(lb, y, valid)
        out[f"analytic {kind}"] = median_time(lambda: batched_loss_grad(z, None, None, lb, t), repeats, 200)
        same = [build_loss(f"user-{kind}", params, counts)] * m
        for label, mode in (("vmap (default)", VMAP), ("one autograd call", LOOP)):
            fb = AutogradLossGrad(same, ["bench"] * m, counts, "cpu", mode=mode)
            out[f"fallback {kind}, {label}"] = median_time(lambda: fb(z, y, valid, [b] * m, True), repeats, 20)
    grid = [build_loss("user-los", {"delta": 0.5 + 0.02 * i}, counts) for i in range(m)]
    for label, vmin in (("one autograd call (default)", VMAP_MIN), ("vmap per member", 1)):
        fb = AutogradLossGrad(grid, ["bench"] * m, counts, "cpu", vmap_min=vmin)
        out[f"fallback los, {m} deltas, {label}"] = median_time(lambda: fb(z, y, valid, [b] * m, True), repeats, 10)
    return out


def whole_step(m: int, b: int, k: int, d: int, repeats: int) -> dict:
    from ltcache.stage2.methods import get_method, resolve_params
    from ltcache.stage2.api import make_config
    from ltcache.stage2.samplers import steps_per_epoch
    from ltcache.stage2.sweep import TrainData, train_group
    counts = lt_counts(k)
    n = int(counts.sum())
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((int(c),), j) for j, c in enumerate(counts)])
    centers = torch.randn(k, d, generator=g)
    x = (centers[labels] + torch.randn(n, d, generator=g)).unsqueeze(1)
    data = TrainData(x=x, labels=labels, w0=torch.randn(k, d, generator=g) * 0.1, b0=torch.zeros(k))
    steps = steps_per_epoch("ib", n, b)
    out = {}
    for method in ("ce", "user-ce", "los", "user-los"):
        meth = get_method(method)
        params = resolve_params(meth, "cifar", {"epochs": 1, "batch_size": b, **({"delta": 0.9} if "los" in method else {})}, n)
        cfgs = [make_config(meth, params, s, method, counts) for s in range(m)]
        out[f"step {method}"] = median_time(lambda: train_group(cfgs, data, quiet=True), repeats, 1) / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", default="10,100")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"M {args.members}, B {args.batch}, D {args.dim}; median of {args.repeats}")
    with isolated_registry():
        from ltcache.stage2.methods import LOS_CIFAR, register_method

        @register_loss("user-ce")
        def user_ce(z, y):
            return F.cross_entropy(z, y)

        @register_loss("user-los", params=[Param("delta", float, lo=0, hi=1)])
        def user_los(z, y, params):
            return F.cross_entropy(z, y, label_smoothing=params["delta"])

        register_method("user-ce", loss="user-ce", presets=LOS_CIFAR)
        register_method("user-los", loss="user-los", presets=dict(LOS_CIFAR, delta=0.9))
        for k in [int(v) for v in args.classes.split(",")]:
            res = {**dz_only(args.members, args.batch, k, args.repeats),
                   **whole_step(args.members, args.batch, k, args.dim, args.repeats)}
            print(f"\nK {k}")
            for name, sec in res.items():
                print(f"  {name:<52} {sec * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
