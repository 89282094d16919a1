"""Backbone registry: feature dims, forward == fc(features), errors, foreign state dicts."""
from __future__ import annotations

import pytest
import torch
import torchvision

from ltcache.errors import LtcacheError
from ltcache.models import build_model, list_models, load_foreign_state_dict

torch.set_num_threads(1)

EXPECTED = {"resnet32": 64, "resnet34-cifar": 512, "resnet18": 512, "resnet50": 2048, "resnext50_32x4d": 2048}


def test_registry_lists_every_backbone():
    assert set(EXPECTED) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_feature_dim_and_forward_is_fc_of_features(arch):
    torch.manual_seed(0)
    k = 7
    model = build_model(arch, k).eval()
    d = EXPECTED[arch]
    assert model.feature_dim == d
    assert isinstance(model.fc, torch.nn.Linear)
    assert model.fc.in_features == d and model.fc.out_features == k
    small = arch in ("resnet32", "resnet34-cifar")
    x = torch.randn(2 if arch == "resnet32" else 1, 3, 32 if small else 64, 32 if small else 64)
    with torch.no_grad():
        f = model.features(x)
        out = model(x)
    assert f.shape == (x.shape[0], d)
    assert out.shape == (x.shape[0], k)
    assert torch.allclose(out, model.fc(f), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_resnet32_is_the_cao_et_al_network():
    m = build_model("resnet32", 10)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 31                      # stem + 3 stages x 5 blocks x 2 convs (option-A shortcuts)
    n_params = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n_params < 0.48e6            # ~0.46M parameters


def test_resnet34_cifar_has_a_3x3_stem_and_no_maxpool():
    m = build_model("resnet34-cifar", 10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())
    assert [len(s) for s in m.layers] == [3, 4, 6, 3]


def test_unknown_arch_lists_valid_names():
    with pytest.raises(LtcacheError) as ei:
        build_model("resnet33", 10)
    msg = str(ei.value)
    assert "unknown arch 'resnet33'" in msg
    for name in EXPECTED:
        assert name in msg
    with pytest.raises(LtcacheError, match="at least one class"):
        build_model("resnet32", 0)


def test_load_torchvision_state_dict():
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(num_classes=5)
    sd = tv.state_dict()
    ours = build_model("resnet18", 5)
    load_foreign_state_dict(ours, sd)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), tv.eval()(x), atol=1e-5)
    # a DataParallel checkpoint: every key prefixed with "module."
    ours2 = build_model("resnet18", 5)
    load_foreign_state_dict(ours2, {f"module.{k}": v for k, v in sd.items()})
    assert torch.equal(ours2.fc.weight, tv.fc.weight)


def test_load_foreign_state_dict_mismatch():
    model = build_model("resnet18", 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LtcacheError, match="does not fit this --arch: 0 missing, 0 unexpected, 2 wrongly shaped"):
        load_foreign_state_dict(model, torchvision.models.resnet18(num_classes=10).state_dict())
    with pytest.raises(LtcacheError, match="does not fit this --arch.*check --arch"):
        load_foreign_state_dict(model, build_model("resnet32", 5).state_dict())
    partial = dict(torchvision.models.resnet18(num_classes=5).state_dict())
    partial.pop("fc.bias")
    with pytest.raises(LtcacheError, match="1 missing, 0 unexpected.*'fc.bias'"):
        load_foreign_state_dict(model, partial)
    for k, v in model.state_dict().items():      # nothing loaded on failure
        assert torch.equal(v, before[k]), k
