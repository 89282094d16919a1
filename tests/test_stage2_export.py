"""--export: folded heads reproduce the stage-2 logits; load_model returns a ready module."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

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


@pytest.fixture
def cache_with_ckpt(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_build_backbone", lambda arch, k: TinyBackbone(k))
    cache = fake_cache()
    net = TinyBackbone(cache.num_classes)
    ck = tmp_path / "stage1.pt"
    torch.save({"format": "ltcache-stage1", "arch": "tiny", "num_classes": cache.num_classes,
                "feature_dim": 8, "state_dict": net.state_dict()}, ck)
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
