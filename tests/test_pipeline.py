"""Pipelines: the shipped files parse; smoke.toml runs end to end and resumes; bad files are
one-line errors naming the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import datagen
from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.pipeline import parse_pipeline

torch.set_num_threads(1)
PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.parametrize("name", ["cifar10_lt_ir100", "cifar10_lt_ir50", "cifar10_lt_ir10", "cifar100_lt_ir100", "smoke",
                                  "imagenet_lt_resnext50", "imagenet_lt_resnet50", "inat2018_resnet50",
                                  "places_lt_resnet152"])
def test_shipped_pipelines_parse(name):
    pl = parse_pipeline(PIPELINES / f"{name}.toml")
    assert pl.name == name and pl.stage1["arch"]
    # the recipe is one `ltcache train` accepts (arch registered, schedule and warm-up fit) and the
    # [extract] keys are extract()'s parameters (the weights file of Places-LT is the user's)
    import inspect
    from ltcache.cache.extraction import extract
    from ltcache.stage1 import Stage1Options
    s1 = {k: v for k, v in pl.stage1.items() if k != "pretrained"}
    ds = {k: v for k, v in pl.dataset.items() if k not in ("source", "data_root", "download")}
    Stage1Options(dataset=pl.dataset["source"], **{**ds, **s1}).validate()
    inspect.signature(extract).bind_partial(**pl.extract)


def test_smoke_pipeline_end_to_end_and_resume(tmp_path):
    datagen.make_imagefolder(tmp_path / "smoke-data", num_classes=4, per_class_train=24, per_class_test=8, size=32)
    out = tmp_path / "out"
    args = ["run", str(PIPELINES / "smoke.toml"), "--data-root", str(tmp_path), "--out", str(out),
            "--device", "cpu", "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results" / "results.json").read_text())
    methods = {r["method"] for r in results["runs"]}
    assert {"ce", "los", "crt", "lws", "tau-norm", "balanced-softmax", "marc"} <= methods
    assert all(r["metrics"]["all"] is not None for r in results["runs"])
    tuned = json.loads((out / "tune" / "results.json").read_text())          # the [tune] step
    assert set(tuned["tune"]["picks"]) == {"ce", "los", "tau-norm"} and (out / "tune" / "tune.md").is_file()
    tuned_table = tuned["tune"]["table"]
    # the smoke data is learnable: the best method is well above chance (25 % on 4 classes)
    assert max(r["metrics"]["all"] for r in results["runs"]) >= 0.6
    ckpt = out / "stage1" / "stage1.pt"
    manifest = out / "cache" / "manifest.json"
    files = [ckpt, manifest, out / "results" / "results.json", out / "tune" / "results.json"]
    stamps = [f.stat().st_mtime_ns for f in files]
    res = CliRunner().invoke(cli, args)            # everything complete: every step is skipped
    assert res.exit_code == 0, res.output
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert json.loads((out / "tune" / "results.json").read_text())["tune"]["table"] == tuned_table
    # a changed [tune] section: refused without --force, nothing replaced
    changed = tmp_path / "smoke.toml"
    changed.write_text((PIPELINES / "smoke.toml").read_text().replace("budget = 2", "budget = 3"))
    args2 = ["run", str(changed)] + args[2:]
    res = CliRunner().invoke(cli, args2)
    assert res.exit_code == 2 and "--force" in res.output and "[tune]" in res.output
    assert [f.stat().st_mtime_ns for f in files] == stamps
    res = CliRunner().invoke(cli, args2 + ["--force"])     # only the tune step re-runs
    assert res.exit_code == 0, res.output
    assert [f.stat().st_mtime_ns for f in files][:3] == stamps[:3]
    assert files[3].stat().st_mtime_ns != stamps[3]


@pytest.mark.parametrize("text,needle", [
    ("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\nepochz = 3\n", "unknown key [stage1] epochz"),
    ("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\nepochs = 'ten'\n", "[stage1] epochs must be an integer"),
    ("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\n[sweeep]\n", "unknown section [sweeep]"),
    ("[stage1]\narch = 'resnet32'\n", "missing [dataset] source"),
    ("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\n[tune]\nbudget = 'many'\n", "[tune] budget must be an integer"),
    ("[dataset\nsource=", "not valid TOML"),
])
def test_bad_pipeline_files(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(LtcacheError) as exc:
        parse_pipeline(p)
    assert needle in str(exc.value)
    res = CliRunner().invoke(cli, ["run", str(p)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("error:")


LATE = """[pipeline]
name = "late"
[dataset]
source = "imagefolder:imgs"
imb_ratio = 2
[stage1]
arch = "resnet32"
epochs = 1
schedule = "cosine"
warmup_epochs = 0
"""


@pytest.mark.parametrize("section, needle", [
    ('[sweep]\nmethods = ["ce", "nosuch"]\n', "[sweep]: unknown method 'nosuch'"),
    ('[sweep]\nmethods = ["ce"]\ngrid = {delta = [0.9]}\n', "[sweep]: --grid delta applies to none"),
    ('[sweep]\nmethods = ["la-loss"]\ngrid = {"vs.tau" = [1.0]}\n', "[sweep]: --grid vs.tau: method vs is not in this run"),
    ('[sweep]\nmethods = ["la-loss"]\ngrid = {la-loss = {delta = [0.9]}}\n', "method la-loss has no hyper-parameter delta"),
    ('[sweep]\nmethods = ["los"]\nseeds = [0, 0]\n', "[sweep]:"),
    ('[sweep]\nmethods = ["ce"]\n[tune]\nbudget = 0\n', "[tune]: budget must be an integer >= 1"),
    ('[sweep]\nmethods = ["ce"]\n[tune]\nmethods = ["nosuch"]\n', "[tune]: unknown method 'nosuch'"),
    ('[sweep]\nmethods = ["ce"]\n[tune]\nsearch = "bayes"\n', "[tune]: search 'bayes' is unknown"),
])
def test_run_checks_every_step_before_stage1(tmp_path, section, needle):
    # a later step's bad option is refused before stage 1 starts (hours on a real dataset)
    (tmp_path / "late.toml").write_text(LATE + section)
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "late.toml"), "--out", str(tmp_path / "out"),
                                   "--data-root", str(tmp_path), "--quiet"])
    assert res.exit_code == 2, res.output
    assert needle in res.output and str(tmp_path / "late.toml") in res.output, res.output
    assert not (tmp_path / "out").exists()                   # nothing started, nothing written


def test_sweep_grid_takes_qualified_names(tmp_path):
    # "vs.tau" (quoted) and vs.tau (a TOML table) name vs's tau only; both pass the checks before stage 1
    from ltcache.pipeline import check_steps, flat_grid
    assert flat_grid({"vs": {"tau": [1.0]}, "la-loss.tau": [0.5], "lr": [0.1]}) == {
        "vs.tau": [1.0], "la-loss.tau": [0.5], "lr": [0.1]}
    for grid in ('{"la-loss.tau" = [0.5, 1.0]}', '{vs.tau = [1.0, 1.5], tau = [0.5]}'):
        p = tmp_path / "q.toml"
        p.write_text(LATE + f'[sweep]\nmethods = ["la-loss", "vs"]\ngrid = {grid}\n')
        check_steps(parse_pipeline(p), p)
    p.write_text(LATE + '[sweep]\nmethods = ["vs"]\ngrid = {"vs.nosuch" = [1.0]}\n')
    with pytest.raises(LtcacheError, match="grid key 'vs.nosuch' is not a hyper-parameter"):
        parse_pipeline(p)
