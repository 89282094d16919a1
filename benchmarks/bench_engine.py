"""Speed of the batched stage-2 engine vs a plain one-configuration-at-a-time PyTorch loop.

Run by hand (not by CI):  python benchmarks/bench_engine.py --shapes c10,c100 [--quick]

For each feature shape (random, class-separable features; counts of the real LT profile):
* wall time of ``bench(all methods, seeds)`` at each method's preset epochs and batch size;
* FLOPs of that work (training: 4 B D K per config-step -- forward logits and dW -- for heads
  that train W; heads on the frozen stage-1 layer (LWS, MARC) do no D-sized work per step, only
  the one-off base logits 2 N V D K of their group; evaluation: 2 N D K per run on the
  view-mean features, per view for cosine and NCM layers, closed forms once) and
  the achieved fraction of this machine's fp32 matmul rate, measured in the same run with
  large square ``torch.mm`` (the best of two measurements);
* the same trained configurations one at a time by the **fastest plain loop**: batches gathered
  by tensor indexing (``x[idx]``), one ``nn.Linear``, autograd, ``torch.optim.SGD``, CE, the
  configuration's batch size, epochs and steps per epoch. It runs at its best thread setting
  (1 thread or all threads, chosen by timing one configuration both ways in the same run) and,
  separately, as one single-thread process per core side by side (configurations dealt out
  longest first) -- the way a user with a loop script fills a multi-core box;
* the ``DataLoader(TensorDataset)`` loop as a second row (it fetches samples one by one).
  ``--loop-sample N`` times N configurations of a loop in full and extrapolates the rest by step
  count; ``--loop-sample 0`` (the default for the D 64 shape) times every configuration. The
  report says what was timed and what was extrapolated.

``--epochs-cap E`` trains every method for at most E epochs (for the ImageNet-LT shape on a
CPU, where the source epochs take hours; the matmul-rate fraction is a rate and stays
meaningful, the wall time and speed-up then describe the capped sweep).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ltcache.stage2 import api
from ltcache.stage2.methods import METHODS, choose_preset
from ltcache.stage2.samplers import steps_per_epoch
from ltcache.stage2.sweep import frozen_base

SHAPES = {  # name: (K, D, counts rule, test per class)
    "c10": dict(k=10, d=64, n_max=5000, ir=100, test=1000, label="ResNet-32 CIFAR-10-LT (N 12,406, D 64, K 10)"),
    "c100": dict(k=100, d=512, n_max=500, ir=100, test=100, label="ResNet-34 CIFAR-100-LT (N 10,847, D 512, K 100)"),
    "imnet": dict(k=1000, d=2048, n_max=1280, ir=256, test=50, target_n=115846,
                  label="ResNet-50 ImageNet-LT (N ~115,846, D 2048, K 1000)"),
}


def lt_counts(k, n_max, ir, target_n=None):
    c = [int(n_max * (1 / ir) ** (i / (k - 1))) for i in range(k)]
    if target_n:
        s = target_n / sum(c)
        c = [max(5, int(x * s)) for x in c]
    return c


def synthetic_cache(shape, device, seed=0):
    cfg = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    k, d = cfg["k"], cfg["d"]
    counts = lt_counts(k, cfg["n_max"], cfg["ir"], cfg.get("target_n"))
    centers = torch.randn(k, d, generator=g)

    def split(per_class, views, names):
        labels = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(per_class)])
        base = centers[labels] + 2.0 * torch.randn(len(labels), d, generator=g)
        feats = torch.stack([base + 0.3 * torch.randn(len(labels), d, generator=g) for _ in range(views)], 1)
        return SimpleNamespace(features=feats.to(device), labels=labels.to(device), views=names,
                               index=torch.arange(len(labels)))

    splits = {"train": split(counts, 2, ["clean", "aug1"]), "val": split([20] * k, 2, ["center", "hflip"]),
              "test": split([cfg["test"]] * k, 2, ["center", "hflip"])}
    return SimpleNamespace(path=f"synthetic:{shape}", manifest={}, splits=splits,
                           weight=(centers * 0.1).to(device), bias=torch.zeros(k, device=device),
                           class_counts=torch.tensor(counts), class_names=[str(i) for i in range(k)],
                           num_classes=k, feature_dim=d, groups=None)


def matmul_rate(device, n=2048, reps=10):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def plain_loop(cfg, cache, device):
    """One configuration, the ordinary way."""
    tr = cache.splits["train"]
    x, y = tr.features[:, 0].contiguous(), tr.labels
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True, generator=g)
    lin = torch.nn.Linear(x.shape[1], cache.num_classes).to(device)
    opt = torch.optim.SGD(lin.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    steps = 0
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(lin(xb), yb).backward()
            opt.step()
            steps += 1
        sched.step()
    return steps


def indexed_loop(cfg, cache, device, n_steps_per_epoch=None):
    """One configuration, the fastest plain way: batches by tensor indexing, autograd, SGD."""
    tr = cache.splits["train"]
    x, y = tr.features[:, 0].contiguous(), tr.labels
    n = x.shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    lin = torch.nn.Linear(x.shape[1], cache.num_classes).to(device)
    opt = torch.optim.SGD(lin.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    spe = n_steps_per_epoch or math.ceil(n / cfg.batch_size)
    b = cfg.batch_size
    steps = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(spe):
            idx = perm[(s * b) % n:(s * b) % n + b]
            opt.zero_grad()
            F.cross_entropy(lin(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1
        sched.step()
    return steps


def _time_loop(loop, configs, cache, device, spe):
    """Seconds per configuration (list) of ``loop`` over ``configs``."""
    out = []
    for c in configs:
        t = time.perf_counter()
        loop(c, cache, device, spe[id(c)]) if loop is indexed_loop else loop(c, cache, device)
        out.append(time.perf_counter() - t)
    return out


_PROC = None


def _proc_init():
    torch.set_num_threads(1)


def _proc_run(i):
    cfgs, cache, device, spe = _PROC
    c = cfgs[i]
    t = time.perf_counter()
    indexed_loop(c, cache, device, spe[i])
    return time.perf_counter() - t


def indexed_loop_processes(cfgs, cache, device, spe_list, procs):
    """Wall time of every configuration by the indexed loop in ``procs`` single-thread forked
    processes side by side (longest first)."""
    import multiprocessing
    global _PROC
    order = sorted(range(len(cfgs)), key=lambda i: -cfgs[i].epochs * spe_list[i] * cfgs[i].batch_size)
    _PROC = (cfgs, cache, device, spe_list)
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(procs, initializer=_proc_init) as pool:
        list(pool.imap_unordered(_proc_run, order))
    _PROC = None
    return time.perf_counter() - t


def run_shape(shape, seeds, device, loop_sample, quick, epochs_cap=None, methods=None):
    cache = synthetic_cache(shape, device)
    n = int(cache.splits["train"].labels.numel())
    k, d = cache.num_classes, cache.feature_dim
    preset = choose_preset(k, d)
    methods = methods or list(METHODS)
    overrides = {"epochs": epochs_cap} if epochs_cap else None
    plans = api.expand(methods, overrides, None, preset, n)
    rate = matmul_rate(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = api.bench(cache, methods, seeds=seeds, overrides=overrides, device=str(device), quiet=True)
    wall = time.perf_counter() - t
    rate = max(rate, matmul_rate(device))
    cfgs = [api.make_config(m, p, s, m.name, cache.class_counts) for m, p, _ in plans if not m.closed_form
            for s in seeds]
    # the CE reference row is trained too when ce is not among the methods
    if "ce" not in methods:
        cfgs += [api.make_config(m, p, s, m.name, cache.class_counts)
                 for m, p, _ in api.expand(["ce"], overrides, None, preset, n) for s in seeds]
    n_views = cache.splits["train"].features.shape[1]
    train_flops, cfg_steps, base_groups = 0.0, [], set()
    for c in cfgs:
        steps = sum(steps_per_epoch(c.sampler, n, c.batch_size) for _ in range(c.epochs))
        cfg_steps.append(steps)
        if frozen_base(c):
            base_groups.add(c.batch_size)
        else:
            train_flops += 4.0 * c.batch_size * d * k * steps
    train_flops += len(base_groups) * 2.0 * n * n_views * d * k
    n_test = int(cache.splits["test"].labels.numel())
    n_val = int(cache.splits["val"].labels.numel())
    v_test = cache.splits["test"].features.shape[1]
    # evaluation as computed: a linear layer once on the view-mean features, cosine and NCM per
    # view; closed forms once per (method, params), not per seed; the stage-1 reference row; and
    # tau-norm's one val GEMM for its tau search
    eval_flops, seen = 2.0 * n_test * d * k, set()
    for r in res["runs"]:
        m = METHODS[r["method"]]
        if m.closed_form:
            key = (r["method"], json.dumps(r["params"], sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            if m.head == "tau-norm" and "tau_curve" in r:
                eval_flops += 2.0 * n_val * d * k
        eval_flops += 2.0 * n_test * d * k * (v_test if m.head in ("cosine", "ncm") else 1)
    flops = train_flops + eval_flops
    # plain loops, one configuration at a time (CE on an nn.Linear, the configuration's batch
    # size, epochs and steps per epoch)
    threads = torch.get_num_threads()
    spe = {id(c): steps_per_epoch(c.sampler, n, c.batch_size) for c in cfgs}
    spe_list = [spe[id(c)] for c in cfgs]
    probe = max(cfgs, key=lambda c: c.batch_size * spe[id(c)] * min(c.epochs, 2))
    probe_cfg = SimpleNamespace(**{**vars(probe), "epochs": 2}) if hasattr(probe, "__dict__") else probe
    per_thread = {}
    for th in sorted({1, threads}):
        torch.set_num_threads(th)
        per_thread[th] = min(_time_loop(indexed_loop, [probe_cfg], cache, device, {id(probe_cfg): spe[id(probe)]})[0]
                             for _ in range(2))
    best_threads = min(per_thread, key=per_thread.get)

    def timed(loop, sample_n, th):
        """(total seconds for all cfgs, timed count, timed seconds): sample_n 0 = every config."""
        torch.set_num_threads(th)
        try:
            if sample_n <= 0 or sample_n >= len(cfgs):
                secs = _time_loop(loop, cfgs, cache, device, spe)
                return sum(secs), len(cfgs), sum(secs)
            first_seed = [c for c in cfgs if c.seed == seeds[0]]
            stride = max(1, math.ceil(len(first_seed) / sample_n))
            sample = first_seed[::stride][:sample_n]
            secs = _time_loop(loop, sample, cache, device, spe)
            per_step = {}
            for c, dt in zip(sample, secs):
                per_step.setdefault(c.batch_size, []).append(dt / (c.epochs * spe[id(c)]))
            mean_ps = {b: sum(v) / len(v) for b, v in per_step.items()}
            fb = sum(sum(v) for v in per_step.values()) / sum(len(v) for v in per_step.values())
            return (sum(c.epochs * spe[id(c)] * mean_ps.get(c.batch_size, fb) for c in cfgs), len(sample), sum(secs))
        finally:
            torch.set_num_threads(threads)

    idx_total, idx_timed, idx_secs = timed(indexed_loop, loop_sample, best_threads)
    procs = max(1, threads)
    proc_wall = (indexed_loop_processes(cfgs, cache, device, spe_list, procs)
                 if loop_sample <= 0 and device.type == "cpu" and procs > 1 else None)
    dl_total, dl_timed, dl_secs = timed(plain_loop, max(1, min(8, len(cfgs))) if loop_sample <= 0 else loop_sample,
                                        1 if d * k <= 10_000 else threads)
    baseline = min(x for x in (idx_total, proc_wall) if x is not None)
    out = {"shape": SHAPES[shape]["label"], "n_train": n, "device": str(device), "threads": threads,
           "seeds": list(seeds), "epochs_cap": epochs_cap, "runs": len(res["runs"]),
           "trained_configs": len(cfgs), "sweep_wall_s": wall, "sweep_flops": flops,
           "sweep_gflops_per_s": flops / wall / 1e9, "matmul_gflops_per_s": rate / 1e9,
           "fraction_of_matmul_rate": flops / wall / rate,
           "indexed_loop_probe_s_by_threads": per_thread, "indexed_loop_threads": best_threads,
           "indexed_loop_total_s": idx_total, "indexed_loop_timed_configs": idx_timed,
           "indexed_loop_timed_s": idx_secs, "indexed_loop_extrapolated": idx_timed < len(cfgs),
           "indexed_loop_processes": procs if proc_wall is not None else None,
           "indexed_loop_processes_wall_s": proc_wall,
           "dataloader_loop_total_s": dl_total, "dataloader_loop_timed_configs": dl_timed,
           "dataloader_loop_extrapolated": dl_timed < len(cfgs),
           "fastest_plain_loop_s": baseline,
           "speedup_vs_fastest_loop": baseline / wall, "speedup_vs_dataloader_loop": dl_total / wall,
           "best": res["summary"][0]["name"]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="c10,c100", help="comma list of c10, c100, imnet")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loop-sample", type=int, default=None,
                    help="configurations timed in full per plain loop, the rest extrapolated by steps "
                         "(0: every configuration; default: 0 for c10, 5 otherwise)")
    ap.add_argument("--quick", action="store_true", help="seeds 0,1 and 4 plain-loop configurations")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--epochs-cap", type=int, default=None, help="train every method for at most this many epochs")
    ap.add_argument("--methods", default=None, help="comma list of methods (default: all)")
    a = ap.parse_args(argv)
    seeds = [0, 1] if a.quick else [int(s) for s in a.seeds.split(",")]
    loop_sample = 4 if a.quick else a.loop_sample
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}", file=sys.stderr)
    results = []
    for shape in a.shapes.split(","):
        ls = loop_sample if loop_sample is not None else (0 if shape.strip() == "c10" else 5)
        r = run_shape(shape.strip(), seeds, device, ls, a.quick, a.epochs_cap,
                      a.methods.split(",") if a.methods else None)
        results.append(r)
        print(json.dumps(r, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
