"""Nothing silent: a repeated single-valued option, a file option ending in '/', a grid key some methods
lack, results not written, an added reference row -- each is said, or refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.stage2 import api
from test_stage2_engine import fake_cache

torch.set_num_threads(1)
FAST = ["--epochs", "1", "--device", "cpu", "--jobs", "1", "--quiet"]


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    return CliRunner()


@pytest.mark.parametrize("args,needle", [
    (["bench", "--methods", "ce", "--seeds", "0", "--seeds", "1"], "--seeds given more than once"),
    (["bench", "--methods", "ce", "--seeds=0", "--seeds", "1"], "--seeds given more than once"),
    (["retrain", "--method", "ce", "--method", "los"], "--method given more than once"),
    (["tune", "--methods", "ce", "--budget", "2", "--budget", "3"], "--budget given more than once"),
    (["train", "--epochs", "1", "--epochs", "2"], "--epochs given more than once"),
    (["retrain", "--method", "ce", "--out", "results/r3/"], "ends with '/'"),
    (["retrain", "--method", "ce", "--export=m/"], "ends with '/'"),
    (["extract", "--ckpt", "runs/x/"], "ends with '/'"),
    (["bench", "--methods", "los,mislas", "--grid", "delta=0.9", "--strict"], "does not apply to mislas"),
])
def test_refused_in_one_line(runner, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert not any(tmp_path.iterdir())                       # nothing written


def test_repeatable_options_still_repeat(runner):
    res = runner.invoke(cli, ["bench", "--methods", "los", "--grid", "delta=0.9", "--grid", "lr=0.01"] + FAST)
    assert res.exit_code == 0, res.output


def test_grid_notice_reference_note_and_not_saved(runner):
    res = runner.invoke(cli, ["bench", "--methods", "los,mislas", "--grid", "delta=0.9,0.98"] + FAST)
    assert res.exit_code == 0, res.output
    assert "notice: --grid delta does not apply to mislas" in res.output
    assert any(ln.startswith("ce") and "(reference)" in ln for ln in res.output.splitlines())
    assert "(reference): plain CE" in res.output
    assert "LM (Logits Magnitude" in res.output and "RSD (Regularized Standard Deviation)" in res.output
    assert res.output.rstrip().splitlines()[-1].startswith("results not saved")
    res = runner.invoke(cli, ["bench", "--methods", "ce,los"] + FAST)      # ce asked for: no reference label
    assert res.exit_code == 0 and "(reference)" not in res.output, res.output
    res = runner.invoke(cli, ["retrain", "--method", "ce"] + FAST[:2] + FAST[-1:])
    assert res.output.rstrip().splitlines()[-1].startswith("results not saved"), res.output


def test_results_record_threads_preset_world_size(runner, tmp_path):
    res = runner.invoke(cli, ["bench", "--methods", "ce", "--threads", "1", "--out", str(tmp_path / "b")] + FAST)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    assert doc["threads"] == 1 and doc["world_size"] == 1 and doc["preset"] and doc["device"] == "cpu"
    assert doc["cache"]["path"] is not None
    res = runner.invoke(cli, ["bench", "--methods", "ce", "--device", "cpu", "--epochs", "1", "--jobs", "1"])
    assert "preset cifar, device cpu" in res.output and "world size 1" in res.output
