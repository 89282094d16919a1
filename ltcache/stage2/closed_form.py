"""Closed-form stage-2 methods: no training, a layer computed from the stage-1 head or features.

* tau-normalisation (cRT ``tau_norm.py``): w_j / ||w_j||^tau and **the bias dropped** (cRT's
  dot product has no bias term; LTWB and BoT keep it). tau is swept over linspace(0, 2, 21)
  and chosen on the val split (never test) unless given.
* post-hoc logit adjustment (Menon et al.): z_j - tau log pi_j, i.e. bias b_j - tau log pi_j.
* nearest class mean (cRT ``KNNClassifier``, feat_type cl2n, dist l2): x^ = (f - mu)/||f - mu||,
  c_j = mean of x^ over class j (not renormalised), z_j = -||x^ - c_j||^2; mu and c_j from the
  clean (first) train view, the closest a cache comes to cRT's ``train_plain`` features.

Each is a **post-hoc rule** in the :data:`POSTHOC` registry, the closed-form methods' ``head``;
a rule of your own is one :func:`register_posthoc` function in a ``--plugin`` file.

The registry loads without torch (``ltcache methods``, ``--help``): the rules import it when
they compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, check_name, origin_of

if TYPE_CHECKING:
    import torch

TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))   # cRT tau_norm.py: numpy linspace(0, 2, 21)


def _check_tau(tau: float) -> None:
    if tau < 0:
        raise LtcacheError(f"tau must be >= 0 (got {tau}); tau-norm uses 0..2")


def tau_norm_layer(w0: torch.Tensor, tau: float) -> dict:
    """cRT tau-normalised classifier (bias dropped) as a linear layer."""
    import torch

    _check_tau(tau)
    norms = w0.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = (w0.double() / norms.pow(tau)).float()
    return {"kind": "linear", "weight": w, "bias": torch.zeros(w0.shape[0])}


def posthoc_la_layer(w0: torch.Tensor, b0: torch.Tensor, counts: torch.Tensor, tau: float) -> dict:
    """Post-hoc logit adjustment folded into the bias: b_j - tau log pi_j."""
    if tau < 0:
        raise LtcacheError(f"tau must be >= 0 (got {tau})")
    prior = counts.double() / counts.sum()
    return {"kind": "linear", "weight": w0.clone().float(), "bias": (b0.double() - tau * prior.log()).float()}


def ncm_layer(train_x: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int = 16384) -> dict:
    """Nearest-class-mean classifier (cl2n features, l2 distance) from train features [N, D].

    Sums accumulate in float64 over row chunks, so an ImageNet-scale [N, D] never gets a float64 copy."""
    import torch
    import torch.nn.functional as F

    n, d = train_x.shape
    dev = train_x.device
    labels = labels.to(dev).long()
    total = torch.zeros(d, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        total += train_x[s:s + chunk].double().sum(0)
    mu = total / max(n, 1)
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        xh = F.normalize(train_x[s:s + chunk].double() - mu, dim=1)
        sums.index_add_(0, labels[s:s + chunk], xh)
    cnt = torch.bincount(labels, minlength=num_classes).double().clamp_min(1).unsqueeze(1)
    return {"kind": "ncm", "mean": mu.float().cpu(), "centroids": (sums / cnt).float().cpu()}


def select_tau(w0: torch.Tensor, val_x: Optional[torch.Tensor], val_labels: Optional[torch.Tensor],
               grid=TAU_GRID) -> tuple[float, list]:
    """The tau of ``grid`` with the best class-mean val accuracy (ties: the smaller tau)."""
    import torch

    from ltcache.metrics import class_mean_accuracy

    if val_x is None:
        raise LtcacheError("tau-norm picks tau on the val split but the cache has none; "
                           "pass --tau (e.g. --tau 1.0) or extract a cache with a val split")
    k = w0.shape[0]
    # w_j / ||w_j||^tau scales logit column j, and the bias is dropped: one GEMM of the view-mean
    # features serves every tau of the grid
    w = w0.to(val_x)
    z0 = val_x.mean(1) @ w.t() if val_x.dim() == 3 else val_x @ w.t()
    lognorm = w0.double().norm(dim=1).clamp_min(1e-12).log().to(z0.device)
    best_tau, best_acc, curve = None, -1.0, []
    for tau in grid:
        _check_tau(tau)
        pred = (z0 * torch.exp(-tau * lognorm).to(z0)).argmax(1)
        acc = float(class_mean_accuracy(pred, val_labels, k))
        curve.append({"tau": tau, "val_acc": acc * 100})
        if acc > best_acc:
            best_tau, best_acc = tau, acc
    return float(best_tau), curve


@dataclass
class PosthocInputs:
    """What a post-hoc rule may read: the stage-1 layer, the training class counts, the clean
    (first-view) train features and labels, and the val split (None when the cache has none)."""

    w0: torch.Tensor                   # [K, D] stage-1 weight
    b0: torch.Tensor                   # [K]
    counts: torch.Tensor               # [K] training class counts
    train_x: Callable[[], torch.Tensor]          # () -> [N, D] clean train features (read on demand)
    train_labels: torch.Tensor         # [N]
    val_x: Optional[torch.Tensor]      # [N_val, V, D] or None
    val_labels: Optional[torch.Tensor]


@dataclass(frozen=True)
class PosthocRule:
    """A registered post-hoc rule: ``fn(inputs, params) -> layer`` (or ``(layer, extra)``)."""

    name: str
    fn: Callable
    needs_stage1: bool = True
    needs_val: bool = False


POSTHOC: Registry = Registry("post-hoc rule", "a rule of your own: @ltcache.register_posthoc in a --plugin FILE")


def register_posthoc(name: str, *, needs_stage1: bool = True, needs_val: bool = False) -> Callable:
    """Decorator registering a post-hoc (closed-form) rule under ``name``, for
    ``register_method(name, head=name, loss="-", closed_form=True, params=..., presets=...)``.

    The function is ``fn(inputs: PosthocInputs, params: dict) -> layer``: ``params`` are the
    method's hyper-parameters; the layer is ``(weight [K, D], bias [K])`` or a layer dict
    (``{"kind": "linear", "weight", "bias"}``, ``{"kind": "cosine", "weight", "scale"}``); a
    rule may return ``(layer, extra)`` with ``extra`` a dict written into its run. Choices are
    made on ``inputs.val_x`` (never the test split): declare ``needs_val=True`` and a cache
    without val is refused before anything runs. ``needs_stage1``: it reads ``w0``/``b0``.
    """
    check_name(name, "post-hoc rule")

    def deco(fn):
        if not callable(fn):
            raise LtcacheError(f"@register_posthoc('{name}') decorates a function fn(inputs, params) -> layer")
        POSTHOC.register(name, PosthocRule(name, fn, bool(needs_stage1), bool(needs_val)), origin_of(fn))
        return fn

    return deco


def _as_layer(out, name: str) -> tuple[dict, dict]:
    """A rule's result as (layer dict, extra), checked."""
    import torch

    extra: dict = {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out, extra = out
    if isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        out = {"kind": "linear", "weight": out[0].detach().float().cpu(), "bias": out[1].detach().float().cpu()}
    if not isinstance(out, dict) or out.get("kind") not in ("linear", "cosine", "ncm"):
        raise LtcacheError(f"post-hoc rule '{name}' ({POSTHOC.origin(name)}) returned {type(out).__name__}; "
                           "return (weight [K, D], bias [K]) or a layer dict")
    return out, extra


def _tau_norm(inp: PosthocInputs, params: dict):
    tau, extra = params.get("tau"), {}
    if tau is None:
        tau, extra["tau_curve"] = select_tau(inp.w0, inp.val_x, inp.val_labels)
        params["tau"] = tau
    return tau_norm_layer(inp.w0.cpu(), tau), extra


POSTHOC.register("tau-norm", PosthocRule("tau-norm", _tau_norm), "built-in")
POSTHOC.register("posthoc-la", PosthocRule(
    "posthoc-la", lambda inp, params: posthoc_la_layer(inp.w0.cpu(), inp.b0.cpu(), inp.counts, params["tau"])), "built-in")
POSTHOC.register("ncm", PosthocRule(
    "ncm", lambda inp, params: ncm_layer(inp.train_x(), inp.train_labels, len(inp.counts)), needs_stage1=False),
    "built-in")


def closed_form_layer(method, params: dict, cache, data, counts: torch.Tensor) -> tuple[dict, dict]:
    """The layer of closed-form ``method`` (a registry entry; its ``head`` names a post-hoc rule)
    and what it adds to its run (tau-norm without a tau: the val curve, ``tau_curve``; a value
    chosen on val is written into ``params``). ``data``: the sweep's
    :class:`~ltcache.stage2.plan.TrainData`."""
    import torch

    rule = POSTHOC.get(method.head)
    inp = PosthocInputs(
        w0=data.w0, b0=data.b0, counts=counts,
        train_x=lambda: cache.splits["train"].features[:, 0].to(device=data.x.device, dtype=torch.float32),
        train_labels=data.labels, val_x=data.val_x, val_labels=data.val_labels)
    if rule.needs_val and data.val_x is None:
        raise LtcacheError(val_refusal(method))
    try:
        out = rule.fn(inp, params)
    except LtcacheError:
        raise
    except Exception as exc:
        raise LtcacheError(f"post-hoc rule '{rule.name}' ({POSTHOC.origin(rule.name)}) of method {method.name} raised "
                           f"{type(exc).__name__}: {exc}; fix the rule") from None
    return _as_layer(out, rule.name)


def val_refusal(method) -> str:
    """The one-line refusal of a rule that needs val on a cache without one."""
    rule = POSTHOC.get(method.head)
    return (f"method {method.name}: post-hoc rule '{rule.name}' ({POSTHOC.origin(rule.name)}) chooses on the val "
            "split but the cache has none; extract the cache with a val split, or use another method")
