"""The papers' checkpoint layouts (``ltcache extract --ckpt FILE --arch NAME --from SOURCE``).

Each test builds a model of ours with random weights (BatchNorm statistics included), renames and
nests its keys exactly as the source saves them (the real key names: ``module.`` of DataParallel,
``state_dict_model`` / ``state_dict_classifier`` of MiSLAS, ``state_dict_best`` -> ``feat_model`` /
``classifier`` of cRT, ``linear`` of LDAM-DRW, ``backbone.`` / ``classifier`` of BagofTricks-LT,
LOS's ``layer{n}`` + ``downsample``), extracts it on tiny generated images and checks the features
equal those of our own state dict with the same weights, and that the source's classifier is the
cache's stage-1 classifier.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from datagen import make_imagefolder  # noqa: E402

from ltcache.cache import extract, load  # noqa: E402
from ltcache.cli import cli  # noqa: E402
from ltcache.errors import LtcacheError  # noqa: E402
from ltcache.models import build_model  # noqa: E402

K = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    small = make_imagefolder(base / "small", num_classes=K, per_class_train=4, per_class_test=2, size=32)
    large = make_imagefolder(base / "large", num_classes=K, per_class_train=2, per_class_test=1, size=80)
    return {"base": base, "small": small, "large": large}


def _kw(data, arch, folder="small", **over):
    kw = dict(protocol="clean", arch=arch, dataset=f"imagefolder:{data[folder]}", imb_ratio=2, val_per_class=1,
              splits=("train", "test"), test_views=("center",), dtype="float32", batch_size=4,
              data_root=data["base"], quiet=True, workers=2, device="cpu")
    if folder == "large":            # 224-px ResNeXt-50 forwards on a shared CPU: the fewest that test it
        kw.update(splits=("test",), batch_size=2)
    kw.update(over)
    return kw


def _random_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(arch, K)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if "running_var" in name:
                    t.copy_(torch.rand_like(t) + 0.5)
                else:
                    t.copy_(torch.randn_like(t) * (0.1 if t.ndim > 1 else 0.5))
    return model.state_dict()


def _src(key: str, downsample: bool = False) -> str:
    """Our CIFAR key names -> Cao et al.'s / LOS's (``layers.{i}`` -> ``layer{i+1}``)."""
    key = re.sub(r"^layers\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
    return key.replace(".shortcut.", ".downsample.") if downsample else key


def _body(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _features(cache_dir):
    splits = json.loads((Path(cache_dir) / "manifest.json").read_text())["extraction"]["splits"]
    c = load(cache_dir, splits=tuple(splits), dtype=torch.float32)
    return c, {s: c.splits[s].features for s in c.splits}


@pytest.fixture(scope="module")
def reference(data):
    """Our own plain state dicts and the caches extracted from them: the truth per arch."""
    out = {}

    def get(arch, folder="small"):
        if arch not in out:
            sd = _random_model(arch)
            path = data["base"] / f"ours-{arch}.pt"
            torch.save(sd, path)
            cache = extract(path, cache=data["base"] / f"cache-ours-{arch}", **_kw(data, arch, folder))
            out[arch] = (sd, _features(cache))
        return out[arch]
    return get


def _same(data, reference, arch, name, obj, source, folder="small"):
    sd, (ref_cache, ref_feats) = reference(arch, folder)
    path = data["base"] / f"{name}.pth"
    torch.save(obj, path)
    cache = extract(path, cache=data["base"] / f"cache-{name}", source=source, **_kw(data, arch, folder))
    got, feats = _features(cache)
    for split, f in ref_feats.items():
        torch.testing.assert_close(feats[split], f, rtol=0, atol=1e-6)
    return sd, got


def _ldam(sd, normed=False):
    inner = {"module." + _src(k): v for k, v in _body(sd).items()}
    if normed:
        inner["module.linear.weight"] = sd["fc.weight"].t().clone()          # NormedLinear: [D, K], no bias
    else:
        inner["module.linear.weight"], inner["module.linear.bias"] = sd["fc.weight"], sd["fc.bias"]
    return {"epoch": 200, "arch": "resnet32", "state_dict": inner, "best_acc1": 0.5, "optimizer": {"state": {}}}


def _mislas(sd, cifar=True, lws=None):
    body = {"module." + (_src(k) if cifar else k): v for k, v in _body(sd).items()}
    ck = {"epoch": 200, "state_dict_model": body,
          "state_dict_classifier": {"module.fc.weight": sd["fc.weight"], "module.fc.bias": sd["fc.bias"]},
          "best_acc1": 0.5}
    if lws is not None:
        ck["state_dict_lws_model"] = {"module.learned_norm": lws.reshape(1, -1)}
    return ck


def _bot(sd, cifar=True, kind="fc"):
    inner = {"module.backbone." + (_src(k) if cifar else k): v for k, v in _body(sd).items()}
    if kind == "fc":
        inner["module.classifier.weight"], inner["module.classifier.bias"] = sd["fc.weight"], sd["fc.bias"]
    elif kind == "fcnorm":
        inner["module.classifier.weight"] = sd["fc.weight"]
    else:                                                                       # LWS
        inner["module.classifier.fc.weight"], inner["module.classifier.fc.bias"] = sd["fc.weight"], sd["fc.bias"]
        inner["module.classifier.scales"] = torch.full((K,), 2.0)
    return {"state_dict": inner, "epoch": 10, "best_result": 0.5, "scheduler": {}, "optimizer": {}, "amp": {}}


def _crt(sd, lws=None):
    cls = {"module.fc.weight": sd["fc.weight"], "module.fc.bias": sd["fc.bias"]}
    if lws is not None:
        cls["module.scales"] = lws
    return {"epoch": 90, "best_epoch": 88, "best_acc": 0.5, "centroids": None,
            "state_dict_best": {"feat_model": {"module." + k: v for k, v in _body(sd).items()}, "classifier": cls}}


# ------------------------------------------------------------------------------------ per source

def test_ldam_drw_linear_and_normed_linear(data, reference):
    sd, c = _same(data, reference, "resnet32", "ldam", _ldam(sd_ := reference("resnet32")[0]), "ldam-drw")
    torch.testing.assert_close(c.weight, sd["fc.weight"])
    torch.testing.assert_close(c.bias, sd["fc.bias"])
    assert c.manifest["checkpoint"]["layout"]["from"] == "ldam-drw"
    assert c.manifest["checkpoint"]["layout"]["head"] == "linear"
    # NormedLinear: cosine head, W rows normalised, b = 0, recorded as such; auto-detected
    sd, c = _same(data, reference, "resnet32", "ldam-normed", _ldam(sd_, normed=True), None)
    torch.testing.assert_close(c.weight, F.normalize(sd["fc.weight"], dim=1))
    assert not c.bias.any()
    lay = c.manifest["checkpoint"]["layout"]
    assert lay["from"] == "ldam-drw" and lay["detected"] and lay["head"] == "cosine"
    assert c.manifest["stage1_classifier"]["head"] == "cosine"


def test_mislas_cifar_with_lws_folded(data, reference):
    sd = reference("resnet32")[0]
    lws = torch.tensor([1.0, 2.0, 0.5, 3.0])
    sd, c = _same(data, reference, "resnet32", "mislas", _mislas(sd, lws=lws), None)
    torch.testing.assert_close(c.weight, sd["fc.weight"] * lws[:, None])
    torch.testing.assert_close(c.bias, sd["fc.bias"] * lws)
    lay = c.manifest["checkpoint"]["layout"]
    assert lay["from"] == "mislas" and lay["detected"] and lay["head"] == "linear x scales"
    assert "state_dict_classifier" in c.manifest["stage1_classifier"]["from"]


def test_bot_cifar_fc_fcnorm_lws(data, reference):
    sd = reference("resnet32")[0]
    _, c = _same(data, reference, "resnet32", "bot", _bot(sd), "bot")
    torch.testing.assert_close(c.weight, sd["fc.weight"])
    _, c = _same(data, reference, "resnet32", "bot-fcnorm", _bot(sd, kind="fcnorm"), None)
    assert c.manifest["checkpoint"]["layout"]["head"] == "cosine"
    torch.testing.assert_close(c.weight, F.normalize(sd["fc.weight"], dim=1))
    _, c = _same(data, reference, "resnet32", "bot-lws", _bot(sd, kind="lws"), None)
    torch.testing.assert_close(c.weight, 2 * sd["fc.weight"])


def test_los_resnet34_cifar(data, reference):
    sd = reference("resnet34-cifar")[0]
    obj = {_src(k, downsample=True): v for k, v in sd.items()}                 # a plain state dict
    assert "layer2.0.downsample.0.weight" in obj and "fc.weight" in obj
    _, c = _same(data, reference, "resnet34-cifar", "los", obj, None)
    assert c.manifest["checkpoint"]["layout"]["from"] == "los"
    torch.testing.assert_close(c.weight, sd["fc.weight"])


def test_resnet50_mislas_bot_torchvision(data, reference):
    sd = reference("resnet50")[0]
    for name, obj in (("mislas50", _mislas(sd, cifar=False)), ("bot50", _bot(sd, cifar=False)), ("tv50", dict(sd))):
        _, c = _same(data, reference, "resnet50", name, obj, None)
        assert c.manifest["checkpoint"]["layout"]["from"] == {"mislas50": "mislas", "bot50": "bot", "tv50": "torchvision"}[name]
        torch.testing.assert_close(c.bias, sd["fc.bias"])


def test_crt_resnext50_on_224px(data, reference):
    sd = reference("resnext50_32x4d", "large")[0]
    lws = torch.tensor([1.0, 0.5, 2.0, 1.5])
    sd, c = _same(data, reference, "resnext50_32x4d", "crt", _crt(sd, lws=lws), "crt", folder="large")
    torch.testing.assert_close(c.weight, sd["fc.weight"] * lws[:, None])
    assert c.manifest["checkpoint"]["layout"]["read"].startswith("'state_dict_best'")


# ------------------------------------------------------------------------------------ refusals

def _err(data, name, obj, arch, source=None, folder="small") -> str:
    path = data["base"] / f"{name}.pth"
    torch.save(obj, path)
    cache = data["base"] / f"cache-{name}"
    with pytest.raises(LtcacheError) as ei:
        extract(path, cache=cache, source=source, **_kw(data, arch, folder))
    assert not cache.exists()
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_wrong_from_names_first_key_and_the_layout_that_fits(data, reference):
    sd = reference("resnet32")[0]
    msg = _err(data, "wrong-from", _ldam(sd), "resnet32", source="bot")
    assert "not a Bag of Tricks" in msg and "'backbone.*'" in msg and "--from ldam-drw" in msg
    msg = _err(data, "wrong-from2", _bot(sd), "resnet32", source="ldam-drw")
    assert "linear.weight" in msg and "it reads as --from bot" in msg


def test_other_architecture_names_the_first_bad_key(data, reference):
    sd = reference("resnet32")[0]
    msg = _err(data, "other-arch", _mislas(sd), "resnet50", source="mislas")
    assert "--from mislas" in msg and "missing '" in msg and "unexpected" in msg
    # auto-detection: the closest layout is named with its first bad key
    msg = _err(data, "other-arch-auto", _mislas(sd), "resnet50")
    assert "closest: --from mislas" in msg and "missing 'layer1.0.conv3.weight'" in msg


def test_combination_without_our_ops_is_refused(data, reference):
    sd = reference("resnet34-cifar")[0]
    obj = {_src(k, downsample=True): v for k, v in sd.items()}
    msg = _err(data, "los-on-32", obj, "resnet34-cifar", source="mislas")
    assert "no network that matches --arch resnet34-cifar" in msg
    ck = _mislas(reference("resnet32")[0])
    ck["state_dict_block"] = {"module.conv1.weight": torch.zeros(1)}
    msg = _err(data, "mislas-places", ck, "resnet32")
    assert "state_dict_block" in msg
    crt = _crt(reference("resnet50")[0])
    crt["state_dict_best"]["feat_model"]["module.fc_add.weight"] = torch.zeros(512, 2048)
    assert "fc_add" in _err(data, "crt-fc-add", crt, "resnet50", source="crt")


def test_fixed_avgpool_refused_on_other_image_sizes(data, reference):
    sd = _random_model("resnet50")
    msg = _err(data, "crt-on-32px", _crt(sd), "resnet50", source="crt")
    assert "AvgPool2d" in msg and "224x224" in msg


def test_cli_from_option(data, reference):
    sd = reference("resnet32")[0]
    path = data["base"] / "cli-ldam.pth"
    torch.save(_ldam(sd), path)
    args = ["extract", "--ckpt", str(path), "--arch", "resnet32", "--dataset", f"imagefolder:{data['small']}",
            "--imb-ratio", "2", "--val-per-class", "1", "--data-root", str(data["base"]), "--protocol", "clean",
            "--splits", "test", "--test-views", "center", "--device", "cpu", "--quiet", "--workers", "2"]
    bad = CliRunner().invoke(cli, args + ["--from", "crt", "--cache", str(data["base"] / "cli-bad")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and bad.output.count("\n") == 1, bad.output
    assert not (data["base"] / "cli-bad").exists()
    ok = CliRunner().invoke(cli, args + ["--from", "ldam-drw", "--cache", str(data["base"] / "cli-ok")])
    assert ok.exit_code == 0, ok.output
