"""The papers' checkpoint layouts: where each source keeps its state dict, how it names the keys,
what its last layer is, and which ltcache backbone matches its network op for op.

``resolve(obj, arch, source)`` turns a loaded checkpoint into a :class:`Reading`: a state dict in
the key names of ``build_model(arch, K)`` (the backbone plus ``fc.weight`` / ``fc.bias``, the
stage-1 classifier) and a description of what was read. Each table below was written from the
source's own code (repository and commit in ``Source.read_from``); a combination whose ops differ
from ours is refused instead of loaded.

Key naming. Every source names its ResNet like torchvision (``conv1``, ``bn1``,
``layer{n}.{b}.conv1``, ``...downsample.0/1``) or like Cao et al.'s CIFAR ResNet (``layer{n}``,
``shortcut``); ltcache's CIFAR ResNets (:mod:`ltcache.models.resnet_cifar`) say
``layers.{n-1}.{b}`` and ``shortcut.0/1``, its ImageNet ResNets are torchvision's own modules.

| --from | top-level keys | backbone prefix | last layer | networks (ours) |
|---|---|---|---|---|
| los | a plain state dict | (none) | ``fc`` Linear | CIFAR ResNet-34: 3x3 stem, no max-pool, AvgPool2d(4) (resnet34-cifar) |
| mislas | ``state_dict_model``, ``state_dict_classifier`` (+ ``state_dict_lws_model``) | ``module.`` | ``fc`` Linear (x LWS ``learned_norm``) | resnet32_fe (resnet32), resnet50_fe (resnet50) |
| crt | ``state_dict_best`` (or ``state_dict``) -> ``feat_model``, ``classifier`` | ``module.`` | ``fc`` Linear (+ ``scales`` of LWS), or CosNorm ``weight`` | ResNeXt-50 (resnext50_32x4d), ResNet-50 (resnet50); AvgPool2d(7) |
| ldam-drw | ``state_dict`` | ``module.`` | ``linear`` Linear, or NormedLinear ``linear.weight`` [D, K] | resnet32 (option-A shortcuts) |
| bot | ``state_dict`` | ``module.backbone.`` | ``classifier`` Linear, FCNorm (no bias) or LWS ``classifier.fc`` + ``scales`` | res32_cifar (resnet32), res50 (resnet50) |
| torchvision | a plain state dict | (none) | the model's last Linear (``fc``, ``classifier.3``, ...) | resnet18/50, resnext50_32x4d, torchvision:NAME |
| ltcache | a plain state dict in ltcache's own key names | (none) | ``fc`` | any |
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltcache.errors import LtcacheError

CIFAR_ARCHS = ("resnet32", "resnet34-cifar")                 # ltcache CifarResNet key names
TV_ARCHS = ("resnet18", "resnet50", "resnext50_32x4d")       # torchvision key names
TORCHVISION = "torchvision:"


class _NotThis(Exception):
    """The checkpoint is not in this layout (the reason says what is missing)."""


class _Refused(Exception):
    """The checkpoint is in this layout, but it holds ops ltcache's backbone lacks."""


@dataclass
class Parts:
    body: dict                 # backbone tensors, the source's key names without prefixes
    head: dict                 # weight, bias (optional), scales (optional; multiplies the logits)
    head_kind: str             # linear | cosine | normed-linear-T (weight [D, K], cosine)
    where: str                 # where in the file the tensors were read


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    read_from: str                         # repository @ commit: the files whose code this table follows
    archs: dict                            # our arch -> the source's network that matches it op for op
    others: str                            # the source's networks we do not have
    split: Callable                        # loaded object -> Parts (or _NotThis / _Refused)
    pool_input: Optional[int] = None       # a fixed AvgPool2d window: the image size where it is global pooling


@dataclass
class Reading:
    """A checkpoint resolved into ``build_model(arch, K)``'s key names."""
    layout: str
    detected: bool
    state_dict: dict
    head: str                  # linear | linear x scales | cosine
    where: str
    note: str = ""
    pool_input: Optional[int] = None
    fits: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        out = {"from": self.layout, "detected": self.detected, "read": self.where, "head": self.head}
        if self.note:
            out["note"] = self.note
        return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _tensors(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(torch.is_tensor(v) for v in d.values())


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _unmodule(sd: dict) -> dict:
    """``module.`` (DataParallel / DistributedDataParallel) dropped, at most twice."""
    return _strip(_strip(sd, "module."), "module.")


def _plain(obj, containers=("state_dict", "model")) -> tuple:
    """(state dict, where) of a bare state dict or one under one of ``containers``."""
    if _tensors(obj):
        return obj, "a plain state dict"
    if isinstance(obj, dict):
        for key in containers:
            if _tensors(obj.get(key)):
                return obj[key], f"'{key}'"
    raise _NotThis(f"no state dict at the top level or under {', '.join(repr(c) for c in containers)}")


def _split_head(sd: dict, prefix: str) -> tuple:
    body = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    head = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return body, head


# ---------------------------------------------------------------------------------------------
# the sources
# ---------------------------------------------------------------------------------------------

def _los(obj) -> Parts:
    # main_stage{1,2}.py keep `best_model` (a models/resnet.py ResNet on one GPU, no DataParallel);
    # evaluate.py / load_model read the released files with model.load_state_dict(torch.load(pth)).
    sd, where = _plain(obj, ())
    body, head = _split_head(_unmodule(sd), "fc.")
    if not any(k.startswith("layer4.") for k in body):
        raise _NotThis("no 'layer4.*' keys (LOS's ResNet-34 has four stages)")
    return Parts(body, head, "linear", where + " (models/resnet.py ResNet: conv1, layer1-4, fc)")


def _mislas(obj) -> Parts:
    # train_stage1.py / train_stage2.py: save_checkpoint({'state_dict_model': model.state_dict(),
    # 'state_dict_classifier': classifier.state_dict(), ['state_dict_block'], ['state_dict_lws_model']});
    # model and classifier are (Distributed)DataParallel, so keys start with 'module.'
    if not (isinstance(obj, dict) and _tensors(obj.get("state_dict_model")) and _tensors(obj.get("state_dict_classifier"))):
        raise _NotThis("no 'state_dict_model' and 'state_dict_classifier' at the top level")
    if obj.get("state_dict_block"):
        raise _Refused("it holds 'state_dict_block', the extra Bottleneck of MiSLAS's Places ResNet-152, which "
                       "ltcache's backbones lack")
    head = _unmodule(obj["state_dict_classifier"])
    head = {k[len("fc."):] if k.startswith("fc.") else k: v for k, v in head.items()}
    where = "'state_dict_model' + 'state_dict_classifier'"
    lws = obj.get("state_dict_lws_model")
    if _tensors(lws):
        norm = _unmodule(lws).get("learned_norm")
        if norm is not None:
            head["scales"] = norm.reshape(-1)
            where += " x 'state_dict_lws_model' learned_norm"
    return Parts(_unmodule(obj["state_dict_model"]), head, "linear", where)


def _crt(obj) -> Parts:
    # run_networks.py save_model: {'state_dict_best': {'feat_model': ..., 'classifier': ...}};
    # save_latest: {'state_dict': {...}}; every network is nn.DataParallel ('module.').
    container = None
    if isinstance(obj, dict):
        for key in ("state_dict_best", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and _tensors(inner.get("feat_model")) and _tensors(inner.get("classifier")):
                container = key
                break
    if container is None:
        raise _NotThis("no 'state_dict_best' (or 'state_dict') holding 'feat_model' and 'classifier'")
    body = _unmodule(obj[container]["feat_model"])
    extra = sorted({k.split(".")[0] for k in body if k.split(".")[0] in ("fc_add", "modulatedatt")})
    if extra:
        raise _Refused(f"its feat_model has '{extra[0]}' (use_fc / use_selfatt), an op ltcache's backbone lacks")
    cls = _unmodule(obj[container]["classifier"])
    where = f"'{container}' -> 'feat_model' + 'classifier'"
    if "fc.weight" in cls:           # DotProductClassifier, or TauNormClassifier (LWS: fc + scales)
        head = {"weight": cls["fc.weight"], **({"bias": cls["fc.bias"]} if "fc.bias" in cls else {})}
        if "scales" in cls:
            head["scales"] = cls["scales"]
        return Parts(body, head, "linear", where)
    if "weight" in cls:              # CosNorm_Classifier: scale * squash(x) . normalize(W)
        return Parts(body, {"weight": cls["weight"]}, "cosine", where + " (CosNorm_Classifier)")
    raise _NotThis("its 'classifier' has neither 'fc.weight' nor 'weight'")


def _ldam(obj) -> Parts:
    # cifar_train.py: save_checkpoint(args, {'epoch', 'arch', 'state_dict': model.state_dict(), ...});
    # model is nn.DataParallel unless --gpu; the last layer is 'linear' (NormedLinear when LDAM).
    sd, where = _plain(obj, ("state_dict",))
    body, head = _split_head(_unmodule(sd), "linear.")
    if "weight" not in head:
        raise _NotThis("no 'linear.weight' (LDAM-DRW's last layer)")
    return Parts(body, head, "linear" if "bias" in head else "normed-linear-T", where)


def _bot(obj) -> Parts:
    # main/train.py: torch.save({'state_dict': model.state_dict(), ...}); lib/net/network.py Network:
    # backbone + module (GAP, no parameters) + classifier (nn.Linear, FCNorm or LWS); DataParallel.
    sd, where = _plain(obj, ("state_dict",))
    sd = _unmodule(sd)
    if not any(k.startswith("backbone.") for k in sd):
        raise _NotThis("no 'backbone.*' keys (BagofTricks-LT's Network)")
    rest, head = _split_head(sd, "classifier.")
    body = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in rest.items()}
    if "fc.weight" in head:                   # LWS
        head = {"weight": head["fc.weight"], "scales": head.get("scales"),
                **({"bias": head["fc.bias"]} if "fc.bias" in head else {})}
        if head["scales"] is None:
            del head["scales"]
        return Parts(body, head, "linear", where + " (classifier: LWS)")
    if "weight" in head and "bias" not in head:   # FCNorm (the configs' only bias-free classifier)
        return Parts(body, head, "cosine", where + " (classifier: FCNorm)")
    return Parts(body, head, "linear", where)


def _torchvision(obj) -> Parts:
    sd, where = _plain(obj)
    return Parts(_unmodule(sd), {}, "model", where)      # the head is found by the model (its last Linear)


SOURCES = {
    "los": Source("los", "LOS (Label Over-Smoothing, ICLR 2025)",
                  "bilibili/LOS@50652c0 models/resnet.py, main_stage1.py, main_stage2.py, evaluate.py",
                  {"resnet34-cifar": "resnet34(num_classes=100, pool_size=4)"},
                  "its resnet18/50/101/152 with the CIFAR stem", _los, pool_input=32),
    "mislas": Source("mislas", "MiSLAS (Zhong et al., CVPR 2021)",
                     "dvlab-research/MiSLAS@0fc381e models/resnet_cifar.py, models/resnet.py, train_stage1.py, "
                     "train_stage2.py",
                     {"resnet32": "resnet32_fe", "resnet50": "resnet50_fe"},
                     "Places' resnet152_fe (+ block)", _mislas),
    "crt": Source("crt", "cRT / LWS / tau-norm (Kang et al., classifier-balancing)",
                  "facebookresearch/classifier-balancing@f162adef models/ResNextFeature.py, ResNetFeature.py, "
                  "DotProductClassifier.py, TauNormClassifier.py, CosNormClassifier.py, run_networks.py",
                  {"resnext50_32x4d": "ResNext50Feature", "resnet50": "ResNet50Feature"},
                  "ResNet-10, ResNet-101/152, ResNeXt-101/152", _crt, pool_input=224),
    "ldam-drw": Source("ldam-drw", "LDAM-DRW (Cao et al., NeurIPS 2019)",
                       "kaidic/LDAM-DRW@2536330 models/resnet_cifar.py, cifar_train.py, utils.py",
                       {"resnet32": "resnet32"}, "resnet20/44/56/110/1202", _ldam),
    "bot": Source("bot", "Bag of Tricks for LT (Zhang et al., AAAI 2021)",
                  "zhangyongshun/BagofTricks-LT@ce7859a lib/net/network.py, lib/backbone/resnet_cifar.py, "
                  "lib/backbone/resnet.py, lib/modules/classifier_ops.py, main/train.py",
                  {"resnet32": "res32_cifar", "resnet50": "res50"}, "res10, resnext", _bot),
    "torchvision": Source("torchvision", "torchvision", "torchvision.models (the installed version)",
                          {a: a for a in TV_ARCHS}, "", _torchvision),
    "ltcache": Source("ltcache", "ltcache state dict", "ltcache.models (this package)", {}, "", _torchvision),
}
LAYOUTS = tuple(SOURCES)


def _to_ours(key: str, arch: str) -> str:
    """A source key (torchvision / Cao et al. ResNet names) in ltcache's names for ``arch``."""
    if arch in CIFAR_ARCHS:
        m = re.match(r"layer(\d+)\.(.*)$", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.{m.group(2)}"
        key = key.replace(".downsample.", ".shortcut.")
    return key


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------

@dataclass
class _Fit:
    name: str
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    bad_shape: list = field(default_factory=list)
    reason: str = ""               # not this layout / refused
    refused: bool = False
    reading: Optional[Reading] = None

    @property
    def score(self) -> float:
        if self.reason:
            return float("inf")
        return len(self.missing) + len(self.unexpected) + len(self.bad_shape)

    def first_bad(self) -> str:
        if self.missing:
            return f"missing '{self.missing[0]}'"
        if self.unexpected:
            return f"unexpected '{self.unexpected[0]}'"
        if self.bad_shape:
            return f"wrongly shaped '{self.bad_shape[0]}'"
        return self.reason

    def counts(self) -> str:
        return (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.bad_shape)} wrongly shaped keys")


def _classifier(parts: Parts, feature_dim: int) -> tuple:
    """(W [K, D], b [K], head description, note) from the source's last layer."""
    w, b, s = parts.head.get("weight"), parts.head.get("bias"), parts.head.get("scales")
    if w is None or w.ndim != 2:
        return None, None, "", ""
    w = w.detach().float()
    if parts.head_kind == "normed-linear-T":            # LDAM-DRW NormedLinear: weight [D, K], columns normalised
        return (F.normalize(w, dim=0).t().contiguous(), torch.zeros(w.shape[1]), "cosine",
                "NormedLinear (cosine) head: logits = normalize(f) . normalize(w_k); stored W rows normalised, "
                "b = 0 (same ranking per image)")
    if parts.head_kind == "cosine":
        return (F.normalize(w, dim=1), torch.zeros(w.shape[0]), "cosine",
                "cosine head (no bias): stored W rows normalised, b = 0 (the source's per-image feature scaling "
                "does not change the ranking)")
    b = torch.zeros(w.shape[0]) if b is None else b.detach().float()
    if s is not None and s.numel() == w.shape[0]:
        s = s.detach().float().reshape(-1)
        return (w * s[:, None], b * s, "linear x scales",
                "learnable weight scaling (LWS) folded in: W = s_k w_k, b = s_k b_k (the same logits)")
    return w, b, "linear", ""


def _fit(src: Source, obj, arch: str, probe: nn.Module) -> _Fit:
    fit = _Fit(src.name)
    if src.name == "ltcache":
        pass                                            # our own key names: any arch
    elif src.name == "torchvision":
        if not (arch in TV_ARCHS or arch.startswith(TORCHVISION)):
            fit.reason = f"torchvision's layout is that of --arch {', '.join(TV_ARCHS)} or torchvision:NAME"
            return fit
    elif arch not in src.archs:
        fit.reason = (f"{src.title} has no network that matches --arch {arch} op for op (it matches "
                      f"{', '.join(f'{o} as --arch {a}' for a, o in src.archs.items())}; ltcache lacks {src.others})")
        return fit
    try:
        parts = src.split(obj)
    except _NotThis as exc:
        fit.reason = f"not a {src.title} checkpoint: {exc}"
        return fit
    except _Refused as exc:
        fit.reason, fit.refused = f"{src.title} checkpoint refused: {exc}", True
        return fit
    own = {k: v for k, v in probe.state_dict().items() if not k.startswith("fc.")}
    if parts.head_kind == "model":                      # torchvision: the model names its own head
        mapper = getattr(probe, "map_state_dict", None)
        full = mapper(parts.body) if callable(mapper) else dict(parts.body)
        body = {k: v for k, v in full.items() if not k.startswith("fc.")}
        parts = Parts(body, {k[3:]: v for k, v in full.items() if k.startswith("fc.")}, "linear", parts.where)
        names = {k: k for k in body}
    else:
        names = {}
        for k in parts.body:
            names[_to_ours(k, arch)] = k
        body = {_to_ours(k, arch): v for k, v in parts.body.items()}
    fit.missing = [k for k in own if k not in body]
    fit.unexpected = [names[k] for k in body if k not in own]
    fit.bad_shape = [names[k] for k in own if k in body and tuple(body[k].shape) != tuple(own[k].shape)]
    w, b, head, note = _classifier(parts, probe.feature_dim)
    if w is None:
        fit.missing.append("the classifier weight")
    elif w.shape[1] != probe.feature_dim or b.shape != (w.shape[0],):
        fit.bad_shape.append(f"classifier weight {tuple(w.shape)} (features have {probe.feature_dim} dims)")
    if fit.score == 0:
        sd = dict(body)
        sd["fc.weight"], sd["fc.bias"] = w, b
        fit.reading = Reading(src.name, False, sd, head, parts.where, note, src.pool_input)
    return fit


def resolve(obj, arch: str, source: Optional[str], ckpt, probe: nn.Module) -> Reading:
    """Read ``obj`` (a loaded checkpoint) in the layout ``source`` (None: the one that fits) into the
    key names of ``probe`` (``build_model(arch, K)``); a mismatch is a one-line LtcacheError naming
    the first missing or unexpected key and the ``--from`` that fits best."""
    if source is not None and source not in SOURCES:
        raise LtcacheError(f"--from {source!r} is not a known layout; valid: {', '.join(LAYOUTS)}")
    fits = {name: _fit(src, obj, arch, probe) for name, src in SOURCES.items()}
    if source is not None:
        fit = fits[source]
        if fit.reading is not None:
            fit.reading.fits = {n: f.score for n, f in fits.items()}
            return fit.reading
        others = [f for n, f in fits.items() if n != source and f.score < fit.score]
        better = min(others, key=lambda f: f.score) if others else None
        hint = (f"; it reads as --from {better.name}" if better and better.score == 0 else
                f"; --from {better.name} fits better ({better.first_bad()}, {better.counts()})" if better else
                "; check --arch and the number of classes")
        if fit.reason:
            raise LtcacheError(f"{ckpt}: {fit.reason}{hint}")
        raise LtcacheError(f"{ckpt} does not fit --arch {arch} as --from {source}: {fit.first_bad()} "
                           f"({fit.counts()}){hint}")
    good = [f for f in fits.values() if f.reading is not None]
    if good:
        reading = good[0].reading
        reading.detected = True
        reading.fits = {n: f.score for n, f in fits.items()}
        return reading
    refused = [f for f in fits.values() if f.refused]
    if refused:
        raise LtcacheError(f"{ckpt}: {refused[0].reason}")
    best = min(fits.values(), key=lambda f: f.score)
    if best.score == float("inf"):
        raise LtcacheError(f"{ckpt} is in none of the known layouts for --arch {arch} ({', '.join(LAYOUTS)}): "
                           "check --arch, or give --from NAME to see why that layout does not fit")
    raise LtcacheError(f"{ckpt} does not fit --arch {arch} in any known layout; closest: --from {best.name} "
                       f"({best.first_bad()}, {best.counts()}); check --arch and the number of classes")
