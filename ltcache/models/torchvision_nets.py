"""Any torchvision classification model by name: ``torchvision:NAME`` (:class:`TorchvisionFeatures`),
randomly initialised (no weight downloads). The registry (:mod:`ltcache.models.registry`) calls
:func:`check_torchvision` / :func:`build_torchvision` for that prefix; the registered ResNets are in
:mod:`ltcache.models.resnet_imagenet`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ltcache.errors import LtcacheError, close_matches


PREFIX = "torchvision:"
_EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                 "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_names() -> list[str]:
    """The classification models torchvision can build by name (``torchvision.models.list_models``)."""
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def last_linear(net: nn.Module) -> "Optional[tuple[str, nn.Linear]]":
    """(qualified name, module) of the last ``nn.Linear`` registered in ``net``: the classifier,
    whatever the model calls it (fc, classifier.3, heads.head, head, ...); None when there is none."""
    found = None
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    return found


class TorchvisionFeatures(nn.Module):
    """A torchvision classification model with its last Linear replaced by Identity (``body``:
    images -> penultimate features [N, D]) and a classifier ``fc`` = Linear(D, num_classes).
    Built with ``weights=None``: nothing is downloaded. State dicts in torchvision's own layout
    load through :meth:`map_state_dict` (the last Linear's keys become ``fc``)."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        import torchvision
        try:
            net = torchvision.models.get_model(name, weights=None, **_EXTRA_KWARGS.get(name, {}))
        except Exception as exc:        # a model that cannot be built this way (rare): one line
            raise LtcacheError(f"torchvision cannot build '{name}' with weights=None ({exc.__class__.__name__}: "
                               f"{exc}); choose another torchvision:NAME") from None
        found = last_linear(net)
        if found is None:
            raise LtcacheError(f"torchvision:{name} has no Linear classifier (its head is not an nn.Linear, e.g. "
                               "a convolution), so its penultimate features are not defined here; choose a model "
                               "with a Linear head (resnet18, mobilenet_v3_small, efficientnet_b0, vit_b_16, ...)")
        head_name, head = found
        net.set_submodule(head_name, nn.Identity())
        self.name = name
        self.head_name = head_name
        self.body = net
        self.feature_dim = int(head.in_features)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        if not torch.is_tensor(f) or f.ndim != 2 or f.shape[1] != self.feature_dim:
            got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
            raise LtcacheError(f"torchvision:{self.name} without its last Linear ({self.head_name}) returns {got}, "
                               f"not [N, {self.feature_dim}] features; this model is not supported by name")
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def map_state_dict(self, state_dict: dict) -> dict:
        """A state dict of the torchvision model itself (``conv1.weight``, ..., ``fc.weight`` or
        ``classifier.3.weight``) in this module's layout (``body.*``, ``fc.*``); one already in
        this layout is returned as it is."""
        if any(k.startswith("body.") for k in state_dict):
            return dict(state_dict)
        head = self.head_name + "."
        return {("fc." + k[len(head):]) if k.startswith(head) else "body." + k: v for k, v in state_dict.items()}


def build_torchvision(arch: str, num_classes: int) -> TorchvisionFeatures:
    """``torchvision:NAME`` -> a :class:`TorchvisionFeatures` (name checked first)."""
    name = arch[len(PREFIX):]
    check_torchvision(arch)
    return TorchvisionFeatures(name, num_classes)


def check_torchvision(arch: str) -> None:
    """Refuse a ``torchvision:NAME`` that torchvision does not know, with the closest names."""
    name = arch[len(PREFIX):]
    names = torchvision_names()
    if name not in names:
        close = close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise LtcacheError(f"unknown arch '{arch}'{hint}; torchvision:NAME takes a torchvision classification "
                           f"model name ({len(names)} known: torchvision.models.list_models())")
