"""Metrics on hand-built examples: groups, ECE (MiSLAS bins), NLL, LM/RSD."""
from __future__ import annotations

import math

import pytest
import torch

from ltcache import metrics as M


def test_groups_and_empty_group():
    counts = [500, 150, 100, 20, 19, 5]
    pc = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    g = M.group_accuracy(pc, counts)
    assert g["many"] == pytest.approx(90.0) and g["medium"] == pytest.approx(50.0) and g["few"] == pytest.approx(10.0)
    assert M.group_accuracy(torch.tensor([1.0, 0.5]), [500, 50])["few"] is None
    assert M.fmt_pct(None) == "-"


def test_ece_hand_example():
    # two samples: conf 0.9 correct, conf 0.58 wrong -> bins 14 and 9 (1-based: 0.8667<c<=0.9333, 0.5333<c<=0.6)
    p1 = torch.tensor([0.9, 0.1])
    p2 = torch.tensor([0.58, 0.42])
    logits = torch.stack([p1.log(), p2.log()])
    labels = torch.tensor([0, 1])
    rel = M.reliability(logits, labels)
    assert rel["bin_count"][13] == 1 and rel["bin_count"][8] == 1 and sum(rel["bin_count"]) == 2
    assert M.ece(logits, labels) == pytest.approx(100 * (0.5 * 0.1 + 0.5 * 0.58), abs=1e-6)
    assert M.nll(logits, labels) == pytest.approx(-(math.log(0.9) + math.log(0.42)) / 2, abs=1e-6)


def test_logits_magnitude_and_rsd():
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    lm, rsd = M.logits_magnitude(z, y)
    raw = torch.tensor([2.0 - 0.0, 3.0 - 0.5])           # pos mean - neg mean
    assert torch.allclose(lm.float(), raw / raw.abs().mean())
    std = torch.tensor([torch.tensor([3.0, 1.0]).std(), torch.tensor([2.0, 4.0]).std()])
    assert torch.allclose(rsd.float(), std / raw)
    mean_logit, margin = M.class_logit_stats(z, y)
    assert torch.allclose(mean_logit.float(), torch.tensor([2.0, 3.0]))
    assert torch.allclose(margin.float(), torch.tensor([(3 + 0) / 2, (2 + 4) / 2]))


def test_full_report_has_no_nan_for_missing_group():
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    rep = M.full_report(z, torch.arange(20) % 2, [500, 50], torch.ones(2))
    assert rep["few"] is None and rep["lm_groups"]["few"] is None
    assert len(rep["reliability"]["bin_conf"]) == 15


def test_rsd_undefined_when_lm_near_zero():
    # class 0: a clear LM; class 1: its true-class logit barely differs from the others' (LM ~ 0)
    z = torch.tensor([[4.0, 0.00], [2.0, 0.01], [0.0, 1.00], [0.0, -0.99]])
    y = torch.tensor([0, 0, 1, 1])
    lm, rsd = M.logits_magnitude(z, y)
    raw1 = (1.0 - 0.99) / 2 - (0.0 + 0.01) / 2                    # 0.0: LM of class 1 vanishes
    assert abs(raw1) < 1e-9 and not math.isnan(lm[1])
    assert not math.isnan(rsd[0]) and rsd[0] == pytest.approx(torch.tensor([4.0, 2.0]).std().item() / 3.0)
    assert math.isnan(rsd[1])                                       # not +-1e9 or -242.69: undefined
    z[3, 1] = -0.98                                                 # |LM| = 0.005, far below 1 % of the logits' std
    assert math.isnan(M.logits_magnitude(z, y)[1][1])
    rep = M.full_report(z, y, [500, 10], torch.ones(2))
    assert rep["rsd"][1] is None and rep["rsd"][0] is not None
    assert rep["rsd_groups"]["few"] is None                         # the group's mean skips undefined classes
    from ltcache.stage2.results import _num
    assert _num(rep["rsd_groups"]["few"], "{:.2f}") == "-"


def test_rsd_never_negative():
    # class 1's own logit is below the other class's logit on its samples: LM < 0, so RSD is undefined
    z = torch.tensor([[3.0, 0.0], [2.0, 1.0], [0.0, 0.5], [1.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1])
    lm, rsd = M.logits_magnitude(z, y)
    assert lm[1] < 0 and math.isnan(rsd[1]) and rsd[0] > 0
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(200, 5, generator=gen), torch.arange(200) % 5      # weak (random) logits
    rsd = M.logits_magnitude(z, y)[1]
    assert all(math.isnan(v) or v >= 0 for v in rsd.tolist())
