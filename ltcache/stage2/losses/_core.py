"""The fused batched loss of M configurations, and the loss registry it dispatches through.

Every built-in loss is a point of one family (docs/methods.md#the-loss-family)::

    z'  = mult * z + offset - margin[y] * e_y (+ shifts of the detached logits, e.g. Seesaw)
    q   = (1 - eps[y]) e_y + eps[y] / K
    l   = w[y] * modulation(sum_k -q_k log softmax(z')_k)      (the ``softmax`` form)

plus what does not fit it, each owned by the loss unit that needs it: other per-sample *forms*
(LTWB's BCE on softmax, the CB repo's sigmoid), *terms* (Seesaw's shift, the focal modulation,
Poly-1's per-sample term, LADE's regulariser on the batch). A loss unit (one file per loss in
this package, registered with :func:`register_loss`) declares its hyper-parameters and turns
them into a :class:`LossSpec`: per-class vectors of the family plus the coefficients of its
terms. :func:`stack_specs` stacks M specs into tensors ``[M, ...]``; :func:`batched_loss`
evaluates all M losses and :func:`batched_loss_grad` their exact gradient with no Python
branching per configuration (only per *group*: a form or term is computed on the slice of
members that needs it).

A loss registered with only a forward (plain PyTorch on one configuration's logits) has no
spec terms: the engine takes its gradient by autograd (:mod:`ltcache.stage2.losses._fallback`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Sequence

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, check_name, origin_of
from ltcache.stage2.params import GENERIC, RESERVED, Param

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------------
# one configuration's loss
# --------------------------------------------------------------------------------------------

@dataclass
class LossSpec:
    """Hyper-parameters of one configuration's loss as per-class vectors (length K) and the
    coefficients of its terms; or, for a forward-only loss, its name and hyper-parameters.

    The composition path (public as ``ltcache.LossSpec``): a loss class whose ``spec(params,
    counts, scale)`` returns one trains at built-in speed with the exact analytic gradient.
    What composes, with z the logits and y the label::

        z' = mult * z + offset - margin[y] e_y (+ the shift of a term, e.g. seesaw)
        l  = w[y] * form(z', y; eps)  (+ the terms' per-sample parts)  (+ the terms' batch parts)

    * the per-class vectors ``mult``, ``offset``, ``margin``, ``eps``, ``weight`` (any
      together; None = neutral), with ``weighted_mean`` (sum w_y l / sum w_y instead of / B);
    * one ``form`` per member (``softmax``, ``bce_softmax``, ``sigmoid``);
    * any registered ``terms`` ({name: {coefficient: value}}), each applying to the forms it
      names (e.g. ``focal`` modulates only the softmax form). :func:`composable` lists them.
    """

    num_classes: int
    mult: Optional[torch.Tensor] = None      # z_k * mult_k (VS multiplicative term)
    offset: Optional[torch.Tensor] = None    # + offset_k (LA, balanced softmax, VS, LADE prior)
    margin: Optional[torch.Tensor] = None    # - margin_y on the true class (LDAM, already * scale)
    eps: Optional[torch.Tensor] = None       # smoothing of label y (LS, LOS, MiSLAS LAS)
    weight: Optional[torch.Tensor] = None    # class weight w_y (CB, DRW, GRW)
    weighted_mean: bool = False              # PyTorch weighted mean (sum w_y l / sum w_y) vs / B
    form: str = "softmax"                    # a registered form: softmax | bce_softmax | sigmoid
    terms: dict = field(default_factory=dict)        # term name -> {coefficient: value}
    user: Optional[str] = None               # forward-only loss: its registered name (autograd)
    user_params: dict = field(default_factory=dict)  # ... and its declared hyper-parameters
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# forms and terms: the pieces of the fused loss that belong to one loss unit
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Form:
    """A per-sample loss on z' selected per configuration.

    ``loss(zt [m,B,K], y [m,B], onehot, w_y [m,B], lb) -> [m,B]`` (the definition) and
    ``grad(zt [m,K,B], t: LossTargets, lb, first) -> [m,K,B]``: d(loss)/dz' with ``t.factor``
    (class weight and batch normalisation) applied, for members ``first .. first + m``.
    """

    name: str
    loss: Callable
    grad: Callable


@dataclass(frozen=True)
class Term:
    """A part of the loss owned by one loss unit, with per-configuration coefficients.

    ``coefs`` maps each coefficient to its neutral value: members without the term (or inside
    its slice of a group without using it) get the neutral values, which make it vanish.
    ``active(values)`` says whether a configuration's values switch the term on (default: any
    value differs from its neutral one). ``form``: the term applies only to members of that form.

    Hooks (each optional). Definition hooks see coefficients as [M] tensors, gradient hooks as
    [m, 1, 1] slices; the definition layout is [m, B, K], the gradient's class-major [m, K, B]:

    * ``shift(z_detached, yi, c, lb, dim)`` -> added to z' (no gradient of its own; ``dim`` is
      the class dimension, ``yi`` the labels with a size-1 class dimension);
    * ``modulate`` / ``modulate_grad``: a modification of the per-sample loss of its form, called
      by that form (see the form's docstring for the arguments);
    * ``sample_loss(zt, y, onehot, c, lb) -> [m, B]`` added to the per-sample loss (weighted by
      w_y and averaged like it); ``sample_grad(zt, t, c, lb) -> [m, K, B]`` its gradient with
      ``t.factor`` applied;
    * ``batch_loss(z, onehot, valid, c, lb) -> [m]`` added to each configuration's loss (on the
      raw logits); ``batch_grad(z, t, c, lb) -> [m, K, B]``.

    The ``t`` a gradient hook gets holds its members' :class:`LossTargets`, read as attributes
    (``t.yi``, ``t.factor``, ...; a :class:`TargetsSlice` where the hook runs on a slice).

    Two optional hooks let the gradient hooks skip work that does not depend on the logits:

    * ``derived(c, lb) -> dict``: coefficient-only quantities (e.g. gamma - 1), computed once per
      group from the [m, 1, 1] slices; the gradient hooks find them in ``c`` next to the
      coefficients;
    * ``targets(y, valid, c, lb) -> [..., m, R, B]``: label-only per-sample quantities, computed
      with :func:`loss_targets` once per epoch (y, valid [..., m, B] of the term's members, c its
      [m] coefficients); the gradient hooks read them as ``t.aux`` [m, R, B].
    """

    name: str
    coefs: dict
    form: Optional[str] = None
    active: Optional[Callable[[dict], bool]] = None
    shift: Optional[Callable] = None
    modulate: Optional[Callable] = None
    modulate_grad: Optional[Callable] = None
    sample_loss: Optional[Callable] = None
    sample_grad: Optional[Callable] = None
    batch_loss: Optional[Callable] = None
    batch_grad: Optional[Callable] = None
    derived: Optional[Callable] = None
    targets: Optional[Callable] = None

    def on(self, spec: LossSpec) -> bool:
        """Whether ``spec`` uses this term."""
        values = spec.terms.get(self.name)
        if values is None or (self.form is not None and spec.form != self.form):
            return False
        return bool(self.active(values)) if self.active else any(
            float(values.get(c, n)) != n for c, n in self.coefs.items())


FORMS: Registry = Registry("loss form")     # registration order; a member's form is an index into it
TERMS: Registry = Registry("loss term")
_RANGE_KEYS = ("mult", "eps", "tiled")


def register_form(form: Form) -> Form:
    """Add a per-sample form to the fused loss (forms and terms share one namespace)."""
    return FORMS.register(form.name, form, origin_of(form.loss), taken=(*TERMS, *_RANGE_KEYS))


def register_term(term: Term) -> Term:
    """Add a term to the fused loss (forms and terms share one namespace)."""
    return TERMS.register(term.name, term, origin_of(next((h for h in (term.shift, term.modulate, term.sample_loss,
                                                                         term.batch_loss) if h is not None), None)),
                          taken=(*FORMS, *_RANGE_KEYS))


def composable() -> dict:
    """What a :class:`LossSpec` can combine: the per-class vectors, the forms and every
    registered term with its coefficients (neutral values), its form and its origin."""
    return {
        "vectors": {"mult": 1.0, "offset": 0.0, "margin": 0.0, "eps": 0.0, "weight": 1.0},
        "forms": {name: FORMS.origin(name) for name in FORMS},
        "terms": {name: {"coefs": dict(t.coefs), "form": t.form or "any", "origin": TERMS.origin(name)}
                  for name, t in TERMS.items()},
    }


# --------------------------------------------------------------------------------------------
# the loss registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossUnit:
    """A registered loss: its hyper-parameters and either its batched form (``spec``: params,
    class counts, head scale -> :class:`LossSpec`) or only its ``forward`` (autograd fallback)."""

    name: str
    params: tuple
    spec: Optional[Callable]
    forward: Optional[Callable]
    origin: str
    doc: str = ""
    reads: tuple = ()                  # what the forward reads beyond z, y: "h" (features), "head" (parameters)
    grad: Optional[Callable] = None    # its analytic gradient (same arguments as forward), else autograd

    def resolve(self, params: dict) -> dict:
        """``params`` with the declared defaults filled in (LtcacheError if one is missing)."""
        out = dict(params)
        for p in self.params:
            if out.get(p.name) is None:
                if p.default is None:
                    raise LtcacheError(f"loss '{self.name}' needs hyper-parameter {p.name}; give it in the "
                                       f"method's presets or as Param(default=...)")
                out[p.name] = p.default
        return out


LOSSES: Registry = Registry("loss", "a loss of your own: @ltcache.register_loss in a --plugin FILE")


READS = ("h", "head")                   # what a forward may read beyond the logits and labels


def _reads(fn: Callable) -> tuple:
    """The keyword arguments of READS that ``fn`` takes (``h``: the batch's features, ``head``:
    the member's head parameters)."""
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(r for r in READS if r in names)


def _forward_arity(fn: Callable, name: str, what: str = "forward") -> Callable:
    """``fn`` called as fn(z, y, params, counts, **reads), whichever of z, y, params, counts it
    takes positionally (2 to 4) and whichever of ``h`` / ``head`` it names."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    reads = _reads(fn)
    pos = [p for p in sig.parameters.values()
           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in reads]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return fn
    if len(pos) < 2:
        raise LtcacheError(f"loss '{name}': {what} must take (z, y[, params[, counts]][, h=, head=]), it takes "
                           f"{len(pos)} positional argument(s)")
    n = min(len(pos), 4)
    if n == 4 and not reads:
        return fn
    return lambda z, y, params, counts, **kw: fn(*(z, y, params, counts)[:n], **{r: kw.get(r) for r in reads})


def register_loss(name: str, params: Sequence[Param] = (), *, doc: str = "") -> Callable:
    """Decorator registering a loss under ``name`` (as timm's ``@register_model``).

    Three ways, fastest first:

    * **composed** (a class with ``spec(self, params, counts, scale) -> LossSpec``): the loss is
      a point of the fused family (:class:`LossSpec`: per-class ``mult``, ``offset``,
      ``margin``, ``eps``, ``weight``, a ``form`` and coefficients of registered ``terms``);
      it trains at built-in speed with the exact analytic gradient. What composes: any
      per-class vectors together, one form per member, and every term whose ``form`` matches
      (``ltcache methods --terms`` lists forms and terms with their coefficients).
    * **forward with its gradient** (a class with ``forward`` and ``grad``, same arguments):
      ``grad`` returns dL/dz ``[B, K]`` of the mean loss; checked against autograd of
      ``forward`` at the first step.
    * **forward only** (a function, or a class with ``forward``): ``f(z [B, K], y [B], params,
      counts [K]) -> scalar``, the mean loss over the batch in plain PyTorch; the engine takes
      dL/dz by autograd, all members of a group in one call when the loss is a mean of
      per-sample terms (checked at the first step).

    A forward (and ``grad``) may also read the batch: ``h=`` the features ``[B, D]`` of its
    samples (e.g. the influence-balanced loss's ||h||_1) and ``head=`` the member's head
    parameters ({name: tensor}, e.g. a penalty on ||W||; their gradient is added to the
    head's). Name them as keyword arguments: ``def f(z, y, params, counts, h=None)``.
    Registering a name that exists is an error.
    """
    check_name(name, "loss")

    def deco(obj):
        grad = None
        if inspect.isclass(obj):
            inst = obj()
            declared = tuple(params) or tuple(getattr(obj, "params", ()))
            spec = getattr(inst, "spec", None)
            forward = getattr(inst, "forward", None)
            grad = getattr(inst, "grad", None)
        elif callable(obj):
            declared, spec, forward = tuple(params), None, obj
        else:
            raise LtcacheError(f"@register_loss('{name}') decorates a function or a class, not {type(obj).__name__}")
        if spec is None and forward is None:
            raise LtcacheError(f"loss '{name}' gives neither spec() nor forward(); give a forward(z, y, params, counts)")
        LOSSES.check_free(name)
        _check_declared(declared, f"loss '{name}'")
        fwd = _forward_arity(forward, name) if forward is not None else None
        reads = _reads(forward) if forward is not None else ()
        if grad is not None and (forward is None or _reads(grad) != reads):
            raise LtcacheError(f"loss '{name}': grad needs a forward with the same arguments (it reads "
                               f"{', '.join(_reads(grad)) or 'z, y'}); give both or only forward")
        origin = origin_of(obj)
        LOSSES.register(name, LossUnit(name, declared, spec, fwd, origin,
                                       doc or (inspect.getdoc(obj) or "").split("\n")[0], reads,
                                       _forward_arity(grad, name, "grad") if grad is not None else None), origin)
        return obj

    return deco


def _check_declared(declared: Sequence[Param], owner: str) -> None:
    """Every declaration is a Param, not generic or reserved, and agrees in type with the other
    declarations of its name (one CLI option per name)."""
    seen = set()
    for p in declared:
        if not isinstance(p, Param):
            raise LtcacheError(f"{owner}: params must be ltcache.Param(...) declarations, got {p!r}")
        if p.name in seen:
            raise LtcacheError(f"{owner}: hyper-parameter {p.name} is declared twice")
        seen.add(p.name)
        if p.name in GENERIC or p.name in RESERVED:
            raise LtcacheError(f"{owner}: hyper-parameter name '{p.name}' is taken by "
                               f"{'a generic hyper-parameter' if p.name in GENERIC else 'a command option'}; "
                               "choose another name")
        for other, where in declarations(p.name):
            if (other.type, other.choices) != (p.type, p.choices):
                raise LtcacheError(f"{owner}: hyper-parameter {p.name} is a {p.type.__name__} here but a "
                                   f"{other.type.__name__}{' with other choices' if other.type is p.type else ''} "
                                   f"in {where}; use another name")


def declarations(name: str) -> list[tuple[Param, str]]:
    """Every loss-unit declaration of ``name``: (Param, 'loss X')."""
    return [(p, f"loss '{u.name}'") for u in LOSSES.values() for p in u.params if p.name == name]


def get_loss(name: str) -> LossUnit:
    """The registered loss ``name``."""
    return LOSSES.get(name)


def build_loss(kind: str, params: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
    """The :class:`LossSpec` of a registered loss with the method's hyper-parameters.

    ``counts`` are the training class counts; ``scale`` is the cosine head's scale (LDAM
    margins are subtracted before the scale in the source, i.e. s * (cos - m_y)).
    """
    unit = get_loss(kind)
    p = unit.resolve(params)
    if unit.spec is not None:
        return unit.spec(p, counts, scale)
    return LossSpec(num_classes=len(counts), user=unit.name, user_params={q.name: p[q.name] for q in unit.params})


# --------------------------------------------------------------------------------------------
# M configurations at once
# --------------------------------------------------------------------------------------------

@dataclass
class LossBatch:
    """M stacked :class:`LossSpec` (tensors ``[M, K]`` / ``[M]``; ``None`` where no member
    uses a term) plus, for each optional part, the range of members that need it."""

    mult: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    margin: Optional[torch.Tensor]
    eps: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    weighted_mean: torch.Tensor
    form: torch.Tensor
    coef: dict                      # term -> coefficient -> [M] (only the terms some member uses)
    log_counts: torch.Tensor
    prior: torch.Tensor
    forms_used: tuple
    # part -> (first, stop): the smallest slice of members holding every member that needs it
    # (forms, terms, "mult", "eps"). Members inside a slice that do not need the part have
    # neutral values, so a slice wider than needed is still exact; :func:`loss_signature`
    # orders a group so it is tight.
    ranges: dict = field(default_factory=dict)
    pure_forms: tuple = ()           # forms whose slice holds only members of that form
    cache: dict = field(default_factory=dict)   # per-batch constants a term computes once

    def __post_init__(self):
        """Class-major views [M, K, 1] / [M, 1, 1] for :func:`batched_loss_grad`, the terms that
        each hook of the fused loss runs, and each term's coefficient slice (with its ``derived``
        quantities), so that a gradient call slices nothing it can look up."""
        k = self.prior.shape[0]
        self.weighted_any = bool(self.weighted_mean.any())
        self.mult3 = None if self.mult is None else self.mult.unsqueeze(2)
        self.offset3 = None if self.offset is None else self.offset.unsqueeze(2)
        self.coef3 = {t: {c: v[:, None, None] for c, v in cs.items()} for t, cs in self.coef.items()}
        self.log_counts3 = self.log_counts.view(1, k, 1)
        self.prior3 = self.prior.view(1, k, 1)
        used = [TERMS[n] for n in TERMS if n in self.coef]
        self.shift_terms = [t for t in used if t.shift]
        self.sample_terms = [t for t in used if t.sample_loss]
        self.batch_terms = [t for t in used if t.batch_loss]
        self.modulators = {f: [t for t in used if t.form == f and (t.modulate or t.modulate_grad)] for f in FORMS}
        self.aux_terms = [t for t in used if t.targets]
        # members a..e holding every member of a term with per-epoch targets: LossTargets.aux's rows
        spans = [self.ranges[t.name] for t in self.aux_terms]
        self.aux_span = (min(a for a, _ in spans), max(e for _, e in spans)) if spans else None
        self.aux_rows: dict = {}          # term -> (first row, stop row) of its part of LossTargets.aux
        self._coef_slices: dict = {}
        for t in used:
            self.coef_slice(t.name, *self.ranges[t.name])
        self.mult_slice = None if "mult" not in self.ranges else self.mult3[slice(*self.ranges["mult"])]

    def coef_slice(self, term: str, a: int, e: int) -> dict:
        """Coefficients of ``term`` for members a..e, shaped [e - a, 1, 1], plus the term's
        ``derived`` quantities (made once per slice, then looked up)."""
        key = (term, a, e)
        c = self._coef_slices.get(key)
        if c is None:
            c = {n: v[a:e] for n, v in self.coef3[term].items()}
            if TERMS[term].derived is not None:
                c.update(TERMS[term].derived(dict(c), self))
            self._coef_slices[key] = c
        return c

    def overlaps(self, part: str, a: int, e: int) -> bool:
        """Whether a member a..e needs ``part``: a form, term, "mult" or "eps" (its range), or
        "weight" (a class weight other than 1), so that a hook can skip a no-op on a slice."""
        key = ("overlaps", part, a, e)
        hit = self.cache.get(key)
        if hit is None:
            if part == "weight":
                hit = self.weight is not None and bool((self.weight[a:e] != 1).any())
            else:
                r = self.ranges.get(part)
                hit = r is not None and r[0] < e and a < r[1]
            self.cache[key] = hit
        return hit

    def filled(self, value: float, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A cached constant tensor (e.g. the -1 that :meth:`Tensor.scatter_add_` puts at the
        label), so that a gradient call does not build it each time. Read-only."""
        key = ("filled", value, tuple(shape), dtype)
        x = self.cache.get(key)
        if x is None:
            import torch

            x = self.cache[key] = torch.full(shape, value, dtype=dtype, device=self.prior.device)
        return x


def loss_signature(spec: LossSpec) -> tuple:
    """Sort key that makes the members needing each optional part contiguous in a group
    (forward-only losses last, grouped by loss and hyper-parameters)."""
    if spec.user is not None:
        return (1, spec.user, repr(sorted(spec.user_params.items())))
    return (0, FORMS.index(spec.form), *(t.on(spec) for t in TERMS.values()), spec.mult is not None,
            spec.eps is not None)


def stack_specs(specs: Sequence[LossSpec], counts: torch.Tensor, device, dtype=None) -> LossBatch:
    """Stack M loss specs into tensors on ``device`` (of ``dtype``, float32 unless given); parts
    nobody uses are left out (None)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if any(s.user is not None for s in specs):
        raise ValueError("stack_specs takes built-in losses; forward-only losses train by autograd")
    k = specs[0].num_classes

    def vec(attr: str, fill: float):
        if all(getattr(s, attr) is None for s in specs):
            return None
        rows = [getattr(s, attr) if getattr(s, attr) is not None else torch.full((k,), fill) for s in specs]
        return torch.stack([r.float() for r in rows]).to(device=device, dtype=dtype)

    def span(flags) -> Optional[tuple]:
        idx = [i for i, f in enumerate(flags) if f]
        return (idx[0], idx[-1] + 1) if idx else None

    ranges = {f: span([s.form == f for s in specs]) for f in FORMS}
    coef = {}
    for name, term in TERMS.items():
        users = [term.on(s) for s in specs]
        ranges[name] = span(users)
        if ranges[name] is not None:
            coef[name] = {c: torch.tensor([float(s.terms[name].get(c, neutral)) if on else neutral
                                           for s, on in zip(specs, users)], device=device, dtype=dtype)
                          for c, neutral in term.coefs.items()}
    ranges["mult"] = span([s.mult is not None for s in specs])
    ranges["eps"] = span([s.eps is not None for s in specs])
    ranges = {a: r for a, r in ranges.items() if r is not None}
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
        form=torch.tensor([FORMS.index(s.form) for s in specs], device=device),
        coef=coef,
        log_counts=n.log().to(device=device, dtype=dtype),
        prior=(n / n.sum()).to(device=device, dtype=dtype),
        forms_used=tuple(sorted({s.form for s in specs})),
        ranges=ranges,
        pure_forms=pure,
    )


def _class_weight(lb: LossBatch, y: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.ones(y.shape, dtype=lb.prior.dtype, device=y.device) if lb.weight is None else lb.weight.gather(1, y)


def batched_loss(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lb: LossBatch) -> torch.Tensor:
    """The loss of each of M configurations, shape [M] -- the definition (the engine trains
    with its exact gradient, :func:`batched_loss_grad`).

    z: logits [M, B, K] (the head's output); y: labels [M, B]; valid: float mask [M, B]
    (0 for padding of a short last batch or an inactive step). The mean over a batch counts
    only valid samples, so a padded batch equals the smaller batch of the source code.
    """
    import torch
    import torch.nn.functional as F

    m, b, k = z.shape
    onehot = F.one_hot(y, k).to(z.dtype)
    zt = z
    if lb.mult is not None:
        zt = zt * lb.mult[:, None, :]
    if lb.offset is not None:
        zt = zt + lb.offset[:, None, :]
    if lb.margin is not None:
        zt = zt - onehot * lb.margin.gather(1, y).unsqueeze(-1)
    for term in lb.shift_terms:
        zt = zt + term.shift(z.detach(), y.unsqueeze(-1), lb.coef3[term.name], lb, -1)

    w_y = _class_weight(lb, y)
    per_sample = None
    for name in lb.forms_used:
        loss = FORMS[name].loss(zt, y, onehot, w_y, lb)
        if per_sample is None:
            per_sample = loss
        else:
            per_sample = torch.where((lb.form == FORMS.index(name))[:, None], loss, per_sample)
    for term in lb.sample_terms:
        per_sample = per_sample + w_y * term.sample_loss(zt, y, onehot, lb.coef[term.name], lb)

    num = (per_sample * valid).sum(1)
    denom = torch.where(lb.weighted_mean, (w_y * valid).sum(1), valid.sum(1)).clamp_min(1e-12)
    loss = num / denom
    for term in lb.batch_terms:
        loss = loss + term.batch_loss(z, onehot, valid, lb.coef[term.name], lb)
    return loss


def _softmax_loss(zt, y, onehot, w_y, lb: LossBatch) -> torch.Tensor:
    """The softmax form: w_y sum_k -q_k log softmax(z')_k, then each softmax term's
    ``modulate(l [m, B], c) -> [m, B]`` (e.g. focal)."""
    import torch

    logp = torch.log_softmax(zt, dim=-1)
    ce = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if lb.eps is not None:
        eps_y = lb.eps.gather(1, y)
        ce = (1 - eps_y) * ce + eps_y * (-logp.mean(-1))
    loss = w_y * ce
    for term in lb.modulators["softmax"]:
        loss = term.modulate(loss, lb.coef[term.name])
    return loss


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
    weight_y: Optional[torch.Tensor] = None   # class weight of the label w_y [.., M, 1, B] (None: all 1)
    aux: Optional[torch.Tensor] = None    # the terms' own targets (Term.targets) [.., m, R, B] of
    #                                       members lb.aux_span, rows lb.aux_rows[term]

    def step(self, s: int) -> "LossTargets":
        return LossTargets(*(None if t is None else t[s] for t in self))


def loss_targets(lb: LossBatch, y: torch.Tensor, valid: torch.Tensor) -> LossTargets:
    """The :class:`LossTargets` of labels y and float mask valid, both [..., M, B]."""
    import torch

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
                       valid.unsqueeze(-2), y, None if w is None else w.unsqueeze(-2), _aux_targets(lb, y, valid))


def _aux_targets(lb: LossBatch, y: torch.Tensor, valid: torch.Tensor) -> Optional[torch.Tensor]:
    """The terms' own per-epoch targets (``Term.targets``) stacked along rows: [..., m, R, B]
    for the members lb.aux_span (0 where a member is outside a term's slice)."""
    if not lb.aux_terms:
        return None
    import torch

    f, stop = lb.aux_span
    parts, rows = [], {}
    for term in lb.aux_terms:
        a, e = lb.ranges[term.name]
        coefs = {c: v[a:e] for c, v in lb.coef[term.name].items()}
        part = term.targets(y[..., a:e, :], valid[..., a:e, :], coefs, lb)
        if (a, e) != (f, stop):               # widen to the span: 0 for the members outside the slice
            full = part.new_zeros(part.shape[:-3] + (stop - f,) + part.shape[-2:])
            full[..., a - f:e - f, :, :] = part
            part = full
        n = sum(p.shape[-2] for p in parts)
        rows[term.name] = (n, n + part.shape[-2])
        parts.append(part)
    lb.aux_rows = rows                        # the same every epoch (one assignment: thread-safe)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class TargetsSlice:
    """The :class:`LossTargets` of members a..e, read like one (``t.yi``, ``t.factor``, ...):
    a field is sliced when a hook first reads it, since a hook reads two or three of them and
    each slice is a torch op. ``aux`` is the part of LossTargets.aux of ``term`` (its rows)."""

    def __init__(self, t, a: int, e: int, term: Optional[str] = None, lb: Optional[LossBatch] = None):
        self._t, self._a, self._e, self._term, self._lb = t, a, e, term, lb

    def __getattr__(self, name: str):
        if name == "aux":
            value = _term_aux(self._t, self._a, self._e, self._term, self._lb)
        elif name in LossTargets._fields:
            value = getattr(self._t, name)
            value = None if value is None else value[self._a:self._e]
        else:
            raise AttributeError(name)
        setattr(self, name, value)            # once: later reads find the attribute
        return value


def _term_aux(t, a: int, e: int, term: Optional[str], lb: Optional[LossBatch]) -> Optional[torch.Tensor]:
    """Rows of ``term`` and members a..e of t.aux (t: full targets); no op where it is all of it."""
    if t.aux is None or term not in lb.aux_rows:
        return None
    f, stop = lb.aux_span
    r0, r1 = lb.aux_rows[term]
    aux = t.aux if (a, e) == (f, stop) else t.aux[a - f:e - f]
    return aux if (r0, r1) == (0, t.aux.shape[-2]) else aux[:, r0:r1]


def _targets_of(t: LossTargets, a: int, e: int, m: int, term: Optional[str] = None,
                lb: Optional[LossBatch] = None):
    """The targets a hook of members a..e (of m) sees: t itself where that is all of them."""
    if (a, e) == (0, m) and (t.aux is None or term is None or _term_aux(t, a, e, term, lb) is t.aux):
        return t
    return TargetsSlice(t, a, e, term, lb)


def batched_loss_grad(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lb: LossBatch,
                      targets: Optional[LossTargets] = None) -> torch.Tensor:
    """d(sum_m loss_m)/dz: the exact gradient of :func:`batched_loss`, in the engine's
    class-major layout: z and the result are [M, K, B] (y [M, B], valid [M, B]; or their
    precomputed ``targets``).

    Written out by hand because autograd's graph costs more than the arithmetic on the small
    per-step tensors of a sweep, and each optional part (a form, a term) is computed only on
    the slice of members that needs it (``lb.ranges``). On a CPU a small torch op costs a few
    microseconds whatever its size, so what does not depend on the logits is made ahead
    (:func:`loss_targets` per epoch, :class:`LossBatch` per group) and slices are updated in
    place (``x[a:e].add_(...)``, not ``x[a:e] += ...``, which copies the slice back).
    tests/test_stage2_losses.py checks it against autograd for every loss (clamps included:
    where a log is clamped its gradient is 0, as in PyTorch).
    """
    import torch

    t = loss_targets(lb, y, valid) if targets is None else targets
    m = z.shape[0]
    rg = lb.ranges
    zt = z
    if lb.mult is not None:          # mul then add: PyTorch's broadcasting addcmul is several times slower
        zt = torch.mul(z, lb.mult3)
        if lb.offset is not None:
            zt.add_(lb.offset3)
    elif lb.offset is not None:
        zt = z + lb.offset3
    if t.neg_margin is not None:
        zt = zt.scatter_add(1, t.yi, t.neg_margin)
    for term in lb.shift_terms:      # functions of the detached logits: shift zt, no gradient of their own
        a, e = rg[term.name]
        zt = zt.clone() if zt is z else zt
        zt[a:e].add_(term.shift(z[a:e], t.yi[a:e], lb.coef_slice(term.name, a, e), lb, 1))

    if len(lb.forms_used) == 1 and rg[lb.forms_used[0]] == (0, m):
        dz = FORMS[lb.forms_used[0]].grad(zt, t, lb, 0)
    elif "tiled" in lb.pure_forms:   # each form's slice holds only its members: stack their gradients
        order = sorted(lb.forms_used, key=lambda f: rg[f])
        dz = torch.cat([FORMS[f].grad(zt[slice(*rg[f])], _targets_of(t, *rg[f], m), lb, rg[f][0]) for f in order])
    else:
        dz = torch.zeros_like(z)
        for form in lb.forms_used:
            a, e = rg[form]
            d = FORMS[form].grad(zt[a:e], _targets_of(t, a, e, m), lb, a)
            if form in lb.pure_forms:
                dz[a:e] = d
            else:                     # the slice holds members of another form (unsorted group)
                dz[a:e] = torch.where((lb.form[a:e] == FORMS.index(form))[:, None, None], d, dz[a:e])
    # dz is ours (a new tensor): updated in place below
    for term in lb.sample_terms:
        a, e = rg[term.name]
        dz[a:e].add_(term.sample_grad(zt[a:e], _targets_of(t, a, e, m, term.name, lb),
                                      lb.coef_slice(term.name, a, e), lb))
    if lb.mult_slice is not None:    # scale only the members with a multiplier
        dz[slice(*rg["mult"])].mul_(lb.mult_slice)
    for term in lb.batch_terms:
        a, e = rg[term.name]
        dz[a:e].add_(term.batch_grad(z[a:e], _targets_of(t, a, e, m, term.name, lb),
                                     lb.coef_slice(term.name, a, e), lb))
    return dz


def within(span: tuple, first: int, m: int) -> tuple:
    """An absolute member span relative to a slice starting at ``first`` of length m (clipped)."""
    return max(span[0] - first, 0), min(span[1] - first, m)


def _softmax_grad(zt, t: LossTargets, lb: LossBatch, first: int) -> torch.Tensor:
    """Softmax-form members: l = -sum_k q_k log p_k with q = (1 - eps_y) e_y + eps_y / K, so
    dl/dzt = p - q; a modulating term (focal) scales it by its ``modulate_grad(l [m', 1, B],
    c) -> d modulated(l) / dl``, on the members it covers."""
    import torch

    m = zt.shape[0]
    d = torch.softmax(zt, dim=1)
    if t.eps_k is not None:
        a, e = within(lb.ranges["eps"], first, m)
        if a < e:
            d[a:e].sub_(t.eps_k[a:e])
    d.scatter_add_(1, t.yi, t.neg_target)
    for term in lb.modulators["softmax"]:
        a, e = within(lb.ranges[term.name], first, m)
        if a < e:
            logp = torch.log_softmax(zt[a:e], dim=1)
            # w_y ce with ce = -sum_k q_k logp_k = -(1 - eps_y) logp_y - eps_y mean_k logp_k
            ce = logp.gather(1, t.yi[a:e]).mul_(t.neg_target[a:e])
            if t.eps_k is not None and lb.overlaps("eps", first + a, first + e):
                ce.sub_(t.eps_k[a:e] * logp.sum(1, keepdim=True))
            if t.weight_y is not None and lb.overlaps("weight", first + a, first + e):
                ce.mul_(t.weight_y[a:e])
            d[a:e].mul_(term.modulate_grad(ce, lb.coef_slice(term.name, first + a, first + e)))
    return d.mul_(t.factor)


register_form(Form("softmax", _softmax_loss, _softmax_grad))
