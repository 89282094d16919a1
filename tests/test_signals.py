"""Stops from outside: SIGTERM on one process of every writing command ends it with one line that
says what was kept (exit 143, lock released, no temporary file), and the same command continues;
under torchrun, a rank that is killed is named in one line by every surviving rank (exit 2).

Every stop happens at a known point of the work (``LTCACHE_TEST_SIGTERM=POINT``: the process signals
itself there; ``LTCACHE_TEST_KILL=RANK:N``: that rank SIGKILLs itself on entering its N-th collective),
so no test races the work it interrupts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datagen
import ranks
from ltcache import distributed
from ltcache.models import build_model

BENCH = ["bench", "--methods", "ce,los", "--seeds", "0", "--epochs", "1", "--quiet", "--jobs", "1"]
TUNE = ["tune", "--methods", "ce,los", "--budget", "2", "--seeds", "0", "--tune-seeds", "0", "--quiet", "--jobs", "1"]


def _env(**extra: str) -> dict:
    return ranks.env(OMP_NUM_THREADS="1", **extra)


def _run(args: list, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltcache", *args], cwd=cwd, env=_env(**extra), capture_output=True,
                          text=True, timeout=300)


def _leftovers(folder: Path) -> list:
    """A lock or temporary file left in ``folder`` (and below)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name == ".lock" or ".tmp" in p.name or p.name.startswith(".tmp"))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class 32-px image folder and a randomly initialised resnet32 saved as a state dict."""
    base = tmp_path_factory.mktemp("signals")
    datagen.make_imagefolder(base / "imgs", num_classes=3, per_class_train=12, per_class_test=4, size=32)
    torch.manual_seed(0)
    torch.save(build_model("resnet32", 3).state_dict(), base / "net.pt")
    return base


TRAIN = ["train", "--dataset", "imagefolder:imgs", "--imb-ratio", "2", "--val-per-class", "2", "--arch", "resnet32",
         "--epochs", "2", "--batch-size", "8", "--schedule", "cosine", "--warmup-epochs", "0", "--eval-every", "0",
         "--device", "cpu", "--workers", "1", "--data-root", ".", "--quiet"]
EXTRACT = ["extract", "--ckpt", "net.pt", "--arch", "resnet32", "--dataset", "imagefolder:imgs", "--imb-ratio", "2",
           "--val-per-class", "2", "--protocol", "clean", "--shard-rows", "8", "--batch-size", "8", "--device", "cpu",
           "--workers", "1", "--data-root", ".", "--quiet"]


def test_sigterm_in_bench_is_one_line_and_leaves_nothing(tmp_path):
    res = _run(BENCH + ["--out", "out"], tmp_path, LTCACHE_TEST_SIGTERM="sweep")
    assert res.returncode == 143, res.stderr
    assert _one_line(res.stderr) == "stopped by SIGTERM: nothing was written; the same command starts over"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sigterm_in_tune_keeps_stage_a_and_the_same_command_continues(tmp_path):
    res = _run(TUNE + ["--out", "out"], tmp_path, LTCACHE_TEST_SIGTERM="stage-b")
    assert res.returncode == 143, res.stderr
    assert _one_line(res.stderr) == ("stopped by SIGTERM: stage A's picks are kept in out/stage_a.json; the same "
                                     "command continues with stage B")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["stage_a.json"]
    stage_a = (out / "stage_a.json").read_text()
    # a different plan into that folder is refused, naming --force; the folder is untouched
    other = _run(["tune", "--methods", "ce,los", "--budget", "3", "--seeds", "0", "--quiet", "--jobs", "1",
                  "--out", "out"], tmp_path)
    assert other.returncode == 2 and "different tune" in _one_line(other.stderr) and "--force" in other.stderr
    assert (out / "stage_a.json").read_text() == stage_a
    again = _run(TUNE + ["--out", "out"], tmp_path)
    assert again.returncode == 0, again.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["tune"]["stage_a"]["resumed"] is True
    fresh = _run(TUNE + ["--out", "fresh"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    ref = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert doc["tune"]["picks"] == ref["tune"]["picks"] and doc["tune"]["table"] == ref["tune"]["table"]
    assert not _leftovers(out)


def test_sigterm_in_extract_keeps_shards_and_resumes(tiny, tmp_path):
    res = _run(EXTRACT + ["--cache", str(tmp_path / "c")], tiny, LTCACHE_TEST_SIGTERM="shard")
    assert res.returncode == 143, res.stderr
    assert _one_line(res.stderr) == ("stopped by SIGTERM: the completed shards are kept; the same command resumes "
                                     "from them")
    assert not _leftovers(tmp_path / "c") and not (tmp_path / "c" / "manifest.json").exists()
    again = _run(EXTRACT + ["--cache", str(tmp_path / "c")], tiny)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "c" / "manifest.json").exists()


def test_sigterm_in_train_keeps_the_last_epoch(tiny, tmp_path):
    out = tmp_path / "s1"
    res = _run(TRAIN + ["--out", str(out)], tiny, LTCACHE_TEST_SIGTERM="epoch")
    assert res.returncode == 143, res.stderr
    assert _one_line(res.stderr) == (f"stopped by SIGTERM: {out / 'stage1.pt'} holds the last complete epoch; the "
                                     "same command with --resume continues from it")
    assert not _leftovers(out)
    assert torch.load(out / "stage1.pt", weights_only=False)["epoch"] == 1
    again = _run(TRAIN + ["--out", str(out), "--resume"], tiny)
    assert again.returncode == 0, again.stderr
    assert torch.load(out / "stage1.pt", weights_only=False)["epoch"] == 2


# -- a rank killed (SIGKILL) under torchrun's environment: the other one names it ------------------------

PIPE = """[pipeline]
name = "tiny"
[dataset]
source = "imagefolder:imgs"
imb_ratio = 2
val_per_class = 2
[stage1]
arch = "resnet32"
epochs = 1
batch_size = 8
schedule = "cosine"
warmup_epochs = 0
eval_every = 0
[extract]
protocol = "clean"
[sweep]
methods = ["ce"]
epochs = 1
"""

# (command, the collective at which the victim dies: after rank 0 has taken its output lock)
COMMANDS = {
    "train": (TRAIN + ["--out", "o"], 4),
    "extract": (EXTRACT + ["--cache", "o"], 4),
    "bench": (BENCH + ["--out", "o"], 3),
    "tune": (TUNE + ["--out", "o"], 3),
    "run": (["run", "tiny.toml", "--out", "o", "--device", "cpu", "--data-root", ".", "--quiet"], 3),
}


# every command loses each rank in turn (rank 0 holds the output lock)
KILLS = [(command, victim) for command in COMMANDS for victim in (1, 0)]


@pytest.mark.skipif(not distributed._dist().is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("command, victim", KILLS)
def test_a_killed_rank_is_named_by_the_survivor(tiny, tmp_path, command, victim):
    for p in tiny.iterdir():
        (tmp_path / p.name).symlink_to(p)
    (tmp_path / "tiny.toml").write_text(PIPE)
    args, at = COMMANDS[command]
    outs = ranks.launch([args, args], tmp_path, LTCACHE_TEST_KILL=f"{victim}:{at}")
    survivor = 1 - victim
    assert outs[victim][0] == -9, outs[victim][2]
    rc, _, err = outs[survivor]
    assert rc == 2, err
    line = _one_line(err)
    assert line.startswith(f"error: rank {survivor}: lost rank {victim} during "), line
    if survivor == 0:                                       # rank 0 held the output lock: released
        assert not _leftovers(tmp_path / "o")


TORCHRUN = ranks.TORCHRUN


@pytest.mark.skipif(TORCHRUN is None or not distributed._dist().is_available(), reason="torchrun not available")
def test_under_torchrun_the_survivor_names_rank_0_and_releases_its_lock(tmp_path):
    # torchrun stops the surviving rank with SIGTERM once rank 0 is gone: one line naming rank 0,
    # and the output lock rank 0 held is released (torchrun's store outlives the ranks)
    res = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "--log-dir", "logs", "--redirects", "3",
                          "-m", "ltcache", *BENCH, "--out", "o"], cwd=tmp_path, env=_env(LTCACHE_TEST_KILL="0:3"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    (err1,) = [p.read_text() for p in (tmp_path / "logs").rglob("stderr.log") if p.parent.name == "1"]
    assert _one_line(err1).startswith("error: rank 1: lost rank 0 during "), err1
    assert not _leftovers(tmp_path / "o")
