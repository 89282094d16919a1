"""Every registered method at each of its presets: the batched engine equals the plain reference
loop (ltcache/stage2/reference.py, the recipes as the sources' scripts run them) on the same
batches and initialisation; and the recipe details themselves (batches per epoch, the
progressive weight, the schedule stepping, the weight decay exemptions)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ltcache.stage2 import api
from ltcache.stage2.methods import METHODS, PRESETS, get_method, resolve_params
from ltcache.stage2.reference import script_batches, train_reference
from ltcache.stage2.samplers import ClassIndex, epoch_indices, epoch_samples, progressive_lambda, steps_per_epoch
from ltcache.stage2.sweep import train_sweep

torch.set_num_threads(1)

COUNTS = (300, 150, 80, 40, 20, 7)      # N = 597: no preset batch size divides it
EPOCHS = 2                                # epochs capped for time (the schedule still spans them)


def _split(counts, d, views, gen, centers):
    labels = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(counts)])
    base = centers[labels] + 0.8 * torch.randn(len(labels), d, generator=gen)
    feats = torch.stack([base + 0.1 * torch.randn(len(labels), d, generator=gen) for _ in range(views)], 1)
    names = (["clean"] + [f"aug{i}" for i in range(1, views)]) if views > 2 else ["center", "hflip"]
    return SimpleNamespace(features=feats.float(), labels=labels, index=torch.arange(len(labels)), views=names)


def tiny_cache(d: int = 6):
    g = torch.Generator().manual_seed(0)
    k = len(COUNTS)
    centers = torch.randn(k, d, generator=g)
    splits = {"train": _split(COUNTS, d, 3, g, centers), "val": _split([3] * k, d, 2, g, centers),
              "test": _split([3] * k, d, 2, g, centers)}
    w = 0.3 * torch.randn(k, d, generator=g) + 0.2 * centers
    return SimpleNamespace(path="mem", manifest={"dataset": {"source": "fake"}}, splits=splits, weight=w,
                           bias=torch.linspace(0.3, -0.3, k), class_counts=torch.tensor(COUNTS),
                           class_names=[f"c{j}" for j in range(k)], num_classes=k, feature_dim=d, groups=None)


CACHE = tiny_cache()
DATA = api._train_data(CACHE, torch.device("cpu"), "all")
TRAINED = [(name, preset) for name, m in METHODS.items() if not m.closed_form and m.origin == "built-in"
           for preset in PRESETS]


def config(name: str, preset: str, seed: int = 1):
    m = get_method(name)
    epochs = min(EPOCHS, m.defaults(preset).get("epochs") or EPOCHS)
    params = resolve_params(m, preset, {"epochs": epochs}, len(DATA.labels))
    return api.make_config(m, params, seed, name, CACHE.class_counts)


@pytest.mark.parametrize("name,preset", TRAINED, ids=[f"{n}-{p}" for n, p in TRAINED])
def test_engine_equals_reference_loop(name, preset):
    cfg = config(name, preset)
    ref = train_reference(cfg, DATA)
    got = train_sweep([cfg], DATA, quiet=True, n_jobs=1)[0].layer
    for key in ("weight", "bias"):
        if key in ref:
            diff = float((got[key] - ref[key]).abs().max())
            assert diff <= 1e-5 * max(1.0, float(ref[key].abs().max())), (name, preset, key, diff)
    assert not torch.allclose(got["weight"], CACHE.weight)


def test_a_recipe_field_the_engine_ignored_would_fail():
    """The comparison sees each field: change it on the reference's side only and the heads part."""
    base = config("balanced-softmax", "cifar")
    got = train_sweep([base], DATA, quiet=True, n_jobs=1)[0].layer
    for change in ({"steps": "ceil"}, {"schedule": "cosine"}, {"no_wd": ("b",)}):
        ref = train_reference(SimpleNamespace(**{**vars(base), **change}), DATA)
        assert max(float((ref[k] - got[k]).abs().max()) for k in ("weight", "bias")) > 1e-5, change


def test_step_rules_as_the_scripts_count():
    # CIFAR-100-LT IR 100: N = 10847
    n = 10847
    assert steps_per_epoch("ib", n, 512) == 22 and steps_per_epoch("ib", n, 512, "floor") == 21    # BALMS: 21
    assert 91 * steps_per_epoch("ib", n, 512, "floor") == 1911                                      # 2000 it. -> 91 ep.
    assert steps_per_epoch("cb", n, 128) == 84                                                      # cRT int(N/B)
    assert steps_per_epoch("cb", n, 128, "ceil+1", samples=500 * 100) == 86                         # MiSLAS
    for rule in ("floor", "ceil", "ceil+1"):
        for b in (7, 64, 128, 512):
            assert script_batches(rule, 597, b, 597) == steps_per_epoch("ib", 597, b, rule)
    ci = ClassIndex.from_labels(DATA.labels, len(COUNTS))
    idx, valid = epoch_indices("ib", ci, 64, 0, 1, torch.Generator().manual_seed(0), steps="floor")
    assert idx.shape == (9, 64) and bool(valid.all())                                   # the short batch dropped
    idx, valid = epoch_indices("cb", ci, 64, 0, 1, torch.Generator().manual_seed(0), steps="ceil+1")
    assert idx.shape == (11, 64) and bool(valid.all()) and epoch_samples("cb", ci) == 300 * 6


def test_progressive_weight_reaches_one():
    for e_total in (1, 2, 10, 30):
        lams = [progressive_lambda(e, e_total) for e in range(e_total)]
        assert np.allclose(lams, np.linspace(0, 1, e_total), atol=1e-15)
    assert progressive_lambda(29, 30) == 1.0
    ci = ClassIndex.from_labels(DATA.labels, len(COUNTS))
    idx, valid = epoch_indices("progressive", ci, 64, 9, 10, torch.Generator().manual_seed(0))
    freq = torch.bincount(ci.labels[idx[valid]], minlength=len(COUNTS)).double() / int(valid.sum())
    assert float(freq.max() - freq.min()) < 0.12              # the last epoch draws classes uniformly


def test_recipes_follow_their_scripts():
    start = {"crt", "sqrt", "progressive", "lws", "balanced-softmax", "maxnorm"}
    for name, m in METHODS.items():
        if m.closed_form or m.origin != "built-in":
            continue
        for preset in PRESETS:
            want = "cosine-start" if name in start else "cosine"
            assert m.defaults(preset)["schedule"] == want, (name, preset)
    assert get_method("balanced-softmax").steps == "floor" and get_method("mislas").steps == "ceil+1"
    assert get_method("cb-sigmoid").no_wd == ("b",) and get_method("cb-focal").no_wd == ("b",)
    assert get_method("maxnorm").script("cifar")[1].startswith("ShadeAlsha/LTR-weight-balancing@")
    cfg = config("cb-sigmoid", "cifar")
    assert cfg.no_wd == ("b",) and cfg.bias_init == pytest.approx(-math.log(len(COUNTS) - 1))
