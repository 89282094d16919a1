"""Common checks of registered entries (scikit-learn's ``check_estimator`` idea): the same
checks run on every method, loss, head, sampler and post-hoc rule, built-in or from a plugin.

``tests/test_common_checks.py`` runs them over every registry entry (and the examples'),
``ltcache check-plugin FILE`` over the entries a user's file registers. Each check raises a
one-line :class:`LtcacheError` naming the entry, what is wrong and the fix; all run on a tiny
generated cache (:func:`tiny_data`, K 5, D 8, 258 rows) in well under a second each.

=================  ==========================================================================
kind               checks
=================  ==========================================================================
method             presets pass their own Param ranges; an out-of-range value is refused in
                   one line; its search space names only its options and says where each
                   range comes from; trained in a mixed sweep it equals the same
                   configuration trained alone (1e-5) and the plain reference loop
                   (:mod:`ltcache.stage2.reference`: autograd + ``torch.optim.SGD``, 2e-5)
loss               the gradient the engine trains with equals autograd of the loss's
                   definition in float64, mixed in one group with every other loss; finite
head               its backward equals autograd of its forward (float64); init gives the
                   declared parameters
sampler            long indices in range, enough for every step rule, the same batches from the
                   same seed
post-hoc rule      a layer of shape [K, D] / [K] from the tiny cache's stage-1 layer
=================  ==========================================================================
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

from ltcache.errors import LtcacheError
from ltcache.registry import Registry

K, D, COUNTS = 5, 8, (150, 60, 30, 12, 6)
MIXED_TOL, REFERENCE_TOL = 1e-5, 2e-5
SHORT = {"epochs": 2, "batch_size": 64}          # the sweeps' budget (a few steps on the tiny cache)


# --------------------------------------------------------------------------------------------
# the tiny generated cache
# --------------------------------------------------------------------------------------------

def tiny_cache(seed: int = 0, val: bool = True) -> SimpleNamespace:
    """An in-memory cache (the FeatureCache contract) of K 5 classes, D 8, 3 train views."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(K, D, generator=g) * 1.5

    def split(n_per_class, views, names):
        labels = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(n_per_class)])
        base = centers[labels] + 0.8 * torch.randn(len(labels), D, generator=g)
        feats = torch.stack([base + 0.1 * torch.randn(len(labels), D, generator=g) for _ in range(views)], 1)
        return SimpleNamespace(features=feats.float(), labels=labels, index=torch.arange(len(labels)), views=names)

    splits = {"train": split(COUNTS, 3, ["clean", "aug1", "aug2"])}
    v = split([4] * K, 2, ["center", "hflip"])
    splits["test"] = split([10] * K, 2, ["center", "hflip"])
    if val:
        splits["val"] = v
    w = torch.randn(K, D, generator=g) * 0.3 + centers * 0.2
    return SimpleNamespace(path="tiny", manifest={"dataset": {"source": "tiny"}}, splits=splits, weight=w,
                           bias=torch.linspace(0.5, -0.5, K), class_counts=torch.tensor(COUNTS),
                           class_names=[f"c{j}" for j in range(K)], num_classes=K, feature_dim=D, groups=None)


def tiny_data(cache=None):
    """The :class:`~ltcache.stage2.plan.TrainData` of :func:`tiny_cache` on the CPU."""
    from ltcache.stage2.plan import _train_data
    return _train_data(cache or tiny_cache(), torch.device("cpu"), "all")


def config(method: str, data, seed: int = 3, **overrides):
    """The training Config of ``method`` with the short budget (and ``overrides``)."""
    from ltcache.stage2.methods import get_method, resolve_params
    from ltcache.stage2.plan import make_config
    m = get_method(method)
    counts = data.class_index.counts
    params = resolve_params(m, "cifar", {**SHORT, **overrides}, len(data.labels))
    return make_config(m, params, seed, method, counts)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------

def _where(reg: Registry, name: str, kind: str) -> str:
    origin = reg.origin(name)
    return f"{origin}: {kind} '{name}'" if origin != "built-in" else f"{kind} '{name}'"


def check_presets(name: str) -> None:
    """Every preset value passes the range of its own declaration."""
    from ltcache.stage2.methods import METHODS, method_params
    m = METHODS.get(name)
    decl = method_params(m)
    for preset, values in m.presets.items():
        for key, value in values.items():
            if value is None or key not in decl:
                continue
            try:
                decl[key].check(value)
            except LtcacheError as exc:
                raise LtcacheError(f"{_where(METHODS, name, 'method')}: preset {preset}: {exc}") from None


def out_of_range(p) -> Optional[object]:
    """A value that ``p`` (a Param) refuses, or None when it has no range."""
    if p.choices:
        return "not-a-choice"
    if p.hi is not None:
        return p.hi + 1
    if p.lo is not None:
        return p.lo - 1
    return None


def check_refuses_out_of_range(name: str) -> list[str]:
    """Each of the method's own hyper-parameters with a range refuses a value outside it, in one
    line; returns the messages."""
    from ltcache.stage2.methods import METHODS, method_params, validate_overrides
    m = METHODS.get(name)
    decl = method_params(m)
    out = []
    for key in m.tunables:
        bad = out_of_range(decl[key])
        if bad is None:
            continue
        try:
            validate_overrides(m, {key: bad})
        except LtcacheError as exc:
            msg = str(exc)
            if "\n" in msg.strip():
                raise LtcacheError(f"{_where(METHODS, name, 'method')}: the refusal of {key}={bad} spans lines") from None
            out.append(msg)
            continue
        raise LtcacheError(f"{_where(METHODS, name, 'method')}: {key}={bad} is accepted though outside its "
                           "declared range; fix the Param (lo/hi/choices)")
    return out


def check_space(name: str) -> None:
    """The search space names only the method's options, and every range says where it comes from."""
    from ltcache.stage2.methods import GENERIC, METHODS, method_space
    m = METHODS.get(name)
    allowed = set(m.tunables) | (set() if m.closed_form else set(GENERIC))
    sp = method_space(m, "cifar")
    for d in sp.dims:
        if d.name not in allowed:
            raise LtcacheError(f"{_where(METHODS, name, 'method')}: its space searches {d.name}, not one of its options")
        if not d.source:
            raise LtcacheError(f"{_where(METHODS, name, 'method')}: space dimension {d.name} gives no source; "
                               "say where the range comes from (Dim(..., source=...))")


def mixed_sweep(names, data) -> dict:
    """One configuration of each trained method in ``names``, trained as one sweep: name -> layer."""
    from ltcache.stage2.sweep import train_sweep
    cfgs = [config(n, data) for n in names]
    return {c.method: t.layer for c, t in zip(cfgs, train_sweep(cfgs, data, quiet=True, n_jobs=1))}


def check_mixed_equals_alone(name: str, data, mixed: dict) -> None:
    """The configuration of ``name`` trained alone equals it trained in the mixed sweep
    (``mixed``: :func:`mixed_sweep`'s result) and the plain reference loop."""
    from ltcache.stage2.methods import METHODS
    from ltcache.stage2.reference import train_reference
    from ltcache.stage2.sweep import train_sweep
    cfg = config(name, data)
    alone = train_sweep([cfg], data, quiet=True, n_jobs=1)[0].layer
    where = _where(METHODS, name, "method")
    _same(alone, mixed[name], MIXED_TOL, f"{where}: trained in a mixed sweep it differs from trained alone",
          "draw random numbers only from the member's generator g, and read only its own rows")
    _same(alone, train_reference(cfg, data), REFERENCE_TOL,
          f"{where}: the engine differs from a plain autograd + torch.optim.SGD loop",
          "check the loss's grad / the head's backward against autograd")


def _same(a: dict, b: dict, tol: float, what: str, fix: str) -> None:
    for key, t in a.items():
        if isinstance(t, dict):
            _same(t, b[key], tol, what, fix)
        elif isinstance(t, torch.Tensor) and t.is_floating_point():
            err = float((t - b[key].to(t)).abs().max()) if t.numel() else 0.0
            if not err <= tol * max(1.0, float(t.abs().max())):
                raise LtcacheError(f"{what} by {err:.2e} in {key} (tolerance {tol:g}); {fix}")


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------

def loss_params(name: str) -> dict:
    """Hyper-parameters to check loss ``name`` with: a method's preset that uses it, else the
    declared defaults."""
    from ltcache.stage2.losses import get_loss
    from ltcache.stage2.methods import METHODS
    unit = get_loss(name)
    for m in METHODS.values():
        if m.loss == name:
            d = m.defaults("cifar")
            return {p.name: d.get(p.name) for p in unit.params}
    return unit.resolve({})


def check_loss_gradient(name: str) -> None:
    """The gradient the engine trains ``name`` with equals autograd of its definition (float64),
    with every other loss in the same group."""
    from ltcache.stage2 import losses as L
    from ltcache.stage2.losses._fallback import AutogradLossGrad
    counts = torch.tensor(COUNTS)
    names = list(L.LOSSES)
    names.remove(name)
    names.insert(len(names) // 2, name)                      # in the middle of the group
    specs = [L.build_loss(n, loss_params(n), counts, scale=30.0 if n.startswith("ldam") else 1.0) for n in names]
    g = torch.Generator().manual_seed(5)
    b = 12
    z = torch.randn(len(specs), b, K, generator=g, dtype=torch.float64) * 3
    y = torch.randint(K, (len(specs), b), generator=g)
    h = torch.randn(len(specs), b, D, generator=g, dtype=torch.float64)
    valid = torch.ones(len(specs), b, dtype=torch.float64)
    valid[:, -3:] = 0                                          # a short batch
    n_valid = [b - 3] * len(specs)
    builtin = [i for i, s in enumerate(specs) if s.user is None]
    users = [i for i, s in enumerate(specs) if s.user is not None]
    i = names.index(name)
    where = _where(L.LOSSES, name, "loss")
    if specs[i].user is None:
        lb = L.stack_specs([specs[j] for j in builtin], counts, "cpu", dtype=torch.float64)
        zz = z[builtin].clone().requires_grad_(True)
        auto, = torch.autograd.grad(L.batched_loss(zz, y[builtin], valid[builtin], lb).sum(), zz)
        ours = L.batched_loss_grad(z[builtin].transpose(1, 2).contiguous(), y[builtin], valid[builtin],
                                   lb).transpose(1, 2)
        j = builtin.index(i)
        got, ref = ours[j], auto[j]
    else:
        order = [j for j in users]
        fb = AutogradLossGrad([specs[j] for j in order], [names[j] for j in order], counts, "cpu",
                              dtype=torch.float64)
        ours = fb(z[order].transpose(1, 2).contiguous(), y[order], valid[order], [n_valid[j] for j in order], True,
                  h=h[order], head=None if "head" not in fb.reads else {"W": torch.randn(len(order), K, D,
                                                                                         dtype=torch.float64)})
        j = order.index(i)
        got = ours[j].transpose(0, 1)
        unit = L.get_loss(name)
        zz = z[i, :n_valid[i]].clone().requires_grad_(True)
        kw = {"h": h[i, :n_valid[i]]} if "h" in unit.reads else {}
        if "head" in unit.reads:
            kw["head"] = {"W": torch.zeros(K, D, dtype=torch.float64)}
        ref = torch.zeros_like(z[i])
        ref[:n_valid[i]], = torch.autograd.grad(unit.forward(zz, y[i, :n_valid[i]], specs[i].user_params,
                                                             counts.double(), **kw), zz)
        if "head" in unit.reads:
            return                                            # its head side is checked by the reference loop
    if not bool(torch.isfinite(got).all()):
        raise LtcacheError(f"{where}: its gradient is not finite on ordinary logits; make it finite (clamp before a log)")
    if not torch.allclose(got, ref, atol=1e-9, rtol=1e-7):
        raise LtcacheError(f"{where}: the engine's gradient differs from autograd of its definition by "
                           f"{float((got - ref).abs().max()):.2e}; fix its gradient hooks or grad")


# --------------------------------------------------------------------------------------------
# heads, samplers, post-hoc rules
# --------------------------------------------------------------------------------------------

def check_head(name: str) -> None:
    """init gives the declared parameters; the backward the engine uses equals autograd of the
    forward (float64, 3 members)."""
    from ltcache.stage2 import heads as H
    kind = H.HEADS.get(name)
    where = _where(H.HEADS, name, "head")
    cache = tiny_cache()
    inits = [H.init_head(kind, "stage1", cache.weight, cache.bias, torch.Generator().manual_seed(s)) for s in range(3)]
    names = H.param_names(kind.family)
    need = tuple(a for a in names if a in kind.trained)
    p = {a: torch.stack([i[0][a] for i in inits]).double() for a in names}
    for a in need:                                             # away from the initial values (s = 1, c = 0)
        p[a] = p[a] + 0.1 * torch.randn(p[a].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    buf = {a: torch.stack([i[1][a] for i in inits]).double() for a in inits[0][1]}
    if kind.family == "cosine":
        buf["scale"] = torch.full((3,), 16.0, dtype=torch.float64)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pf = {a: t for a, t in p.items() if a in need or (kind.family == "affine" and a in ("W", "b"))}   # as the engine
    tbuf = {a: t for a, t in buf.items() if a != "u" or kind.family != "affine" or kind.uses_base_norm}
    z, ctx = H.forward_train(kind.family, pf, tbuf, x)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = H.backward(kind.family, pf, tbuf, ctx, dz.clone(), need)
    leaf = {a: t.clone().requires_grad_(a in need) for a, t in p.items()}
    with torch.enable_grad():
        zz = H.forward(kind.family, leaf, buf, x)
        auto = torch.autograd.grad(zz, [leaf[a] for a in need], dz.transpose(1, 2), allow_unused=True)
    for a, ref in zip(need, auto):
        ref = torch.zeros_like(p[a]) if ref is None else ref
        if not torch.allclose(ours[a], ref, atol=1e-9, rtol=1e-7):
            raise LtcacheError(f"{where}: its backward differs from autograd of its forward in {a} by "
                               f"{float((ours[a] - ref).abs().max()):.2e}; fix backward or leave it out (autograd)")


def check_sampler(name: str) -> None:
    """Long indices in range, enough for every step rule, and the same batches from the same seed."""
    from ltcache.stage2.samplers import SAMPLERS, STEP_RULES, ClassIndex, epoch_indices
    labels = torch.cat([torch.full((n,), j) for j, n in enumerate(COUNTS)])
    ci = ClassIndex.from_labels(labels, K)
    for epoch, rule in zip((0, 1, 1), STEP_RULES):           # every step rule cuts its draws (checked)
        a = epoch_indices(name, ci, 32, epoch, 2, torch.Generator().manual_seed(7), steps=rule)
        b = epoch_indices(name, ci, 32, epoch, 2, torch.Generator().manual_seed(7), steps=rule)
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            raise LtcacheError(f"{_where(SAMPLERS, name, 'sampler')}: two draws from the same seed differ; draw "
                               "random numbers only from the generator g it is given")


def check_posthoc(name: str) -> None:
    """The rule gives a [K, D] / [K] layer on the tiny cache (with and without its chosen value)."""
    from ltcache.stage2.closed_form import POSTHOC, closed_form_layer
    from ltcache.stage2.methods import METHODS
    cache = tiny_cache()
    data = tiny_data(cache)
    for m in [m for m in METHODS.values() if m.closed_form and m.head == name] or [None]:
        method = m or SimpleNamespace(name=f"(rule {name})", head=name)
        params = dict(m.defaults("cifar")) if m else {}
        layer, _ = closed_form_layer(method, params, cache, data, cache.class_counts)
        w = layer.get("weight", layer.get("centroids"))
        if w is None or tuple(w.shape) != (K, D) or not bool(torch.isfinite(w).all()):
            raise LtcacheError(f"{_where(POSTHOC, name, 'post-hoc rule')}: its layer's weight is not a finite "
                               f"[K, D] = [{K}, {D}] tensor; fix the rule")


# --------------------------------------------------------------------------------------------
# before a sweep: the plugin entries it uses, on a few rows
# --------------------------------------------------------------------------------------------

def preflight(configs, data) -> None:
    """Run every plugin head, sampler and loss that ``configs`` use once on a few rows of
    ``data`` before anything trains: a head that cannot be differentiated, a sampler's bad
    indices, a loss that raises or is not finite are refused (one line naming the plugin file,
    the entry and the fix) before the first group trains."""
    from ltcache.stage2 import heads as H
    from ltcache.stage2.losses import LOSSES
    from ltcache.stage2.losses._fallback import AutogradLossGrad
    from ltcache.stage2.samplers import SAMPLERS, epoch_indices
    seen = set()
    x = data.x[:8, 0].float().cpu()
    y = data.labels[:8].cpu()
    w0, b0 = data.w0.float().cpu(), data.b0.float().cpu()
    for c in configs:
        if c.sampler not in seen and SAMPLERS.origin(c.sampler) != "built-in":
            seen.add(c.sampler)
            epoch_indices(c.sampler, data.class_index, c.batch_size, 0, c.epochs,
                          torch.Generator().manual_seed(c.seed), steps=c.steps)
        kind = H.get_head(c.head)
        if kind.plugin is not None and ("head", c.head) not in seen:
            seen.add(("head", c.head))
            p, buf = H.init_head(kind, c.init, w0, b0, torch.Generator().manual_seed(c.seed))
            p = {a: t.unsqueeze(0) for a, t in p.items()}
            buf = {a: t.unsqueeze(0) for a, t in buf.items()}
            z, ctx = H.forward_train(kind.family, p, buf, x.unsqueeze(0))
            H.backward(kind.family, p, buf, ctx, torch.ones_like(z), kind.trained)
        key = (c.loss.user, repr(sorted(c.loss.user_params.items())))
        if c.loss.user is not None and LOSSES.origin(c.loss.user) != "built-in" and key not in seen:
            seen.add(key)
            fb = AutogradLossGrad([c.loss], [c.method], data.class_index.counts, "cpu")
            z = (x @ w0.t() + b0).t().unsqueeze(0)
            head = None
            if "head" in fb.reads:
                p0, _ = H.init_head(H.get_head(c.head), c.init, w0, b0, torch.Generator().manual_seed(c.seed))
                head = {a: t.unsqueeze(0) for a, t in p0.items()}
            fb(z, y.unsqueeze(0), torch.ones(1, len(y)), [len(y)], True, h=x.unsqueeze(0), head=head)


# --------------------------------------------------------------------------------------------
# a plugin file
# --------------------------------------------------------------------------------------------

def plugin_entries(path: str) -> dict[str, list[str]]:
    """kind -> names the plugin file ``path`` registered (it must be loaded)."""
    from ltcache.registry import registries
    origin = f"plugin {path}"
    return {kind: [n for n in reg if reg.origin(n) == origin] for kind, reg in registries().items()}


def run_checks(entries: dict[str, list[str]], report: Callable[[str], None] = lambda s: None) -> int:
    """Every common check on ``entries`` (kind -> names); ``report`` gets one line per passed
    check; the first failure raises its one-line LtcacheError. Returns the checks run."""
    from ltcache.stage2.methods import METHODS
    done = 0

    def ok(line: str) -> None:
        nonlocal done
        done += 1
        report(f"ok  {line}")

    for name in entries.get("loss", []):
        check_loss_gradient(name)
        ok(f"loss {name}: gradient equals autograd (float64, in a group with every other loss)")
    for name in entries.get("head", []):
        check_head(name)
        ok(f"head {name}: backward equals autograd of forward")
    for name in entries.get("sampler", []):
        check_sampler(name)
        ok(f"sampler {name}: long indices in range for every step rule, reproducible from its seed")
    for name in entries.get("post-hoc rule", []):
        check_posthoc(name)
        ok(f"post-hoc rule {name}: a finite [K, D] layer")
    methods = entries.get("method", [])
    trained = [n for n in methods if not METHODS.get(n).closed_form]
    data = tiny_data() if trained else None
    mixed = mixed_sweep(sorted(set(trained) | {"ce", "lws", "cosine"}), data) if trained else {}
    for name in methods:
        check_presets(name)
        ok(f"method {name}: presets within their Param ranges")
        refused = check_refuses_out_of_range(name)
        ok(f"method {name}: " + (f"out-of-range values of its {len(refused)} ranged option(s) refused in one line"
                                  if refused else "no option with a range to refuse"))
        check_space(name)
        ok(f"method {name}: search space of its own options, each range with a source")
        if name in trained:
            check_mixed_equals_alone(name, data, mixed)
            ok(f"method {name}: a mixed sweep equals it alone ({MIXED_TOL:g}) and a plain SGD loop ({REFERENCE_TOL:g})")
    return done


def check_plugin(path: str, report: Callable[[str], None] = lambda s: None) -> int:
    """Load the plugin file ``path`` and run every common check on what it registers; errors
    name the file. Returns the number of checks passed."""
    from ltcache.plugins import load_plugin
    load_plugin(path)
    entries = plugin_entries(str(path))
    if not any(entries.values()):
        raise LtcacheError(f"plugin {path} registers nothing; call ltcache.register_method / register_loss / ... in it")
    try:
        return run_checks(entries, report)
    except LtcacheError as exc:
        msg = str(exc)
        raise LtcacheError(msg if str(path) in msg else f"plugin {path}: {msg}") from None


__all__ = ["tiny_cache", "tiny_data", "run_checks", "check_plugin", "preflight", "check_presets",
           "check_refuses_out_of_range", "check_space", "check_mixed_equals_alone", "check_loss_gradient",
           "check_head", "check_sampler", "check_posthoc", "mixed_sweep"]
