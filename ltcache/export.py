"""Deployable classifiers: the stage-1 backbone plus a re-trained stage-2 head in one file.

Post-hoc adjustments are folded into the head before writing: tau-norm, post-hoc logit
adjustment, LWS / MiSLAS scales and MARC's affine all become one ``nn.Linear``; cosine heads
stay a cosine layer; NCM stays a nearest-class-mean layer. ``load_model(path)`` returns a
ready ``nn.Module`` whose ``forward(images)`` gives logits. (This module may import
``ltcache.models``; stage 2 itself never does.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltcache import __version__
from ltcache.errors import LtcacheError

FORMAT = "ltcache-model"


class CosineHead(nn.Module):
    """z = scale * cos(f, w_j)."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())
        self.scale = float(scale)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).t()


class NCMHead(nn.Module):
    """Nearest class mean (cl2n features, l2 distance): z_j = -||x^ - c_j||^2."""

    def __init__(self, mean: torch.Tensor, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone().float())
        self.register_buffer("centroids", centroids.clone().float())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        xh = F.normalize(f - self.mean, dim=-1)
        return -(xh.pow(2).sum(1, keepdim=True) + self.centroids.pow(2).sum(1) - 2 * xh @ self.centroids.t())


def head_module(layer: dict) -> nn.Module:
    """An ``nn.Module`` for a stage-2 layer dict (``ltcache.stage2.heads.effective`` format)."""
    kind = layer["kind"]
    if kind == "linear":
        k, d = layer["weight"].shape
        lin = nn.Linear(d, k)
        with torch.no_grad():
            lin.weight.copy_(layer["weight"])
            lin.bias.copy_(layer["bias"])
        return lin
    if kind == "cosine":
        return CosineHead(layer["weight"], layer["scale"])
    if kind == "ncm":
        return NCMHead(layer["mean"], layer["centroids"])
    raise LtcacheError(f"cannot export a head of kind '{kind}'")


class LtcacheClassifier(nn.Module):
    """Backbone features followed by the exported head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, class_names=None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.class_names = list(class_names or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.features(x))


def _checkpoint_path(cache) -> Path:
    man = dict(getattr(cache, "manifest", None) or {})
    ck = man.get("checkpoint") or man.get("checkpoint_path") or man.get("stage1")
    if isinstance(ck, dict):
        ck = ck.get("path")
    if not ck:
        raise LtcacheError("the cache manifest names no stage-1 checkpoint, so the backbone cannot be exported; "
                           "re-extract the cache with `ltcache extract --ckpt stage1.pt`")
    path = Path(ck)
    if not path.is_absolute() and getattr(cache, "path", None):
        cand = Path(cache.path) / path
        path = cand if cand.exists() else path
    if not path.exists():
        raise LtcacheError(f"stage-1 checkpoint {path} (named by the cache manifest) is missing; "
                           "restore it or re-extract the cache from an existing checkpoint")
    return path


def _read_checkpoint(path: Path) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise LtcacheError(f"cannot read stage-1 checkpoint {path}: {exc}") from None
    if not isinstance(ck, dict) or "state_dict" not in ck or "arch" not in ck:
        raise LtcacheError(f"{path} is not an ltcache stage-1 checkpoint (no arch/state_dict)")
    return ck


def _build_backbone(arch: str, num_classes: int) -> nn.Module:
    from ltcache.models import build_model
    return build_model(arch, num_classes)


def _shifted_bn_stats(cache) -> dict:
    """BN running statistics the cache's val/test features were computed with (``--bn-shift``):
    the exported backbone must use them, or deployed features differ from the cached ones."""
    man = dict(getattr(cache, "manifest", None) or {})
    name = (man.get("extraction") or {}).get("bn_stats_file")
    if not name:
        return {}
    path = Path(getattr(cache, "path", ".")) / name
    if not path.is_file():
        raise LtcacheError(f"{path} (the shifted BatchNorm statistics named by the manifest) is missing; "
                           "re-extract the cache")
    return torch.load(path, map_location="cpu", weights_only=True)


def export_model(cache, layer: dict, path: Union[str, Path], meta: Optional[dict] = None) -> Path:
    """Write backbone (from the checkpoint the manifest names) + folded head to ``path`` (atomically)."""
    ck = _read_checkpoint(_checkpoint_path(cache))
    state = {k: v for k, v in ck["state_dict"].items() if not k.startswith("fc.")}
    state.update(_shifted_bn_stats(cache))
    doc = {"format": FORMAT, "format_version": 1, "ltcache_version": __version__, "arch": ck["arch"],
           "num_classes": int(ck.get("num_classes", cache.num_classes)),
           "feature_dim": int(ck.get("feature_dim", cache.feature_dim)),
           "backbone_state_dict": state,
           "head": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in layer.items()},
           "class_names": list(getattr(cache, "class_names", None) or []), "meta": meta or {}}
    from ltcache.outputs import atomic_save
    # a temporary name in the same folder, then a rename: never a half-written model under ``path``,
    # never a temporary file left after a failure; OS errors become a one-line LtcacheError
    return atomic_save(Path(path), lambda tmp: torch.save(doc, tmp))


def load_model(path: Union[str, Path]) -> nn.Module:
    """The exported classifier at ``path`` as an ``nn.Module`` in eval mode."""
    path = Path(path)
    if not path.exists():
        raise LtcacheError(f"model file {path} does not exist; write one with `ltcache retrain --export`")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise LtcacheError(f"cannot read model file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LtcacheError(f"{path} is not an ltcache exported model; export one with `ltcache retrain --export`")
    backbone = _build_backbone(doc["arch"], doc["num_classes"])
    missing, unexpected = backbone.load_state_dict(doc["backbone_state_dict"], strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise LtcacheError(f"{path}: backbone weights do not match architecture {doc['arch']}")
    model = LtcacheClassifier(backbone, head_module(doc["head"]), doc.get("class_names"))
    return model.eval()
