"""Evaluation metrics shared by stage 1 and stage 2 (only tensors: no images, no backbones)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ltcache.groups import GROUPS, shot_groups


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class absent from ``labels``), shape [K]."""
    labels = labels.long()
    correct = (pred.long() == labels).double()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=labels.device).index_add_(0, labels, correct)
    total = torch.bincount(labels, minlength=num_classes).double()
    acc = hits / total.clamp_min(1)
    acc[total == 0] = float("nan")
    return acc.cpu()


def group_accuracy(per_class: torch.Tensor, class_counts: Sequence[int]) -> dict[str, Optional[float]]:
    """Mean per-class accuracy (in %) over All / Many / Medium / Few; ``None`` for an empty group."""
    names = shot_groups(class_counts)
    out: dict[str, Optional[float]] = {}
    valid = ~torch.isnan(per_class)
    out["all"] = float(per_class[valid].mean() * 100) if valid.any() else None
    for g in GROUPS:
        mask = torch.tensor([n == g for n in names]) & valid
        out[g] = float(per_class[mask].mean() * 100) if mask.any() else None
    return out


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor,
                    class_counts: Sequence[int]) -> dict[str, Optional[float]]:
    """Top-1 All / Many / Medium / Few (in %) from logits [N, K]."""
    pc = per_class_accuracy(logits.argmax(dim=1), labels, logits.shape[1])
    return group_accuracy(pc, class_counts)


def fmt_pct(value: Optional[float], std: Optional[float] = None) -> str:
    """Format a percentage for tables: '-' for an empty group, never NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if std is None:
        return f"{value:.2f}"
    return f"{value:.2f} ± {std:.2f}"
