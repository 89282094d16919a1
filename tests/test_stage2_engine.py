"""The batched stage-2 engine: a mixed sweep equals each configuration trained alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ltcache.stage2 import api
from ltcache.stage2.methods import METHODS, get_method, resolve_params
from ltcache.stage2.sweep import Config, TrainData, train_sweep
from ltcache.stage2.losses import build_loss

torch.set_num_threads(1)


def fake_split(n_per_class, d, views, names, gen, centers):
    labels = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(n_per_class)])
    base = centers[labels] + 0.8 * torch.randn(len(labels), d, generator=gen)
    feats = torch.stack([base + 0.1 * torch.randn(len(labels), d, generator=gen) for _ in range(views)], 1)
    return SimpleNamespace(features=feats.float(), labels=labels, index=torch.arange(len(labels)), views=names)


def fake_cache(counts=(150, 60, 30, 12, 6), d=8, train_views=2, seed=0):
    """An in-memory FeatureCache-like object (ARCHITECTURE.md contract) with tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    k = len(counts)
    centers = torch.randn(k, d, generator=g) * 1.5
    train = fake_split(counts, d, train_views, ["clean"] + [f"aug{i}" for i in range(1, train_views)], g, centers)
    val = fake_split([4] * k, d, 2, ["center", "hflip"], g, centers)
    test = fake_split([10] * k, d, 2, ["center", "hflip"], g, centers)
    w = torch.randn(k, d, generator=g) * 0.3 + centers * 0.2
    w[0] *= 2.0
    b = torch.linspace(0.5, -0.5, k)
    return SimpleNamespace(path="mem", manifest={"dataset": {"source": "fake"}},
                           splits={"train": train, "val": val, "test": test}, weight=w, bias=b,
                           class_counts=torch.tensor(counts), class_names=[f"c{j}" for j in range(k)],
                           num_classes=k, feature_dim=d, groups=None)


def data_of(cache):
    return api._train_data(cache, torch.device("cpu"), "all")


def configs_for(cache, specs):
    counts = cache.class_counts
    out = []
    for name, ov, seed in specs:
        m = get_method(name)
        params = resolve_params(m, "cifar", ov, len(cache.splits["train"].labels))
        out.append(api.make_config(m, params, seed, name, counts))
    return out


MIXED = [
    ("ce", {"lr": 0.05, "batch_size": 32, "epochs": 3}, 0),
    ("los", {"delta": 0.9, "lr": 0.02, "batch_size": 32, "epochs": 2}, 1),
    ("crt", {"lr": 0.1, "batch_size": 32, "epochs": 3}, 2),          # class-balanced sampler, fresh head
    ("sqrt", {"batch_size": 32, "epochs": 2}, 0),
    ("progressive", {"batch_size": 32, "epochs": 3}, 3),
    ("lws", {"batch_size": 32, "epochs": 2}, 0),
    ("mislas", {"batch_size": 32, "epochs": 3, "shape": "convex"}, 4),
    ("marc", {"batch_size": 32, "epochs": 2}, 0),
    ("maxnorm", {"batch_size": 32, "epochs": 3, "lr": 0.05}, 1),     # BCE-on-softmax + MaxNorm
    ("focal", {"batch_size": 32, "epochs": 2}, 0),
    ("cb", {"batch_size": 32, "epochs": 2}, 0),
    ("cb-focal", {"batch_size": 32, "epochs": 2}, 0),
    ("vs", {"batch_size": 32, "epochs": 2}, 5),
    ("seesaw", {"batch_size": 32, "epochs": 2}, 0),
    ("lade", {"batch_size": 32, "epochs": 2}, 0),
    ("ldam-drw", {"batch_size": 32, "epochs": 2}, 0),                # cosine head group
    ("cosine", {"batch_size": 32, "epochs": 3}, 1),
]


@pytest.mark.parametrize("select", ["last", "val"])
def test_batched_equals_alone(select):
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MIXED)
    together = train_sweep(cfgs, data, select=select, quiet=True)
    counts = cache.class_counts.tolist()
    test = cache.splits["test"]
    for cfg, t in zip(cfgs, together):
        alone = train_sweep([cfg], data, select=select, quiet=True)[0]
        assert alone.selected_epoch == t.selected_epoch, cfg.method
        for key in ("weight", "bias"):
            if key in t.layer:
                assert torch.allclose(alone.layer[key], t.layer[key], atol=1e-5, rtol=0), (cfg.method, key)
        ma = api.evaluate_layer(alone.layer, test.features, test.labels, counts)
        mt = api.evaluate_layer(t.layer, test.features, test.labels, counts)
        assert ma["all"] == pytest.approx(mt["all"], abs=1e-5)
        assert ma["nll"] == pytest.approx(mt["nll"], abs=1e-5)
        # and it trained: the head moved away from its initial value
        assert not torch.allclose(t.layer.get("weight"), cache.weight) or cfg.head in ("lws", "marc")
