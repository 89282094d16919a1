"""Closed-form stage-2 methods: no training, a layer computed from the stage-1 head or features.

* tau-normalisation (cRT ``tau_norm.py``): w_j / ||w_j||^tau and **the bias dropped** (cRT's
  dot product has no bias term; LTWB and BoT keep it). tau is swept over linspace(0, 2, 21)
  and chosen on the val split (never test) unless given.
* post-hoc logit adjustment (Menon et al.): z_j - tau log pi_j, i.e. bias b_j - tau log pi_j.
* nearest class mean (cRT ``KNNClassifier``, feat_type cl2n, dist l2): x^ = (f - mu)/||f - mu||,
  c_j = mean of x^ over class j (not renormalised), z_j = -||x^ - c_j||^2; mu and c_j from the
  clean (first) train view, the closest a cache comes to cRT's ``train_plain`` features.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ltcache.errors import LtcacheError

TAU_GRID = [round(0.1 * i, 1) for i in range(21)]   # numpy linspace(0, 2, 21)


def tau_norm_layer(w0: torch.Tensor, tau: float) -> dict:
    """cRT tau-normalised classifier (bias dropped) as a linear layer."""
    if tau < 0:
        raise LtcacheError(f"tau must be >= 0 (got {tau}); tau-norm uses 0..2")
    norms = w0.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = (w0.double() / norms.pow(tau)).float()
    return {"kind": "linear", "weight": w, "bias": torch.zeros(w0.shape[0])}


def posthoc_la_layer(w0: torch.Tensor, b0: torch.Tensor, counts: torch.Tensor, tau: float) -> dict:
    """Post-hoc logit adjustment folded into the bias: b_j - tau log pi_j."""
    if tau < 0:
        raise LtcacheError(f"tau must be >= 0 (got {tau})")
    prior = counts.double() / counts.sum()
    return {"kind": "linear", "weight": w0.clone().float(), "bias": (b0.double() - tau * prior.log()).float()}


def ncm_layer(train_x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Nearest-class-mean classifier (cl2n features, l2 distance) from train features [N, D]."""
    x = train_x.double()
    mu = x.mean(0)
    xh = F.normalize(x - mu, dim=1)
    labels = labels.to(x.device).long()
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, xh)
    cnt = torch.bincount(labels, minlength=num_classes).double().clamp_min(1).unsqueeze(1)
    return {"kind": "ncm", "mean": mu.float().cpu(), "centroids": (sums / cnt).float().cpu()}


def select_tau(w0: torch.Tensor, val_x: Optional[torch.Tensor], val_labels: Optional[torch.Tensor],
               grid=TAU_GRID) -> tuple[float, list]:
    """The tau of ``grid`` with the best class-mean val accuracy (ties: the smaller tau)."""
    if val_x is None:
        raise LtcacheError("tau-norm picks tau on the val split but the cache has none; "
                           "pass --tau (e.g. --tau 1.0) or extract a cache with a val split")
    k = w0.shape[0]
    cnt = torch.bincount(val_labels, minlength=k).double()
    present = cnt > 0
    best_tau, best_acc, curve = None, -1.0, []
    for tau in grid:
        layer = tau_norm_layer(w0, tau)
        w = layer["weight"].to(val_x)
        z = sum(val_x[:, v] @ w.t() for v in range(val_x.shape[1])) / val_x.shape[1]
        hit = (z.argmax(1) == val_labels).double()
        acc = float((torch.zeros(k, dtype=torch.float64, device=z.device).index_add_(0, val_labels, hit)[present]
                     / cnt[present]).mean())
        curve.append({"tau": tau, "val_acc": acc * 100})
        if acc > best_acc:
            best_tau, best_acc = tau, acc
    return float(best_tau), curve
