"""Deployable classifiers: the stage-1 backbone plus a re-trained stage-2 head in one file.

Post-hoc adjustments are folded into the head before writing: tau-norm, post-hoc logit
adjustment, LWS / MiSLAS scales and MARC's affine all become one ``nn.Linear``; cosine heads
stay a cosine layer; NCM stays a nearest-class-mean layer.

The file also carries what a deployed model needs to reproduce the reported number: the
image preprocessing (RGB, resize of the short side, centre crop, per-channel mean / std, as
``ltcache.data.sources._decode`` and ``ltcache.data.augment.normalize`` do it) and the cache's
test-time views (centre + horizontal flip, logits averaged). ``load_model(path)`` returns a
ready ``nn.Module`` whose ``forward`` takes raw images (PIL images or uint8 tensors) and whose
``forward_normalized`` takes already-normalised float tensors. (This module may import
``ltcache.models``; stage 2 itself never does.)
"""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltcache.version import __version__
from ltcache.errors import LtcacheError

FORMAT = "ltcache-model"
FORMAT_VERSION = 2
CROP_FRACTION = 0.875          # large images: short side resized to image_size / 0.875, then centre crop
KNOWN_VIEWS = ("center", "hflip")


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


# ---------------------------------------------------------------------------------- preprocessing
def preprocessing_spec(image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The stored preprocessing of a model whose backbone saw ``image_size`` px square images.

    Large models (image_size > 64) follow the image decoder: short side resized (bilinear) to
    round(image_size / 0.875), then a centre crop of image_size. Small models were trained at
    the images' native resolution: an image of that size is kept as it is, any other one has
    its short side resized to image_size and is centre-cropped."""
    from ltcache.data.sources import SMALL_IMAGE

    s = int(image_size)
    if s < 1:
        raise LtcacheError(f"image size {image_size} must be a positive number of pixels")
    if len(mean) != 3 or len(std) != 3 or any(float(v) <= 0 for v in std):
        raise LtcacheError(f"mean {list(mean)} / std {list(std)} must be three numbers each (std > 0)")
    short = s if s <= SMALL_IMAGE else int(round(s / CROP_FRACTION))
    return {"color": "RGB", "image_size": s, "resize_short_side": short, "interpolation": "bilinear",
            "crop": "center", "scale": 1 / 255, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _resize_crop(im, size: int, short: int) -> torch.Tensor:
    """A PIL image -> uint8 [3, size, size]: RGB, short side to ``short`` (bilinear), centre crop."""
    from PIL import Image

    from ltcache.data.decode import to_rgb
    im = to_rgb(im)                  # every PIL mode, 16-bit gray scaled to 8 bits
    w, h = im.size
    if min(w, h) != short:           # same arithmetic as ltcache.data.sources._decode
        scale = short / min(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        w, h = im.size
    if (w, h) != (size, size):
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


class LtcacheClassifier(nn.Module):
    """Backbone features followed by the exported head, with the stored preprocessing and views.

    ``forward(images)``: a PIL image, a list of PIL images, or a uint8 tensor [3,H,W] / [N,3,H,W]
    (0-255) -> logits [N, K], through the stored preprocessing and averaged over the test-time
    views (``flip``: the horizontal flip too). A float tensor is taken as already normalised
    (the format ``forward`` took before) and goes to :meth:`forward_normalized`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, class_names=None,
                 preprocessing: Optional[dict] = None, views: Sequence[str] = ("center",),
                 flip: Optional[bool] = None, source: str = "the model"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.class_names = list(class_names or [])
        self.preprocessing = dict(preprocessing) if preprocessing else None
        self.views = tuple(views)
        self.flip = ("hflip" in self.views) if flip is None else bool(flip)
        self.source = source

    @property
    def image_size(self) -> Optional[int]:
        """Side of the square images the backbone sees (None for a file without preprocessing)."""
        return int(self.preprocessing["image_size"]) if self.preprocessing else None

    def _need_preprocessing(self) -> dict:
        if not self.preprocessing:
            raise LtcacheError(f"{self.source} was exported without its preprocessing (an older ltcache), so it "
                               "cannot take raw images; re-export it with `ltcache retrain --export`, or pass "
                               "normalised float tensors to forward_normalized")
        return self.preprocessing

    def preprocess(self, images) -> torch.Tensor:
        """Raw images -> uint8 [N, 3, S, S] (RGB, resized, centre-cropped; not yet normalised)."""
        p = self._need_preprocessing()
        size, short = int(p["image_size"]), int(p["resize_short_side"])
        if _is_pil(images):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise LtcacheError("no images given; pass a PIL image, a list of them or a uint8 tensor")
            out = []
            for i, im in enumerate(images):
                if _is_pil(im):
                    out.append(_resize_crop(im, size, short))
                elif torch.is_tensor(im):
                    if im.dim() != 3 or im.is_floating_point():
                        _bad_input(im)
                    out.append(self.preprocess(im)[0].cpu())
                else:
                    raise LtcacheError(f"image {i} is a {type(im).__name__}; pass PIL images or uint8 tensors")
            return torch.stack(out)
        if not torch.is_tensor(images):
            raise LtcacheError(f"cannot classify a {type(images).__name__}; pass a PIL image, a list of them, or "
                               "a uint8 tensor [3,H,W] / [N,3,H,W]")
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
            _bad_input(images)
        h, w = x.shape[-2:]
        if x.shape[0] == 0:
            return x.new_zeros((0, 3, size, size))
        if min(h, w) == short:                      # no resize: the centre crop alone
            top, left = (h - size) // 2, (w - size) // 2
            return x[:, :, top:top + size, left:left + size]
        from PIL import Image
        return torch.stack([_resize_crop(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()), size, short)
                            for im in x]).to(x.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> normalised float32 (the stored mean / std), as extraction does it."""
        from ltcache.data.augment import normalize

        p = self._need_preprocessing()
        return normalize(x, p["mean"], p["std"])

    def forward_normalized(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Logits of already-normalised float images [N, 3, S, S] (what ``forward`` took before):
        the centre view only, or with ``flip`` the mean of the centre and flipped views' logits."""
        if not flip:
            return self.head(self.backbone.features(x))
        n = x.shape[0]
        z = self.head(self.backbone.features(torch.cat([x, x.flip(-1)])))
        return (z[:n] + z[n:]) / 2

    def forward(self, images) -> torch.Tensor:
        """Logits [N, K] of raw images (PIL, list of PIL, uint8 tensor), or of a normalised float tensor."""
        if torch.is_tensor(images) and images.is_floating_point():
            return self.forward_normalized(images)
        x = self.preprocess(images)
        dev = next(self.parameters(), torch.empty(0)).device
        return self.forward_normalized(self.normalize(x.to(dev)), flip=self.flip)


def _bad_input(x: torch.Tensor) -> NoReturn:
    """Refuse an image tensor of the wrong shape or dtype."""
    raise LtcacheError(f"image tensor of shape {list(x.shape)} and dtype {str(x.dtype).replace('torch.', '')}: "
                       "pass uint8 [3,H,W] or [N,3,H,W] (0-255, RGB), or normalised float tensors")


# ---------------------------------------------------------------------------------- export
def _checkpoint_path(cache) -> Path:
    man = dict(getattr(cache, "manifest", None) or {})
    ck = man.get("checkpoint") or man.get("checkpoint_path") or man.get("stage1")
    if isinstance(ck, dict):
        ck = ck.get("path")
    if not ck:
        raise LtcacheError("the cache manifest names no stage-1 checkpoint, so the backbone cannot be exported; "
                           "re-extract the cache with `ltcache extract --ckpt runs/NAME/stage1/stage1.pt`")
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


def _preprocessing(cache, ck: dict, ck_path: Path) -> dict:
    """The preprocessing the cached features were made with: the manifest's dataset block, else
    the stage-1 checkpoint's."""
    man = dict(getattr(cache, "manifest", None) or {})
    for block in (man.get("dataset"), ck.get("dataset")):
        if isinstance(block, dict) and all(block.get(k) is not None for k in ("image_size", "mean", "std")):
            return preprocessing_spec(block["image_size"], block["mean"], block["std"])
    raise LtcacheError(f"neither the cache manifest nor {ck_path} records the image preprocessing (image_size, "
                       "mean, std), so the model could not take images; re-train stage 1 with this ltcache "
                       "(`ltcache train`) and re-extract the cache")


def _test_views(cache, views: Optional[Sequence[str]]) -> list:
    """The test-time views to store: ``views``, else the cache's test views (center, hflip)."""
    if views is None:
        test = (getattr(cache, "splits", None) or {}).get("test")
        views = list(getattr(test, "views", None) or [])
        if not views:
            man = dict(getattr(cache, "manifest", None) or {})
            views = list((man.get("extraction") or {}).get("test_views") or ["center"])
    views = list(views)
    bad = [v for v in views if v not in KNOWN_VIEWS]
    if bad or "center" not in views:
        raise LtcacheError(f"test views {views} cannot be exported; use center, optionally with hflip")
    return [v for v in KNOWN_VIEWS if v in views]


def export_model(cache, layer: dict, path: Union[str, Path], meta: Optional[dict] = None,
                 views: Optional[Sequence[str]] = None) -> Path:
    """Write backbone (from the checkpoint the manifest names) + folded head + preprocessing +
    test-time views to ``path`` (atomically). ``views``: default the cache's test views, which
    is what the reported number averages over (centre + horizontal flip)."""
    ck_path = _checkpoint_path(cache)
    ck = _read_checkpoint(ck_path)
    pre = _preprocessing(cache, ck, ck_path)
    test_views = _test_views(cache, views)
    state = {k: v for k, v in ck["state_dict"].items() if not k.startswith("fc.")}
    state.update(_shifted_bn_stats(cache))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "ltcache_version": __version__, "arch": ck["arch"],
           "num_classes": int(ck.get("num_classes", cache.num_classes)),
           "feature_dim": int(ck.get("feature_dim", cache.feature_dim)),
           "backbone_state_dict": state,
           "head": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in layer.items()},
           "class_names": list(getattr(cache, "class_names", None) or []),
           "preprocessing": pre, "test_views": test_views, "flip_average": "hflip" in test_views,
           "meta": meta or {}}
    from ltcache.outputs import save_torch
    # a temporary name in the same folder, then a rename: never a half-written model under ``path``,
    # never a temporary file left after a failure; OS errors (and torch's RuntimeError for a full
    # disk) become a one-line LtcacheError
    return save_torch(doc, Path(path))


def read_model_file(path: Union[str, Path]) -> dict:
    """The stored dict of an exported model (checked to be one)."""
    path = Path(path)
    if not path.exists():
        raise LtcacheError(f"model file {path} does not exist; write one with `ltcache retrain --export`")
    if path.is_dir():
        raise LtcacheError(f"model file {path} is a folder; give the .pt file `ltcache retrain --export` wrote")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        why = " ".join(str(exc).split())[:200]
        raise LtcacheError(f"cannot read model file {path} ({why}); give a file written by "
                           "`ltcache retrain --export`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LtcacheError(f"{path} is not an ltcache exported model; export one with `ltcache retrain --export`")
    return doc


def load_model(path: Union[str, Path], flip: Optional[bool] = None) -> LtcacheClassifier:
    """The exported classifier at ``path`` as an ``nn.Module`` in eval mode.

    ``flip``: average the logits of the horizontally flipped image too (default: as stored,
    on for a cache with the hflip test view, which is what the reported number does)."""
    doc = read_model_file(path)
    backbone = _build_backbone(doc["arch"], doc["num_classes"])
    missing, unexpected = backbone.load_state_dict(doc["backbone_state_dict"], strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise LtcacheError(f"{path}: backbone weights do not match architecture {doc['arch']}")
    views = doc.get("test_views") or ["center"]
    if flip is None:
        flip = bool(doc.get("flip_average", "hflip" in views))
    model = LtcacheClassifier(backbone, head_module(doc["head"]), doc.get("class_names"),
                              preprocessing=doc.get("preprocessing"), views=views, flip=flip, source=str(path))
    return model.eval()
