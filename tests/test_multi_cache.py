"""bench / tune over several caches: replicate grouping, one results file, the paper table
(checked against a hand computation), its renderings, the heat maps, and bad input."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest
import torch
from click.testing import CliRunner

from ltcache.cache.build import write_cache
from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.stage2 import api, paper_format as pf, paper_table as pt, sweep
from ltcache.stage2.replicates import group_caches, identify, stage1_seed
from test_stage2_engine import fake_cache

torch.set_num_threads(1)
KW = dict(device="cpu", quiet=True, jobs=1)


def _spec(ir, seed):
    return {"source": "cifar10", "imb_ratio": float(ir), "profile": "exp", "selection": "shuffle", "seed": seed,
            "val_per_class": 4, "val_split": "holdout"}


def disk_cache(path, seed, ir=10.0, counts=(150, 60, 30, 12, 6), splits=("train", "val", "test"), dataset=None,
               stage1=True):
    """A tiny cache on disk from generated features, as if extracted from a stage-1 run with ``seed``."""
    c = fake_cache(counts, seed=seed)
    names = [f"c{j}" for j in range(len(counts))]
    ds = dataset if dataset is not None else {**_spec(ir, seed), "class_names": names}
    return write_cache(path, {s: (c.splits[s].features, c.splits[s].labels, c.splits[s].index, c.splits[s].views)
                              for s in splits}, c.weight, c.bias, dataset=ds, class_counts=list(counts),
                       checkpoint_sha256=f"{seed:064d}", dtype="float32", stage1_seed=seed if stage1 else None)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Two backbones (stage-1 seeds 0 and 1) of cifar10 IR 10 and one of cifar10 IR 50."""
    base = tmp_path_factory.mktemp("multi")
    return [disk_cache(base / "ir10-s0", 0), disk_cache(base / "ir10-s1", 1), disk_cache(base / "ir50-s0", 0, ir=50)]


@pytest.fixture(scope="module")
def bench_doc(three):
    return api.bench([str(p) for p in three], ["ce", "los", "tau-norm"], seeds=[0, 1], **KW)


# ------------------------------------------------------------------------------- grouping

def test_replicates_are_caches_of_one_dataset_from_different_stage1_seeds(three):
    from ltcache.cache import load
    ids = [identify(load(p), str(p)) for p in three]
    groups, notices = group_caches(ids)
    assert [(g.label, g.members) for g in groups] == [("cifar10 IR 10", [0, 1]), ("cifar10 IR 50", [2])]
    assert [i.stage1_seed for i in ids] == [0, 1, 0] and notices == []
    assert groups[0].groups == ("many", "medium", "few")


def test_stage1_seed_from_the_manifest_then_the_old_caches_fallback():
    assert stage1_seed({"checkpoint": {"sha256": "x", "stage1_seed": 3}, "dataset": {"seed": 0}}) == (3, "manifest")
    # a cache extracted before the seed was recorded: an ltcache checkpoint drew its dataset with its seed
    assert stage1_seed({"checkpoint": {"sha256": "x"}, "dataset": {"seed": 2}}) == (2, "dataset seed")
    # a foreign checkpoint, --pretrained weights or an import: unknown
    assert stage1_seed({"checkpoint": {"sha256": "x", "layout": {}}, "dataset": {"seed": 2}})[0] is None
    assert stage1_seed({"checkpoint": {"sha256": "x"}, "dataset": {"seed": 2},
                        "extraction": {"weights": "pretrained"}})[0] is None
    assert stage1_seed({"checkpoint": {"sha256": ""}, "dataset": {"imported": True, "name": "x"}})[0] is None


def test_imported_caches_without_a_seed_are_each_a_backbone_with_a_notice(tmp_path):
    ds = {"name": "mine", "source": "mine (import:x.npz)", "imported": True}
    a = disk_cache(tmp_path / "a", 0, dataset=ds, stage1=False)
    b = disk_cache(tmp_path / "b", 1, dataset=ds, stage1=False)
    from ltcache.cache import load
    groups, notices = group_caches([identify(load(p), str(p)) for p in (a, b)])
    assert len(groups) == 1 and groups[0].members == [0, 1] and groups[0].label == "mine"
    assert len(notices) == 1 and "each taken as a backbone of its own" in notices[0]


# ------------------------------------------------------------------------------- results and table

def test_one_results_file_holds_a_run_per_cache_method_configuration_and_seed(bench_doc, three):
    doc = bench_doc
    assert doc["schema"] == "ltcache-multi/1" and doc["kind"] == "bench" and doc["against"] == "ce"
    keys = {(r["cache"], r["name"], r["seed"]) for r in doc["runs"]}
    assert len(keys) == len(doc["runs"]) == 3 * 3 * 2
    assert [d["caches"] for d in doc["datasets"]] == [[0, 1], [2]]
    assert [c["backbone"] for c in doc["caches"]] == ["stage-1 seed 0", "stage-1 seed 1", "stage-1 seed 0"]
    assert [c["id"]["path"] for c in doc["caches"]] == [str(p.resolve()) for p in three]
    json.dumps(doc, allow_nan=False)
    from ltcache.stage2.multi import cache_results
    one = cache_results(doc, 1)
    assert len(one["runs"]) == 6 and one["summary"] and "cache" not in one["runs"][0]


def test_paper_table_numbers_match_a_hand_computation(bench_doc):
    doc = bench_doc
    table = pt.compute(doc, "ce")

    def acc(c, m, s, col="all"):
        (r,) = [r for r in doc["runs"] if r["cache"] == c and r["method"] == m and r["seed"] == s]
        return r["metrics"][col]
    rows = {r["method"]: r for r in table["rows"]}
    for m in ("ce", "los", "tau-norm"):
        vals = [acc(c, m, s) for c in (0, 1) for s in (0, 1)]
        cell = rows[m]["cells"][("cifar10 IR 10", "all")]
        assert cell["mean"] == pytest.approx(sum(vals) / 4)
        assert cell["std"] == pytest.approx(statistics.stdev(vals))          # n - 1, over 2 backbones x 2 seeds
        assert cell["n"] == 4 and cell["backbones"] == 2
        few = [acc(c, m, s, "few") for c in (0, 1) for s in (0, 1)]
        assert rows[m]["cells"][("cifar10 IR 10", "few")]["mean"] == pytest.approx(sum(few) / 4)
    # paired difference: per backbone the mean over seeds, then a t-interval over the 2 backbones (df 1)
    d_b = [sum(acc(c, "los", s) - acc(c, "ce", s) for s in (0, 1)) / 2 for c in (0, 1)]
    half = 12.7062 * statistics.stdev(d_b) / math.sqrt(2)
    d = rows["los"]["diff"]["cifar10 IR 10"]
    assert d["over"] == "backbones" and d["n"] == 2 and d["pairs"] == 4
    assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((sum(d_b) / 2, sum(d_b) / 2 - half, sum(d_b) / 2 + half))
    # one backbone: over the stage-2 seeds only (df 1), and labelled so
    d_s = [acc(2, "los", s) - acc(2, "ce", s) for s in (0, 1)]
    d = rows["los"]["diff"]["cifar10 IR 50"]
    assert d["over"] == "seeds only" and d["mean"] == pytest.approx(sum(d_s) / 2)
    assert rows["ce"]["diff"]["cifar10 IR 10"] is None
    # average rank over the two datasets, from the All means
    for label in ("cifar10 IR 10", "cifar10 IR 50"):
        means = {m: rows[m]["cells"][(label, "all")]["mean"] for m in rows}
        order = sorted(means, key=lambda m: -means[m])
        if len(set(means.values())) == 3:
            assert [rows[m]["ranks"][label] for m in order] == [1, 2, 3]
        best = max(round(v, 2) for v in means.values())
        assert table["best"][(label, "all")] == {m for m, v in means.items() if round(v, 2) == best}
    for m in rows:
        assert rows[m]["rank"] == pytest.approx(sum(rows[m]["ranks"].values()) / 2)
    assert [r["rank"] for r in table["rows"]] == sorted(r["rank"] for r in table["rows"])
    # the split of the spread: std of the backbone means, root mean within-backbone variance
    vals = {c: [acc(c, "ce", s) for s in (0, 1)] for c in (0, 1)}
    cell = rows["ce"]["cells"][("cifar10 IR 10", "all")]
    assert cell["std_backbone"] == pytest.approx(statistics.stdev([sum(v) / 2 for v in vals.values()]))
    assert cell["std_seed"] == pytest.approx(math.sqrt(sum(statistics.variance(v) for v in vals.values()) / 2))


def test_t_quantiles():
    assert pt.t975(1) == pytest.approx(12.706, abs=1e-3) and pt.t975(10) == pytest.approx(2.228, abs=1e-3)
    assert pt.t975(60) == pytest.approx(2.0003, abs=2e-3) and pt.t975(1000) == pytest.approx(1.9623, abs=1e-3)


def test_renderings_terminal_markdown_csv_latex(bench_doc):
    term = pf.render(bench_doc, "terminal")
    assert "cifar10 IR 10" in term and "Δ vs ce [95 % CI]" in term and "*" in term
    assert "2 backbones (stage-1 seed 0, stage-1 seed 1) x 2 stage-2 seeds" in term
    assert "1 backbone x 2 stage-2 seeds (stage-2 seeds only)" in term
    md = pf.render(bench_doc, "markdown")
    assert md.startswith("| method | avg rank | cifar10 IR 10 All |") and "**" in md
    rows = list(csv.DictReader(io.StringIO(pf.render(bench_doc, "csv"))))
    # 3 methods x (IR 10: All, Many, Medium, Few + IR 50: the same)
    assert len(rows) == 3 * 8 and {r["column"] for r in rows} == {"all", "many", "medium", "few"}
    los = next(r for r in rows if r["method"] == "los" and r["dataset"] == "cifar10 IR 10" and r["column"] == "all")
    assert los["diff_over"] == "backbones" and float(los["diff_lo"]) <= float(los["diff_mean"]) <= float(los["diff_hi"])
    tex = pf.render(bench_doc, "latex", against="los")
    assert r"\begin{tabular}" in tex and r"\multicolumn{4}{c}{cifar10 IR 10}" in tex and r"\textbf{" in tex
    assert r"$\Delta$ vs los" in tex and tex.count(r"\\") == 2 + 3
    with pytest.raises(LtcacheError, match="--against ncm"):
        pt.compute(bench_doc, "ncm")


def test_cli_bench_over_caches_writes_results_and_the_paper_table(three, tmp_path):
    out = tmp_path / "o"
    args = ["bench", "--methods", "ce,los", "--seeds", "0", "--jobs", "1", "--quiet", "--out", str(out)]
    for p in three:
        args += ["--cache", str(p)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "cifar10 IR 50" in res.output and "paper.tex" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["paper.csv", "paper.md", "paper.tex", "results.json"]
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 3 * 2
    res = CliRunner().invoke(cli, ["table", str(out), "--format", "latex", "--against", "los"])
    assert res.exit_code == 0 and r"\begin{tabular}" in res.output and "vs los" in res.output
    res = CliRunner().invoke(cli, ["table", str(out), "--against", "ncm"])
    assert res.exit_code == 2 and "--against ncm" in res.output
    res = CliRunner().invoke(cli, args)                                # never replaced without --force
    assert res.exit_code == 2 and "--force" in res.output


def test_tune_over_caches_tunes_each_on_its_own_val(three, tmp_path):
    doc = api.tune([str(p) for p in three[:2]], ["ce", "los"], budget=2, tune_seeds=[0], seeds=[0, 1],
                   out_dir=tmp_path / "t", **KW)
    assert doc["kind"] == "tune" and len(doc["datasets"]) == 1
    assert [set(c["results"]["tune"]["picks"]) for c in doc["caches"]] == [{"ce", "los"}] * 2
    tuned = [r for r in doc["runs"] if r["tune_role"] == "tuned"]
    assert {(r["cache"], r["method"], r["seed"]) for r in tuned} == {(c, m, s) for c in (0, 1) for m in ("ce", "los")
                                                                     for s in (0, 1)}
    table = pt.compute(doc)
    assert all(r["cells"][("cifar10 IR 10", "all")]["n"] == 4 for r in table["rows"])
    assert (tmp_path / "t" / "paper.md").is_file()


def test_an_interrupted_tune_over_caches_continues_where_it_ended(three, tmp_path, monkeypatch):
    """Each cache's tune lives in OUT/caches/NN/: a failure in cache 2's stage B keeps cache 1's
    finished tune and cache 2's stage A, and the same command re-runs only cache 2's stage B."""
    from ltcache.stage2 import tune as tune_mod
    real, calls = tune_mod.run_sweep, []

    def fourth_fails(*a, **k):                 # cache 1: stage A, stage B; cache 2: stage A, then this
        calls.append(1)
        if len(calls) == 4:
            raise LtcacheError("stage B broke")
        return real(*a, **k)

    caches, out = [str(p) for p in three[:2]], tmp_path / "t"
    args = dict(methods=["ce", "los"], budget=2, tune_seeds=[0], seeds=[0, 1], out_dir=out, **KW)
    monkeypatch.setattr(tune_mod, "run_sweep", fourth_fails)
    with pytest.raises(LtcacheError, match="stage B broke"):
        api.tune(caches, **args)
    assert (out / "caches" / "00" / "results.json").is_file() and (out / "caches" / "01" / "stage_a.json").is_file()
    assert not (out / "caches" / "01" / "results.json").exists() and not (out / "results.json").exists()
    first = json.loads((out / "caches" / "00" / "results.json").read_text())
    calls.clear()
    doc = api.tune(caches, **args)                        # the same command: cache 2's stage B alone
    assert len(calls) == 1
    assert doc["caches"][0]["results"]["tune"] == first["tune"]
    assert doc["caches"][1]["results"]["tune"]["stage_a"]["resumed"] is True
    assert len(doc["runs"]) == 2 * len([r for r in first["runs"]])
    with pytest.raises(LtcacheError, match="already holds results.json"):   # finished: never replaced silently
        api.tune(caches, **args)
    with pytest.raises(LtcacheError, match="different plan"):              # another plan in a cache's folder
        for name in ("results.json", "paper.md", "paper.csv", "paper.tex"):
            (out / name).unlink()
        api.tune(caches, **{**args, "budget": 3})


# ------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    base = tmp_path_factory.mktemp("odd")
    imp = {"name": "mine", "source": "mine (import:x.npz)", "imported": True}
    return {"four": disk_cache(base / "four", 2, counts=(150, 60, 30, 12)),
            "noval": disk_cache(base / "noval", 3, splits=("train", "test")),
            "imp_seed": disk_cache(base / "imp_seed", 4, dataset=imp),
            "imp_none": disk_cache(base / "imp_none", 5, dataset=imp, stage1=False),
            "same_seed": disk_cache(base / "same_seed", 0, counts=(150, 60, 30, 12, 7))}


@pytest.mark.parametrize("cmd,extra,needle", [
    ("bench", ["four"], "different classes (5 vs 4 classes)"),
    ("tune", ["noval"], "no val split"),
    ("bench", ["again"], "is given twice"),
    ("bench", ["against"], "--against ncm: the run has no method 'ncm'"),
    ("tune", ["against"], "--against tau-norm: the run has no method 'tau-norm'"),
    ("bench", ["imp_seed", "imp_none"], "has no stage-1 seed but other caches of this dataset do"),
    ("bench", ["same_seed"], "hold the same backbone (stage-1 seed 0)"),
])
def test_bad_multi_cache_input_is_one_line_exit_2_before_training(three, odd, tmp_path, monkeypatch, cmd, extra,
                                                                   needle):
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: pytest.fail("trained on bad input"))
    out = tmp_path / "out"
    args = [cmd, "--methods", "ce,los", "--seeds", "0", "--jobs", "1", "--quiet", "--out", str(out),
            "--cache", str(three[0])]
    if cmd == "tune":
        args += ["--budget", "1"]
    for e in extra:
        if e == "again":
            args += ["--cache", str(three[0])]
        elif e == "against":
            args += ["--cache", str(three[1]), "--against", "ncm" if cmd == "bench" else "tau-norm"]
        else:
            args += ["--cache", str(odd[e])]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert not out.exists()                                   # nothing written, not even the folder


# ------------------------------------------------------------------------------- report

def test_report_of_a_multi_cache_run_draws_the_heat_maps_and_the_table(bench_doc, tmp_path):
    from PIL import Image

    from ltcache.report import make_report
    from ltcache.stage2.multi import write_multi
    write_multi(bench_doc, tmp_path / "res")
    page = make_report(tmp_path / "res", quiet=True)
    text = page.read_text()
    figs = tmp_path / "res" / "report" / "figures"
    stems = ["datasets_heatmap", "gain_heatmap", "classes_heatmap_1", "classes_heatmap_2"]
    assert sorted(p.stem for p in figs.iterdir()) == sorted(stems)
    for stem in stems:
        with Image.open(figs / f"{stem}.png") as im:
            assert im.size[0] == 1000 and im.size[1] >= 300
        assert f'src="figures/{stem}.png"' in text
    assert "Paper table" in text and "<b>" in text and "Δ vs ce" in text and "stage-1 seed 1" in text
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "res"), "--methods", "nope"])
    assert res.exit_code == 2 and "'nope' not in" in res.output


# ------------------------------------------------------------------------------- pipelines

def test_pipeline_sweep_and_tune_caches_run_over_the_pipelines_cache_and_the_listed_ones(three, tmp_path,
                                                                                         monkeypatch):
    import shutil

    import ltcache.cache.extraction as extraction
    import ltcache.pipeline as pipeline
    import ltcache.stage1 as stage1
    out = tmp_path / "run"
    shutil.copytree(three[0], out / "cache")             # the pipeline's own cache, as if extracted
    (tmp_path / "more").mkdir()
    shutil.copytree(three[1], tmp_path / "more" / "s1")
    shutil.copytree(three[2], tmp_path / "more" / "ir50")
    monkeypatch.setattr(pipeline, "_stage1_complete", lambda ckpt, args: True)
    monkeypatch.setattr(extraction, "extract", lambda ckpt, cache, **kw: cache)
    monkeypatch.setattr(stage1, "load_checkpoint", lambda p: {"epoch": 1, "history": []})
    toml = tmp_path / "p.toml"
    toml.write_text("[dataset]\nsource = 'cifar10'\nimb_ratio = 10\n[stage1]\narch = 'resnet32'\n"
                    "[sweep]\nmethods = ['ce', 'los']\nseeds = [0, 1]\ncaches = ['more/s1', 'more/ir50']\n"
                    "against = 'los'\n"
                    "[tune]\nmethods = ['ce', 'los']\nbudget = 1\nseeds = [0]\ncaches = ['more/s1']\n")
    res = pipeline.run_pipeline(toml, out=str(out), device="cpu", quiet=True)
    doc = json.loads((out / "results" / "results.json").read_text())
    assert doc["schema"] == "ltcache-multi/1" and doc["against"] == "los" and len(doc["caches"]) == 3
    assert [d["caches"] for d in doc["datasets"]] == [[0, 1], [2]] and (out / "results" / "paper.tex").is_file()
    tuned = json.loads((out / "tune" / "results.json").read_text())
    assert tuned["kind"] == "tune" and len(tuned["caches"]) == 2
    assert {r["method"] for r in res["tune"]} == {"ce", "los"}
    bad = tmp_path / "bad.toml"
    bad.write_text("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\n[sweep]\ncaches = 'x'\n")
    with pytest.raises(LtcacheError, match=r"\[sweep\] caches must be a list"):
        pipeline.parse_pipeline(bad)


def test_import_records_the_stage1_seed_and_imports_of_one_name_are_replicates(tmp_path):
    import numpy as np

    from ltcache.cache import load
    paths = []
    for seed in (3, 4):
        c = fake_cache(seed=seed)
        np.savez(tmp_path / f"f{seed}.npz", **{f"{s}_features": c.splits[s].features.numpy() for s in ("train", "test")},
                 **{f"{s}_labels": c.splits[s].labels.numpy() for s in ("train", "test")},
                 weight=c.weight.numpy(), bias=c.bias.numpy())
        res = CliRunner().invoke(cli, ["import", str(tmp_path / f"f{seed}.npz"), "--out", str(tmp_path / f"c{seed}"),
                                       "--name", "mine", "--stage1-seed", str(seed), "--quiet"])
        assert res.exit_code == 0, res.output
        paths.append(tmp_path / f"c{seed}")
    ids = [identify(load(p), str(p)) for p in paths]
    assert [(i.stage1_seed, i.seed_source, i.imported) for i in ids] == [(3, "manifest", True), (4, "manifest", True)]
    groups, notices = group_caches(ids)
    assert [(g.label, g.members) for g in groups] == [("mine", [0, 1])] and notices == []


def test_imported_caches_named_like_an_extracted_dataset_join_it_only_with_a_seed(three, tmp_path):
    from ltcache.cache import load
    imp = {"name": "cifar10 IR 10", "source": "cifar10 IR 10 (import:x.npz)", "imported": True,
           "class_names": [f"c{j}" for j in range(5)]}
    seeded = disk_cache(tmp_path / "seeded", 7, dataset=imp)
    unseeded = disk_cache(tmp_path / "unseeded", 8, dataset=imp, stage1=False)
    ids = [identify(load(p), str(p)) for p in (three[0], three[1], seeded)]
    groups, notices = group_caches(ids)
    assert [(g.label, g.members) for g in groups] == [("cifar10 IR 10", [0, 1, 2])]
    assert len(notices) == 1 and "grouped with the extracted caches" in notices[0]
    ids[2] = identify(load(unseeded), str(unseeded))
    with pytest.raises(LtcacheError, match="has no stage-1 seed but other caches of this dataset do"):
        group_caches(ids)
    # one cache under two paths (identical manifests) is refused too
    import shutil
    shutil.copytree(three[0], tmp_path / "copy")
    with pytest.raises(LtcacheError, match="are the same cache"):
        group_caches([identify(load(p), str(p)) for p in (three[0], tmp_path / "copy")])
