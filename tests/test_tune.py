"""`ltcache tune`, val metrics in every run, search spaces, and the rule that selection never
reads the test split (on small in-memory caches)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.stage2 import api, runner, sweep
from ltcache.stage2 import tune as tune_mod
from ltcache.stage2.methods import GENERIC, METHODS, method_space
from ltcache.stage2.space import Dim, Space, draw
from ltcache.stage2.tune import load_choices, pick, without_test
from test_stage2_engine import fake_cache

torch.set_num_threads(1)
METHODS4 = ["ce", "los", "tau-norm", "ncm"]
KW = dict(device="cpu", quiet=True, jobs=1)


def _tune(cache, **kw):
    args = dict(methods=METHODS4, budget=3, tune_seeds=[0], seeds=[0, 1], **KW)
    args.update(kw)
    return api.tune(cache, **args)


def _permuted_test(cache):
    other = copy.deepcopy(cache)
    te = other.splits["test"]
    te.labels = te.labels[torch.randperm(len(te.labels), generator=torch.Generator().manual_seed(1))]
    return other


def _no_class0_in_val(cache):
    other = copy.deepcopy(cache)
    val = other.splits["val"]
    keep = val.labels != 0
    val.labels, val.features, val.index = val.labels[keep], val.features[keep], val.index[keep]
    return other


# ------------------------------------------------------------------------------- search spaces
def test_every_method_declares_a_space_of_its_own_options():
    for m in METHODS.values():
        sp = method_space(m, "cifar")
        allowed = set(m.tunables) | (set() if m.closed_form else set(GENERIC))
        assert set(sp.names) <= allowed, m.name
        for name in sp.candidates:
            assert name in m.tunables
        for d in sp.dims:
            assert d.source, (m.name, d.name)                 # where the range comes from
        if not m.closed_form:
            assert {"lr", "wd", "epochs"} <= set(sp.names)
    assert len(draw(method_space(METHODS["tau-norm"], "cifar"), 32)) == 21      # cRT's linspace(0, 2, 21)
    assert draw(method_space(METHODS["ncm"], "cifar"), 32) == [{}]


def test_draw_is_deterministic_in_range_and_within_budget():
    sp = Space(dims=(Dim("lr", "log", 1e-3, 1e-1), Dim("delta", "linear", 0.0, 0.9),
                     Dim("epochs", "choice", choices=(10, 20, 30))))
    for search in ("sobol", "random", "grid"):
        pts = draw(sp, 12, search)
        assert pts == draw(sp, 12, search)
        assert 1 <= len(pts) <= 12
        assert len({tuple(sorted(p.items())) for p in pts}) == len(pts)
        for p in pts:
            assert 1e-3 <= p["lr"] <= 1e-1 and 0 <= p["delta"] <= 0.9 and p["epochs"] in (10, 20, 30)
    assert len(draw(sp, 12, "sobol")) == 12
    with pytest.raises(LtcacheError, match="--budget must be >= 1"):
        draw(sp, 0)
    with pytest.raises(LtcacheError, match="unknown --search 'halton'"):
        draw(sp, 4, "halton")


def test_pick_prefers_the_metric_then_lower_nll_and_never_an_undefined_score():
    pts = [{"val": {"balanced": 50.0, "all": 50.0, "nll": 1.0}},
           {"val": {"balanced": 60.0, "all": 55.0, "nll": 2.0}},
           {"val": {"balanced": 60.0, "all": 40.0, "nll": 1.5}},
           {"val": {"balanced": float("nan"), "all": None, "nll": 0.1}}]
    assert pick(pts, "val-balanced") == 2
    assert pick(pts, "val-all") == 1
    assert pick(pts, "val-nll") == 3


# ------------------------------------------------------------------------------- val metrics
def test_every_run_records_val_metrics_beside_test(tmp_path):
    res = api.bench(fake_cache(), ["ce", "tau-norm", "ncm"], seeds=[0], overrides={"epochs": 2}, out_dir=tmp_path, **KW)
    for r in res["runs"]:
        assert set(r["val"]) == set(api.VAL_METRICS) and r["metrics"]["all"] is not None
        assert 0 <= r["val"]["all"] <= 100 and r["val"]["nll"] > 0
    assert res["stage1_val"]["balanced"] is not None
    row = res["summary"][0]
    assert row["val_balanced"] is not None and row["val_nll"] is not None
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "val_balanced" in header and "val_nll" in header


# ------------------------------------------------------------------------------- tune
def test_tune_picks_on_val_and_reports_tuned_and_preset_on_test(tmp_path):
    res = _tune(fake_cache(), out_dir=tmp_path / "t")
    t = res["tune"]
    assert [r["method"] for r in sorted(t["table"], key=lambda r: r["method"])] == sorted(METHODS4)
    for r in t["table"]:
        assert r["all_mean"] is not None and r["preset_all_mean"] is not None and r["val_score"] is not None
        pts = t["points"][r["method"]]
        assert len(pts) == r["points"] <= 3
        best = max(p["val"]["balanced"] for p in pts)
        assert r["val_score"] == pytest.approx(best)
    assert t["picks"]["ncm"]["points"] == 1
    roles = {r["tune_role"] for r in res["runs"]}
    assert roles == {"tuned", "preset"}
    assert {r["seed"] for r in res["runs"]} == {0, 1}
    for name in ("results.json", "tune.csv", "tune.md"):
        assert (tmp_path / "t" / name).is_file()
    assert "los" in (tmp_path / "t" / "tune.md").read_text()


def test_permuting_test_labels_changes_no_choice():
    """Selection never reads the test split: the same picks with the test labels shuffled."""
    cache = fake_cache()
    a, b = _tune(cache), _tune(_permuted_test(cache))
    assert a["tune"]["picks"] == b["tune"]["picks"]
    assert a["tune"]["points"] == b["tune"]["points"]
    assert a["summary"] != b["summary"]                       # test itself did change
    # --select val picks epochs on val only
    ov = {"epochs": 4, "lr": 0.05}
    ea = api.retrain(cache, "ce", ov, seeds=[0, 1], select="val", **KW)
    eb = api.retrain(_permuted_test(cache), "ce", ov, seeds=[0, 1], select="val", **KW)
    assert [r["selected_epoch"] for r in ea["runs"]] == [r["selected_epoch"] for r in eb["runs"]]


def test_selection_sweep_has_no_test_split_to_read():
    cache = fake_cache()
    view = without_test(cache)
    assert "test" not in view.splits and "test" in cache.splits
    plans = api.expand(["ce", "tau-norm"], {"epochs": 1}, None, "cifar", len(cache.splits["train"].labels))
    res, _ = api.run_sweep(view, plans, [0], evaluate_test=False, **KW)
    assert all(r["metrics"] is None and r["val"] for r in res["runs"])


def test_val_based_choices_on_a_val_split_lacking_a_class_fail_before_training(monkeypatch):
    bad = _no_class0_in_val(fake_cache())

    def boom(*a, **k):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(runner, "train_sweep", boom)
    with pytest.raises(LtcacheError, match="tune chooses on the val split.*no image of class c0"):
        _tune(bad)
    with pytest.raises(LtcacheError, match="tau-norm .* no image of class c0"):
        api.bench(bad, ["ce", "tau-norm"], seeds=[0], **KW)
    with pytest.raises(LtcacheError, match="--select val .* no image of class c0"):
        api.retrain(bad, "ce", seeds=[0], select="val", **KW)
    nov = copy.deepcopy(bad)
    del nov.splits["val"]
    with pytest.raises(LtcacheError, match="has no val split"):
        _tune(nov)
    monkeypatch.undo()
    # every method asked for: the one that must choose on val is left out, and says so
    res = api.bench(bad, None, seeds=[0], overrides={"epochs": 1}, **KW)
    assert [s["method"] for s in res["skipped"]] == ["tau-norm"]
    assert "tau-norm" not in {r["method"] for r in res["runs"]}


def test_from_tune_reruns_the_choices_and_refuses_another_cache(tmp_path):
    cache = fake_cache()
    res = _tune(cache, out_dir=tmp_path / "t")
    path = tmp_path / "t" / "results.json"
    picks = load_choices(path, cache)
    assert picks == {m: p["point"] for m, p in res["tune"]["picks"].items()}
    again = api.bench(cache, None, seeds=[0], from_tune=path, **KW)
    assert {r["method"] for r in again["runs"]} == set(METHODS4)
    los = next(r for r in again["runs"] if r["method"] == "los")
    for k, v in picks["los"].items():
        assert los["params"][k] == v
    one = api.retrain(cache, "los", seeds=[0], from_tune=path, **KW)
    assert one["runs"][0]["params"]["delta"] == picks["los"]["delta"]
    other = fake_cache(seed=1)
    other.manifest = {"dataset": {"source": "fake-other"}}
    with pytest.raises(LtcacheError, match="tuned on another cache"):
        api.bench(other, None, seeds=[0], from_tune=path, **KW)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(path.read_text()[:200])
    with pytest.raises(LtcacheError, match="not a readable tune results file"):
        load_choices(damaged, cache)
    bench_file = tmp_path / "b"
    api.bench(cache, ["ce"], seeds=[0], overrides={"epochs": 1}, out_dir=bench_file, **KW)
    with pytest.raises(LtcacheError, match="not a readable tune results file"):
        load_choices(bench_file / "results.json", cache)


@pytest.mark.parametrize("args,needle", [
    (["tune", "--methods", "ce", "--budget", "0"], "--budget must be >= 1"),
    (["tune", "--methods", "ce", "--search", "halton"], "Invalid value for '--search'"),
    (["tune", "--methods", "ce", "--select-metric", "test-all"], "Invalid value for '--select-metric'"),
    (["tune"], "exactly one of --all-methods or --methods"),
    (["tune", "--methods", "lso"], "did you mean"),
    (["bench", "--methods", "ce", "--from-tune", "nowhere.json"], "no such file"),
])
def test_tune_bad_input_is_one_line_exit_2(monkeypatch, tmp_path, args, needle):
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    monkeypatch.setattr(tune_mod, "_load_cache", lambda cache, device: fake_cache())
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: pytest.fail("trained on bad input"))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output


def test_tune_cli_writes_the_table_and_refuses_to_replace_it(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    monkeypatch.setattr(tune_mod, "_load_cache", lambda cache, device: fake_cache())
    args = ["tune", "--methods", "ce,los", "--budget", "2", "--seeds", "0", "--jobs", "1", "--quiet",
            "--out", str(tmp_path / "t")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "tuned All" in res.output and "preset All" in res.output and "budget 2" in res.output
    doc = json.loads((tmp_path / "t" / "results.json").read_text())
    assert set(doc["tune"]["picks"]) == {"ce", "los"}
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "--force" in res.output


def test_space_overrides_and_a_space_no_method_has(tmp_path):
    from ltcache.stage2.tune import parse_space
    sp = parse_space(["delta=0.5:0.6", "epochs=2,3"])
    res = _tune(fake_cache(), methods=["los", "tau-norm"], space={**sp, **parse_space(["tau=0.5,1.5"])})
    for p in res["tune"]["points"]["los"]:
        assert 0.5 <= p["point"]["delta"] <= 0.6 and p["point"]["epochs"] in (2, 3)
    assert {p["point"]["tau"] for p in res["tune"]["points"]["tau-norm"]} == {0.5, 1.5}
    with pytest.raises(LtcacheError, match="none of the chosen methods has a hyper-parameter 'tau'"):
        _tune(fake_cache(), methods=["ce", "los"], space=parse_space(["tau=0:1"]))
    with pytest.raises(LtcacheError, match="unknown hyper-parameter 'foo'"):
        parse_space(["foo=1:2"])
    with pytest.raises(LtcacheError, match="delta .* must be in"):
        parse_space(["delta=0.5:2"])
    with pytest.raises(LtcacheError, match="LOW <= HIGH"):
        parse_space(["delta=0.9:0.5"])


def test_space_qualified_names_reach_one_method():
    # tau is tau-norm's exponent and la-loss's offset: la-loss.tau narrows la-loss's only
    from ltcache.stage2.tune import parse_space
    sp = parse_space(["tau=0.5,1.5", "la-loss.tau=0.2:0.3", "epochs=1"])
    res = _tune(fake_cache(), methods=["la-loss", "tau-norm"], space=sp)
    assert all(0.2 <= p["point"]["tau"] <= 0.3 for p in res["tune"]["points"]["la-loss"])
    assert {p["point"]["tau"] for p in res["tune"]["points"]["tau-norm"]} == {0.5, 1.5}
    with pytest.raises(LtcacheError, match="method vs is not in this run"):
        _tune(fake_cache(), methods=["la-loss"], space=parse_space(["vs.tau=0:1"]))
    with pytest.raises(LtcacheError, match="method la-loss has no hyper-parameter delta"):
        _tune(fake_cache(), methods=["la-loss"], space=parse_space(["la-loss.delta=0.1:0.2"]))
    with pytest.raises(LtcacheError, match="unknown method 'nosuch'"):
        parse_space(["nosuch.tau=0:1"])


def test_a_late_failure_keeps_stage_a(tmp_path, monkeypatch):
    real = api.run_sweep
    calls = []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise LtcacheError("stage B broke")
        return real(*a, **k)

    monkeypatch.setattr(tune_mod, "run_sweep", second_fails)
    with pytest.raises(LtcacheError, match="stage B broke"):
        _tune(fake_cache(), out_dir=tmp_path / "t")
    doc = json.loads((tmp_path / "t" / "stage_a.json").read_text())
    assert set(doc["picks"]) == set(METHODS4) and not (tmp_path / "t" / "results.json").exists()
