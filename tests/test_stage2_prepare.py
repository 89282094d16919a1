"""Epoch preparation made once per sweep (ltcache.stage2.prepare): the class-aware sampler's
batches bit for bit those of its definition, for several class profiles and epoch lengths."""
from __future__ import annotations

import math

import pytest
import torch

from ltcache.stage2.samplers import ClassIndex, epoch_indices

torch.set_num_threads(1)


def _reference_class_aware(ci: ClassIndex, total: int, g: torch.Generator) -> torch.Tensor:
    """The class-aware sampler as defined (samplers module docstring), written out plainly:
    the per-class permutations from one float64 sort of rand + 2 segment."""
    k = len(ci.counts)
    visits = math.ceil(total / 4)
    rounds = math.ceil(visits / k)
    class_seq = torch.argsort(torch.rand(rounds, k, generator=g), dim=1).reshape(-1)[:visits]
    pos = ((torch.arange(visits) // k) * 4).unsqueeze(1) + torch.arange(4)
    cls = class_seq.unsqueeze(1).expand_as(pos)
    n_c = ci.counts[cls]
    counts = ci.counts.clamp_min(1)
    cycles = (rounds * 4 + counts - 1) // counts
    seg_len = counts.repeat_interleave(cycles)
    seg_first = torch.cumsum(seg_len, 0) - seg_len
    class_first_seg = torch.cumsum(cycles, 0) - cycles
    seg_of = torch.arange(int(seg_len.numel())).repeat_interleave(seg_len)
    item = torch.arange(int(seg_len.sum())) - seg_first[seg_of]
    keys = torch.rand(int(seg_len.sum()), generator=g, dtype=torch.float64) + seg_of.double() * 2
    perm = item[torch.argsort(keys)]
    picked = perm[seg_first[class_first_seg[cls] + pos // n_c] + pos % n_c]
    return ci.order[ci.start[cls] + picked].reshape(-1)[:total]


@pytest.mark.parametrize("counts", [[400, 100, 25, 9], [7, 3, 1, 1, 1], [50] * 6])
@pytest.mark.parametrize("b", [8, 32])
def test_class_aware_equals_its_definition(counts, b):
    labels = torch.cat([torch.full((n,), j) for j, n in enumerate(counts)])
    ci = ClassIndex.from_labels(labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))],
                                len(counts))
    for steps in ("floor", "ceil+1"):
        g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for e in range(3):                         # the plan is reused across epochs
            idx, valid = epoch_indices("cb", ci, b, e, 3, g, steps=steps)
            ref = _reference_class_aware(ci, int(valid.sum()), h)
            assert torch.equal(idx[valid], ref)
        assert torch.equal(g.get_state(), h.get_state())     # the same amount of the stream used
