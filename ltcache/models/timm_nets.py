"""``timm:NAME``: any timm model as a backbone (optional: ``pip install 'ltcache[timm]'``).

Built with ``pretrained=False`` and ``num_classes=0``, so timm itself returns the pooled
penultimate features and nothing is downloaded; local weights come with ``--pretrained PATH``
(a state dict in timm's own layout, its classifier keys named by the model's ``pretrained_cfg``).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ltcache.errors import LtcacheError, close_matches

PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:
        raise LtcacheError("--arch timm:NAME needs the optional timm package: pip install -e '.[timm]' in the ltcache checkout "
                           "(or use torchvision:NAME)") from None
    return timm


def check_timm(arch: str) -> None:
    """Refuse a ``timm:NAME`` that timm does not know (or timm missing), with the closest names."""
    timm = _timm()
    name = arch[len(PREFIX):]
    names = timm.list_models()
    if name not in names:
        close = close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise LtcacheError(f"unknown arch '{arch}'{hint}; timm:NAME takes a timm model name "
                           f"({len(names)} known: timm.list_models())")


class TimmFeatures(nn.Module):
    """A timm model without its classifier (``.features``) plus our own ``fc``."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        timm = _timm()
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception as exc:        # a model that cannot be built this way: one line
            raise LtcacheError(f"timm cannot build '{name}' ({exc.__class__.__name__}: {exc}); "
                               "choose another timm:NAME") from None
        self.name = name
        self.head_name = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or "fc"
        self.body = net
        self.feature_dim = int(net.num_features)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise LtcacheError(f"timm:{self.name} returns {tuple(f.shape)}, not [N, {self.feature_dim}] "
                               "pooled features; this model is not supported by name")
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def map_state_dict(self, state_dict: dict) -> dict:
        """A state dict of the timm model itself (its classifier under ``pretrained_cfg
        ['classifier']``, e.g. ``fc`` or ``head.fc``) in this module's layout (``body.*``,
        ``fc.*``); one already in this layout is returned as it is."""
        if any(k.startswith("body.") for k in state_dict):
            return dict(state_dict)
        head = self.head_name + "."
        return {("fc." + k[len(head):]) if k.startswith(head) else "body." + k: v for k, v in state_dict.items()}


def build_timm(arch: str, num_classes: int) -> TimmFeatures:
    """``timm:NAME`` -> a :class:`TimmFeatures` (name checked first)."""
    check_timm(arch)
    return TimmFeatures(arch[len(PREFIX):], num_classes)
