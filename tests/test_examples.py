"""The worked plugin examples in examples/: each is loaded, tuned with a tiny budget against CE
on a tiny generated cache (`ltcache tune --plugin examples/X.py --methods X,ce`), and does what
its docstring says."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.plugins import isolated_registry, load_plugin
from ltcache.stage2 import api
from ltcache.stage2 import tune as tune_mod
from test_stage2_engine import fake_cache

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = [("ib_loss.py", "ib"), ("cosine_temperature.py", "cosine-t"), ("cb_warmup.py", "cb-warmup")]


@pytest.fixture(autouse=True)
def registry():
    with isolated_registry():
        yield


@pytest.mark.parametrize("file,method", CASES)
def test_example_is_tuned_against_ce(file, method, monkeypatch, tmp_path):
    monkeypatch.setattr(tune_mod, "_load_cache", lambda cache, device: fake_cache())
    out = tmp_path / "tune"
    res = CliRunner().invoke(cli, ["tune", "--plugin", str(EXAMPLES / file), "--methods", f"{method},ce",
                                   "--budget", "2", "--tune-seeds", "0", "--seeds", "0", "--space", "epochs=2,3",
                                   "--quiet", "--device", "cpu", "--jobs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert method in res.output
    runs = json.loads((out / "results.json").read_text())["runs"]
    mine = [r for r in runs if r["method"] == method]
    assert mine and all(math.isfinite(r["metrics"]["all"]) for r in mine)


def test_cb_warmup_goes_from_instance_to_class_balanced():
    load_plugin(EXAMPLES / "cb_warmup.py")
    from ltcache.stage2.samplers import ClassIndex, epoch_indices
    labels = torch.cat([torch.full((n,), j) for j, n in enumerate((400, 100, 25))])
    ci = ClassIndex.from_labels(labels, 3)
    g = torch.Generator().manual_seed(0)
    first, _ = epoch_indices("cb-warmup", ci, 64, 0, 10, g)
    late, _ = epoch_indices("cb-warmup", ci, 64, 6, 10, g)
    share = lambda idx: torch.bincount(labels[idx.reshape(-1)], minlength=3).double() / idx.numel()  # noqa: E731
    assert share(first)[2] < 0.15 and abs(share(late)[2] - 1 / 3) < 0.08


def test_cosine_temperature_learns_its_scale():
    load_plugin(EXAMPLES / "cosine_temperature.py")
    cache = fake_cache()
    from test_stage2_engine import configs_for, data_of
    from ltcache.stage2.sweep import train_group
    head = train_group(configs_for(cache, [("cosine-t", {"epochs": 3, "batch_size": 32}, 0)]), data_of(cache))[0]
    assert head.layer["kind"] == "plugin" and float(head.layer["p"]["t"]) != pytest.approx(math.log(16.0))


def test_ib_loss_reads_the_features():
    load_plugin(EXAMPLES / "ib_loss.py")
    from ltcache.stage2.losses import get_loss
    unit = get_loss("ib")
    assert unit.reads == ("h",)
    z, y, h = torch.randn(6, 5), torch.arange(6) % 5, torch.randn(6, 8)
    counts = torch.tensor([50.0, 20, 10, 5, 2])
    small, big = (unit.forward(z, y, {"ib_alpha": 1000.0}, counts, h=h * s) for s in (1.0, 2.0))
    assert float(big) == pytest.approx(float(small) / 2, rel=1e-3)       # influence grows with ||h||_1
