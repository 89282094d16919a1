"""Step 4 of a stage-2 sweep (see :mod:`ltcache.stage2.plan`): every run's layer evaluated.

A run's layer is a deployable layer dict (:func:`ltcache.stage2.heads.effective` for a trained
head, :mod:`ltcache.stage2.closed_form` for the others). Its logits on a split are averaged
over the split's views (:func:`layer_logits`); the test split gives the run's ``metrics``
(:func:`evaluate_layer`), the val split its ``val`` block (:func:`val_report`).
"""
from __future__ import annotations

import copy
import math
import sys
from typing import Optional, Sequence

import torch

from ltcache.metrics import accuracy_report, ece, full_report, nll
from ltcache.stage2 import closed_form as CF
from ltcache.stage2 import heads as H
from ltcache.stage2.plan import Entry, TrainData, eval_split

VAL_METRICS = ("all", "balanced", "many", "medium", "few", "nll", "ece")


def layer_logits(layer: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits of a deployable layer on features x [N, V, D], averaged over the views."""
    if layer["kind"] == "linear":   # logits are linear in x: the view-mean features give the mean logits
        return H.apply_layer(layer, x.mean(1))
    # cosine and NCM normalise each view first: apply per view, then average
    return sum(H.apply_layer(layer, x[:, v]) for v in range(x.shape[1])) / x.shape[1]


def evaluate_layer(layer: dict, x: torch.Tensor, labels: torch.Tensor, counts) -> dict:
    """Metrics of a deployable layer on features x [N, V, D] (logits averaged over views)."""
    return full_report(layer_logits(layer, x).cpu(), labels.cpu(), counts, H.weight_norms(layer))


def val_report(layer: dict, x: torch.Tensor, labels: torch.Tensor, counts) -> dict:
    """A run's val metrics (what selection may read): instance top-1 ``all``, class-balanced
    ``balanced`` (mean per-class accuracy), Many / Medium / Few, NLL and ECE (%)."""
    z = layer_logits(layer, x).cpu()
    y = labels.cpu()
    rep = accuracy_report(z, y, counts)
    return {"all": float((z.argmax(1) == y).double().mean() * 100), "balanced": rep["all"],
            "many": rep["many"], "medium": rep["medium"], "few": rep["few"],
            "nll": nll(z, y), "ece": ece(z, y)}


def _finite_only(obj):
    """``obj`` with every NaN / inf number replaced by None (the metrics of a diverged head)."""
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class Evaluator:
    """A sweep's evaluation: its test split (unless ``evaluate_test`` is False) and val split."""

    def __init__(self, cache, data: TrainData, counts: torch.Tensor, test_views: str, evaluate_test: bool = True):
        self.cache, self.data, self.counts = cache, data, counts
        self.clist = counts.tolist()
        dev = data.x.device
        self.test = eval_split(cache.splits["test"], dev, test_views) if evaluate_test else None
        self.has_val = data.val_x is not None and data.val_x.shape[0] > 0

    def __call__(self, layer: dict) -> tuple[Optional[dict], Optional[dict]]:
        """(test metrics or None, val metrics or None) of one layer."""
        return (evaluate_layer(layer, *self.test, self.clist) if self.test is not None else None,
                val_report(layer, self.data.val_x, self.data.val_labels, self.clist) if self.has_val else None)

    def runs(self, entries: Sequence[Entry], trained: Sequence) -> tuple[list[dict], list[dict]]:
        """The run dicts (ARCHITECTURE.md "Results JSON") and layers of ``entries``, in order:
        a trained entry reads its head from ``trained``; a closed form is computed and evaluated
        once per distinct (method, params) and copied to its other seeds."""
        runs, layers = [], []
        closed: dict = {}
        for entry in entries:
            extra: dict = {}
            if entry.config is not None:
                head = trained[entry.config]
                layer, params, sel = head.layer, head.config.params, head.selected_epoch
                metrics, val = self(layer)
            else:
                sel = None
                key = (entry.method.name, repr(sorted(entry.params.items())))
                if key not in closed:
                    # sets a tau chosen on val in entry.params
                    layer, extra = CF.closed_form_layer(entry.method, entry.params, self.cache, self.data, self.counts)
                    closed[key] = (layer, extra, dict(entry.params), *self(layer))
                layer, extra, chosen, metrics, val = closed[key]
                metrics, val = copy.deepcopy(metrics), copy.deepcopy(val)
                params = dict(chosen)
            run = {"name": entry.name, "method": entry.method.name, "params": dict(params), "seed": entry.seed,
                   "selected_epoch": sel, "metrics": metrics, "val": val}
            run.update(extra)
            if entry.config is not None and getattr(trained[entry.config], "failed", None):
                run["failed"] = trained[entry.config].failed
                run["metrics"], run["val"] = _finite_only(run["metrics"]), _finite_only(run["val"])
                print(f"notice: {entry.name} seed {entry.seed} failed: {run['failed']}; its row is marked failed",
                      file=sys.stderr, flush=True)
            runs.append(run)
            layers.append(layer)
        return runs, layers

    def stage1(self) -> tuple[Optional[dict], Optional[dict]]:
        """(test, val) metrics of the stage-1 layer."""
        return self({"kind": "linear", "weight": self.data.w0, "bias": self.data.b0})
