"""CLI of stage 2: option validation (exit 2, one line) and the happy paths on a fake cache."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.stage2 import api
from test_stage2_engine import fake_cache

torch.set_num_threads(1)


@pytest.fixture
def runner(monkeypatch):
    # private stand-in for ltcache.cache.load: every --cache resolves to an in-memory fake cache
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    return CliRunner()


@pytest.mark.parametrize("args,needle", [
    (["retrain", "--method", "lso"], "did you mean"),
    (["retrain", "--method", "los", "--tau", "1"], "--tau does not apply to method los"),
    (["retrain", "--method", "los", "--delta", "1.5"], "must be in [0, 1]"),
    (["retrain", "--method", "ce", "--lr", "-1"], "lr (learning rate) must be in"),
    (["retrain", "--method", "la-loss", "--tau", "-0.5"], "tau"),
    (["retrain", "--method", "ce", "--seeds", "0,x"], "--seeds"),
    (["retrain", "--method", "ce", "--seeds", "1,1"], "distinct"),
    (["bench", "--methods", "los", "--grid", "delta="], "empty"),
    (["bench", "--methods", "los", "--grid", "tau=1,2"], "applies to none"),
    (["bench", "--methods", "los", "--grid", "delta=0.5,2"], "must be in [0, 1]"),
    (["bench"], "exactly one of --all-methods or --methods"),
])
def test_bad_input_is_one_line_exit_2(runner, args, needle):
    res = runner.invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output


def test_retrain_prints_table_and_writes_json(runner, tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(cli, ["retrain", "--method", "los", "--delta", "0.9", "--epochs", "2", "--seeds", "0,1",
                              "--out", str(out), "--quiet", "--device", "cpu", "--jobs", "1"])
    assert res.exit_code == 0, res.output
    assert "los[delta=0.9,epochs=2]" in res.output and "±" in res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "ltcache-results/1" and len(doc["runs"]) == 2


def test_bench_grid_and_methods_listing(runner, tmp_path):
    res = runner.invoke(cli, ["bench", "--methods", "los,mislas", "--grid", "delta=0.5,0.9", "--grid", "eps-head=0.3",
                              "--epochs", "1", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = (tmp_path / "summary.md").read_text()
    assert "los[delta=0.5,epochs=1]" in summary and "los[delta=0.9,epochs=1]" in summary
    assert "mislas[eps_head=0.3" in summary and "ce[epochs=1] (reference)" in summary
    res = runner.invoke(cli, ["methods"])
    assert res.exit_code == 0 and "mislas" in res.output and "docs/methods.md#mislas" in res.output
