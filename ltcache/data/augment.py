"""Batched augmentation of uint8 image tensors, on whatever device the batch lives on."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a batch [B, C, H, W]."""
    return x.flip(-1)


def _rand(shape, generator, device, high=None):
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if high is None:
        t = torch.rand(shape, generator=generator, device=gen_device)
    else:
        t = torch.randint(high, shape, generator=generator, device=gen_device)
    return t.to(device)


def crop_flip(x: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CIFAR augmentation: random crop with ``padding`` zero pixels, then random horizontal
    flip; one gather for the whole batch (no loop over images)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = _rand((b,), generator, x.device, 2 * padding + 1)
    dx = _rand((b,), generator, x.device, 2 * padding + 1)
    flip = _rand((b,), generator, x.device) < 0.5
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h))               # [B, H]
    cols = torch.arange(w, device=x.device).view(1, w).expand(b, w)
    cols = torch.where(flip.view(b, 1), w - 1 - cols, cols) + dx.view(b, 1)            # [B, W]
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * padding))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def resized_crop_flip(x: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ImageNet-style RandomResizedCrop + flip on a batch of equal-size images (per image).

    For large images decoded into memory (``build_dataset(stream=False)``), i.e. on centre
    crops: a crop of a crop, without ColorJitter. Streamed splits get the papers' protocol from
    the full-size image instead (ltcache.data.streaming.train_transform)."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    area = h * w
    r = _rand((b, 4), generator, torch.device("cpu"))
    for i in range(b):
        s = scale[0] + (scale[1] - scale[0]) * float(r[i, 0])
        logr = torch.log(torch.tensor(ratio))
        ar = float(torch.exp(logr[0] + (logr[1] - logr[0]) * r[i, 1]))
        cw = int(round((s * area * ar) ** 0.5))
        ch = int(round((s * area / ar) ** 0.5))
        cw, ch = max(1, min(cw, w)), max(1, min(ch, h))
        top = int((h - ch) * float(r[i, 2]))
        left = int((w - cw) * float(r[i, 3]))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw].float()
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).to(x.dtype)[0]
    flip = _rand((b,), generator, x.device) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 normalised by per-channel mean/std."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s
