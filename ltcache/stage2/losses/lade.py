"""``lade``: LADE (hyperconnect/LADE loss/LADELoss.py, README, METHODS §22).

PriorCE (= balanced softmax, the prior as an offset) plus alpha times the LADER regulariser on
the batch's raw logits (a term of the fused loss, with its gradient here).
"""
from __future__ import annotations

import math

import torch

from ltcache.stage2.losses._core import LossBatch, LossSpec, LossTargets, Term, register_loss, register_term
from ltcache.stage2.params import Param


def lade_regulariser(z: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, lb: LossBatch,
                     lam: torch.Tensor) -> torch.Tensor:
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
    est = t1 - t2 - lam[:, None] * t2 ** 2
    lader = -(est * lb.prior).sum(1)
    return lader * (nb > 0).to(z.dtype)


def lade_loss(z, onehot, valid, c: dict, lb: LossBatch) -> torch.Tensor:
    """alpha LADER, [M]."""
    return c["alpha"] * lade_regulariser(z, onehot, valid, lb, c["lam"])


def lade_grad(z: torch.Tensor, t: LossTargets, c: dict, lb: LossBatch) -> torch.Tensor:
    """alpha d LADER / dz, class-major [m, K, B] (alpha, lambda [m, 1, 1])."""
    if "lade_shift3" not in lb.cache:
        k = lb.prior.shape[0]
        lb.cache["lade_shift3"] = (math.log(1.0 / k) - torch.log(lb.prior + 1e-9)).view(1, k, 1)
    v = t.valid                                                            # [m, 1, B]
    pos = torch.zeros_like(z).scatter_(1, t.yi, v)
    spread = torch.where(v > 0, z + lb.cache["lade_shift3"], torch.full_like(z, -1e4))
    nb = v.sum(2, keepdim=True)                                            # [m, 1, 1]
    lse = torch.logsumexp(spread, dim=2, keepdim=True)                     # [m, K, 1]
    t2 = lse - torch.log(nb.clamp_min(1))
    soft = torch.exp(spread - lse).mul_(v)                                 # dt2/dz
    dt1 = pos / (pos.sum(2, keepdim=True) + 1e-8)
    dest = dt1 - (1 + 2 * c["lam"] * t2) * soft
    return dest.mul_(-(c["alpha"] * lb.prior3) * (nb > 0).to(z.dtype))


register_term(Term("lade", {"alpha": 0.0, "lam": 0.0}, active=lambda c: c["alpha"] > 0,
                   batch_loss=lade_loss, batch_grad=lade_grad))


@register_loss("lade")
class LADE:
    """PriorCE + alpha LADER(lambda)."""

    params = (Param("alpha", float, lo=0, help="LADE regulariser weight"),
              Param("lam", float, lo=0, help="LADE lambda"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        n = counts.double()
        return LossSpec(num_classes=len(counts), offset=torch.log(n / n.sum() + 1e-9).float(),
                        terms={"lade": {"alpha": float(p["alpha"]), "lam": float(p["lam"])}})
