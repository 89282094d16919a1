"""The reference path through the backbone agrees with the cached path when augmentation and
train-mode BatchNorm are off (same data, same seed), and its CLI refuses misuse."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import datagen
from ltcache.cache import extract
from ltcache.cli import cli
from ltcache.stage1 import Stage1Options, train_stage1
from ltcache.stage2 import api
from ltcache.through_backbone import retrain_through_backbone

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    folder = datagen.make_imagefolder(root / "imgs", num_classes=3, per_class_train=16, per_class_test=6, size=32)
    ckpt = train_stage1(Stage1Options(dataset=f"imagefolder:{folder}", data_root=str(root), imb_ratio=2,
                                      val_per_class=2, epochs=1, batch_size=16, warmup_epochs=0, workers=2,
                                      out=str(root / "run"), quiet=True, device="cpu"))
    cache = extract(ckpt, protocol="clean", cache=root / "cache", dtype="float32", batch_size=16, data_root=str(root),
                    device="cpu", quiet=True, workers=2)
    return root, ckpt, cache


def test_through_backbone_equals_cached_without_augmentation_or_train_bn(run):
    root, ckpt, cache = run
    ov = {"epochs": 2, "batch_size": 8, "lr": 0.01}
    cached = api.retrain(cache, "ce", ov, seeds=[0], device="cpu", quiet=True)
    through = retrain_through_backbone(ckpt, "ce", ov, seeds=[0], augment=False, train_bn=False,
                                       device="cpu", data_root=str(root), quiet=True)
    a, b = cached["runs"][0]["metrics"], through["runs"][0]["metrics"]
    assert a["per_class_acc"] == pytest.approx(b["per_class_acc"], abs=1e-6)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5, abs=1e-4)
    assert a["mean_logit"] == pytest.approx(b["mean_logit"], rel=1e-5, abs=1e-4)
    assert cached["stage1"]["nll"] == pytest.approx(through["stage1"]["nll"], rel=1e-5, abs=1e-4)


def test_through_backbone_with_augmentation_and_train_bn_differs_and_moves_bn(run):
    root, ckpt, cache = run
    ov = {"epochs": 1, "batch_size": 8, "lr": 0.01}
    plain = retrain_through_backbone(ckpt, "los", ov, seeds=[0], augment=False, train_bn=False,
                                     device="cpu", data_root=str(root), quiet=True)
    paper = retrain_through_backbone(ckpt, "los", ov, seeds=[0], augment=True, train_bn=True,
                                     device="cpu", data_root=str(root), quiet=True)
    assert paper["runs"][0]["protocol"] == {"through_backbone": True, "augment": True, "train_bn": True}
    assert paper["runs"][0]["metrics"]["nll"] != pytest.approx(plain["runs"][0]["metrics"]["nll"], abs=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["retrain", "--method", "ce", "--through-backbone"], "needs --ckpt"),
    (["retrain", "--method", "ce", "--no-augment"], "only apply with --through-backbone"),
    (["retrain", "--method", "tau-norm", "--through-backbone", "--ckpt", "CKPT"], "closed-form"),
])
def test_through_backbone_cli_errors(run, args, needle):
    args = [str(run[1]) if a == "CKPT" else a for a in args]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output


def _gap_script():
    """benchmarks/cache_gap_families.py, imported by path (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_gap_families.py"
    spec = importlib.util.spec_from_file_location("cache_gap_families", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gap_families_per_class_gaps_against_the_backbone_spread():
    mod = _gap_script()

    def res(rows):
        return {"runs": [{"metrics": {"all": sum(pc) / len(pc), "per_class_acc": pc}} for pc in rows]}
    cache = res([[90.0, 50.0, 20.0], [92.0, 52.0, 22.0]])
    backbone = res([[91.0, 40.0, 20.0], [91.0, 44.0, 24.0]])
    g = mod.family_gap(cache, backbone, ["a", "b", "c"])
    assert g["cache_all"] == pytest.approx((160 / 3 + 166 / 3) / 2) and g["seeds"] == [2, 2]
    by = {c["class"]: c for c in g["per_class"]}
    assert by["a"]["gap"] == pytest.approx(0.0) and not by["a"]["beyond"]          # spread 0, gap 0
    assert by["b"]["gap"] == pytest.approx(9.0) and by["b"]["backbone_spread"] == pytest.approx(4.0)
    assert by["b"]["beyond"] and not by["c"]["beyond"] and g["beyond"] == ["b"]   # c: gap -1 inside spread 4
    assert "b +9.0 / 4.0" in mod.gaps_markdown({"crt": dict(g, bn="train")})
    assert mod.bn_mode("mislas", 10) == "eval" and mod.bn_mode("mislas", 100) == "train"
    assert mod.bn_mode("crt", 10) == "train"


def test_gap_families_script_runs_both_paths_and_resumes(run, tmp_path):
    root, ckpt, cache = run
    mod = _gap_script()
    out = tmp_path / "gap"
    ov = {"epochs": 1, "batch_size": 8, "lr": 0.01}
    gaps = mod.run(out, ckpt, cache, ["ce"], [0, 1], data_root=str(root), device="cpu", overrides=ov, quiet=True)
    g = gaps["ce"]
    assert g["seeds"] == [2, 2] and len(g["per_class"]) == 3 and g["bn"] == "train"
    assert {p.name for p in out.iterdir()} == {"ce.cache.json", "ce.backbone.json", "gaps.json", "gaps.md"}
    first = (out / "ce.backbone.json").stat().st_mtime_ns
    again = mod.run(out, ckpt, cache, ["ce"], [0, 1], data_root=str(root), device="cpu", overrides=ov, quiet=True)
    assert (out / "ce.backbone.json").stat().st_mtime_ns == first and again["ce"]["all_gap"] == g["all_gap"]
