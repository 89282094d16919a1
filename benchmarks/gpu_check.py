"""The GPU check: every figure the speed issue asks of a CUDA device, in one run, one JSON.

Run by hand on a machine with a CUDA device (installs nothing; the project and its
dependencies as they are):

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.json          # ~3-5 min
    sh benchmarks/gpu_check.sh                                             # the same, logged

What it measures, in this order (a section that would overrun ``--budget-s`` is recorded as
skipped, so the JSON is always written):

1. the matmul rates of the device: fp32, tf32 and bf16 (large square ``torch.mm``);
2. the CIFAR-10-LT and CIFAR-100-LT-shaped synthetic caches of ``bench_engine.py`` (D 64 /
   K 10, D 512 / K 100), all methods x 5 seeds at their preset epochs: the sweep with the
   plain eager step, with the static-buffer step captured as CUDA graphs
   (:mod:`ltcache.stage2.graphs`), the graphs with the groups side by side on CUDA streams
   of their own (:mod:`ltcache.stage2.streams`), the graphs with every head family's groups
   merged into one step stream (``workers.merge_plan`` "on"), with and without streams; per
   variant its speed-up over the eager sweep and its largest test-accuracy difference from it;
3. the CIFAR-100-LT shape in fp32, tf32 and bf16 (``--precision``);
4. the fastest plain loop (``bench_engine.indexed_loop``: tensor-indexed batches, one
   ``nn.Linear``, autograd, ``torch.optim.SGD``) on the same device, a sample of the
   configurations timed in full and the rest extrapolated by steps;
5. the ImageNet-LT shape (N 115,846, D 2048, K 1000; features made on the device) at the
   source epochs for a sample of methods x 5 seeds, with an estimate of the full all-methods
   sweep (the sample's seconds per trained sample-row times the full sweep's rows). When the
   source epochs would overrun the budget, the sample runs at one epoch and is scaled;
6. on the CIFAR-10-LT shape, ``torch.compile(mode="reduce-overhead")`` of the static step
   (twice: the second run finds Inductor's kernels cached and adds the group streams) beside
   the hand-captured graphs, in a child process stopped when the budget ends. Compiling fuses
   the step's element-wise kernels, which is what shortens the longest group's chain of steps.

The JSON is rewritten after every section, so a run stopped from outside keeps what it measured.

``--tiny`` runs every section on tiny shapes and a few methods at two epochs (the CPU test
of this script, ``tests/test_gpu_check.py``, under 30 s); on a CPU, tf32 is recorded as refused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import SHAPES, indexed_loop, lt_counts, synthetic_cache  # noqa: E402

from ltcache.errors import LtcacheError  # noqa: E402
from ltcache.stage2 import api, graphs, streams, workers  # noqa: E402
from ltcache.stage2.methods import METHODS, choose_preset  # noqa: E402
from ltcache.stage2.samplers import steps_per_epoch  # noqa: E402
from ltcache.stage2.sweep import frozen_base  # noqa: E402

SHAPES.setdefault("tiny10", dict(k=5, d=16, n_max=60, ir=10, test=10, label="tiny (N ~150, D 16, K 5)"))
SHAPES.setdefault("tiny100", dict(k=8, d=32, n_max=40, ir=10, test=5, label="tiny (N ~150, D 32, K 8)"))
IMNET_SAMPLE = ("ce", "crt", "lws", "ldam-drw", "mislas")
TINY_METHODS = ("ce", "crt", "lws", "ldam-drw", "cosine")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rate(dev: torch.device, dtype: torch.dtype, tf32: bool, n: int) -> float:
    """GFLOP/s of n^3 ``torch.mm`` in ``dtype`` (tf32: CUDA tensor cores on float32)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(dev)
        reps, t = 10, time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def device_cache(shape: str, dev: torch.device, seed: int = 0) -> SimpleNamespace:
    """``bench_engine.synthetic_cache``'s layout with the features drawn on the device (the
    ImageNet-LT shape's 1.9 GB of features would take minutes on a CPU)."""
    cfg = SHAPES[shape]
    g = torch.Generator(device=dev).manual_seed(seed)
    k, d = cfg["k"], cfg["d"]
    counts = lt_counts(k, cfg["n_max"], cfg["ir"], cfg.get("target_n"))
    centers = torch.randn(k, d, generator=g, device=dev)

    def split(per_class, names):
        labels = torch.cat([torch.full((n,), j, dtype=torch.long, device=dev) for j, n in enumerate(per_class)])
        feats = torch.empty(len(labels), len(names), d, device=dev)
        for v in range(len(names)):
            feats[:, v] = torch.randn(len(labels), d, generator=g, device=dev).mul_(2.0).add_(centers[labels])
        return SimpleNamespace(features=feats, labels=labels, views=names, index=torch.arange(len(labels)))

    splits = {"train": split(counts, ["clean", "aug1"]), "val": split([20] * k, ["center", "hflip"]),
              "test": split([cfg["test"]] * k, ["center", "hflip"])}
    return SimpleNamespace(path=f"synthetic:{shape}", manifest={}, splits=splits, weight=centers * 0.1,
                           bias=torch.zeros(k, device=dev), class_counts=torch.tensor(counts),
                           class_names=[str(i) for i in range(k)], num_classes=k, feature_dim=d, groups=None)


def sweep(cache, dev, methods, seeds, mode="auto", precision="fp32", cap=None, merge="off", side="off") -> dict:
    """One ``bench`` sweep timed: wall seconds, runs, the best run and per-run test accuracy
    (``mode``: the step graphs' mode; ``merge``: the group-merge mode, :func:`workers.merge_plan`;
    ``side``: the group-stream mode, :mod:`ltcache.stage2.streams`)."""
    before = (graphs.STATS["captured"], len(graphs.STATS["failed"]))
    sync(dev)
    t = time.perf_counter()
    try:
        with graphs.step_graphs(mode), workers.merging(merge), streams.group_streams(side):
            res = api.bench(cache, list(methods) if methods else None, seeds=seeds, device=str(dev), quiet=True,
                            overrides={"epochs": cap} if cap else None, precision=precision)
    except LtcacheError as exc:
        return {"refused": str(exc)}
    sync(dev)
    return {"wall_s": time.perf_counter() - t, "mode": mode, "merge": merge, "streams": side, "precision": precision,
            "epochs_cap": cap,
            "runs": len(res["runs"]), "best": res["summary"][0]["name"],
            "graphs_captured": graphs.STATS["captured"] - before[0],
            "capture_failures": graphs.STATS["failed"][before[1]:],
            "acc": {f"{r['name']}/{r['seed']}": r["metrics"]["all"] for r in res["runs"]}}


def compare(r: dict, names: list) -> None:
    """Beside each variant of ``r`` other than eager: the largest test-accuracy difference from
    the eager sweep and the speed-up over it."""
    e = r["eager"]
    for name in names[1:]:
        v = r[name]
        acc = v.get("acc", {})
        r[f"{name}_max_abs_acc_diff"] = max((abs(e["acc"][k] - acc[k]) for k in e.get("acc", {}) if k in acc),
                                            default=None)
        if "wall_s" in e and "wall_s" in v:
            r[f"{name}_speedup"] = e["wall_s"] / v["wall_s"]


def trained_configs(cache, methods, seeds, cap=None) -> list:
    n = int(cache.splits["train"].labels.numel())
    preset = choose_preset(cache.num_classes, cache.feature_dim)
    plans = api.expand(list(methods) if methods else list(METHODS), {"epochs": cap} if cap else None, None, preset, n)
    return [api.make_config(m, p, s, m.name, cache.class_counts) for m, p, _ in plans if not m.closed_form
            for s in seeds]


def rows(cfgs, n) -> float:
    """Training sample-rows of ``cfgs`` (steps x B; frozen-base heads count a tenth: K-wide rows)."""
    return sum(c.epochs * steps_per_epoch(c.sampler, n, c.batch_size) * c.batch_size
               * (0.1 if frozen_base(c) else 1) for c in cfgs)


def plain_loop(cache, dev, cfgs, sample: int, epochs_cap=None) -> dict:
    """The fastest plain loop: ``sample`` configurations (spread over methods) timed, the rest
    extrapolated by their steps at the timed seconds per step of the same batch size."""
    n = int(cache.splits["train"].labels.numel())
    spe = [steps_per_epoch(c.sampler, n, c.batch_size) for c in cfgs]
    stride = max(1, math.ceil(len(cfgs) / sample))
    picked = list(range(len(cfgs)))[::stride][:sample]
    indexed_loop(SimpleNamespace(**{**vars(cfgs[0]), "epochs": 1}), cache, dev, 2)    # warm-up, untimed
    per_step, timed = {}, 0.0
    for i in picked:
        c = cfgs[i]
        run = SimpleNamespace(**{**vars(c), "epochs": min(c.epochs, epochs_cap or c.epochs)})
        sync(dev)
        t = time.perf_counter()
        indexed_loop(run, cache, dev, spe[i])
        sync(dev)
        dt = time.perf_counter() - t
        timed += dt
        per_step.setdefault(c.batch_size, []).append(dt / (run.epochs * spe[i]))
    mean = {b: sum(v) / len(v) for b, v in per_step.items()}
    fallback = sum(sum(v) for v in per_step.values()) / sum(len(v) for v in per_step.values())
    total = sum(c.epochs * s * mean.get(c.batch_size, fallback) for c, s in zip(cfgs, spe))
    return {"total_s": total, "timed_configs": len(picked), "timed_s": timed, "configs": len(cfgs),
            "extrapolated": len(picked) < len(cfgs), "ms_per_step_by_batch": {b: 1e3 * v for b, v in mean.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON written (temporary name, then renamed)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--budget-s", type=float, default=280.0, help="sections that would start after this are skipped")
    ap.add_argument("--loop-sample", type=int, default=4, help="plain-loop configurations timed in full per shape")
    ap.add_argument("--imnet-methods", default=",".join(IMNET_SAMPLE))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, a few methods, 2 epochs (the CPU test)")
    ap.add_argument("--only-compile", default=None, help=argparse.SUPPRESS)     # the compile section's child
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if a.only_compile:
        return only_compile(a, dev)
    t0 = time.perf_counter()
    seeds = [int(s) for s in a.seeds.split(",")]
    tiny = a.tiny
    shapes = ("tiny10", "tiny100") if tiny else ("c10", "c100")
    methods = TINY_METHODS if tiny else None
    cap = 2 if tiny else None
    mm_n = 256 if tiny else 8192 if dev.type == "cuda" else 2048
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "tiny": tiny, "seeds": seeds, "budget_s": a.budget_s, "sections": {}}

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t0)

    def section(name, fn, min_left=0.0):
        if left() < min_left:
            out["sections"][name] = {"skipped": f"budget: {left():.0f} s left"}
            return
        t = time.perf_counter()
        try:
            out["sections"][name] = fn()
        except Exception as exc:                    # a failed section is recorded, the others still run
            out["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        out["sections"][name + "_s"] = time.perf_counter() - t
        write(out, a.out)                           # a run cut short still leaves every finished section

    section("matmul_gflops", lambda: {
        "fp32": rate(dev, torch.float32, False, mm_n),
        "tf32": rate(dev, torch.float32, True, mm_n) if dev.type == "cuda" else None,
        "bf16": rate(dev, torch.bfloat16, False, mm_n)})
    caches = {s: synthetic_cache(s, dev) for s in shapes}

    variants = {"eager": ("off", "off", "off"), "graphs": ("on", "off", "off"), "streams": ("on", "off", "on"),
                "merged": ("on", "on", "off"), "merged_streams": ("on", "on", "on")}   # graphs, merge, streams

    def modes(shape):
        def run():
            cache = caches[shape]
            r = {"shape": SHAPES[shape]["label"]}
            for name, (mode, merge, side) in variants.items():
                r[name] = sweep(cache, dev, methods, seeds, mode, cap=cap, merge=merge, side=side)
            compare(r, list(variants))
            return r
        return run
    for s in shapes:
        section(f"sweep_{s}", modes(s), min_left=30 if not tiny else 0)

    def precisions():
        cache = caches[shapes[1]]
        return {p: sweep(cache, dev, methods, seeds, "auto", p, cap) for p in ("fp32", "tf32", "bf16")}
    section(f"precision_{shapes[1]}", precisions, min_left=60 if not tiny else 0)

    def loops(shape):
        def run():
            cache = caches[shape]
            r = plain_loop(cache, dev, trained_configs(cache, methods, seeds, cap), a.loop_sample)
            sw = out["sections"].get(f"sweep_{shape}", {})
            best = min((v["wall_s"] for v in sw.values() if isinstance(v, dict) and "wall_s" in v), default=None)
            if best:
                r["speedup_of_the_faster_sweep"] = r["total_s"] / best
            return r
        return run
    for s in shapes:
        section(f"plain_loop_{s}", loops(s), min_left=20 if not tiny else 0)

    def imnet():
        shape = "tiny100" if tiny else "imnet"
        cache = caches[shape] if tiny else device_cache(shape, dev)
        sample = a.imnet_methods.split(",") if not tiny else list(TINY_METHODS[:3])
        n = int(cache.splits["train"].labels.numel())
        first = sweep(cache, dev, sample, seeds, "auto", cap=1)   # one epoch: the rate; do source epochs fit?
        src_rows = rows(trained_configs(cache, sample, seeds, cap), n)
        one_rows = rows(trained_configs(cache, sample, seeds, 1), n)
        est_src = first["wall_s"] * src_rows / one_rows if "wall_s" in first else None
        r = {"shape": SHAPES[shape]["label"], "n_train": n, "methods": sample, "one_epoch": first,
             "source_epochs_estimate_s": est_src}
        if est_src is not None and est_src < left() - 20:
            r["source_epochs"] = sweep(cache, dev, sample, seeds, "auto", cap=cap)
            measured, basis = r["source_epochs"].get("wall_s"), src_rows
        else:
            r["source_epochs"] = {"skipped": f"estimated {est_src} s, over the budget"}
            measured, basis = first.get("wall_s"), one_rows
        full = rows(trained_configs(cache, TINY_METHODS if tiny else None, seeds, cap), n)
        r["full_sweep_estimate_s"] = measured * full / basis if measured else None
        r["estimate_rule"] = ("measured seconds x (trained sample-rows of every method's configurations at the source "
                              "epochs) / (those of the measured run); frozen-base rows count 0.1")
        r["plain_loop"] = plain_loop(cache, dev, trained_configs(cache, sample, seeds, cap), 2, epochs_cap=1)
        return r
    section("imnet", imnet, min_left=45 if not tiny else 0)

    def compiled():
        """torch.compile(mode="reduce-overhead") of the static step against the hand capture, in a
        child process stopped when the budget ends (compiling every group's step may take minutes)."""
        r = compile_in_child(a, shapes[0], left() - 5)
        hand = out["sections"].get(f"sweep_{shapes[0]}", {}).get("graphs", {})
        r["hand_capture_wall_s"] = hand.get("wall_s")          # the same sweep, torch.cuda.CUDAGraph
        return r
    section(f"compile_{shapes[0]}", compiled, min_left=60 if not tiny else 0)
    out["total_s"] = time.perf_counter() - t0
    write(out, a.out)
    print(f"wrote {a.out} ({out['total_s']:.0f} s)")
    return out


def write(out: dict, path: str) -> None:
    """The JSON written under a temporary name, then renamed."""
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    os.replace(tmp, path)


def compile_in_child(a, shape: str, seconds: float) -> dict:
    """The ``compile`` section run by a child process of this script (``--only-compile``) within
    ``seconds``: its result, or a note that it ran out of time."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "compile.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--only-compile", shape, "--device", a.device,
               "--seeds", a.seeds, "--out", path] + (["--tiny"] if a.tiny else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            return {"timed_out": f"not finished within the {seconds:.0f} s left of the budget"}
        if proc.returncode != 0 or not os.path.exists(path):
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
        with open(path) as fh:
            return json.load(fh)


def only_compile(a, dev: torch.device) -> dict:
    """The child's work: the eager sweep, then the compiled one twice (the second finds
    Inductor's kernels cached and runs the groups on streams of their own), their speed-ups and
    accuracy differences."""
    shape, seeds = a.only_compile, [int(s) for s in a.seeds.split(",")]
    cache, methods, cap = synthetic_cache(shape, dev), TINY_METHODS if a.tiny else None, 2 if a.tiny else None
    r = {"shape": SHAPES[shape]["label"], "eager": sweep(cache, dev, methods, seeds, "off", cap=cap),
         "compiled": sweep(cache, dev, methods, seeds, "compile", cap=cap)}
    # again, Inductor's kernels now cached, with the groups side by side on their streams
    r["compiled_streams"] = sweep(cache, dev, methods, seeds, "compile", cap=cap, side="on")
    compare(r, ["eager", "compiled", "compiled_streams"])
    write(r, a.out)
    return r

if __name__ == "__main__":
    main()
