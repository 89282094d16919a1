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
    (["bench", "--methods", "la-loss,vs", "--grid", "nosuch.tau=1"], "--grid nosuch.tau: unknown method 'nosuch'"),
    (["bench", "--methods", "la-loss,vs", "--grid", "los.delta=0.9"], "method los is not in this run"),
    (["bench", "--methods", "la-loss,vs", "--grid", "vs.delta=0.9"], "method vs has no hyper-parameter delta"),
    (["bench", "--methods", "la-loss,vs", "--grid", "vs.tau=-1"], "VS additive"),
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


def test_bench_grid_qualified_names(runner, tmp_path):
    # tau is la-loss's offset and vs's additive tau: la-loss.tau sweeps la-loss's only, vs keeps its preset
    res = runner.invoke(cli, ["bench", "--methods", "la-loss,vs", "--grid", "la-loss.tau=0.5,1", "--grid", "epochs=1",
                              "--out", str(tmp_path), "--quiet", "--device", "cpu", "--jobs", "1"])
    assert res.exit_code == 0, res.output
    names = {r["name"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert {"la-loss[tau=0.5,epochs=1]", "la-loss[tau=1,epochs=1]", "vs[gamma=0.2,tau=1.2,epochs=1]"} <= names
    assert not any(n.startswith("vs[") and n != "vs[gamma=0.2,tau=1.2,epochs=1]" for n in names)
    # a qualified key wins over the short one for its method; the short one still reaches the others
    plans = api.expand(["la-loss", "vs"], None, {"tau": [0.3], "la-loss.tau": [0.7]}, "cifar", 100)
    assert [(m.name, p["tau"]) for m, p, _ in plans] == [("la-loss", 0.7), ("vs", 0.3)]
    plans = api.expand(["la-loss", "vs"], {"vs.tau": 1.5}, {"tau": [0.3]}, "cifar", 100)
    assert [(m.name, p["tau"]) for m, p, _ in plans] == [("la-loss", 0.3), ("vs", 1.5)]


def test_help_says_what_a_shared_name_means_for_each_method(runner):
    res = runner.invoke(cli, ["retrain", "--help"], terminal_width=400)
    assert res.exit_code == 0
    tau = next(ln for ln in res.output.splitlines() if ln.strip().startswith("--tau"))
    for part in ("la-loss: logit-adjusted loss offset", "vs: VS additive", "tau-norm: tau-norm exponent",
                 "posthoc-la: post-hoc logit adjustment", "vs.tau=..."):
        assert part in tau, tau
    res = runner.invoke(cli, ["bench", "--help"], terminal_width=400)
    assert "la-loss.tau" in res.output
