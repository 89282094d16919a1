"""The stage-2 loss family, evaluated for M configurations at once.

Every supported loss is a point of one family (DESIGN.md "The stage-2 engine")::

    z'  = mult * z + offset - margin[y] * e_y (+ Seesaw's data-dependent log M C off the label)
    q   = (1 - eps[y]) e_y + eps[y] / K
    l   = w[y] * focal^gamma * sum_k -q_k log softmax(z')_k

plus terms that do not fit it (LTWB's BCE on softmax, the CB repo's sigmoid/focal form,
LADE's regulariser), selected per configuration by masks. A :class:`LossSpec` holds one
configuration's hyper-parameters as per-class vectors; :func:`stack_specs` turns M of them
into tensors ``[M, ...]`` and :func:`batched_loss` evaluates all M losses with no Python
branching per configuration (only per *group*: an extra term is computed when any member
of the group needs it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ltcache.errors import LtcacheError

FORMS = ("softmax", "bce_softmax", "sigmoid")
SEESAW_EPS = 1e-2  # mmdet default


# --------------------------------------------------------------------------------------------
# per-class quantities used by several methods
# --------------------------------------------------------------------------------------------

def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al.: w_j = (1 - beta) / (1 - beta^n_j), normalised so that sum_j w_j = K."""
    n = counts.double()
    if beta <= 0:
        w = torch.ones_like(n)
    else:
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


def grw_weights(counts: torch.Tensor, rho: float) -> torch.Tensor:
    """Generalised re-weighting (DisAlign/MARC): u_j = pi_j^-rho, normalised to sum K."""
    pi = counts.double() / counts.sum()
    u = pi.pow(-rho)
    return (u / u.sum() * len(pi)).float()


def ldam_margins(counts: torch.Tensor, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins m_j = C / n_j^(1/4) scaled so that max_j m_j = max_m."""
    m = 1.0 / counts.double().pow(0.25)
    return (m * (max_m / m.max())).float()


def label_aware_eps(counts: torch.Tensor, eps_head: float, eps_tail: float,
                    shape: str = "concave") -> torch.Tensor:
    """MiSLAS label-aware smoothing epsilon of each class (``shape`` concave|linear|convex).

    With n_1 = max n, n_K = min n and r = (n_y - n_K) / (n_1 - n_K):
    concave eps_K + (eps_1 - eps_K) sin(pi r / 2); linear eps_K + (eps_1 - eps_K) r;
    convex eps_1 + (eps_1 - eps_K) sin(3 pi / 2 + pi r / 2).
    """
    n = counts.double()
    span = (n.max() - n.min()).clamp_min(1e-12)
    r = (n - n.min()) / span
    if shape == "concave":
        eps = eps_tail + (eps_head - eps_tail) * torch.sin(math.pi * r / 2)
    elif shape == "linear":
        eps = eps_tail + (eps_head - eps_tail) * r
    elif shape == "convex":
        eps = eps_head + (eps_head - eps_tail) * torch.sin(1.5 * math.pi + math.pi * r / 2)
    else:
        raise LtcacheError(f"unknown label-aware smoothing shape '{shape}'; use concave, linear or convex")
    return eps.float()


# --------------------------------------------------------------------------------------------
# one configuration's loss
# --------------------------------------------------------------------------------------------

@dataclass
class LossSpec:
    """Hyper-parameters of one configuration's loss as per-class vectors (length K)."""

    num_classes: int
    mult: Optional[torch.Tensor] = None      # z_k * mult_k (VS multiplicative term)
    offset: Optional[torch.Tensor] = None    # + offset_k (LA, balanced softmax, VS, LADE prior)
    margin: Optional[torch.Tensor] = None    # - margin_y on the true class (LDAM, already * scale)
    eps: Optional[torch.Tensor] = None       # smoothing of label y (LS, LOS, MiSLAS LAS)
    weight: Optional[torch.Tensor] = None    # class weight w_y (CB, DRW, GRW)
    weighted_mean: bool = False              # PyTorch weighted mean (sum w_y l / sum w_y) vs / B
    gamma: float = 0.0                       # softmax focal exponent (LDAM-repo form)
    form: str = "softmax"                    # softmax | bce_softmax (LTWB) | sigmoid (CB repo)
    sigmoid_gamma: float = 0.0               # sigmoid focal exponent (CB repo)
    seesaw_p: float = 0.0
    seesaw_q: float = 0.0
    lade_alpha: float = 0.0
    lade_lambda: float = 0.0
    notes: list = field(default_factory=list)


def build_loss(kind: str, params: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
    """The :class:`LossSpec` of a named loss with the method's hyper-parameters.

    ``counts`` are the training class counts; ``scale`` is the cosine head's scale (LDAM
    margins are subtracted before the scale in the source, i.e. s * (cos - m_y)).
    """
    k = len(counts)
    n = counts.double()
    log_prior = torch.log(n / n.sum()).float()
    spec = LossSpec(num_classes=k)
    if kind == "ce":
        pass
    elif kind == "ls":
        spec.eps = torch.full((k,), float(params["eps"]))
    elif kind == "los":
        spec.eps = torch.full((k,), float(params["delta"]))
    elif kind == "las":
        spec.eps = label_aware_eps(counts, params["eps_head"], params["eps_tail"], params.get("shape", "concave"))
    elif kind == "focal":
        spec.gamma = float(params["gamma"])
    elif kind == "cb":
        # CB repo (TensorFlow): sum_i w_{y_i} CE_i / B  (tf.losses SUM_BY_NONZERO_WEIGHTS), not
        # PyTorch's weighted mean. METHODS.md §0.3(7), §15.
        spec.weight = class_balanced_weights(counts, params["beta"])
    elif kind == "cb-sigmoid":
        # CB repo sigmoid form: sum_{i,j} w_{y_i} BCE(z_ij, 1[j=y_i]) / B.
        spec.weight = class_balanced_weights(counts, params["beta"])
        spec.form = "sigmoid"
    elif kind == "cb-focal":
        # CB repo sigmoid focal: BCE * exp(-g y z - g log(1 + e^-z)), weighted, / B.
        spec.weight = class_balanced_weights(counts, params["beta"])
        spec.form = "sigmoid"
        spec.sigmoid_gamma = float(params["gamma"])
    elif kind == "ltwb-cb":
        # LTWB's PyTorch CB "softmax": F.binary_cross_entropy(softmax(z), onehot, weight=w_y)
        # averaged over B x K -- BCE on softmax probabilities, not weighted CE (METHODS §15, §19).
        spec.weight = class_balanced_weights(counts, params["beta"])
        spec.form = "bce_softmax"
    elif kind in ("ldam", "ldam-drw"):
        spec.margin = ldam_margins(counts, params["margin"]) * scale
        if kind == "ldam-drw":
            # DRW on cached features = CB weights (beta) for the whole re-training, PyTorch
            # F.cross_entropy(weight=) normalisation by sum_i w_{y_i} (METHODS §13).
            spec.weight = class_balanced_weights(counts, params["beta"])
            spec.weighted_mean = True
    elif kind == "balanced-softmax":
        spec.offset = n.log().float()          # CE(z + log n), BALMS
    elif kind == "la":
        spec.offset = float(params["tau"]) * log_prior   # CE(z + tau log pi)  (+1e-12 omitted)
    elif kind == "vs":
        spec.mult = (n / n.max()).pow(float(params["gamma"])).float()
        spec.offset = float(params["tau"]) * log_prior
    elif kind == "seesaw":
        # static counts instead of mmdet's cumulative counts (METHODS §23.5)
        spec.seesaw_p = float(params["p"])
        spec.seesaw_q = float(params["q"])
    elif kind == "lade":
        spec.offset = torch.log(n / n.sum() + 1e-9).float()   # PriorCE == balanced softmax
        spec.lade_alpha = float(params["alpha"])
        spec.lade_lambda = float(params["lam"])
    elif kind == "grw":
        # MARC's GRWCrossEntropyLoss: F.cross_entropy(weight=u), PyTorch normalisation.
        spec.weight = grw_weights(counts, params["rho"])
        spec.weighted_mean = True
    else:
        raise LtcacheError(f"unknown loss '{kind}'")
    return spec


# --------------------------------------------------------------------------------------------
# M configurations at once
# --------------------------------------------------------------------------------------------

@dataclass
class LossBatch:
    """M stacked :class:`LossSpec` (tensors ``[M, K]`` / ``[M]``) plus group-level flags."""

    mult: Optional[torch.Tensor]
    offset: torch.Tensor
    margin: Optional[torch.Tensor]
    eps: Optional[torch.Tensor]
    weight: torch.Tensor
    weighted_mean: torch.Tensor
    gamma: Optional[torch.Tensor]
    form: torch.Tensor
    sigmoid_gamma: Optional[torch.Tensor]
    seesaw_p: Optional[torch.Tensor]
    seesaw_q: Optional[torch.Tensor]
    lade_alpha: Optional[torch.Tensor]
    lade_lambda: Optional[torch.Tensor]
    log_counts: torch.Tensor
    prior: torch.Tensor
    forms_used: tuple


def stack_specs(specs: Sequence[LossSpec], counts: torch.Tensor, device, dtype=torch.float32) -> LossBatch:
    """Stack M loss specs into tensors on ``device``; terms nobody uses are left out (None)."""
    k = specs[0].num_classes

    def vec(attr: str, fill: float, needed: bool):
        if not needed:
            return None
        rows = [getattr(s, attr) if getattr(s, attr) is not None else torch.full((k,), fill) for s in specs]
        return torch.stack([r.float() for r in rows]).to(device=device, dtype=dtype)

    def scal(attr: str):
        vals = [float(getattr(s, attr)) for s in specs]
        if not any(vals):
            return None
        return torch.tensor(vals, device=device, dtype=dtype)

    forms = torch.tensor([FORMS.index(s.form) for s in specs], device=device)
    n = counts.double()
    return LossBatch(
        mult=vec("mult", 1.0, any(s.mult is not None for s in specs)),
        offset=vec("offset", 0.0, True),
        margin=vec("margin", 0.0, any(s.margin is not None for s in specs)),
        eps=vec("eps", 0.0, any(s.eps is not None for s in specs)),
        weight=vec("weight", 1.0, True),
        weighted_mean=torch.tensor([s.weighted_mean for s in specs], device=device),
        gamma=scal("gamma"),
        form=forms,
        sigmoid_gamma=scal("sigmoid_gamma"),
        seesaw_p=torch.tensor([float(s.seesaw_p) for s in specs], device=device, dtype=dtype)
        if any(s.seesaw_p or s.seesaw_q for s in specs) else None,
        seesaw_q=torch.tensor([float(s.seesaw_q) for s in specs], device=device, dtype=dtype)
        if any(s.seesaw_p or s.seesaw_q for s in specs) else None,
        lade_alpha=scal("lade_alpha"),
        lade_lambda=torch.tensor([float(s.lade_lambda) for s in specs], device=device, dtype=dtype),
        log_counts=n.log().to(device=device, dtype=dtype),
        prior=(n / n.sum()).to(device=device, dtype=dtype),
        forms_used=tuple(sorted({s.form for s in specs})),
    )


def batched_loss(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lb: LossBatch) -> torch.Tensor:
    """The loss of each of M configurations, shape [M].

    z: logits [M, B, K] (the head's output); y: labels [M, B]; valid: float mask [M, B]
    (0 for padding of a short last batch or an inactive step). The mean over a batch counts
    only valid samples, so a padded batch equals the smaller batch of the source code.
    """
    m, b, k = z.shape
    onehot = F.one_hot(y, k).to(z.dtype)
    zt = z
    if lb.mult is not None:
        zt = zt * lb.mult[:, None, :]
    zt = zt + lb.offset[:, None, :]
    if lb.margin is not None:
        zt = zt - onehot * lb.margin.gather(1, y).unsqueeze(-1)
    if lb.seesaw_p is not None:
        # Seesaw (mmdet seesaw_ce_loss): for j != y add log M_yj + log C_yj with
        # M_yj = (n_j / n_y)^p if n_j < n_y, C_yj = (sigma_j / max(sigma_y, eps))^q if > 1,
        # sigma = softmax of the detached raw logits. p = q = 0 leaves other configs untouched.
        logn = lb.log_counts
        log_m = lb.seesaw_p[:, None, None] * (logn[None, None, :] - logn[y].unsqueeze(-1)).clamp(max=0)
        sig = torch.softmax(z.detach(), dim=-1)
        sy = sig.gather(-1, y.unsqueeze(-1)).clamp_min(SEESAW_EPS)
        log_c = lb.seesaw_q[:, None, None] * (torch.log(sig) - torch.log(sy)).clamp_min(0)
        zt = zt + (log_m + log_c) * (1 - onehot)

    w_y = lb.weight.gather(1, y)
    per_sample = None
    if "softmax" in lb.forms_used:
        logp = torch.log_softmax(zt, dim=-1)
        ce = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if lb.eps is not None:
            eps_y = lb.eps.gather(1, y)
            ce = (1 - eps_y) * ce + eps_y * (-logp.mean(-1))
        l_soft = w_y * ce
        if lb.gamma is not None:
            # LDAM-DRW FocalLoss: CE_w = w_y CE, p = exp(-CE_w), (1 - p)^gamma CE_w, mean over B
            g = lb.gamma[:, None]
            mod = torch.where(g > 0, (1 - torch.exp(-l_soft)).clamp_min(1e-12) ** g, torch.ones_like(l_soft))
            l_soft = mod * l_soft
        per_sample = l_soft
    if "bce_softmax" in lb.forms_used:
        p = torch.softmax(zt, dim=-1)
        logp1 = torch.log_softmax(zt, dim=-1).clamp_min(-100)       # PyTorch BCE clamps logs at -100
        logp0 = torch.log1p(-p.clamp_max(1.0)).clamp_min(-100)
        bce = -(onehot * logp1 + (1 - onehot) * logp0).mean(-1)
        l_bce = w_y * bce
        sel = (lb.form == FORMS.index("bce_softmax"))[:, None]
        per_sample = l_bce if per_sample is None else torch.where(sel, l_bce, per_sample)
    if "sigmoid" in lb.forms_used:
        bce = F.binary_cross_entropy_with_logits(zt, onehot, reduction="none")
        if lb.sigmoid_gamma is not None:
            g = lb.sigmoid_gamma[:, None, None]
            bce = torch.exp(-g * onehot * zt - g * F.softplus(-zt)) * bce
        l_sig = w_y * bce.sum(-1)
        sel = (lb.form == FORMS.index("sigmoid"))[:, None]
        per_sample = l_sig if per_sample is None else torch.where(sel, l_sig, per_sample)

    num = (per_sample * valid).sum(1)
    denom = torch.where(lb.weighted_mean, (w_y * valid).sum(1), valid.sum(1)).clamp_min(1e-12)
    loss = num / denom
    if lb.lade_alpha is not None:
        loss = loss + lb.lade_alpha * lade_regulariser(z, onehot, valid, lb)
    return loss


def lade_regulariser(z: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, lb: LossBatch) -> torch.Tensor:
    """LADE's LADER term on the raw logits, per configuration [M] (hyperconnect/LADE LADELoss).

    T1_c = mean of z_c over the batch samples of class c (0 if none: divided by N_c + 1e-8),
    T2_c = logsumexp_i(z_ic - log pi_c + log 1/K) - log B, est_c = T1_c - T2_c - lambda T2_c^2,
    LADER = -sum_c pi_c est_c.
    """
    m, b, k = z.shape
    v = valid.unsqueeze(-1)
    pos = onehot * v
    t1 = (z * pos).sum(1) / (pos.sum(1) + 1e-8)
    spread = z - torch.log(lb.prior + 1e-9) + math.log(1.0 / k)
    spread = torch.where(v > 0, spread, torch.full_like(spread, -1e4))   # padding contributes 0
    nb = valid.sum(1)
    t2 = torch.logsumexp(spread, dim=1) - torch.log(nb.clamp_min(1)).unsqueeze(-1)
    est = t1 - t2 - lb.lade_lambda[:, None] * t2 ** 2
    lader = -(est * lb.prior).sum(1)
    return lader * (nb > 0).to(z.dtype)
