"""Extraction throughput: one process vs two processes (torchrun), the same cache options.

Run by hand (not by CI):

    python benchmarks/bench_extract_scale.py [--images data/cifar10-jpg | --generate] [--train-per-class 300]
        [--test-per-class 100] [--arch resnet32] [--protocol clean] [--device cpu|cuda] [--json out.json]

Each measurement is a whole ``ltcache extract`` command into a fresh cache folder:

* ``1 process, T threads`` for T in ``--threads`` (default 1,2): ``python -m ltcache extract`` with
  ``OMP_NUM_THREADS=T`` (torch's intra-op threads);
* ``2 processes, 1 thread each``: ``torchrun --standalone --nproc_per_node 2 -m ltcache extract``
  with ``OMP_NUM_THREADS=1`` per rank (gloo on the CPU; one GPU per rank with ``--device cuda``,
  which needs two visible GPUs).

Reported: extraction images/s as the manifest records it (images forwarded, rows x views, over the
extraction loop's seconds; for two processes the sum of both ranks' images over the slower rank's
seconds) and, for two processes, the same images over the wall-clock span from the first rank's
start to the last rank's end (lower when the ranks did not run side by side), the backbone's bare inference rate in the same run, the wall time of the whole command
(start-up, data decoding on every rank and the manifest included) and the load average
(``os.getloadavg``) before and after: on a shared machine the figures move with the other jobs.

The backbone is a randomly initialised ``--arch`` saved as a plain state dict (the rate does not
depend on the weights). ``--images DIR``: an image folder (DIR/train/<class>/*, DIR/test/<class>/*)
of which the first ``--train-per-class`` / ``--test-per-class`` files per class are linked into a
temporary folder; ``--generate``: tests/datagen.py's synthetic 32-px folder of the same size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def link_subset(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """dst/{train,test}/<class>/ holding symlinks to the first files of each class of ``src``."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        classes = sorted(p for p in (src / split).iterdir() if p.is_dir())
        if not classes:
            raise SystemExit(f"{src / split} has no class folders; give --images an image folder or use --generate")
        for c in classes:
            out = dst / split / c.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_EXT)[:n]:
                (out / f.name).symlink_to(f.resolve())
    return dst


def make_backbone(arch: str, classes: int, path: Path) -> Path:
    import torch

    from ltcache.models import build_model
    torch.manual_seed(0)
    torch.save(build_model(arch, classes).state_dict(), path)
    return path


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def env_for(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_one(cmd: list, cwd: Path, threads: int, cache: Path) -> dict:
    """One extraction command; its manifest's throughput figures, the wall time and the load."""
    load_before = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env_for(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ex = json.loads((cache / "manifest.json").read_text())["extraction"]
    spans = [r["span"] for r in ex.get("ranks") or []]
    span = (max(e for _, e in spans) - min(b for b, _ in spans)) if spans else None
    return {"span_images_per_s": round(ex["images_forwarded"] / span, 1) if span else ex["images_per_s"],"images_forwarded": ex["images_forwarded"], "extraction_seconds": ex["seconds"],
            "images_per_s": ex["images_per_s"], "bare_inference_images_per_s": ex["bare_inference_images_per_s"],
            "ranks": ex.get("ranks"), "world_size": ex.get("world_size", 1), "wall_seconds": round(wall, 2),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, default=REPO / "data" / "cifar10-jpg",
                     help="image folder with train/<class>/ and test/<class>/ (default: data/cifar10-jpg)")
    src.add_argument("--generate", action="store_true", help="synthetic 32-px images (tests/datagen.py) instead")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=10, help="--generate: number of classes")
    ap.add_argument("--arch", default="resnet32")
    ap.add_argument("--protocol", default="clean", choices=["clean", "faithful"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: the protocol's")
    ap.add_argument("--shard-rows", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (two processes: one GPU each)")
    ap.add_argument("--threads", default="1,2", help="intra-op threads of the one-process runs")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads (--workers of extract)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)")
    a = ap.parse_args()

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        raise SystemExit("torchrun not found (install torch with torch.distributed)")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_extract_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if a.generate:
            from datagen import make_imagefolder
            folder = make_imagefolder(work / "images", num_classes=a.classes, per_class_train=a.train_per_class,
                                      per_class_test=a.test_per_class)
        else:
            folder = link_subset(a.images, work / "images", a.train_per_class, a.test_per_class)
        classes = len([p for p in (folder / "train").iterdir() if p.is_dir()])
        make_backbone(a.arch, classes, work / "net.pt")
        base = ["extract", "--ckpt", "net.pt", "--arch", a.arch, "--dataset", f"imagefolder:{folder.resolve()}",
                "--imb-ratio", "1", "--val-per-class", "0", "--protocol", a.protocol, "--shard-rows",
                str(a.shard_rows), "--device", a.device, "--workers", str(a.workers), "--quiet"]
        if a.batch_size:
            base += ["--batch-size", str(a.batch_size)]
        runs = []
        for t in [int(x) for x in a.threads.split(",") if x.strip()]:
            cache = work / f"cache-1p-{t}t"
            res = run_one([sys.executable, "-m", "ltcache", *base, "--cache", cache.name], work, t, cache)
            runs.append({"setup": f"1 process, {t} thread{'s' if t > 1 else ''}", "processes": 1, "threads": t, **res})
            print(f"  {runs[-1]['setup']}: {res['images_per_s']:.0f} img/s", file=sys.stderr)
        if a.device.startswith("cuda") and gpu_count() < 2:
            raise SystemExit(f"--device {a.device}: two processes need two GPUs (one per rank), {gpu_count()} visible")
        cache = work / "cache-2p-1t"
        res = run_one([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "ltcache", *base, "--cache", cache.name],
                      work, 1, cache)
        runs.append({"setup": "2 processes (torchrun), 1 thread each", "processes": 2, "threads": 1, **res})
        print(f"  {runs[-1]['setup']}: {res['images_per_s']:.0f} img/s", file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    import torch
    best1 = max((r for r in runs if r["processes"] == 1), key=lambda r: r["images_per_s"])
    two = runs[-1]
    out = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "python": platform.python_version()},
           "options": {"images": "generated" if a.generate else str(a.images), "train_per_class": a.train_per_class,
                       "test_per_class": a.test_per_class, "classes": classes, "arch": a.arch,
                       "protocol": a.protocol, "batch_size": a.batch_size, "shard_rows": a.shard_rows,
                       "device": a.device, "workers": a.workers},
           "runs": runs, "speedup_2p_vs_best_1p": round(two["images_per_s"] / max(best1["images_per_s"], 1e-9), 2),
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"{a.arch}, --protocol {a.protocol}, {classes} classes x ({a.train_per_class} train + {a.test_per_class} test)"
          f" images, device {a.device}, {os.cpu_count()} CPUs")
    print("| setup | images forwarded | extraction s | images/s | images/s over the ranks' span | bare inference img/s "
          "| wall s (whole command) | load avg before -> after (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        per_rank = (" (ranks: " + ", ".join(f"{x['images_per_s']:.0f}" for x in r["ranks"]) + ")") if r["ranks"] else ""
        print(f"| {r['setup']} | {r['images_forwarded']} | {r['extraction_seconds']:.1f} | "
              f"{r['images_per_s']:.0f}{per_rank} | {r['span_images_per_s']:.0f} | {r['bare_inference_images_per_s']:.0f} | {r['wall_seconds']:.1f} | "
              f"{r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f} |")
    print(f"2 processes vs the best one-process setting ({best1['setup']}): x{out['speedup_2p_vs_best_1p']:.2f}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
