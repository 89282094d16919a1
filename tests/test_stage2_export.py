"""--export: folded heads reproduce the stage-2 logits; load_model returns a ready module that
takes raw images through the stored preprocessing and test-time views."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import ltcache
from ltcache import export
from ltcache.errors import LtcacheError
from ltcache.stage2 import api
from ltcache.stage2.heads import apply_layer
from test_stage2_engine import fake_cache

torch.set_num_threads(1)


class TinyBackbone(nn.Module):
    """Private stand-in for ltcache.models: features = linear map of flattened images."""

    def __init__(self, num_classes, d=8):
        super().__init__()
        self.body = nn.Linear(12, d)
        self.fc = nn.Linear(d, num_classes)
        self.feature_dim = d

    def features(self, x):
        return self.body(x.flatten(1))

    def forward(self, x):
        return self.fc(self.features(x))


MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.fixture
def cache_with_ckpt(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_build_backbone", lambda arch, k: TinyBackbone(k))
    cache = fake_cache()
    net = TinyBackbone(cache.num_classes)
    ck = tmp_path / "stage1.pt"
    torch.save({"format": "ltcache-stage1", "arch": "tiny", "num_classes": cache.num_classes,
                "feature_dim": 8, "state_dict": net.state_dict(),
                "dataset": {"image_size": 2, "mean": MEAN, "std": STD}}, ck)
    cache.manifest = {"checkpoint": str(ck)}
    return cache, net


@pytest.mark.parametrize("method,ov", [("marc", {"epochs": 1}), ("tau-norm", {"tau": 1.0}), ("lws", {"epochs": 1}),
                                       ("posthoc-la", {}), ("ldam", {"epochs": 1}), ("ncm", {})])
def test_export_roundtrip(cache_with_ckpt, tmp_path, method, ov):
    cache, net = cache_with_ckpt
    res, pairs = api.run_sweep(cache, api.expand([method], ov, None, "cifar", 246), [0], quiet=True, device="cpu")
    layer = pairs[0][1]
    out = export.export_model(cache, layer, tmp_path / "m.pt")
    model = ltcache.load_model(out)
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        feats = net.features(x)
        assert torch.allclose(model(x), apply_layer(layer, feats), atol=1e-5)


def test_export_errors(tmp_path):
    cache = fake_cache()
    with pytest.raises(LtcacheError, match="names no stage-1 checkpoint"):
        export.export_model(cache, {"kind": "linear"}, tmp_path / "m.pt")
    cache.manifest = {"checkpoint": str(tmp_path / "gone.pt")}
    with pytest.raises(LtcacheError, match="is missing"):
        export.export_model(cache, {"kind": "linear"}, tmp_path / "m.pt")
    (tmp_path / "junk.pt").write_text("x")
    with pytest.raises(LtcacheError):
        ltcache.load_model(tmp_path / "junk.pt")


def _normalized(x):
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


@pytest.mark.parametrize("method", ["tau-norm", "ncm"])
def test_export_takes_raw_images_with_stored_preprocessing_and_flip(cache_with_ckpt, tmp_path, method):
    cache, net = cache_with_ckpt
    res, pairs = api.run_sweep(cache, api.expand([method], {}, None, "cifar", 246), [0], quiet=True, device="cpu")
    layer = pairs[0][1]
    out = export.export_model(cache, layer, tmp_path / "m.pt")
    doc = torch.load(out, weights_only=False)
    assert doc["preprocessing"]["image_size"] == 2 and doc["preprocessing"]["mean"] == MEAN
    assert doc["preprocessing"]["std"] == STD and doc["preprocessing"]["color"] == "RGB"
    assert doc["test_views"] == ["center", "hflip"] and doc["flip_average"] is True
    x = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8)
    with torch.no_grad():
        center = apply_layer(layer, net.features(_normalized(x)))
        flipped = apply_layer(layer, net.features(_normalized(x.flip(-1))))
        model = ltcache.load_model(out)
        assert model.flip is True
        assert torch.allclose(model(x), (center + flipped) / 2, atol=1e-5)
        assert torch.allclose(model(x[0]), model(x)[:1], atol=1e-6)                       # [3,H,W]
        pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]
        assert torch.allclose(model(pils), model(x), atol=1e-6)                          # list of PIL
        assert torch.allclose(model(pils[1]), model(x)[1:2], atol=1e-6)                   # one PIL image
        assert torch.allclose(model(_normalized(x)), center, atol=1e-5)                  # float: as before
        assert torch.allclose(model.forward_normalized(_normalized(x), flip=True), (center + flipped) / 2, atol=1e-5)
        assert torch.allclose(ltcache.load_model(out, flip=False)(x), center, atol=1e-5)
        grey = Image.fromarray(x[2, 0].numpy(), mode="L")                                  # converted to RGB
        assert torch.allclose(model(grey), model(x[2, :1].expand(3, 2, 2).contiguous()), atol=1e-6)


def test_preprocessing_matches_the_image_decoder(tmp_path):
    """Large images: resize of the short side to size/0.875 and centre crop, exactly as the
    dataset decoder; small models keep their native-size images as they are."""
    from ltcache.data.sources import _decode

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.png")
    big = export.LtcacheClassifier(nn.Identity(), nn.Identity(), preprocessing=export.preprocessing_spec(
        224, MEAN, STD))
    want = _decode(str(tmp_path / "big.png"), 224)
    assert big.preprocessing["resize_short_side"] == 256
    assert torch.equal(big.preprocess(Image.open(tmp_path / "big.png"))[0], want)
    assert torch.equal(big.preprocess(torch.from_numpy(arr).permute(2, 0, 1))[0], want)
    small = export.LtcacheClassifier(nn.Identity(), nn.Identity(), preprocessing=export.preprocessing_spec(
        32, MEAN, STD))
    img = torch.from_numpy(arr[:32, :32]).permute(2, 0, 1).contiguous()
    assert torch.equal(small.preprocess(img)[0], img)
    assert small.preprocess(Image.fromarray(arr)).shape == (1, 3, 32, 32)             # other sizes: resized


def test_export_input_errors(cache_with_ckpt, tmp_path):
    cache, net = cache_with_ckpt
    res, pairs = api.run_sweep(cache, api.expand(["tau-norm"], {}, None, "cifar", 246), [0], quiet=True,
                               device="cpu")
    out = export.export_model(cache, pairs[0][1], tmp_path / "m.pt")
    model = ltcache.load_model(out)
    for bad in (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8),
                [torch.zeros(3, 2, 2)], "img.png", []):
        with pytest.raises(LtcacheError):
            model(bad)
    # a file from before the preprocessing was stored: normalised tensors still work, raw images are refused
    doc = torch.load(out, weights_only=False)
    for key in ("preprocessing", "test_views", "flip_average"):
        doc.pop(key)
    doc["format_version"] = 1
    torch.save(doc, tmp_path / "old.pt")
    old = ltcache.load_model(tmp_path / "old.pt")
    x = torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8)
    assert torch.allclose(old(_normalized(x)), model(_normalized(x)))
    with pytest.raises(LtcacheError, match="without its preprocessing"):
        old(x)
    # a checkpoint and manifest without mean/std/image size: no incomplete model is written
    ck = torch.load(cache.manifest["checkpoint"], weights_only=False)
    del ck["dataset"]
    torch.save(ck, cache.manifest["checkpoint"])
    with pytest.raises(LtcacheError, match="preprocessing"):
        export.export_model(cache, pairs[0][1], tmp_path / "m2.pt")
    assert not (tmp_path / "m2.pt").exists()


def test_stage2_alone_never_imports_backbone_code():
    """retrain and bench on a loaded cache import no image, backbone or export code (the export
    of `retrain --export` is called from the CLI, outside stage 2)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    code = ("import sys\nfrom ltcache.stage2 import api\nfrom test_stage2_engine import fake_cache\n"
            "api.retrain(fake_cache(), 'ce', {'epochs': 1}, quiet=True, device='cpu', jobs=1)\n"
            "api.bench(fake_cache(), ['ce', 'tau-norm'], overrides={'epochs': 1}, quiet=True, device='cpu', jobs=1)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torchvision' or m.startswith(\n"
            "    ('ltcache.data', 'ltcache.models', 'ltcache.export', 'ltcache.stage1', 'ltcache.cache.extraction'))]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
