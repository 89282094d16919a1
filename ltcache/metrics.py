"""Evaluation metrics shared by stage 1 and stage 2 (only tensors: no images, no backbones)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ltcache.groups import GROUPS, shot_groups


def class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class, float64 [..., K] on ``labels``' device, of predictions ``pred``
    [..., N] (any leading axes: e.g. m heads at once); NaN for a class absent from ``labels``.

    The one definition of per-class accuracy: :func:`per_class_accuracy`, :func:`group_accuracy`
    and :func:`class_mean_accuracy` (val selection, the tau-norm search) all read it."""
    labels = labels.long()
    correct = (pred.long() == labels).double()
    lead = correct.shape[:-1]
    flat = correct.reshape(math.prod(lead), labels.shape[0])
    hits = torch.zeros(flat.shape[0], num_classes, dtype=torch.float64, device=labels.device)
    hits.index_add_(1, labels, flat)
    total = torch.bincount(labels, minlength=num_classes).double()
    acc = hits / total.clamp_min(1)
    acc[:, total == 0] = float("nan")
    return acc.reshape(*lead, num_classes)


def class_mean_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-balanced accuracy (a fraction): the mean of :func:`class_accuracy` over the classes
    present in ``labels``; float64 with ``pred``'s leading axes ([m] for m heads' [m, N])."""
    acc = class_accuracy(pred, labels, num_classes)
    present = torch.bincount(labels.long(), minlength=num_classes) > 0
    return acc[..., present].mean(-1)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class absent from ``labels``), shape [K], on the CPU."""
    return class_accuracy(pred, labels, num_classes).cpu()


def group_accuracy(per_class: torch.Tensor, class_counts: Sequence[int]) -> dict[str, Optional[float]]:
    """Mean per-class accuracy (in %) over All / Many / Medium / Few; ``None`` for an empty group.

    ``per_class`` is :func:`per_class_accuracy` (NaN: a class absent from the evaluated split)."""
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


# ---------------------------------------------------------------------------------------------
# Calibration and logit statistics (stage 2 reports)
# ---------------------------------------------------------------------------------------------

ECE_BINS = 15


def _row_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: log-sum-exp (float64), max logit (float64) and argmax, in one pass over [N, K]
    without a float64 copy of the logits (the exponentials are summed in float32 in (0, 1])."""
    zmax, pred = logits.max(dim=1)
    s = torch.exp(logits - zmax.unsqueeze(1)).sum(1, dtype=torch.float64)
    zmax = zmax.double()
    return zmax + s.log(), zmax, pred


def reliability(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Reliability bins as MiSLAS ``utils/metric.py: calibration``.

    Confidence c = max softmax, bin b (1..n_bins) holds (b-1)/n < c <= b/n (``np.digitize``
    with ``right=True`` on ``linspace(0, 1, n+1)``); a confidence of exactly 0 falls in no bin.
    Returns per-bin mean confidence, accuracy (0 for an empty bin) and count.
    """
    return _reliability(_row_lse(logits), labels, n_bins)


def _reliability(row: tuple, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    lse, zmax, pred = row
    conf = torch.exp(zmax - lse)
    correct = (pred == labels.to(pred.device).long()).double()
    # bin index b-1 for (b-1)/n < c <= b/n  ->  ceil(c*n) - 1
    idx = torch.ceil(conf * n_bins).long() - 1
    keep = idx >= 0
    idx, conf, correct = idx[keep].clamp_max(n_bins - 1), conf[keep], correct[keep]
    count = torch.bincount(idx, minlength=n_bins).double()
    s_conf = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)
    s_acc = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, correct)
    denom = count.clamp_min(1)
    return {"bin_conf": (s_conf / denom).tolist(), "bin_acc": (s_acc / denom).tolist(),
            "bin_count": [int(c) for c in count.tolist()]}


def _ece_from(rel: dict) -> float:
    total = sum(rel["bin_count"])
    if total == 0:
        return 0.0
    gap = sum(n * abs(a - c) for n, a, c in zip(rel["bin_count"], rel["bin_acc"], rel["bin_conf"]))
    return 100.0 * gap / total


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error in % (15 bins, MiSLAS binning; weights |B_b| / sum |B_b|)."""
    return _ece_from(reliability(logits, labels, n_bins))


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood (unsmoothed cross-entropy) of the true class."""
    return _nll(logits, labels, _row_lse(logits)[0])


def _nll(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor) -> float:
    zy = logits.gather(1, labels.to(logits.device).long().view(-1, 1)).squeeze(1).double()
    return float((lse - zy).mean())


RSD_MIN_LM = 1e-2       # |LM_j| below this fraction of the logits' std: RSD_j undefined


def logits_magnitude(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LOS paper's Logits Magnitude and Regularised Standard Deviation per class.

    WORKING DEFINITION (the LOS repository has no code for them; the definition is not
    verified, docs/methods.md#logits-magnitude-and-rsd):
      LM_j  = mean_{x: y=j} z_j(x) - mean_{x: y!=j} z_j(x), then regularised by the 1-norm:
              LM_j / (sum_k |LM_k| / K)
      RSD_j = std_{x: y=j} z_j(x) / LM_j  (raw, unregularised LM: the ratio is scale-free)
    Classes absent from ``labels`` get NaN. RSD_j is undefined (NaN; None in results, "-" in
    tables) when LM_j <= RSD_MIN_LM x the standard deviation of all logits: a near-zero LM gives
    meaningless values such as -242.69, and a negative one (the class's own logit below the others'
    on its own samples: no margin to relate the spread to) a negative "standard deviation". So a
    reported RSD is never negative.
    """
    labels = labels.to(logits.device).long()
    k = logits.shape[1]
    zy = logits.gather(1, labels.view(-1, 1)).squeeze(1).double()        # z_j(x) of x's own class j
    n_pos = torch.bincount(labels, minlength=k).double()
    n_neg = logits.shape[0] - n_pos
    pos_sum = torch.zeros(k, dtype=torch.float64, device=logits.device).index_add_(0, labels, zy)
    pos_mean = pos_sum / n_pos.clamp_min(1)
    neg_mean = (logits.sum(0, dtype=torch.float64) - pos_sum) / n_neg.clamp_min(1)
    lm = pos_mean - neg_mean
    sq = (zy - pos_mean[labels]) ** 2
    pos_var = torch.zeros(k, dtype=torch.float64, device=logits.device).index_add_(0, labels, sq) / (n_pos - 1).clamp_min(1)
    rsd = pos_var.sqrt() / lm
    scale = float(logits.float().std()) if logits.numel() > 1 else 0.0
    rsd[lm <= RSD_MIN_LM * scale] = float("nan")              # LM ~ 0 or negative: RSD undefined
    valid = n_pos > 0
    norm = lm[valid].abs().mean() if valid.any() else torch.tensor(1.0, dtype=torch.float64)
    lm_reg = lm / norm.clamp_min(1e-12)
    lm_reg[~valid] = float("nan")
    rsd[~valid] = float("nan")
    return lm_reg.cpu(), rsd.cpu()


def class_logit_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean logit of the true class and mean margin z_y - max_{k != y} z_k (by true class)."""
    labels = labels.to(logits.device).long()
    k = logits.shape[1]
    zy = logits.gather(1, labels.view(-1, 1)).squeeze(1).double()
    if k > 1:
        top = logits.topk(2, dim=1)           # the best other class is the first of the top 2 that is not y
        first_is_y = top.indices[:, 0] == labels
        other = torch.where(first_is_y, top.values[:, 1], top.values[:, 0]).double()
    else:
        other = torch.full_like(zy, float("-inf"))
    cnt = torch.bincount(labels, minlength=k).double()
    mean_logit = torch.zeros(k, dtype=torch.float64, device=logits.device).index_add_(0, labels, zy) / cnt.clamp_min(1)
    margin = torch.zeros(k, dtype=torch.float64, device=logits.device).index_add_(0, labels, zy - other) / cnt.clamp_min(1)
    mean_logit[cnt == 0] = float("nan")
    margin[cnt == 0] = float("nan")
    return mean_logit.cpu(), margin.cpu()


def group_means(values: torch.Tensor, class_counts: Sequence[int]) -> dict[str, Optional[float]]:
    """Mean of a per-class quantity over Many / Medium / Few (None for an empty group)."""
    names = shot_groups(class_counts)
    values = values.double().cpu()
    out: dict[str, Optional[float]] = {}
    for g in GROUPS:
        mask = torch.tensor([n == g for n in names]) & ~torch.isnan(values)
        out[g] = float(values[mask].mean()) if mask.any() else None
    return out


def _nan_to_none(t: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in t.double().tolist()]


def full_report(logits: torch.Tensor, labels: torch.Tensor, class_counts: Sequence[int],
                weight_norm: Optional[torch.Tensor] = None) -> dict:
    """Every metric of a run's ``metrics`` block (ARCHITECTURE.md "Results JSON") from test logits."""
    k = logits.shape[1]
    row = _row_lse(logits)                  # shared by accuracy, ECE and NLL
    pc = per_class_accuracy(row[2], labels, k)
    acc = group_accuracy(pc, class_counts)
    lm, rsd = logits_magnitude(logits, labels)
    mean_logit, margin = class_logit_stats(logits, labels)
    out = dict(acc)
    rel = _reliability(row, labels)
    out["ece"] = _ece_from(rel)
    out["nll"] = _nll(logits, labels, row[0])
    out["per_class_acc"] = _nan_to_none(pc * 100)
    out["lm"] = _nan_to_none(lm)
    out["rsd"] = _nan_to_none(rsd)
    out["lm_groups"] = group_means(lm, class_counts)
    out["rsd_groups"] = group_means(rsd, class_counts)
    out["mean_logit"] = _nan_to_none(mean_logit)
    out["margin"] = _nan_to_none(margin)
    out["weight_norm"] = _nan_to_none(weight_norm) if weight_norm is not None else None
    out["reliability"] = rel
    return out
