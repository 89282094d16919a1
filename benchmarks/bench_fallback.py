"""Plugin losses vs the built-in ones: the loss-gradient call and the whole step.

Run by hand (not by CI):  python benchmarks/bench_fallback.py [--members 1,10,20] [--batch 128] [--classes 10]
                                                              [--dim 64] [--repeats 7] [--threads 1] [--no-inductor]

Two losses, each written twice:

* **logit-adjusted focal** (tau 1, gamma 2): built in as a composed :class:`ltcache.LossSpec`
  (an ``offset`` tau log pi plus the ``focal`` term: the analytic path), and as a forward-only
  plugin (``F.cross_entropy`` of the adjusted logits, then (1 - p)^gamma CE);
* **Poly-1** (epsilon 1): the built-in ``poly1`` loss vs a forward-only plugin.

For a group of M members with the same loss and hyper-parameters (batch B, K classes,
feature dim D) it times, per step:

* ``dz``: the loss gradient dL/dz of the group -- ``batched_loss_grad`` (built-in) vs the
  fallback's call (``AutogradLossGrad``), in the same run:

  - ``plugin`` (the default): the steady state, one TorchScript graph per run of members
    (layout in, the forward and its gradient traced with fake tensors, class-major softmax /
    NLL, loss-value ops dropped, constants folded, layout out);
  - ``fx graph``: the previous default, the flat traced FX graph called from Python with the
    general bookkeeping around it;
  - ``flat eager``: the members' samples end to end through eager autograd;
  - ``per member``: vmap of ``torch.func.grad`` over runs of >= 8 members, else one summed
    autograd call (the path before issue 24);
  - ``inductor`` (a candidate not taken): the flat gradient graph compiled by Inductor with
    fixed shapes; its compile time is printed below the table;

* ``step``: ``train_group`` of the M members for one epoch of synthetic features (N 12,406
  rows, the CIFAR-10-LT size), wall time / steps: gather, two matmuls, loss gradient, head
  backward, update;
* below the table, ``dz`` of a grid: the largest M Poly-1 members, each its own epsilon.

Each number is the median of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltcache.registry import isolated  # noqa: E402
from ltcache.stage2.losses import (LossSpec, batched_loss_grad, build_loss, get_loss, loss_targets,  # noqa: E402
                                   register_loss, stack_specs)
from ltcache.stage2.losses._fallback import AutogradLossGrad  # noqa: E402
from ltcache.stage2.losses.la import log_prior  # noqa: E402
from ltcache.stage2.params import Param  # noqa: E402

TAU, GAMMA, EPSILON = 1.0, 2.0, 1.0


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


def register_plugins() -> None:
    """The two losses as forward-only plugins, LA-focal also composed, and a method each."""
    from ltcache.stage2.methods import LOS_CIFAR, register_method

    @register_loss("la-focal", params=[Param("la_tau", float, lo=0), Param("focal_gamma", float, lo=0)])
    class LAFocal:
        """Composed: offset tau log pi + the focal term (the analytic path)."""

        def spec(self, p, counts, scale=1.0):
            return LossSpec(num_classes=len(counts), offset=p["la_tau"] * log_prior(counts),
                            terms={"focal": {"gamma": p["focal_gamma"]}})

    @register_loss("user-la-focal", params=[Param("la_tau", float, lo=0), Param("focal_gamma", float, lo=0)])
    def user_la_focal(z, y, params, counts):
        ce = F.cross_entropy(z + params["la_tau"] * torch.log(counts / counts.sum()), y, reduction="none")
        return ((1 - torch.exp(-ce)).clamp_min(1e-12) ** params["focal_gamma"] * ce).mean()

    @register_loss("user-poly1", params=[Param("poly_eps", float, lo=-1)])
    def user_poly1(z, y, params):
        ce = F.cross_entropy(z, y, reduction="none")
        p_y = torch.softmax(z, -1).gather(1, y[:, None]).squeeze(1)
        return (ce + params["poly_eps"] * (1 - p_y)).mean()

    la = dict(LOS_CIFAR, la_tau=TAU, focal_gamma=GAMMA)
    register_method("la-focal", loss="la-focal", presets=la)
    register_method("user-la-focal", loss="user-la-focal", presets=la)
    register_method("user-poly1", loss="user-poly1", presets=dict(LOS_CIFAR, poly_eps=EPSILON))


PAIRS = {  # name -> (built-in loss, params), (plugin loss, params), (built-in method, plugin method)
    "LA-focal": (("la-focal", {"la_tau": TAU, "focal_gamma": GAMMA}), ("user-la-focal", {"la_tau": TAU, "focal_gamma": GAMMA}),
                 ("la-focal", "user-la-focal")),
    "Poly-1": (("poly1", {"epsilon": EPSILON}), ("user-poly1", {"poly_eps": EPSILON}), ("poly1", "user-poly1")),
}


def dz_times(m: int, b: int, k: int, repeats: int, inductor: bool) -> dict:
    counts = lt_counts(k)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, k, b, generator=g)
    y = torch.randint(k, (m, b), generator=g)
    valid = torch.ones(m, b)
    out = {}
    for name, ((bl, bp), (pl, pp), _) in PAIRS.items():
        lb = stack_specs([build_loss(bl, bp, counts)] * m, counts, "cpu")
        t = loss_targets(lb, y, valid)
        out[(name, "dz", "built-in")] = median_time(lambda: batched_loss_grad(z, None, None, lb, t), repeats, 200)
        specs = [build_loss(pl, pp, counts)] * m
        for label, flat, trace, steady in (("plugin", True, True, True), ("fx graph", True, True, False),
                                           ("flat eager", True, False, False), ("per member", False, False, False)):
            fb = AutogradLossGrad(specs, ["bench"] * m, counts, "cpu", flat=flat, trace=trace, steady=steady)
            out[(name, "dz", label)] = median_time(lambda: fb(z, y, valid, [b] * m, True), repeats, 50)
        if inductor:
            out[(name, "dz", "inductor")], out[(name, "compile", "inductor")] = inductor_time(
                get_loss(pl), pp, counts.float(), z, y, repeats)
    return out


def inductor_time(unit, params: dict, counts: torch.Tensor, z: torch.Tensor, y: torch.Tensor, repeats: int):
    """The candidate not taken: the flat gradient graph compiled by Inductor (C++ kernels, fixed
    shapes) -- (seconds a call, including the layout changes in and out; seconds to compile)."""
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx
    m, k, b = z.shape
    takes_counts = "counts" in inspect.signature(unit.forward).parameters or \
        len(inspect.signature(unit.forward).parameters) >= 4

    def f(zz, yy):
        return unit.forward(zz, yy, params, counts) if takes_counts else unit.forward(zz, yy, params)

    zf = z.permute(1, 0, 2).reshape(k, m * b).t()
    yf = y.reshape(m * b)
    t0 = time.perf_counter()
    grad = torch.func.grad(lambda zz, yy: f(zz, yy) * m)
    gm = make_fx(grad, tracing_mode="fake", _allow_non_fake_inputs=True)(zf, yf)
    compiled = inductor_compile(gm, [zf, yf])
    compiled(zf, yf)
    secs = time.perf_counter() - t0

    def call():
        g = compiled(z.permute(1, 0, 2).reshape(k, m * b).t(), y.reshape(m * b))
        return g.t().reshape(k, m, b).permute(1, 0, 2)
    return median_time(call, repeats, 50), secs


def grid_times(m: int, b: int, k: int, repeats: int) -> tuple:
    """A tune grid over the plugin's own hyper-parameter: M Poly-1 members, each its own epsilon
    (each a run of one member on the fallback) -- (built-in, plugin) seconds a ``dz`` call."""
    counts = lt_counts(k)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, k, b, generator=g)
    y = torch.randint(k, (m, b), generator=g)
    valid = torch.ones(m, b)
    eps = [0.1 * (i + 1) for i in range(m)]
    lb = stack_specs([build_loss("poly1", {"epsilon": e}, counts) for e in eps], counts, "cpu")
    t = loss_targets(lb, y, valid)
    fb = AutogradLossGrad([build_loss("user-poly1", {"poly_eps": e}, counts) for e in eps], ["bench"] * m, counts, "cpu")
    return (median_time(lambda: batched_loss_grad(z, None, None, lb, t), repeats, 100),
            median_time(lambda: fb(z, y, valid, [b] * m, True), repeats, 20))


def step_times(m: int, b: int, k: int, d: int, repeats: int) -> dict:
    from ltcache.stage2.api import make_config
    from ltcache.stage2.methods import get_method, resolve_params
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
    for name, (_, _, methods) in PAIRS.items():
        for label, method in zip(("built-in", "plugin"), methods):
            meth = get_method(method)
            params = resolve_params(meth, "cifar", {"epochs": 1, "batch_size": b}, n)
            cfgs = [make_config(meth, params, s, method, counts) for s in range(m)]
            out[(name, "step", label)] = median_time(lambda: train_group(cfgs, data, quiet=True), repeats, 1) / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", default="1,10,20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-inductor", action="store_true", help="skip the Inductor candidate (compiles for minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    members = [int(v) for v in args.members.split(",")]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"B {args.batch}, K {args.classes}, D {args.dim}; median of {args.repeats}; ms per call / per step")
    with isolated():
        register_plugins()
        res = {}
        for m in members:
            res[m] = {**dz_times(m, args.batch, args.classes, args.repeats, not args.no_inductor),
                      **step_times(m, args.batch, args.classes, args.dim, args.repeats)}
        gb, gp = grid_times(max(members), args.batch, args.classes, args.repeats)
    others = ["fx graph", "flat eager", "per member"] + ([] if args.no_inductor else ["inductor"])
    print("\n| loss | what | M | built-in | plugin | plugin / built-in | " + " | ".join(others) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(others))
    for name in PAIRS:
        for what in ("dz", "step"):
            for m in members:
                r = res[m]
                bi, pl = r[(name, what, "built-in")], r[(name, what, "plugin")]
                cols = [r.get((name, what, k)) for k in others]
                print(f"| {name} | {what} | {m} | {bi * 1e3:.3f} | {pl * 1e3:.3f} | **{pl / bi:.2f}x** | "
                      + " | ".join('' if c is None else f'{c * 1e3:.3f} ({c / bi:.1f}x)' for c in cols) + " |")
    print(f"\nPoly-1 with {max(members)} members, each its own epsilon (a grid over the plugin's hyper-parameter), "
          f"dz: built-in {gb * 1e3:.3f}, plugin {gp * 1e3:.3f} ms, **{gp / gb:.1f}x**")
    if not args.no_inductor:
        print("\nInductor compile (s): " + ", ".join(f"{name} M {m}: {res[m][(name, 'compile', 'inductor')]:.1f}"
                                               for name in PAIRS for m in members))


if __name__ == "__main__":
    main()
