"""The end of a group's epoch and of its training: which members failed, which epoch each keeps
(``select="val"``: the best class-mean val accuracy so far; ``"last"``: the last epoch) and
each member's deployable layer (:class:`TrainedHead`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ltcache.metrics import class_mean_accuracy
from ltcache.stage2 import heads as H
from ltcache.stage2.plan import Config, TrainData

EVAL_CHUNK = 1 << 25     # elements of a [m, N, K] logits block at evaluation


@dataclass
class TrainedHead:
    """A trained configuration: its deployable layer (CPU) and the epoch kept."""

    config: Config
    layer: dict
    selected_epoch: int
    history: list = field(default_factory=list)
    failed: Optional[str] = None          # why the configuration failed (non-finite parameters), or None


class Selection:
    """Per member of a group: the first epoch its parameters turned non-finite, and (``select``
    "val") its best val accuracy so far, that epoch and its parameters. Kept on the device: no
    sync until :meth:`collect`."""

    def __init__(self, cfgs: Sequence[Config], p: dict, select: str, dev: torch.device) -> None:
        self.cfgs, self.select, self.dev, self.m = cfgs, select, dev, len(cfgs)
        self.best_acc = torch.full((self.m,), -1.0, dtype=torch.float64, device=dev)
        self.best_epoch = torch.tensor([c.epochs for c in cfgs])
        self.bad_epoch = torch.zeros(self.m, dtype=torch.long, device=dev)    # 0: finite so far
        self.best = {a: t.clone() for a, t in p.items()} if select == "val" else None

    def check_finite(self, p: dict, e: int) -> None:
        """A member whose parameters turned non-finite at any step of epoch ``e`` (a loss that
        became NaN / inf) is marked failed with that epoch."""
        finite = torch.stack([t.reshape(self.m, -1).isfinite().all(1) for t in p.values()]).all(0)
        self.bad_epoch = torch.where(~finite & (self.bad_epoch == 0), e + 1, self.bad_epoch)

    def choose(self, family: str, p: dict, buf: dict, data: TrainData, e: int) -> None:
        """``select="val"``: keep each live member's parameters of epoch ``e`` if they beat its
        best val accuracy so far (ties keep the earlier epoch)."""
        if self.select != "val":
            return
        acc = _val_accuracy(family, p, buf, data)
        live = torch.tensor([e < c.epochs for c in self.cfgs], device=self.dev)
        better = live & (acc > self.best_acc)
        self.best_acc = torch.where(better, acc, self.best_acc)
        self.best_epoch = torch.where(better.cpu(), torch.tensor(e + 1), self.best_epoch)
        for a, t in p.items():
            self.best[a] = torch.where(better.view((self.m,) + (1,) * (t.dim() - 1)), t, self.best[a])

    def collect(self, family: str, p: dict, buf: dict, order: list) -> list[TrainedHead]:
        """Every member's deployable layer (the kept epoch's), member i at ``order[i]``."""
        final = self.best if self.select == "val" else p
        out: list = [None] * self.m
        bad = self.bad_epoch.tolist()
        for i, c in enumerate(self.cfgs):
            layer = H.effective(family, {a: final[a][i].cpu() for a in p}, {a: buf[a][i].cpu() for a in buf})
            failed = (f"its parameters became non-finite (NaN or inf) during epoch {bad[i]} of {c.epochs}: the loss "
                      "diverged; lower the lr or make the loss finite" if bad[i] else None)
            out[order[i]] = TrainedHead(config=c, layer=layer, selected_epoch=int(self.best_epoch[i]), failed=failed)
        return out


def eval_logits(family: str, p: dict, buf: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits [m, N, K] of m stacked heads on x [N, V, D], averaged over the V views
    (head applied per view, then averaged: exact for cosine heads too)."""
    out = None
    for v in range(x.shape[1]):
        z = H.forward(family, p, buf, x[:, v].unsqueeze(0))
        out = z if out is None else out + z
    return out / x.shape[1]


def _val_accuracy(family: str, p: dict, buf: dict, data: TrainData) -> torch.Tensor:
    """Class-mean val accuracy [m] of the group's current heads (in chunks of heads)."""
    m = next(iter(p.values())).shape[0]
    k = data.w0.shape[0]
    n = data.val_x.shape[0]
    chunk = max(1, EVAL_CHUNK // max(1, n * k))
    accs = []
    for i in range(0, m, chunk):
        pp = {a: t[i:i + chunk] for a, t in p.items()}
        bb = {a: t[i:i + chunk] for a, t in buf.items()}
        pred = eval_logits(family, pp, bb, data.val_x).argmax(-1)
        accs.append(class_mean_accuracy(pred, data.val_labels, k))
    return torch.cat(accs)
