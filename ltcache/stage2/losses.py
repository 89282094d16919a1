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
from typing import NamedTuple, Optional, Sequence

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
    """M stacked :class:`LossSpec` (tensors ``[M, K]`` / ``[M]``; ``None`` where no member
    uses a term) plus, for each optional term, the range of members that need it."""

    mult: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    margin: Optional[torch.Tensor]
    eps: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
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
    # term -> (first, stop): the smallest slice of members holding every member that needs the
    # term (forms, "gamma", "sigmoid_gamma", "seesaw", "lade"). Members inside a slice that do
    # not need the term have neutral values (gamma 0, p = q = 0, alpha 0), so a slice that is
    # wider than needed is still exact; :func:`loss_signature` orders a group so it is tight.
    ranges: dict = field(default_factory=dict)
    pure_forms: tuple = ()           # forms whose slice holds only members of that form

    def __post_init__(self):
        """Class-major views [M, K, 1] / [M, 1, 1] for :func:`batched_loss_grad`."""
        k = self.prior.shape[0]
        self.weighted_any = bool(self.weighted_mean.any())
        self.mult3 = None if self.mult is None else self.mult.unsqueeze(2)
        self.offset3 = None if self.offset is None else self.offset.unsqueeze(2)
        self.gamma3 = None if self.gamma is None else self.gamma[:, None, None]
        self.sigmoid_gamma3 = None if self.sigmoid_gamma is None else self.sigmoid_gamma[:, None, None]
        self.seesaw_p3 = None if self.seesaw_p is None else self.seesaw_p[:, None, None]
        self.seesaw_q3 = None if self.seesaw_q is None else self.seesaw_q[:, None, None]
        self.lade_alpha3 = None if self.lade_alpha is None else self.lade_alpha[:, None, None]
        self.lade_lambda3 = self.lade_lambda[:, None, None]
        self.log_counts3 = self.log_counts.view(1, k, 1)
        self.prior3 = self.prior.view(1, k, 1)
        self.lade_shift3 = (math.log(1.0 / k) - torch.log(self.prior + 1e-9)).view(1, k, 1)


def loss_signature(spec: LossSpec) -> tuple:
    """Sort key that makes the members needing each optional term contiguous in a group."""
    return (FORMS.index(spec.form), spec.gamma > 0, spec.sigmoid_gamma > 0,
            bool(spec.seesaw_p or spec.seesaw_q), spec.lade_alpha > 0, spec.mult is not None,
            spec.eps is not None)


def stack_specs(specs: Sequence[LossSpec], counts: torch.Tensor, device, dtype=torch.float32) -> LossBatch:
    """Stack M loss specs into tensors on ``device``; terms nobody uses are left out (None)."""
    k = specs[0].num_classes

    def vec(attr: str, fill: float):
        if all(getattr(s, attr) is None for s in specs):
            return None
        rows = [getattr(s, attr) if getattr(s, attr) is not None else torch.full((k,), fill) for s in specs]
        return torch.stack([r.float() for r in rows]).to(device=device, dtype=dtype)

    def scal(attr: str):
        vals = [float(getattr(s, attr)) for s in specs]
        if not any(vals):
            return None
        return torch.tensor(vals, device=device, dtype=dtype)

    def span(flags) -> Optional[tuple]:
        idx = [i for i, f in enumerate(flags) if f]
        return (idx[0], idx[-1] + 1) if idx else None

    ranges = {f: span([s.form == f for s in specs]) for f in FORMS}
    ranges["gamma"] = span([s.form == "softmax" and s.gamma > 0 for s in specs])
    ranges["sigmoid_gamma"] = span([s.form == "sigmoid" and s.sigmoid_gamma > 0 for s in specs])
    ranges["seesaw"] = span([bool(s.seesaw_p or s.seesaw_q) for s in specs])
    ranges["lade"] = span([s.lade_alpha > 0 for s in specs])
    ranges["mult"] = span([s.mult is not None for s in specs])
    ranges["eps"] = span([s.eps is not None for s in specs])
    ranges = {a: r for a, r in ranges.items() if r is not None}
    seesaw = "seesaw" in ranges
    pure = tuple(f for f in FORMS if f in ranges and all(specs[i].form == f for i in range(*ranges[f])))
    if len(pure) == len({sp.form for sp in specs}):      # the forms' slices tile the members
        pure = pure + ("tiled",)
    n = counts.double()
    return LossBatch(
        mult=vec("mult", 1.0),
        offset=vec("offset", 0.0),
        margin=vec("margin", 0.0),
        eps=vec("eps", 0.0),
        weight=vec("weight", 1.0),
        weighted_mean=torch.tensor([s.weighted_mean for s in specs], device=device),
        gamma=scal("gamma"),
        form=torch.tensor([FORMS.index(s.form) for s in specs], device=device),
        sigmoid_gamma=scal("sigmoid_gamma"),
        seesaw_p=torch.tensor([float(s.seesaw_p) for s in specs], device=device, dtype=dtype) if seesaw else None,
        seesaw_q=torch.tensor([float(s.seesaw_q) for s in specs], device=device, dtype=dtype) if seesaw else None,
        lade_alpha=scal("lade_alpha"),
        lade_lambda=torch.tensor([float(s.lade_lambda) for s in specs], device=device, dtype=dtype),
        log_counts=n.log().to(device=device, dtype=dtype),
        prior=(n / n.sum()).to(device=device, dtype=dtype),
        forms_used=tuple(sorted({s.form for s in specs})),
        ranges=ranges,
        pure_forms=pure,
    )


def _seesaw_shift(z: torch.Tensor, y: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                  log_counts: torch.Tensor) -> torch.Tensor:
    """Seesaw (mmdet seesaw_ce_loss): log M_yj + log C_yj added to the logits j != y, with
    M_yj = (n_j / n_y)^p if n_j < n_y, C_yj = (sigma_j / max(sigma_y, eps))^q if > 1 and
    sigma = softmax of the detached raw logits. p = q = 0 gives 0."""
    log_m = p[:, None, None] * (log_counts[None, None, :] - log_counts[y].unsqueeze(-1)).clamp(max=0)
    sig = torch.softmax(z.detach(), dim=-1)
    sy = sig.gather(-1, y.unsqueeze(-1)).clamp_min(SEESAW_EPS)
    log_c = q[:, None, None] * (torch.log(sig) - torch.log(sy)).clamp_min(0)
    return (log_m + log_c).scatter(-1, y.unsqueeze(-1), 0.0)


def _class_weight(lb: LossBatch, y: torch.Tensor) -> torch.Tensor:
    return torch.ones(y.shape, dtype=lb.prior.dtype, device=y.device) if lb.weight is None else lb.weight.gather(1, y)


def batched_loss(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lb: LossBatch) -> torch.Tensor:
    """The loss of each of M configurations, shape [M] -- the definition (the engine trains
    with its exact gradient, :func:`batched_loss_grad`).

    z: logits [M, B, K] (the head's output); y: labels [M, B]; valid: float mask [M, B]
    (0 for padding of a short last batch or an inactive step). The mean over a batch counts
    only valid samples, so a padded batch equals the smaller batch of the source code.
    """
    m, b, k = z.shape
    onehot = F.one_hot(y, k).to(z.dtype)
    zt = z
    if lb.mult is not None:
        zt = zt * lb.mult[:, None, :]
    if lb.offset is not None:
        zt = zt + lb.offset[:, None, :]
    if lb.margin is not None:
        zt = zt - onehot * lb.margin.gather(1, y).unsqueeze(-1)
    if lb.seesaw_p is not None:
        zt = zt + _seesaw_shift(z, y, lb.seesaw_p, lb.seesaw_q, lb.log_counts)

    w_y = _class_weight(lb, y)
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


# --------------------------------------------------------------------------------------------
# the analytic gradient (the engine's training step; no autograd per step)
# --------------------------------------------------------------------------------------------

class LossTargets(NamedTuple):
    """Per-sample quantities of the gradient that depend only on labels and validity, so the
    engine computes them for a whole epoch at once ([..., M, 1, B], class-major broadcast);
    indexing with a step number gives that step's targets."""

    yi: torch.Tensor                      # labels [.., M, 1, B]
    factor: torch.Tensor                  # dloss_m/dl_i with w_y folded in: w_y valid / (B or sum w_y valid)
    neg_target: torch.Tensor              # added at the label: eps_y - 1 (or -1)
    eps_k: Optional[torch.Tensor]         # eps_y / K subtracted everywhere (label smoothing)
    neg_margin: Optional[torch.Tensor]    # -margin_y at the label (LDAM)
    valid: torch.Tensor                   # [.., M, 1, B]
    y: torch.Tensor                       # [.., M, B]

    def step(self, s: int) -> "LossTargets":
        return LossTargets(*(None if t is None else t[s] for t in self))


def loss_targets(lb: LossBatch, y: torch.Tensor, valid: torch.Tensor) -> LossTargets:
    """The :class:`LossTargets` of labels y and float mask valid, both [..., M, B]."""
    k = lb.prior.shape[0]
    w = None if lb.weight is None else lb.weight.expand(y.shape[:-2] + lb.weight.shape).gather(-1, y)
    if w is not None and lb.weighted_any:
        denom = torch.where(lb.weighted_mean.unsqueeze(-1), (w * valid).sum(-1, keepdim=True),
                            valid.sum(-1, keepdim=True))
    else:
        denom = valid.sum(-1, keepdim=True)
    factor = valid / denom.clamp_min(1e-12)
    if w is not None:
        factor = factor * w
    if lb.eps is not None:
        eps_y = lb.eps.expand(y.shape[:-2] + lb.eps.shape).gather(-1, y)
        neg_target, eps_k = (eps_y - 1).unsqueeze(-2), (eps_y / k).unsqueeze(-2)
    else:
        neg_target, eps_k = torch.full_like(factor, -1.0).unsqueeze(-2), None
    neg_margin = None
    if lb.margin is not None:
        neg_margin = -lb.margin.expand(y.shape[:-2] + lb.margin.shape).gather(-1, y).unsqueeze(-2)
    return LossTargets(y.unsqueeze(-2), factor.unsqueeze(-2), neg_target, eps_k, neg_margin,
                       valid.unsqueeze(-2), y)


def batched_loss_grad(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lb: LossBatch,
                      targets: Optional[LossTargets] = None) -> torch.Tensor:
    """d(sum_m loss_m)/dz: the exact gradient of :func:`batched_loss`, in the engine's
    class-major layout: z and the result are [M, K, B] (y [M, B], valid [M, B]; or their
    precomputed ``targets``).

    Written out by hand because autograd's graph costs more than the arithmetic on the small
    per-step tensors of a sweep, and each optional term (a loss form, focal, Seesaw, LADE) is
    computed only on the slice of members that needs it (``lb.ranges``).
    tests/test_stage2_losses.py checks it against autograd for every loss (clamps included:
    where a log is clamped its gradient is 0, as in PyTorch).
    """
    t = loss_targets(lb, y, valid) if targets is None else targets
    m = z.shape[0]
    rg = lb.ranges
    zt = z
    if lb.mult is not None and lb.offset is not None:
        zt = torch.addcmul(lb.offset3, z, lb.mult3)
    elif lb.mult is not None:
        zt = z * lb.mult3
    elif lb.offset is not None:
        zt = z + lb.offset3
    if t.neg_margin is not None:
        zt = zt.scatter_add(1, t.yi, t.neg_margin)
    if "seesaw" in rg:               # a function of the detached logits: shifts zt, no gradient of its own
        a, e = rg["seesaw"]
        zt = zt.clone() if zt is z else zt
        zt[a:e] += _seesaw_shift_cm(z[a:e], t.yi[a:e], lb.seesaw_p3[a:e], lb.seesaw_q3[a:e], lb.log_counts)

    if len(lb.forms_used) == 1 and rg[lb.forms_used[0]] == (0, m):
        dzt = _FORM_GRAD[lb.forms_used[0]](zt, t, lb, 0)
    else:
        dzt = torch.empty_like(z) if "tiled" in lb.pure_forms else torch.zeros_like(z)
        for form in lb.forms_used:
            a, e = rg[form]
            d = _FORM_GRAD[form](zt[a:e], _slice(t, a, e), lb, a)
            if form in lb.pure_forms:
                dzt[a:e] = d
            else:                     # the slice holds members of another form (unsorted group)
                dzt[a:e] = torch.where((lb.form[a:e] == FORMS.index(form))[:, None, None], d, dzt[a:e])
    dz = dzt
    if "mult" in rg:                 # dzt is ours: scale only the members with a multiplier
        a, e = rg["mult"]
        dz[a:e].mul_(lb.mult3[a:e])
    if "lade" in rg:
        a, e = rg["lade"]
        dz[a:e] += lade_regulariser_grad(z[a:e], _slice(t, a, e), lb, a)
    return dz


def _within(span: tuple, first: int, m: int) -> tuple:
    """An absolute member span relative to a slice starting at ``first`` of length m (clipped)."""
    return max(span[0] - first, 0), min(span[1] - first, m)


def _slice(t: LossTargets, a: int, e: int) -> LossTargets:
    return LossTargets(*(None if x is None else x[a:e] for x in t))


def _seesaw_shift_cm(z, yi, p3, q3, log_counts) -> torch.Tensor:
    """:func:`_seesaw_shift` in the class-major layout (yi [m, 1, B], p3/q3 [m, 1, 1])."""
    log_m = p3 * (log_counts.view(1, -1, 1) - log_counts[yi]).clamp(max=0)
    logsig = torch.log_softmax(z, dim=1)
    log_c = q3 * (logsig - logsig.gather(1, yi).clamp_min(math.log(SEESAW_EPS))).clamp_min(0)
    return (log_m + log_c).scatter_(1, yi, 0.0)


def _softmax_grad(zt, t: LossTargets, lb: LossBatch, first: int) -> torch.Tensor:
    """Softmax-form members: l = -sum_k q_k log p_k with q = (1 - eps_y) e_y + eps_y / K, so
    dl/dzt = p - q; focal members (LDAM-repo form) scale it by d[(1 - e^-l)^g l]/dl."""
    m = zt.shape[0]
    d = torch.softmax(zt, dim=1)
    if t.eps_k is not None:
        a, e = _within(lb.ranges["eps"], first, m)
        if a < e:
            d[a:e] -= t.eps_k[a:e]
    d.scatter_add_(1, t.yi, t.neg_target)
    factor = t.factor
    if "gamma" in lb.ranges:
        a, e = _within(lb.ranges["gamma"], first, m)
        if a < e:
            logp = torch.log_softmax(zt[a:e], dim=1)
            # ce = -sum_k q_k logp_k = -(1 - eps_y) logp_y - eps_y mean_k logp_k
            ce = logp.gather(1, t.yi[a:e]) * t.neg_target[a:e]
            if t.eps_k is not None:
                ce = ce - t.eps_k[a:e] * logp.sum(1, keepdim=True)
            w = 1.0 if lb.weight is None else lb.weight[first + a:first + e].gather(1, t.y[a:e]).unsqueeze(1)
            l = w * ce
            g = lb.gamma3[first + a:first + e]
            el = torch.exp(-l)
            tt = 1 - el
            tc = tt.clamp_min(1e-12)
            on = g > 0
            mod = torch.where(on, tc ** g, torch.ones_like(l))
            dmod = torch.where(on & (tt >= 1e-12), g * tc ** (g - 1) * el, torch.zeros_like(l))
            factor = factor.clone()
            factor[a:e] *= mod + l * dmod
    return d.mul_(factor)


def _bce_softmax_grad(zt, t: LossTargets, lb: LossBatch, first: int) -> torch.Tensor:
    """LTWB's BCE on softmax: l = -(1/K) sum_k [o_k clamp(log p_k) + (1 - o_k) clamp(log(1 - p_k))]
    (logs clamped at -100 as PyTorch's BCE); with a_k = o_k [kept] - (1 - o_k) [kept] p_k/(1 - p_k),
    dl/dzt_j = -(a_j - p_j sum_k a_k) / K."""
    k = zt.shape[1]
    logp = torch.log_softmax(zt, dim=1)
    p = logp.exp()
    keep0 = torch.log1p(-p.clamp_max(1.0)) >= -100
    a = torch.where(keep0, p / (p - 1).clamp_max(-1e-30), torch.zeros_like(p))        # -(1 - o) ratio off the label
    a.scatter_(1, t.yi, (logp.gather(1, t.yi) >= -100).to(zt.dtype))                 # o [kept] at the label
    d = (p * a.sum(1, keepdim=True) - a).div_(k)
    return d.mul_(t.factor)


def _sigmoid_grad(zt, t: LossTargets, lb: LossBatch, first: int) -> torch.Tensor:
    """CB repo sigmoid form: l = sum_k BCE(zt_k, o_k), dl/dzt = sigma(zt) - o; the sigmoid focal
    members multiply BCE by mod = exp(-g o zt - g softplus(-zt)), dmod = mod g (sigma(-zt) - o)."""
    m = zt.shape[0]
    d = torch.sigmoid(zt).scatter_add_(1, t.yi, torch.full_like(t.factor, -1.0))
    if "sigmoid_gamma" in lb.ranges:
        a, e = _within(lb.ranges["sigmoid_gamma"], first, m)
        if a < e:
            zs = zt[a:e]
            o = torch.zeros_like(zs).scatter_(1, t.yi[a:e], 1.0)
            g = lb.sigmoid_gamma3[first + a:first + e]
            bce = F.binary_cross_entropy_with_logits(zs, o, reduction="none")
            mod = torch.exp(-g * o * zs - g * F.softplus(-zs))
            d[a:e] = mod * (g * (torch.sigmoid(-zs) - o) * bce + d[a:e])
    return d.mul_(t.factor)


_FORM_GRAD = {"softmax": _softmax_grad, "bce_softmax": _bce_softmax_grad, "sigmoid": _sigmoid_grad}


def lade_regulariser_grad(z: torch.Tensor, t: LossTargets, lb: LossBatch, first: int = 0) -> torch.Tensor:
    """alpha d LADER / dz of members ``first .. first + len(z)``, class-major [m, K, B]
    (see :func:`lade_regulariser`)."""
    v = t.valid                                                            # [m, 1, B]
    pos = torch.zeros_like(z).scatter_(1, t.yi, v)
    spread = torch.where(v > 0, z + lb.lade_shift3, torch.full_like(z, -1e4))
    nb = v.sum(2, keepdim=True)                                            # [m, 1, 1]
    lse = torch.logsumexp(spread, dim=2, keepdim=True)                     # [m, K, 1]
    t2 = lse - torch.log(nb.clamp_min(1))
    soft = torch.exp(spread - lse).mul_(v)                                 # dt2/dz
    dt1 = pos / (pos.sum(2, keepdim=True) + 1e-8)
    dest = dt1 - (1 + 2 * lb.lade_lambda3[first:first + len(z)] * t2) * soft
    return dest.mul_(-(lb.lade_alpha3[first:first + len(z)] * lb.prior3) * (nb > 0).to(z.dtype))
