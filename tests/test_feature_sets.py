"""Feature sets: a method whose source keeps BatchNorm in eval mode trains on the cache's bn-eval
set (CACHE/sets/bn-eval) when the cache holds one, every other method on the main features; the
set is checked to come from the same checkpoint, and the choice is the method's registry entry."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ltcache.cache import feature_sets as fs
from ltcache.cache import load
from ltcache.cache.build import write_cache
from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.stage2 import api
from ltcache.stage2.methods import get_method, register_method

K, D = 10, 8
COUNTS = [12, 10, 8, 7, 6, 5, 4, 4, 3, 3]
DATASET = {"source": "synthetic", "imb_ratio": 4.0}


def _split(counts, views, g, centers, shift):
    y = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])
    x = centers[y][:, None, :] + 0.7 * torch.randn(len(y), len(views), D, generator=g) + shift
    return x, y, torch.arange(len(y)), views


def _write(path, shift: float, sha: str = "ck0"):
    """A K = 10 cache at ``path``; ``shift`` moves every feature (the 'other BN mode')."""
    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(K, D, generator=g)
    splits = {"train": _split(COUNTS, ["clean", "aug1"], g, centers, shift),
              "val": _split([2] * K, ["center", "hflip"], g, centers, shift),
              "test": _split([3] * K, ["center", "hflip"], g, centers, shift)}
    w = 0.2 * centers
    return write_cache(path, splits, w, torch.zeros(K), dataset=DATASET, class_counts=COUNTS,
                       checkpoint_sha256=sha, dtype="float32")


@pytest.fixture()
def with_set(tmp_path):
    main = _write(tmp_path / "c", 0.0)
    _write(fs.set_dir(main, "bn-eval"), 0.5)
    return main


FAST = {"epochs": 2}


def test_mislas_trains_on_the_bn_eval_set_and_ce_on_the_main_features(with_set):
    assert get_method("mislas").feature_set(K) == "bn-eval" and get_method("ce").feature_set(K) is None
    res = api.bench(with_set, ["ce", "mislas"], overrides=FAST, quiet=True, jobs=1)
    alone_set = api.retrain(fs.set_dir(with_set, "bn-eval"), "mislas", FAST, quiet=True, jobs=1)
    alone_main = api.retrain(with_set, "ce", FAST, quiet=True, jobs=1, main_features=True)
    runs = {r["method"]: r for r in res["runs"]}
    assert runs["mislas"]["features"] == "bn-eval" and "features" not in runs["ce"]
    assert runs["mislas"]["metrics"]["per_class_acc"] == alone_set["runs"][0]["metrics"]["per_class_acc"]
    assert runs["ce"]["metrics"]["per_class_acc"] == alone_main["runs"][0]["metrics"]["per_class_acc"]
    assert res["feature_sets"] == {"mislas": "bn-eval"}
    assert res["stage1"] == alone_main["stage1"]                  # the stage-1 row: the main features'
    assert [r["method"] for r in res["runs"]] == ["ce", "mislas"]  # plan order kept


def test_main_features_trains_every_method_on_the_main_features(with_set, tmp_path):
    on_set = api.retrain(with_set, "mislas", FAST, quiet=True, jobs=1)
    on_main = api.retrain(with_set, "mislas", FAST, quiet=True, jobs=1, main_features=True)
    plain = _write(tmp_path / "plain", 0.0)                      # the same main features, no set
    no_set = api.retrain(plain, "mislas", FAST, quiet=True, jobs=1)
    assert "features" not in on_main["runs"][0] and on_main["feature_sets"] == {}
    assert on_main["runs"][0]["metrics"]["per_class_acc"] == no_set["runs"][0]["metrics"]["per_class_acc"]
    assert on_set["runs"][0]["metrics"]["per_class_acc"] != on_main["runs"][0]["metrics"]["per_class_acc"]


def test_a_cache_without_the_set_says_how_to_add_it(tmp_path, capsys):
    plain = _write(tmp_path / "plain", 0.0)
    res = api.retrain(plain, "mislas", FAST, quiet=False, jobs=1)
    err = capsys.readouterr()
    assert "ltcache extract" in err.err + err.out and "--set bn-eval" in err.err + err.out
    assert res["feature_sets"] == {}


def test_a_set_from_another_checkpoint_is_refused(tmp_path):
    main = _write(tmp_path / "c", 0.0)
    _write(fs.set_dir(main, "bn-eval"), 0.5, sha="another")
    with pytest.raises(LtcacheError, match="another checkpoint") as err:
        api.retrain(main, "mislas", FAST, quiet=True, jobs=1)
    assert "\n" not in str(err.value) and "--set bn-eval --force" in str(err.value)


def test_bad_declarations_and_contradicting_options_are_refused():
    with pytest.raises(LtcacheError, match="unknown feature set 'bn-typo'"):
        register_method("fs-test-bad", loss="ce", feature_sets={10: "bn-typo"})
    with pytest.raises(LtcacheError, match="class counts"):
        register_method("fs-test-bad2", loss="ce", feature_sets={"cifar": "bn-eval"})
    assert fs.extraction_options("bn-eval", {"train_bn": None, "bn_shift": "none", "batch_size": 64}) == \
        {"train_bn": "running", "bn_shift": "none", "batch_size": 64}
    assert fs.extraction_options("bn-b512", {"batch_size": None})["batch_size"] == 512
    with pytest.raises(LtcacheError, match="drop --train-bn batch"):
        fs.extraction_options("bn-eval", {"train_bn": "batch"})
    with pytest.raises(LtcacheError, match="drop --batch-size 64"):
        fs.extraction_options("bn-b512", {"batch_size": 64})


def test_extract_set_refuses_a_contradicting_option_before_reading_anything(tmp_path):
    r = CliRunner().invoke(cli, ["extract", "--ckpt", str(tmp_path / "none.pt"), "--set", "bn-eval",
                                 "--train-bn", "batch"])
    assert r.exit_code == 2 and "drop --train-bn batch" in r.output and "Traceback" not in r.output


def test_info_lists_the_set_and_methods_shows_the_features_column(with_set):
    r = CliRunner().invoke(cli, ["info", str(with_set)])
    assert r.exit_code == 0 and "feature set  bn-eval (sets/bn-eval)" in r.output
    r = CliRunner().invoke(cli, ["methods"])
    line = next(ln for ln in r.output.splitlines() if ln.startswith("mislas ") and "ceil(N/B)+1" in ln)
    assert "bn-eval at K=10" in line


def test_bundled_cache_holds_the_bn_eval_set():
    bundled = load(None, splits=("test",))
    have = fs.available(bundled)
    assert set(have) == {"bn-eval", "bn-b512"}
    for name, d in have.items():
        ex = json.loads((d / "manifest.json").read_text())["extraction"]
        assert all(ex[k] == v for k, v in fs.SETS[name].items()), name


def test_bundling_a_cache_carries_its_sets(with_set, tmp_path):
    from ltcache.cache.bundle import bundle_cache
    dest = bundle_cache(with_set, {"commands": ["test"]}, dest=tmp_path / "bundled", with_checkpoint=False)
    assert set(fs.available(load(dest, splits=("test",)))) == {"bn-eval"}


def test_the_table_says_which_rows_used_a_set(with_set):
    from ltcache.stage2.results import format_table
    res = api.bench(with_set, ["ce", "mislas"], overrides=FAST, quiet=True, jobs=1)
    assert "mislas: on the cache's bn-eval feature set" in format_table(res)


def test_closed_forms_read_the_set_at_every_class_count(with_set):
    for name in ("tau-norm", "posthoc-la", "ncm"):
        assert get_method(name).feature_set(K) == get_method(name).feature_set(1000) == "bn-eval"
    res = api.bench(with_set, ["tau-norm", "posthoc-la", "ncm"], quiet=True, jobs=1)
    alone = api.bench(fs.set_dir(with_set, "bn-eval"), ["tau-norm", "posthoc-la", "ncm"], quiet=True, jobs=1)
    got = {r["name"]: (r["metrics"]["per_class_acc"], r.get("features")) for r in res["runs"]}
    want = {r["name"]: (r["metrics"]["per_class_acc"], None if r["method"] == "ce" else "bn-eval")
            for r in alone["runs"]}
    assert got.pop(next(n for n in got if n.startswith("ce")))[1] is None    # the CE reference: main features
    want.pop(next(n for n in want if n.startswith("ce")))
    assert got == want
    with pytest.raises(LtcacheError, match=r"or '\*'"):
        register_method("fs-test-bad3", loss="ce", feature_sets={0: "bn-eval"})


def test_export_of_a_method_trained_on_a_set_keeps_that_sets_batchnorm(tmp_path):
    from ltcache.cli.stage2 import _export
    from ltcache.cache.load import BUNDLED
    from ltcache.export import read_model_file
    run = api.retrain_layers(None, "mislas", {"epochs": 1}, quiet=True, jobs=1)
    assert run.pairs[0][0]["features"] == "bn-eval"
    doc = read_model_file(_export(run, "mislas", tmp_path / "m.pt", "all") or tmp_path / "m.pt")
    stage1 = torch.load(BUNDLED / "stage1.pt", map_location="cpu", weights_only=False)["state_dict"]
    shifted = torch.load(BUNDLED / "bn_stats.pt", map_location="cpu", weights_only=True)
    key = next(k for k in shifted if k.endswith("running_mean"))
    assert torch.equal(doc["backbone_state_dict"][key], stage1[key])       # eval-mode BN: stage 1's statistics
    assert not torch.equal(stage1[key], shifted[key])
    assert doc["meta"]["features"] == "bn-eval"
