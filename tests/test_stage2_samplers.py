"""Sampler class frequencies and closed-form methods against hand computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltcache.stage2 import closed_form as CF
from ltcache.stage2.samplers import ClassIndex, epoch_indices

torch.set_num_threads(1)
COUNTS = [400, 100, 25, 9]


def index():
    labels = torch.cat([torch.full((n,), j) for j, n in enumerate(COUNTS)])
    return ClassIndex.from_labels(labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))], 4)


def class_freq(kind, epochs=4, b=32):
    ci = index()
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(4)
    for e in range(epochs):
        idx, valid = epoch_indices(kind, ci, b, e, epochs, g)
        seen += torch.bincount(ci.labels[idx[valid]], minlength=4)
    return seen / seen.sum(), ci, idx, valid


def test_instance_balanced_is_a_permutation():
    ci = index()
    idx, valid = epoch_indices("ib", ci, 32, 0, 1, torch.Generator().manual_seed(0))
    assert idx.shape == (17, 32) and int(valid.sum()) == ci.n
    assert torch.equal(idx[valid].sort().values, torch.arange(ci.n))


def test_class_balanced_uniform_and_crt_shape():
    freq, ci, idx, valid = class_freq("cb")
    assert idx.shape == (ci.n // 32, 32) and bool(valid.all())          # int(N/B) full batches
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.01)
    labels = ci.labels[idx.reshape(-1)]
    assert torch.all(labels.view(-1, 4) == labels.view(-1, 4)[:, :1])   # 4 per class visit
    # no repeat inside a class cycle: the first 9 draws of the rarest class are distinct
    rare = idx.reshape(-1)[labels == 3][:9]
    assert len(set(rare.tolist())) == 9


def test_square_root_sampling():
    freq, *_ = class_freq("sqrt", epochs=8)
    expect = torch.tensor(COUNTS).double().sqrt()
    assert torch.allclose(freq.double(), expect / expect.sum(), atol=0.02)


def test_progressive_moves_to_balanced():
    ci = index()
    g = torch.Generator().manual_seed(0)
    first, _ = epoch_indices("progressive", ci, 32, 0, 10, g)
    assert abs(float((ci.labels[first.reshape(-1)] == 0).float().mean()) - 400 / 534) < 0.05


def test_tau_norm_and_posthoc_la_and_ncm():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    layer = CF.tau_norm_layer(w, 1.0)
    assert torch.allclose(layer["weight"], torch.tensor([[1.0, 0.0], [0.0, 1.0]])) and torch.all(layer["bias"] == 0)
    half = CF.tau_norm_layer(w, 0.5)["weight"]
    assert torch.allclose(half[0], torch.tensor([3 / 3 ** 0.5, 0.0]))
    counts = torch.tensor([90, 10])
    la = CF.posthoc_la_layer(w, torch.tensor([0.5, 0.0]), counts, 1.0)
    assert torch.allclose(la["bias"], torch.tensor([0.5 - torch.log(torch.tensor(0.9)), -torch.log(torch.tensor(0.1))]))
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    ncm = CF.ncm_layer(x, y, 2)
    mu = x.mean(0)
    xh = F.normalize(x - mu, dim=1)
    assert torch.allclose(ncm["centroids"][0], xh[:2].mean(0), atol=1e-6)
    from ltcache.stage2.heads import apply_layer
    z = apply_layer(ncm, x)
    assert torch.allclose(z[2, 1], -((xh[2] - ncm["centroids"][1]) ** 2).sum(), atol=1e-5)


def test_select_tau_uses_val():
    w = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    val_x = torch.tensor([[[1.0, 0.5]], [[1.0, 0.9]], [[1.0, 2.0]]])   # [N, V=1, D]
    tau, curve = CF.select_tau(w, val_x, torch.tensor([0, 1, 1]))
    assert len(curve) == 21 and tau >= 1.0          # raw weights favour class 0; normalising fixes it
    assert max(c["val_acc"] for c in curve) == pytest.approx(next(c["val_acc"] for c in curve if c["tau"] == tau))
