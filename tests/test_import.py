"""`ltcache import`: features you already have -> a verified cache; the same results as the cache
they came from; bad input refused in one line with nothing written; caches without a stage-1
classifier (fit one, or the methods that need one are refused / skipped)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ltcache.cache import load
from ltcache.cache.build import write_cache
from ltcache.cache.importer import import_features
from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.stage2 import api
from ltcache.stage2.methods import METHODS
from ltcache.stage2.requirements import needs_stage1
from test_stage2_engine import fake_cache

torch.set_num_threads(1)

METHODS_CHECKED = ["ce", "crt", "lws", "marc", "tau-norm", "posthoc-la", "ncm", "cosine"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small cache written from tensors (the extracted cache stand-in) and its arrays."""
    root = tmp_path_factory.mktemp("import")
    fc = fake_cache()
    splits = {n: (s.features, s.labels, s.index, s.views) for n, s in fc.splits.items()}
    path = write_cache(root / "cache", splits, fc.weight, fc.bias, dataset={"source": "fake"},
                       class_counts=fc.class_counts.tolist(), arch="toy", dtype="float32", shard_rows=64)
    cache = load(path, quiet=True)
    arrays = {f"{s}_{k}": getattr(sp, k).numpy() for s, sp in cache.splits.items() for k in ("features", "labels")}
    return root, path, cache, arrays, (cache.weight.numpy(), cache.bias.numpy())


def _bench(cache):
    return api.bench(cache, methods=METHODS_CHECKED, overrides={"epochs": 2}, seeds=(0,), quiet=True,
                     device="cpu", jobs=1)


def _table(res):
    keep = ("all", "many", "medium", "few", "ece", "nll", "per_class_acc")
    return ({k: res["stage1"][k] for k in keep},
            [(r["name"], r["params"], {k: r["metrics"][k] for k in keep}) for r in res["runs"]])


def test_import_npz_and_pt_give_the_same_table_as_the_cache(source):
    root, path, cache, arrays, (w, b) = source
    np.savez(root / "feats.npz", **arrays, weight=w, bias=b)
    nested = {s: {"features": torch.from_numpy(arrays[f"{s}_features"]), "labels": torch.from_numpy(arrays[f"{s}_labels"])}
              for s in ("train", "val", "test")}
    torch.save({**nested, "weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}, root / "feats.pt")
    reference = _table(_bench(cache))
    for name in ("feats.npz", "feats.pt"):
        out = import_features(root / name, root / f"imported-{name}")
        got = load(out, quiet=True)
        for s, sp in cache.splits.items():
            assert torch.equal(got.splits[s].features, sp.features) and torch.equal(got.splits[s].labels, sp.labels)
            assert got.splits[s].views == sp.views
        assert got.class_counts.tolist() == cache.class_counts.tolist() and got.groups == cache.groups
        assert got.manifest["stage1_classifier"]["source"] == "given"
        assert _table(_bench(got)) == reference, name


def test_import_npy_folder_and_hdf5_and_views(source, tmp_path):
    _, _, cache, arrays, _ = source
    folder = tmp_path / "npy"
    folder.mkdir()
    two_d = {k: (v[:, 0] if k.endswith("features") else v) for k, v in arrays.items()}   # [N, D]: one view
    for k, v in two_d.items():
        np.save(folder / f"{k}.npy", v)
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        for k, v in arrays.items():
            split, what = k.split("_")
            f.create_dataset(f"{split}/{what}", data=v)
        f.create_dataset("class_names", data=np.array([f"c{i}" for i in range(5)], dtype="S"))
    a = load(import_features(folder, tmp_path / "a", fit_classifier_head=True), quiet=True)
    assert a.splits["train"].views == ["clean"] and a.splits["test"].views == ["center"]
    assert torch.equal(a.splits["train"].features[:, 0], cache.splits["train"].features[:, 0])
    h = load(import_features(tmp_path / "feats.h5", tmp_path / "h"), quiet=True)
    assert h.splits["train"].views == ["clean", "aug1", "aug2"] and h.class_names == [f"c{i}" for i in range(5)]
    assert h.manifest["stage1_classifier"]["source"] == "none"
    res = CliRunner().invoke(cli, ["info", "--verify", str(tmp_path / "h")])
    assert res.exit_code == 0 and "verified" in res.output


def _write(path, arrays, **extra):
    np.savez(path, **{**arrays, **extra})
    return path


BAD = [
    ("lengths", lambda a: {**a, "train_labels": a["train_labels"][:-1]}, "has 258 rows but 'train_labels' has 257"),
    ("nan", lambda a: {**a, "test_features": np.where(np.arange(50)[:, None, None] == 3, np.nan, a["test_features"])},
     "non-finite values (NaN/inf), the first in row 3"),
    ("label-range", lambda a: {**a, "test_labels": a["test_labels"] - 1}, "holds -1, outside [0, 5)"),
    ("no-test", lambda a: {k: v for k, v in a.items() if not k.startswith("test")}, "the test split is missing"),
    ("empty-class", lambda a: {**a, "train_labels": np.where(a["train_labels"] == 2, 1, a["train_labels"])},
     "class 2 has no training row"),
    ("weight-shape", lambda a: {**a, "weight": np.zeros((5, 7), np.float32), "bias": np.zeros(5, np.float32)},
     "weight is float32 (5, 7), expected [K, 8]"),
    ("weight-classes", lambda a: {**a, "weight": np.zeros((4, 8), np.float32)}, "holds 4, outside [0, 4)"),
    ("typo", lambda a: {**{k: v for k, v in a.items() if k != "train_labels"}, "train_label": a["train_labels"]},
     "unknown key 'train_label' (did you mean 'train_labels'?)"),
    ("int-labels", lambda a: {**a, "train_labels": a["train_labels"].astype(np.float32)}, "1-D integer array"),
]


@pytest.mark.parametrize("case,edit,needle", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(source, tmp_path, case, edit, needle):
    arrays = source[3]
    src = _write(tmp_path / "feats.npz", edit(dict(arrays)))
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(cli, ["import", str(src), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    assert needle in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # no cache, no temporary folder


def test_unknown_format_existing_output_and_conflicting_classifiers(source, tmp_path):
    arrays, (w, b) = source[3], source[4]
    (tmp_path / "feats.csv").write_text("1,2\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["import", str(tmp_path / "feats.csv"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown format '.csv'; use .npz, .pt/.pth" in res.output
    src = _write(tmp_path / "feats.npz", arrays)
    np.savez(tmp_path / "clf.npz", weight=w, bias=b)
    out = tmp_path / "out"
    assert runner.invoke(cli, ["import", str(src), "--out", str(out), "--quiet"]).exit_code == 0
    sha = json.loads((out / "manifest.json").read_text())["checksum"]
    res = runner.invoke(cli, ["import", str(src), "--out", str(out), "--classifier", str(tmp_path / "clf.npz")])
    assert res.exit_code == 2 and "already holds a cache; pass --force" in res.output
    assert json.loads((out / "manifest.json").read_text())["checksum"] == sha        # untouched
    res = runner.invoke(cli, ["import", str(src), "--out", str(out), "--classifier", str(tmp_path / "clf.npz"),
                              "--fit-classifier"])
    assert res.exit_code == 2 and "pass one of them" in res.output
    res = runner.invoke(cli, ["import", str(src), "--out", str(out), "--force", "--quiet",
                              "--classifier", str(tmp_path / "clf.npz")])
    assert res.exit_code == 0, res.output
    got = load(out, quiet=True)
    assert np.array_equal(got.weight.numpy(), w)
    man = got.manifest
    assert man["stage1_classifier"]["source"] == "given" and "clf.npz" in man["stage1_classifier"]["from"]
    assert man["import"]["sources"][0]["sha256"] and man["import"]["command"].startswith("ltcache ")
    assert "train_features" in man["import"]["key_convention"]
    assert not list(tmp_path.glob(".out.*"))


def test_fit_classifier_is_recorded_and_deterministic(source, tmp_path):
    arrays = source[3]
    src = _write(tmp_path / "feats.npz", arrays)
    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(cli, ["import", str(src), "--out", str(tmp_path / name), "--fit-classifier", "--quiet"])
        assert res.exit_code == 0, res.output
    a, b = load(tmp_path / "a", quiet=True), load(tmp_path / "b", quiet=True)
    how = a.manifest["stage1_classifier"]["how"]
    assert a.manifest["stage1_classifier"]["source"] == "fit" and how.startswith("fit by ltcache import: ")
    assert "L-BFGS" in how and how in "\n".join(a.manifest["provenance"].values())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    x, y = a.splits["train"].features[:, 0], a.splits["train"].labels
    assert float(((x @ a.weight.t() + a.bias).argmax(1) == y).float().mean()) > 0.8
    res = api.retrain(a, "tau-norm", {"tau": 1.0}, quiet=True, device="cpu")
    assert res["runs"][0]["metrics"]["all"] > 50


def test_without_a_classifier_stage1_methods_are_refused_and_bench_skips_them(source, tmp_path):
    src = _write(tmp_path / "feats.npz", source[3])
    out = import_features(src, tmp_path / "bare")
    cache = load(out, quiet=True)
    with pytest.raises(LtcacheError) as ei:
        api.retrain(cache, "tau-norm", quiet=True, device="cpu")
    msg = str(ei.value)
    assert msg.startswith("method tau-norm is computed from the stage-1 classifier, but") and "\n" not in msg
    assert "--classifier FILE" in msg and "--fit-classifier" in msg
    res = CliRunner().invoke(cli, ["retrain", "--method", "los", "--cache", str(out)])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output
    assert errors[0].startswith("error: method los starts from the stage-1 classifier")
    res = api.bench(out, methods=None, overrides={"epochs": 1}, quiet=True, device="cpu", jobs=1)
    stage1 = {m.name for m in METHODS.values() if needs_stage1(m)}
    assert {"ce", "tau-norm", "lws", "marc", "posthoc-la", "mislas", "los"} <= stage1
    assert {s["method"] for s in res["skipped"]} == stage1
    assert all("--fit-classifier" in s["why"] for s in res["skipped"])
    assert {r["method"] for r in res["runs"]} == set(METHODS) - stage1
    assert {"crt", "ncm", "cosine", "ldam"} <= {r["method"] for r in res["runs"]}
    from ltcache.stage2.results import format_table
    assert res["stage1_classifier"] is False and "stage-1 head" not in format_table(res)   # no placeholder row
    res = api.bench(out, methods=["crt"], overrides={"epochs": 1}, quiet=True, device="cpu", jobs=1)
    assert [r["method"] for r in res["runs"]] == ["crt"] and res["skipped"][0]["method"] == "ce"   # the reference row
