"""The cache shipped inside the package: real CIFAR-10-LT features that load, verify, and run
every method out of the box."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from ltcache.cache import default_cache_path, load
from ltcache.cli import cli

torch.set_num_threads(1)


def test_bundled_cache_loads_and_verifies():
    path = default_cache_path()
    cache = load(path, verify=True)
    man = cache.manifest
    assert man["dataset"]["imb_ratio"] == 100 and cache.num_classes == 10 and cache.feature_dim == 64
    from_test = man.get("val_split", {}).get("rule") == "from-test"
    # the papers' 12,406 training images; held-out val takes 100 of the head class's 5,000
    assert sum(man["class_counts"]) == (12406 if from_test else 12306)
    # val covers every class (every val-based choice needs it); val and test are disjoint
    val, test = cache.splits["val"], cache.splits["test"]
    assert torch.bincount(val.labels, minlength=10).min() > 0
    if from_test:                                                  # interim: val carved from test
        assert len(test.labels) + len(val.labels) == 10000
        assert not set(val.index.tolist()) & set(test.index.tolist())
    else:                                                          # val held out of the training set
        assert len(test.labels) == 10000 and len(val.labels) == 1000
        assert not set(val.index.tolist()) & set(cache.splits["train"].index.tolist())
    assert test.views == ["center", "hflip"]
    prov = man["provenance"]
    assert prov["stage1_epochs"] >= 1 and "pipeline" in prov and "commands" in prov
    assert torch.isfinite(cache.splits["train"].features).all()


def test_bench_all_methods_on_the_bundled_cache(tmp_path):
    res = CliRunner().invoke(cli, ["bench", "--all-methods", "--seeds", "0", "--epochs", "1", "--quiet",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert len({r["method"] for r in results["runs"]}) >= 22
    assert "tau-norm" in {r["method"] for r in results["runs"]} and not results["skipped"]
    assert all(r["metrics"]["all"] is not None and r["val"]["balanced"] is not None for r in results["runs"])
