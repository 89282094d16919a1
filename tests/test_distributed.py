"""torchrun: a sweep's configurations split across 2 CPU ranks (gloo) give one process's results;
mismatched arguments and a missing rank end with a one-line error instead of a hang."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datagen
import ranks
from ltcache import distributed

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
BENCH = ["bench", "--methods", "ce,los,tau-norm,ncm", "--seeds", "0,1", "--epochs", "2", "--quiet", "--jobs", "1"]
TUNE = ["tune", "--methods", "ce,los", "--budget", "2", "--seeds", "0", "--tune-seeds", "0", "--quiet", "--jobs", "1"]

needs_torchrun = pytest.mark.skipif(TORCHRUN is None or not distributed._dist().is_available(),
                                    reason="torchrun / torch.distributed not available")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _one(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltcache", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=120)


def _torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "ltcache", *args], cwd=cwd,
                          env=_env(LTCACHE_DIST_DEBUG="1"), capture_output=True, text=True, timeout=180)


def _runs(path: Path) -> list:
    return [{k: r[k] for k in ("name", "method", "seed", "params", "selected_epoch", "metrics", "val")}
            for r in json.loads(path.read_text())["runs"]]


def _close(a, b, path="") -> None:
    """Equal structures; floats within 1e-6."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_single_process_is_unchanged(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.init_from_env("cpu")
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather_objects(3) == [3] and distributed.gather_objects(3) == [3]
    distributed.barrier()
    distributed.check_same("anything", "sweep")


def test_bad_timeout_is_one_line(monkeypatch):
    monkeypatch.setenv("LTCACHE_DIST_TIMEOUT", "soon")
    with pytest.raises(Exception, match="LTCACHE_DIST_TIMEOUT must be a number"):
        distributed.timeout()


@needs_torchrun
def test_bench_two_ranks_equal_one_process(tmp_path):
    one = _one(BENCH + ["--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(BENCH + ["--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0: parts" in two.stderr and "rank 1: parts" in two.stderr   # the sweep was split
    _close(_runs(tmp_path / "one" / "results.json"), _runs(tmp_path / "two" / "results.json"))
    assert two.stdout.count("results: two/results.json") == 1                  # only rank 0 prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.json", "summary.csv", "summary.md"]


@needs_torchrun
def test_tune_two_ranks_same_picks(tmp_path):
    one = _one(TUNE + ["--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(TUNE + ["--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a["tune"]["picks"] == b["tune"]["picks"]
    _close(a["tune"]["points"], b["tune"]["points"])
    _close(_runs(tmp_path / "one" / "results.json"), _runs(tmp_path / "two" / "results.json"))


def _ranks(args_per_rank: list, tmp_path: Path, timeout_min: str = "1") -> list:
    """Start one ``python -m ltcache`` per rank with torchrun's environment (gloo on localhost)."""
    return ranks.launch(args_per_rank, tmp_path, timeout_min)


@needs_torchrun
def test_mismatched_seeds_are_refused(tmp_path):
    base = ["bench", "--methods", "ce", "--epochs", "1", "--quiet", "--jobs", "1"]
    outs = _ranks([base + ["--seeds", "0,1"], base + ["--seeds", "0,2"]], tmp_path)
    for rc, out, err in outs:
        assert rc == 2, err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "rank 1 planned a different sweep than rank 0" in lines[0], err


@needs_torchrun
def test_missing_rank_times_out_with_one_line(tmp_path):
    # rank 1 never starts: rank 0 gives up after LTCACHE_DIST_TIMEOUT (here 0.05 min = 3 s)
    rc, out, err = _lonely_rank0(tmp_path)
    assert rc == 2, err
    assert err.strip().splitlines()[-1].startswith("error: rank 0: could not join the other ranks")


def _lonely_rank0(tmp_path: Path) -> tuple:
    env = _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ranks.free_port()),
               LTCACHE_DIST_TIMEOUT="0.05")
    p = subprocess.run([sys.executable, "-m", "ltcache", "bench", "--methods", "ce", "--epochs", "1", "--quiet"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


PIPELINE = """
[pipeline]
name = "tiny"
[dataset]
source = "imagefolder:imgs"
imb_ratio = 2
val_per_class = 2
[stage1]
arch = "resnet32"
epochs = 1
batch_size = 8
lr = 0.05
schedule = "cosine"
warmup_epochs = 0
eval_every = 0
[extract]
protocol = "clean"
shard_rows = 16
[sweep]
methods = ["ce", "tau-norm"]
seeds = [0]
epochs = 1
[tune]
methods = ["ce"]
budget = 2
seeds = [0]
"""


@needs_torchrun
def test_pipeline_under_torchrun(tmp_path):
    # every step of `ltcache run` on two ranks: DDP stage 1, split extraction, split sweep and tune;
    # rank 0 alone prints and writes
    datagen.make_imagefolder(tmp_path / "imgs", num_classes=3, per_class_train=12, per_class_test=4, size=32)
    (tmp_path / "tiny.toml").write_text(PIPELINE)
    res = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "ltcache", "run", "tiny.toml",
                          "--out", "out", "--device", "cpu", "--data-root", ".", "--quiet"], cwd=tmp_path,
                         env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    assert torch.load(out / "stage1" / "stage1.pt", weights_only=False)["world_size"] == 2
    man = json.loads((out / "cache" / "manifest.json").read_text())
    assert man["extraction"].get("world_size") == 2
    runs = json.loads((out / "results" / "results.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"ce", "tau-norm"}
    assert json.loads((out / "tune" / "results.json").read_text())["tune"]["picks"].keys() == {"ce"}
    assert res.stdout.count("tau-norm") == 1                 # one table, from rank 0
