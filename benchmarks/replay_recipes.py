"""How far the stage-2 recipes before the source-faithful fix were from their sources' loops.

For each method whose recipe changed (the cosine stepped at the start of each epoch, the batches
per epoch, the parameters without weight decay, the progressive weight), trains one seed at its
preset on a cache three ways and prints the relative differences of the final heads:

* ``old``: the engine with the earlier recipe (``cosine`` after each epoch, the sampler's default
  batches per epoch, weight decay on every parameter, the progressive weight e / E);
* ``engine``: the engine with the method's recipe now;
* ``reference``: :func:`ltcache.stage2.reference.train_reference`, the plain PyTorch loop written
  as the source's script runs it.

    PYTHONPATH=$PWD python benchmarks/replay_recipes.py [--cache DIR] [--preset cifar] [--seed 0]

``--deviations`` instead measures the deviations the CIFAR presets keep from BagofTricks (test All,
mean and std over seeds 0-4): the progressive weight linspace(0, 1, E)[e] (cRT) against BoT's
(e + 1) / E, and cRT's ClassAwareSampler(4) against BoT's class-uniform draw with replacement
(the progressive sampler at weight 1) for cRT and LWS.

Results go into benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from ltcache.stage2 import api, samplers
from ltcache.stage2.methods import choose_preset, get_method, resolve_params
from ltcache.stage2.plan import _load_cache
from ltcache.stage2.reference import train_reference
from ltcache.stage2.samplers import epoch_samples, steps_per_epoch
from ltcache.stage2.sweep import train_sweep

CHANGED = ("maxnorm", "crt", "lws", "sqrt", "progressive", "balanced-softmax", "mislas", "cb-sigmoid", "cb-focal")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _all(cache, method: str, seeds=(0, 1, 2, 3, 4)) -> str:
    res = api.retrain(cache, method, seeds=seeds, quiet=True, device="cpu", jobs=1)
    acc = torch.tensor([r["metrics"]["all"] for r in res["runs"]])      # percent
    return f"{float(acc.mean()):.2f} ± {float(acc.std()):.2f}"


def deviations(cache) -> None:
    """The BagofTricks details the CIFAR presets do not follow, measured (see the module docstring)."""
    from ltcache.stage2.methods import METHODS, register_method
    print("| method | as registered | with BoT's detail | detail |")
    print("|---|---|---|---|")
    saved = samplers.progressive_lambda
    try:
        base = _all(cache, "progressive")
        samplers.progressive_lambda = lambda e, total: (e + 1) / total
        print(f"| progressive | {base} | {_all(cache, 'progressive')} | weight (e+1)/E instead of linspace(0,1,E) |")
        samplers.progressive_lambda = lambda e, total: 1.0                 # class-uniform, with replacement
        for name in ("crt", "lws"):
            m = METHODS[name]
            twin = f"{name}-bot-sampler"
            if twin not in METHODS:
                register_method(twin, loss=m.loss, head=m.head, sampler="progressive", init=m.init,
                                presets=m.presets, steps=m.steps, source="measurement only")
            print(f"| {name} | {_all(cache, name)} | {_all(cache, twin)} | BoT's class-uniform draw with "
                  "replacement instead of ClassAwareSampler(4) |")
    finally:
        samplers.progressive_lambda = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="cache directory (default: the bundled cache)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deviations", action="store_true", help="measure the BagofTricks details the presets keep")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = _load_cache(args.cache, torch.device("cpu"))
    if args.deviations:
        deviations(cache)
        return
    data = api._train_data(cache, torch.device("cpu"), "all")
    preset = choose_preset(cache.num_classes, cache.feature_dim, args.preset)
    ci = data.class_index
    print(f"cache {cache.path} N={ci.n} K={cache.num_classes} D={cache.feature_dim} preset {preset} seed {args.seed}")
    print("| method | batches/epoch old -> now | schedule old -> now | no wd | "
          "old vs reference W (b) | engine vs reference, max abs |")
    print("|---|---|---|---|---|---|")
    for name in CHANGED:
        m = get_method(name)
        params = resolve_params(m, preset, {}, ci.n)
        cfg = api.make_config(m, params, args.seed, name, cache.class_counts)
        old = dataclasses.replace(cfg, schedule="cosine", steps="", no_wd=())
        ref = train_reference(cfg, data)
        now = train_sweep([cfg], data, quiet=True, n_jobs=1)[0].layer
        saved = samplers.progressive_lambda
        samplers.progressive_lambda = lambda e, total: e / max(1, total)      # the earlier weight
        try:
            before = train_sweep([old], data, quiet=True, n_jobs=1)[0].layer
        finally:
            samplers.progressive_lambda = saved
        s_old = steps_per_epoch(cfg.sampler, ci.n, cfg.batch_size, "", epoch_samples(cfg.sampler, ci))
        s_new = steps_per_epoch(cfg.sampler, ci.n, cfg.batch_size, cfg.steps, epoch_samples(cfg.sampler, ci))
        diff = max(float((now[k] - ref[k]).abs().max()) for k in ("weight", "bias"))
        print(f"| {name} | {s_old} x {cfg.epochs} -> {s_new} x {cfg.epochs} | cosine -> {cfg.schedule} | "
              f"{','.join(cfg.no_wd) or '-'} | {100 * rel(before['weight'], ref['weight']):.2f} % "
              f"({100 * rel(before['bias'], ref['bias']):.2f} %) | {diff:.1e} |")


if __name__ == "__main__":
    main()
