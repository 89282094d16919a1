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
from ltcache.metrics import class_mean_accuracy

TAU_GRID = [round(0.1 * i, 1) for i in range(21)]   # numpy linspace(0, 2, 21)


def _check_tau(tau: float) -> None:
    if tau < 0:
        raise LtcacheError(f"tau must be >= 0 (got {tau}); tau-norm uses 0..2")


def tau_norm_layer(w0: torch.Tensor, tau: float) -> dict:
    """cRT tau-normalised classifier (bias dropped) as a linear layer."""
    _check_tau(tau)
    norms = w0.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = (w0.double() / norms.pow(tau)).float()
    return {"kind": "linear", "weight": w, "bias": torch.zeros(w0.shape[0])}


def posthoc_la_layer(w0: torch.Tensor, b0: torch.Tensor, counts: torch.Tensor, tau: float) -> dict:
    """Post-hoc logit adjustment folded into the bias: b_j - tau log pi_j."""
    if tau < 0:
        raise LtcacheError(f"tau must be >= 0 (got {tau})")
    prior = counts.double() / counts.sum()
    return {"kind": "linear", "weight": w0.clone().float(), "bias": (b0.double() - tau * prior.log()).float()}


def ncm_layer(train_x: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int = 16384) -> dict:
    """Nearest-class-mean classifier (cl2n features, l2 distance) from train features [N, D].

    Sums accumulate in float64 over row chunks, so an ImageNet-scale [N, D] never gets a float64 copy."""
    n, d = train_x.shape
    dev = train_x.device
    labels = labels.to(dev).long()
    total = torch.zeros(d, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        total += train_x[s:s + chunk].double().sum(0)
    mu = total / max(n, 1)
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        xh = F.normalize(train_x[s:s + chunk].double() - mu, dim=1)
        sums.index_add_(0, labels[s:s + chunk], xh)
    cnt = torch.bincount(labels, minlength=num_classes).double().clamp_min(1).unsqueeze(1)
    return {"kind": "ncm", "mean": mu.float().cpu(), "centroids": (sums / cnt).float().cpu()}


def select_tau(w0: torch.Tensor, val_x: Optional[torch.Tensor], val_labels: Optional[torch.Tensor],
               grid=TAU_GRID) -> tuple[float, list]:
    """The tau of ``grid`` with the best class-mean val accuracy (ties: the smaller tau)."""
    if val_x is None:
        raise LtcacheError("tau-norm picks tau on the val split but the cache has none; "
                           "pass --tau (e.g. --tau 1.0) or extract a cache with a val split")
    k = w0.shape[0]
    # w_j / ||w_j||^tau scales logit column j, and the bias is dropped: one GEMM of the view-mean
    # features serves every tau of the grid
    w = w0.to(val_x)
    z0 = val_x.mean(1) @ w.t() if val_x.dim() == 3 else val_x @ w.t()
    lognorm = w0.double().norm(dim=1).clamp_min(1e-12).log().to(z0.device)
    best_tau, best_acc, curve = None, -1.0, []
    for tau in grid:
        _check_tau(tau)
        pred = (z0 * torch.exp(-tau * lognorm).to(z0)).argmax(1)
        acc = float(class_mean_accuracy(pred, val_labels, k))
        curve.append({"tau": tau, "val_acc": acc * 100})
        if acc > best_acc:
            best_tau, best_acc = tau, acc
    return float(best_tau), curve


def closed_form_layer(method, params: dict, cache, data, counts: torch.Tensor) -> tuple[dict, dict]:
    """The layer of closed-form ``method`` (a registry entry) and what it adds to its run
    (tau-norm without a tau: the val curve, ``tau_curve``; the chosen tau is written into
    ``params``). ``data``: the sweep's :class:`~ltcache.stage2.plan.TrainData`."""
    w0, b0 = data.w0.cpu(), data.b0.cpu()
    extra = {}
    if method.head == "tau-norm":
        tau = params.get("tau")
        if tau is None:
            tau, curve = select_tau(data.w0, data.val_x, data.val_labels)
            params["tau"] = tau
            extra["tau_curve"] = curve
        return tau_norm_layer(w0, tau), extra
    if method.head == "posthoc-la":
        return posthoc_la_layer(w0, b0, counts, params["tau"]), extra
    if method.head == "ncm":
        clean = cache.splits["train"].features[:, 0].to(device=data.x.device, dtype=torch.float32)   # the clean (first) view
        return ncm_layer(clean, data.labels, len(counts)), extra
    raise LtcacheError(f"method {method.name} has no closed form")
