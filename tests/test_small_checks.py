"""Smaller checks: epochs and batch sizes bounded so they fit the engine's integers, "did you mean"
ignoring case, ``--from-tune`` errors naming the file, a configuration whose loss turns NaN after
the first step marked failed at the next epoch boundary, and honest messages for a ``.pt`` that is
not a torch.save file of tensors."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.stage2 import api, sweep
from test_stage2_engine import fake_cache

torch.set_num_threads(1)
CPU = ["--device", "cpu", "--jobs", "1", "--quiet"]


def invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res


def one_error(res, *needles) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: pytest.fail("trained on bad input"))


# -- epochs and batch sizes ----------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["retrain", "--method", "ce", "--epochs", "99999999999999999999"], "epochs (epochs) must be in [1, 100000]"),
    (["retrain", "--method", "ce", "--epochs", "1000000000"], "epochs (epochs) must be in [1, 100000], got 1000000000"),
    (["bench", "--methods", "ce", "--epochs", "1000000000"], "must be in [1, 100000]"),
    (["bench", "--methods", "ce", "--grid", "epochs=10,100001"], "must be in [1, 100000]"),
    (["retrain", "--method", "ce", "--batch-size", "99999999999999999999"], "must be in [1, 2147483647]"),
])
def test_stage2_epochs_and_batch_size_bounded(no_training, args, needle):
    one_error(invoke(*args, *CPU), needle)


def test_stage1_epochs_bounded(tmp_path):
    out = tmp_path / "run"
    one_error(invoke("train", "--dataset", "imagefolder:nowhere", "--epochs", "1000000000", "--out", out),
              "--epochs must be <= 100000 (got 1000000000)")
    one_error(invoke("train", "--dataset", "imagefolder:nowhere", "--batch-size", "99999999999999999999",
                     "--out", out), "--batch-size must be <=")
    assert not out.exists()


# -- did you mean, ignoring case -----------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["retrain", "--method", "LOS"], "unknown method 'LOS'; did you mean los"),
    (["bench", "--methods", "ce,Tau-Norm"], "did you mean tau-norm"),
    (["train", "--arch", "RESNET32", "--dataset", "imagefolder:nowhere"], "did you mean resnet32?"),
])
def test_suggestions_ignore_case(no_training, tmp_path, args, needle):
    one_error(invoke(*args, *(CPU if args[0] != "train" else ["--out", tmp_path / "o"])), needle)


def test_close_matches_ignore_case_and_keep_the_original_spelling():
    from ltcache.errors import close_matches
    assert close_matches("LOS", ["los", "ls", "ce"])[0] == "los"
    assert close_matches("Resnet32", ["resnet32", "resnet50"], n=1) == ["resnet32"]
    assert close_matches("los", ["los", "ls"]) == ["ls"]             # the word itself is no suggestion


# -- --from-tune errors name the file ------------------------------------------------------------
@pytest.fixture
def tune_file(tmp_path):
    api.tune(fake_cache(), methods=["los"], budget=1, tune_seeds=[0], seeds=[0], device="cpu", quiet=True,
             jobs=1, out_dir=tmp_path / "t")
    return tmp_path / "t" / "results.json"


def _edit(path, **point):
    doc = json.loads(path.read_text())
    doc["tune"]["picks"]["los"]["point"].update(point)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("cmd", [["retrain", "--method", "los"], ["bench"]])
def test_from_tune_edited_file_is_named(tune_file, monkeypatch, cmd):
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: pytest.fail("trained on bad input"))
    _edit(tune_file, delta=1.5)
    line = one_error(invoke(*cmd, "--from-tune", tune_file, *CPU), f"--from-tune {tune_file}", "out of range",
                     "delta", "1.5")
    assert "option" not in line
    _edit(tune_file, delta=0.5, nosuch=3)
    line = one_error(invoke(*cmd, "--from-tune", tune_file, *CPU), f"--from-tune {tune_file}",
                     "unknown key 'nosuch'")
    assert "--nosuch" not in line and "does not apply" not in line


# -- a loss that turns NaN after the first step --------------------------------------------------
LATE_NAN = '''
import torch.nn.functional as F
import ltcache

# finite at the first step, but unbounded below: the logits (so the weights) grow without end, and
# within a few steps they overflow to inf and the loss to NaN -- as a diverging loss does (a loss that
# counted its own calls would not do: the engine may trace a forward once and replay it)
@ltcache.register_loss("late-nan")
def late_nan(z, y):
    return F.cross_entropy(z, y) - 1e6 * z.pow(2).mean()

ltcache.register_method("late-nan", loss="late-nan", presets={"epochs": 2, "batch_size": 64, "lr": 10.0})
'''


def test_a_loss_that_turns_nan_later_marks_its_configuration_failed(tmp_path):
    from ltcache.plugins import isolated_registry
    with isolated_registry():                   # the plugin's method and loss are gone afterwards
        _late_nan_bench(tmp_path)


def _late_nan_bench(tmp_path):
    plugin = tmp_path / "late_nan_plugin.py"
    plugin.write_text(LATE_NAN)
    res = invoke("bench", "--methods", "late-nan", "--plugin", plugin, "--out", tmp_path / "b", *CPU)
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and notes[0].startswith("notice: late-nan") and "failed" in notes[0], res.stderr
    assert "non-finite" in notes[0] and "epoch 1 of 2" in notes[0]
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    runs = {r["method"]: r for r in doc["runs"]}
    assert "non-finite" in runs["late-nan"]["failed"] and "failed" not in runs["ce"]
    rows = {r["method"]: r for r in doc["summary"]}
    assert "failed" in rows["late-nan"] and "failed" not in rows["ce"]
    assert "late-nan[epochs=2] [FAILED" in res.output or "[FAILED: non-finite]" in res.output


def test_finite_training_is_never_marked_failed():
    res = api.bench(fake_cache(), ["ce", "los"], seeds=[0], overrides={"epochs": 2}, device="cpu", quiet=True, jobs=1)
    assert not any("failed" in r for r in res["runs"]) and not any("failed" in r for r in res["summary"])


# -- import of a .pt that is not a torch.save file of tensors ------------------------------------
def _pt(tmp_path, kind):
    p = tmp_path / f"{kind}.pt"
    if kind == "random":
        p.write_bytes(bytes(range(7, 250)) * 4)
    elif kind == "text":
        p.write_text("train_features,train_labels\n1,2\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "pickle":
        p.write_bytes(pickle.dumps({"a": 1}))
    elif kind == "numpy":
        import numpy as np
        torch.save({"train_features": np.zeros(3)}, p)
    elif kind == "truncated":
        torch.save({"train_features": torch.zeros(50, 4)}, p)
        p.write_bytes(p.read_bytes()[:300])
    return p


@pytest.mark.parametrize("kind,needles", [
    ("random", ["is not a torch.save file: found other binary data starting 07 08 09", "expected a dict of tensors"]),
    ("text", ["is not a torch.save file: found text starting 'train_features,train_l", "expected a dict"]),
    ("empty", ["is not a torch.save file: found an empty file"]),
    ("pickle", ["found a pickle that torch.save did not write"]),
    ("numpy", ["holds objects other than tensors (found numpy."]),
    ("truncated", ["found a damaged or truncated torch.save archive"]),
])
def test_import_of_a_garbage_pt_says_what_it_found(tmp_path, kind, needles):
    src = _pt(tmp_path, kind)
    line = one_error(invoke("import", src, "--out", tmp_path / "out"), str(src), *needles)
    if kind != "numpy":
        assert "numpy arrays" not in line
    assert not (tmp_path / "out").exists()
