"""Memory and speed of streamed image data: ``build_dataset`` + one full pass of ``ds.loader`` over
the train split of N generated 256-px JPEGs (ImageNet-LT-style split lists by default).

Run by hand (not by CI):
    nice -n 5 python benchmarks/bench_stream_memory.py --images 5000 [--dir DIR] [--workers 2]

The images are generated once into DIR (default /tmp/ltcache-stream-bench-N; kept and reused by
later runs: a marker file says the set is complete). The measurement then runs in a fresh child
process (``--measure-only``), so its peak RSS (``resource.getrusage(...).ru_maxrss``) counts the
dataset, the DataLoader and the pass alone, not the generation. The same child command, run
under ``/usr/bin/time -v``, measures it from outside (its "Maximum resident set size"); the
script prints that command. The decode workers' largest peak RSS is reported separately
(RUSAGE_CHILDREN of the measuring process).

For comparison, the in-memory design held every used row decoded: N x 3 x 224 x 224 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAME = "bench"


def rss_mb() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generate(root: Path, n: int, classes: int, layout: str, size: int = 256, test: int = 500,
             quiet: bool = False) -> None:
    """N train JPEGs (+ ``test`` val and test ones) of ``size`` px: smooth random colour fields
    (a few KB each, decoded like any photo). Skipped when ``root`` already holds the same set."""
    from PIL import Image

    from ltcache.progress import progress

    marker = root / f".complete-{layout}-{n}-{classes}-{size}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    lines = {"train": [], "val": [], "test": []}
    todo = [("train", i) for i in range(n)] + [(s, i) for s in ("val", "test") for i in range(test)]
    for split, i in progress(todo, total=len(todo), desc="generate JPEGs", unit="img", quiet=quiet):
        c = i % classes
        if layout == "imagefolder":
            rel = Path(split) / f"class{c:04d}" / f"{i:07d}.jpg"
            path = root / rel
        else:
            rel = Path("images") / split / f"c{c:04d}" / f"{i:07d}.jpg"
            path = root / rel
        lines[split].append(f"{rel} {c}")
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(seed).resize((size, size), Image.BICUBIC)
        img.save(path, quality=90)
    if layout == "splitlist":
        for split, ls in lines.items():
            (root / f"{NAME}_{split}.txt").write_text("\n".join(ls) + "\n")
    marker.write_text("complete\n")


def measure(root: Path, layout: str, batch_size: int, workers: int, views: list, quiet: bool) -> dict:
    """build_dataset + one pass of ds.loader over the train split; figures as a dict."""
    import torch

    from ltcache.data import DatasetSpec, build_dataset
    from ltcache.progress import progress

    torch.set_num_threads(1)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    if layout == "splitlist":
        spec = DatasetSpec(source=f"splitlist:{root / NAME}")
    else:
        spec = DatasetSpec(source=f"imagefolder:{root}", imb_ratio=1, val_per_class=0)
    ds = build_dataset(spec, data_root=root, quiet=True, workers=workers)
    t_build = time.perf_counter() - t0
    rss_built = rss_mb()
    sp = ds.splits["train"]
    n = len(sp)
    rows = torch.arange(n)
    seeds = torch.arange(n, dtype=torch.long)
    seen, rss_max, checksum = 0, rss_built, 0
    t1 = time.perf_counter()
    batches = ds.loader("train", rows, batch_size, views, seeds, workers)
    for b in progress(batches, total=-(-n // batch_size), desc="stream train", unit="batch", quiet=quiet):
        seen += b.images.shape[0]
        checksum += int(b.images[:, :, 0, 0, 0].sum())        # touch the data
        rss_max = max(rss_max, rss_mb())
    t_pass = time.perf_counter() - t1
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": n, "seen": seen, "streamed": bool(ds.streamed), "image_size": ds.image_size,
            "views": views, "batch_size": batch_size, "workers": workers,
            "build_s": round(t_build, 2), "pass_s": round(t_pass, 2),
            "images_per_s": round(seen / t_pass, 1) if t_pass > 0 else None,
            "rss_start_mib": round(rss0, 1), "rss_after_build_mib": round(rss_built, 1),
            "rss_max_sampled_mib": round(rss_max, 1), "ru_maxrss_main_mib": round(self_peak, 1),
            "ru_maxrss_largest_worker_mib": round(child_peak, 1),
            "in_memory_would_hold_gib": round(n * 3 * 224 * 224 / 2 ** 30, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000, help="train images (default 100000)")
    ap.add_argument("--dir", default=None, help="where the JPEGs are (generated once; default /tmp/ltcache-stream-bench-N)")
    ap.add_argument("--layout", choices=("splitlist", "imagefolder"), default="splitlist")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2, help="decode workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--views", default="center,train")
    ap.add_argument("--measure-only", action="store_true", help="skip generation, measure in this process")
    ap.add_argument("--generate-only", action="store_true", help="only make the images")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    root = Path(a.dir or f"/tmp/ltcache-stream-bench-{a.images}")
    child = [sys.executable, str(Path(__file__).resolve()), "--images", str(a.images), "--dir", str(root),
             "--layout", a.layout, "--classes", str(a.classes), "--workers", str(a.workers),
             "--batch-size", str(a.batch_size), "--views", a.views, "--measure-only"]
    if a.measure_only:
        res = measure(root, a.layout, a.batch_size, a.workers, a.views.split(","), a.quiet)
        print(json.dumps(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        return
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    generate(root, a.images, a.classes, a.layout, quiet=a.quiet)
    print(f"images ready in {root} ({time.perf_counter() - t0:.0f} s)")
    if a.generate_only:
        return
    print("measured from outside with:\n  /usr/bin/time -v " + " ".join(child) + "   # 'Maximum resident set size'")
    out = subprocess.run(child + (["--quiet"] if a.quiet else []), stdout=subprocess.PIPE, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    print(f"{res['seen']} images x {len(res['views'])} views in {res['pass_s']:.0f} s = {res['images_per_s']} img/s "
          f"({a.workers} workers); main process peak RSS {res['ru_maxrss_main_mib']:.0f} MiB, largest worker "
          f"{res['ru_maxrss_largest_worker_mib']:.0f} MiB; in memory the decoded crops alone: "
          f"{res['in_memory_would_hold_gib']} GiB")


if __name__ == "__main__":
    main()
