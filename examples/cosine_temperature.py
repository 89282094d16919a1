"""A cosine classifier with a learned temperature as an ltcache plugin: a head of your own.

    z_j = exp(t) * <x / ||x||, w_j / ||w_j||>

W [K, D] and t (one number per member, the log of the scale) are both trained; the
engine takes their gradients by autograd through ``forward`` (no backward written).

    ltcache tune --plugin examples/cosine_temperature.py --methods cosine-t,cosine,ce
"""
import math

import torch
import torch.nn.functional as F

import ltcache


@ltcache.register_head("cosine-t")
class CosineTemperature:
    """Cosine logits times a learned scale exp(t)."""

    params = ("W", "t")

    def init(self, w0, b0, g, init):
        if init == "stage1":
            w = w0.clone()
        else:                                   # unit rows from the member's own generator
            w = torch.rand(w0.shape, generator=g) * 2 - 1
        return {"W": F.normalize(w, dim=1), "t": torch.tensor([math.log(16.0)])}, {}

    def forward(self, p, buf, x):               # p["W"] [M, K, D], p["t"] [M, 1], x [M, B, D]
        cos = torch.bmm(F.normalize(x, dim=-1), F.normalize(p["W"], dim=-1).transpose(1, 2))
        return cos * p["t"].exp().unsqueeze(-1)


ltcache.register_method(
    "cosine-t", head="cosine-t", loss="ce", init="fresh",
    presets={"epochs": 30, "lr": 0.1, "wd": 5e-4, "batch_size": 128},
    source="a cosine head (cRT CosNormClassifier) with the scale learned",
    notes="fresh unit rows; scale exp(t) learned from 16")
