"""``lade``: LADE (hyperconnect/LADE loss/LADELoss.py, README, docs/methods.md#lade).

PriorCE (= balanced softmax, the prior as an offset) plus alpha times the LADER regulariser on
the batch's raw logits (a term of the fused loss, with its gradient here).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossBatch, LossSpec, LossTargets, Term, register_loss, register_term
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


def lade_regulariser(z: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, lb: LossBatch,
                     lam: torch.Tensor) -> torch.Tensor:
    """LADE's LADER term on the raw logits, per configuration [M] (hyperconnect/LADE LADELoss).

    T1_c = mean of z_c over the batch samples of class c (0 if none: divided by N_c + 1e-8),
    T2_c = logsumexp_i(z_ic - log pi_c + log 1/K) - log B, est_c = T1_c - T2_c - lambda T2_c^2,
    LADER = -sum_c pi_c est_c.
    """
    import torch

    m, b, k = z.shape
    v = valid.unsqueeze(-1)
    pos = onehot * v
    t1 = (z * pos).sum(1) / (pos.sum(1) + 1e-8)
    spread = z - torch.log(lb.prior + 1e-9) + math.log(1.0 / k)
    spread = torch.where(v > 0, spread, torch.full_like(spread, -1e4))   # padding contributes 0
    nb = valid.sum(1)
    t2 = torch.logsumexp(spread, dim=1) - torch.log(nb.clamp_min(1)).unsqueeze(-1)
    est = t1 - t2 - lam[:, None] * t2 ** 2
    lader = -(est * lb.prior).sum(1)
    return lader * (nb > 0).to(z.dtype)


def lade_loss(z, onehot, valid, c: dict, lb: LossBatch) -> torch.Tensor:
    """alpha LADER, [M]."""
    return c["alpha"] * lade_regulariser(z, onehot, valid, lb, c["lam"])


def lade_targets(y: torch.Tensor, valid: torch.Tensor, c: dict, lb: LossBatch) -> torch.Tensor:
    """The label-only parts of the gradient, made per epoch ([..., m, 3, B]; y, valid [..., m, B]):

    0. -alpha pi_y valid_i / (N_y + 1e-8): alpha pi_c dT1_c/dz_ic at the label (N_c the valid
       samples of class c in the batch), subtracted;
    1. 1 - 2 lambda log max(N, 1) (N = sum_c N_c), constant over B: 1 + 2 lambda T2 is this plus
       2 lambda logsumexp;
    2. 0 / -1e4 for a valid / padded sample, added to the spread so that padding drops out of the
       logsumexp (the definition's torch.where).
    """
    import torch

    k = lb.prior.shape[0]
    n_c = torch.zeros(y.shape[:-1] + (k,), dtype=valid.dtype, device=valid.device).scatter_add_(-1, y, valid)
    alpha, lam = (c[n].to(valid.dtype).unsqueeze(-1) for n in ("alpha", "lam"))
    neg_r = -(alpha * lb.prior.to(valid.dtype)[y]) * (valid / (n_c.gather(-1, y) + 1e-8))
    c0 = 1 - 2 * lam * torch.log(valid.sum(-1, keepdim=True).clamp_min(1))
    pad = torch.where(valid > 0, 0.0, -1e4).to(valid.dtype)
    return torch.stack([neg_r, c0.expand_as(neg_r), pad], dim=-2)


def lade_grad(z: torch.Tensor, t: LossTargets, c: dict, lb: LossBatch) -> torch.Tensor:
    """alpha d LADER / dz, class-major [m, K, B] (alpha, lambda [m, 1, 1]):
    alpha pi_c [(1 + 2 lambda T2_c) softmax_i(spread_c) - dT1_c/dz_ic]. The softmax over the
    batch is masked by valid, and so is T1's part, so a step with no valid sample gives 0 (the
    definition's factor N > 0)."""
    import torch

    if "lade_shift3" not in lb.cache:
        k = lb.prior.shape[0]
        lb.cache["lade_shift3"] = (math.log(1.0 / k) - torch.log(lb.prior + 1e-9)).view(1, k, 1)
    aux = t.aux
    neg_r, c0, pad = aux[:, 0:1], aux[:, 1:2, :1], aux[:, 2:3]
    spread = torch.add(z, lb.cache["lade_shift3"]).add_(pad)
    mx = spread.amax(2, keepdim=True)
    soft = spread.sub_(mx).exp_()                         # logsumexp by hand: its exp is the softmax's too
    se = soft.sum(2, keepdim=True)
    # per class [m, K, 1]: alpha pi_c (1 + 2 lambda T2_c) / se_c, T2 = log se + mx - log N
    h = torch.addcmul(c0, se.log().add_(mx), c["lam2"]).mul_(c["alpha_prior"]).div_(se)
    return soft.mul_(h).mul_(t.valid).scatter_add_(1, t.yi, neg_r)


register_term(Term("lade", {"alpha": 0.0, "lam": 0.0}, active=lambda c: c["alpha"] > 0,
                   batch_loss=lade_loss, batch_grad=lade_grad, targets=lade_targets,
                   derived=lambda c, lb: {"lam2": 2 * c["lam"], "alpha_prior": c["alpha"] * lb.prior3}))


@register_loss("lade")
class LADE:
    """PriorCE + alpha LADER(lambda)."""

    params = (Param("alpha", float, lo=0, help="LADE regulariser weight"),
              Param("lam", float, lo=0, help="LADE lambda"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        import torch

        n = counts.double()
        return LossSpec(num_classes=len(counts), offset=torch.log(n / n.sum() + 1e-9).float(),
                        terms={"lade": {"alpha": float(p["alpha"]), "lam": float(p["lam"])}})
