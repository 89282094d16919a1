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


# -- torchvision:NAME ----------------------------------------------------------------------------
TV = "torchvision:mobilenet_v3_small"          # classifier = Sequential(Linear 576->1024, Hardswish, Dropout, Linear)


def test_torchvision_by_name_cuts_at_the_last_linear():
    from ltcache.models.registry import check_arch, load_pretrained

    torch.manual_seed(0)
    model = build_model(TV, 7).eval()
    assert model.head_name == "classifier.3" and model.feature_dim == 1024
    assert isinstance(model.body.classifier[3], torch.nn.Identity)
    assert model.fc.in_features == 1024 and model.fc.out_features == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f, out = model.features(x), model(x)
    assert f.shape == (2, 1024) and torch.allclose(out, model.fc(f), atol=1e-5)
    assert build_model("torchvision:resnet18", 3).feature_dim == 512
    # torchvision's own state dict: the head of the dataset's classes loads as fc, strictly
    tv = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=7).eval()
    load_foreign_state_dict(model, tv.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5)
    # ImageNet-style weights (1000 classes): --pretrained takes the backbone, keeps a fresh head
    tv1000 = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    fresh = build_model(TV, 7)
    fc_before = fresh.fc.weight.clone()
    assert load_pretrained(fresh, tv1000.state_dict()) is False
    assert torch.equal(fresh.body.features[0][0].weight, tv1000.features[0][0].weight)
    assert torch.equal(fresh.fc.weight, fc_before)
    assert load_pretrained(build_model(TV, 1000), tv1000.state_dict()) is True
    with pytest.raises(LtcacheError, match="does not fit this --arch"):
        load_pretrained(fresh, torchvision.models.resnet18().state_dict())
    check_arch(TV)


@pytest.mark.parametrize("arch,needle", [
    ("torchvision:squeezenet1_0", "has no Linear classifier"),
    ("torchvision:resnet19", "did you mean torchvision:resnet18"),
    ("resnet33", "or torchvision:NAME"),
])
def test_torchvision_names_refused(arch, needle):
    with pytest.raises(LtcacheError, match=needle):
        build_model(arch, 3)


def test_train_and_extract_a_torchvision_model_by_name(tmp_path):
    """`ltcache train --arch torchvision:NAME [--pretrained]` and `ltcache extract` of its checkpoint, or
    of local weights alone (--pretrained): features of the model's penultimate layer."""
    from click.testing import CliRunner

    import datagen
    from ltcache.cache import load
    from ltcache.cli import cli
    from ltcache.stage1 import load_checkpoint

    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=4, per_class_train=20, per_class_test=4)
    data = ["--dataset", f"imagefolder:{folder}", "--data-root", str(tmp_path / "root"), "--imb-ratio", "2",
            "--val-per-class", "2"]
    weights = tmp_path / "mnv3s-imagenet-layout.pth"        # random weights in torchvision's layout (1000 classes)
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), weights)
    run = CliRunner().invoke(cli, ["train", *data, "--arch", TV, "--pretrained", str(weights), "--epochs", "1",
                                   "--batch-size", "8", "--warmup-epochs", "0", "--device", "cpu", "--workers", "1",
                                   "--out", str(tmp_path / "run"), "--quiet"])
    assert run.exit_code == 0, run.output + repr(run.exception)
    ck = load_checkpoint(tmp_path / "run" / "stage1.pt")
    assert ck["arch"] == TV and ck["feature_dim"] == 1024 and ck["state_dict"]["fc.weight"].shape == (4, 1024)
    assert ck["pretrained"]["sha256"] and ck["pretrained"]["classifier"].startswith("fresh")
    res = CliRunner().invoke(cli, ["extract", "--ckpt", str(tmp_path / "run" / "stage1.pt"), "--cache",
                                   str(tmp_path / "cache"), "--protocol", "clean", "--device", "cpu", "--workers", "1",
                                   "--data-root", str(tmp_path / "root"), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cache = load(tmp_path / "cache")
    assert cache.manifest["arch"] == TV and cache.feature_dim == 1024
    assert torch.equal(cache.weight, ck["state_dict"]["fc.weight"])
    model = build_model(TV, 4)
    model.load_state_dict(ck["state_dict"])
    # local weights alone: their 1000-class head is no stage-1 classifier for 4 classes
    res = CliRunner().invoke(cli, ["extract", "--pretrained", str(weights), "--arch", TV, *data, "--splits",
                                   "train,test", "--cache", str(tmp_path / "cache-pre"), "--protocol", "clean",
                                   "--device", "cpu", "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    pre = load(tmp_path / "cache-pre")
    assert pre.feature_dim == 1024 and pre.manifest["stage1_classifier"]["source"] == "none"
    assert pre.manifest["extraction"]["weights"] == "pretrained" and not pre.weight.any()
    res = CliRunner().invoke(cli, ["retrain", "--method", "tau-norm", "--tau", "1", "--cache", str(tmp_path / "cache-pre")])
    assert res.exit_code == 2 and "has none; train one from these weights" in res.output
    res = CliRunner().invoke(cli, ["extract", "--arch", TV, *data, "--cache", str(tmp_path / "x")])
    assert res.exit_code == 2 and "give --ckpt" in res.output and not (tmp_path / "x").exists()


def test_timm_model_by_name_and_its_local_weights(tmp_path, monkeypatch):
    """`--arch timm:NAME`: timm's pooled features (num_classes=0, nothing downloaded), its own state
    dict loads (classifier keys from its pretrained_cfg), and extract runs from local weights."""
    timm = pytest.importorskip("timm")
    from click.testing import CliRunner

    import datagen
    from ltcache.cache import load
    from ltcache.cli import cli
    from ltcache.models.registry import load_foreign_state_dict

    arch = "timm:resnet18"
    model = build_model(arch, 4)
    assert model.feature_dim == 512 and model.head_name == "fc"
    x = torch.randn(2, 3, 32, 32)
    net = timm.create_model("resnet18", pretrained=False)          # timm's own layout, 1000 classes
    net.eval()
    model.eval()
    load_foreign_state_dict(model, {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
                            | {"fc.weight": torch.randn(4, 512), "fc.bias": torch.zeros(4)})
    net.reset_classifier(0)
    assert torch.allclose(model.features(x), net(x), atol=1e-6)
    with pytest.raises(LtcacheError, match="unknown arch 'timm:resnet19'.*did you mean"):
        build_model("timm:resnet19", 4)
    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=4, per_class_train=20, per_class_test=4)
    weights = tmp_path / "r18-timm.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    res = CliRunner().invoke(cli, ["extract", "--pretrained", str(weights), "--arch", arch, "--dataset",
                                   f"imagefolder:{folder}", "--data-root", str(tmp_path / "root"), "--imb-ratio", "2",
                                   "--val-per-class", "2", "--splits", "train,test", "--cache", str(tmp_path / "c"),
                                   "--protocol", "clean", "--device", "cpu", "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert load(tmp_path / "c").feature_dim == 512
    import builtins
    real_import = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ImportError("no timm")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(LtcacheError, match=r"needs the optional timm package: pip install -e '\.\[timm\]'"):
        build_model(arch, 4)
