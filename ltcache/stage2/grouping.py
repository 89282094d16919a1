"""Step 2 of a stage-2 sweep: which configurations train together, and in what order.

Configurations that share a head family, a batch size and whether the stage-1 layer stays
frozen (:func:`group_key`) form a group, trained as one stacked computation
(:mod:`ltcache.stage2.group`). Inside a group, members that read the same rows at every step
(:func:`stream_key`) sit in blocks that share one gather and one wider GEMM
(:func:`stream_blocks`), and the loss reads the members in an order that keeps each optional
loss term on one contiguous slice (:func:`member_order`). Each configuration's head is looked
up once (:attr:`Config.kind <ltcache.stage2.plan.Config.kind>`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ltcache.stage2.losses import get_loss, loss_signature, stack_specs
from ltcache.stage2.plan import Config
from ltcache.stage2.samplers import DEFAULT_STEPS


def frozen_base(cfg: Config) -> bool:
    """True for heads that train only the affine s, c on the frozen stage-1 layer (LWS, MARC):
    their base logits x W^T + b never change, so the engine computes them once per cache row."""
    kind = cfg.kind
    return (kind.family == "affine" and cfg.init == "stage1" and cfg.bias_init is None
            and not {"W", "b"} & set(kind.trained) and not reads_batch(cfg))


def reads_batch(cfg: Config) -> tuple:
    """What a member's loss reads beyond the logits: ("h",) the features, ("head",) its head's
    parameters (a plugin loss; such members get features, not frozen base logits)."""
    return get_loss(cfg.loss.user).reads if cfg.loss.user is not None else ()


def merge_key(cfg: Config) -> tuple:
    """Configurations with equal keys can train in one stacked group even with different batch
    sizes and frozen-base or not: each member's batches padded to the group's largest with
    invalid samples, its own number of steps per epoch (a member with fewer steps idles, see
    :mod:`ltcache.stage2.epochs`); frozen-base members among others compute their base logits
    from the features each step (their W, b get lr 0). Whether merging such groups pays is the
    scheduler's call (:func:`ltcache.stage2.workers.merge_plan`)."""
    return (cfg.kind.family,)


def group_key(cfg: Config) -> tuple:
    """Configurations with equal keys are trained as one stacked group."""
    return (cfg.kind.family, frozen_base(cfg), cfg.batch_size)


def make_groups(configs: Sequence[Config]) -> list[list[int]]:
    """The indices of ``configs`` in groups (:func:`group_key`); inside a group, members needing
    the same optional loss terms side by side (each term then runs on one slice)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)

    def order(i: int) -> tuple:
        return loss_signature(configs[i].loss), "s" in configs[i].kind.trained

    return [sorted(members, key=order) for members in groups.values()]


def stream_key(c: Config) -> tuple:
    """What a configuration's batches depend on besides its group's views: its sampler, seed,
    epochs, batch size and whether its head's initialisation draws from the same generator
    first (a fresh or cosine head draws its weights). Members with equal keys read the same
    rows at every step."""
    draws = c.kind.family != "affine" or c.init == "fresh"
    return (c.sampler, int(c.seed), c.epochs, draws, c.steps or DEFAULT_STEPS.get(c.sampler, ""), c.batch_size)


def stream_blocks(cfgs: Sequence[Config]) -> tuple[list[int], int, int]:
    """A member order with the members that read identical rows (:func:`stream_key`) in
    blocks: (order, S, r).

    Blocks hold r members (the r that puts the most members in blocks; the larger on ties);
    the S blocks come first in ``order``, then the other members in their given order. S = 0
    when no two members share a stream. The engine still checks, each epoch, that every
    block's rows are equal, and gathers per member if they are not."""
    streams: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        streams.setdefault(stream_key(c), []).append(i)
    sizes = {len(v) for v in streams.values() if len(v) >= 2}
    if not sizes:
        return list(range(len(cfgs))), 0, 1
    r = max(sizes, key=lambda r: (sum(len(v) // r * r for v in streams.values()), r))
    blocks = [v[j * r:(j + 1) * r] for v in streams.values() for j in range(len(v) // r)]
    inside = {i for b in blocks for i in b}
    return [i for b in blocks for i in b] + [i for i in range(len(cfgs)) if i not in inside], len(blocks), r


class MemberOrder(NamedTuple):
    """A group's two member orders: ``order`` (parameters; S blocks of r members first, see
    :func:`stream_blocks`) and ``by_loss`` (the loss: built-in losses, then forward-only ones)."""

    order: list
    n_blocks: int
    r: int
    by_loss: list


def member_order(cfgs: Sequence[Config], blocks: bool, counts: torch.Tensor) -> MemberOrder:
    """The parameter and loss orders of a group's members (``blocks``: whether members on the
    same rows may share a gather). The loss reads the parameter order itself when that keeps
    its slices as tight (:func:`_as_tight`): no permutation per step."""
    order, n_blocks, r = stream_blocks(cfgs) if blocks else (list(range(len(cfgs))), 0, 1)
    by_loss = ([i for i, c in enumerate(cfgs) if c.loss.user is None]
               + [i for i, c in enumerate(cfgs) if c.loss.user is not None])
    if by_loss != order and _as_tight(cfgs, order, by_loss, counts):
        by_loss = list(order)
    return MemberOrder(order, n_blocks, r, by_loss)


def _as_tight(cfgs: Sequence[Config], order: list, by_loss: list, counts: torch.Tensor) -> bool:
    """Whether the built-in losses of ``cfgs`` taken in ``order`` run their optional parts on
    slices no wider (and forms no less pure) than in ``by_loss`` order; then the loss can read
    the members in ``order`` with no permutation per step (any order is exact: members inside
    a slice that do not use its part have neutral values)."""
    if any(c.loss.user is not None for c in cfgs):
        return False
    a, b = (stack_specs([cfgs[i].loss for i in o], counts, "cpu") for o in (order, by_loss))

    def width(lb):
        return sum(e - f for f, e in lb.ranges.values())
    return width(a) <= width(b) and set(a.pure_forms) >= set(b.pure_forms)
