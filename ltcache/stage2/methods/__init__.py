"""The method registry: every stage-2 method as data (head, loss, sampler, defaults, source).

A built-in method is **one module of this package** (``ce.py``, ``la_loss.py``, ...): its
``register_method(...)`` call with its presets, search space, source, notes and scripts side by
side, and the declarations of any hyper-parameter of its own (a head's or a closed form's). Its
loss's hyper-parameters, with their default values, are declared once in the loss unit
(``ltcache/stage2/losses/``); a preset gives only what differs from them and from the stated
stage-2 default. This module holds the machinery (:class:`Method`, :func:`register_method`, the
hyper-parameter tables) and what several methods share: the stated defaults, the
repository@commit constants, a few shared search dimensions. A plugin adds a method the same way,
from its own file (see :mod:`ltcache.plugins`).

Hyper-parameters come from the authors' code (docs/methods.md: each method's paper, code and
commit read). Where a method's source only has end-to-end values (marked UNVERIFIED), the
preset uses the **stated stage-2 default** below and the entry's ``notes`` say so:

* cifar    stage-1 init, instance-balanced, 30 epochs, lr 0.1, wd 5e-4, batch 128, cosine --
           the cRT/BagofTricks CIFAR-100-LT stage-2 budget (docs/methods.md#stated-defaults),
           reused where nothing else is known.
* imagenet stage-1 init, instance-balanced, 10 epochs, lr 0.2, wd 5e-4, batch 512, cosine --
           the cRT ImageNet-LT stage-2 budget.

Every preset follows the stage-2 loop of the script it cites (``scripts``: which one, and the
repository@commit whose code it was checked against): the per-epoch cosine of LOS/MiSLAS
(``cosine``) or, for the methods of cRT, BALMS, BagofTricks and LTWB, whose scripts call
``scheduler.step()`` at the start of each epoch, ``cosine-start`` (the last epoch at lr 0); the
batches per epoch (``steps``: int(N/B) in cRT, BALMS and BagofTricks, ceil(N/B) + 1 in MiSLAS,
else the sampler's rule) and the parameters without weight decay (``no_wd``). Methods with no
stage-2 script keep the stated default (``cosine``, ceil(N/B) instance-balanced batches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ltcache.errors import LtcacheError
from ltcache.options import PRESETS, check_feature_set  # noqa: F401  (PRESETS declared once with every option list; re-exported)
from ltcache.registry import Registry, origin_of
from ltcache.stage2 import head_kinds as H
from ltcache.stage2.closed_form import POSTHOC
from ltcache.stage2.losses import _core as losses_core
from ltcache.stage2.losses import get_loss
from ltcache.stage2.params import GENERIC, GENERIC_PARAMS, SCHEDULES, Param  # noqa: F401  (re-exported)
from ltcache.stage2.samplers import SAMPLERS, STEP_RULES
from ltcache.stage2.space import Dim, Space

INITS = ("stage1", "fresh")


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One stage-2 method, as data."""

    name: str
    head: str              # linear | cosine | lws | mislas | marc | tau-norm | posthoc-la | ncm
    loss: str              # a registered loss (ltcache/stage2/losses/; "-" for closed-form methods)
    sampler: str           # ib | cb | sqrt | progressive ("-" for closed form)
    init: str              # stage1 | fresh ("-" for closed form)
    tunables: tuple        # the method's own hyper-parameters (CLI options): its loss's, then its own
    presets: dict          # {"cifar": {...}, "imagenet": {...}}: generic + tunable defaults
    source: str
    notes: str = ""
    closed_form: bool = False
    sigmoid_bias: bool = False     # bias initialised to -log(K-1) (CB repo sigmoid/focal)
    space: Space = Space()         # the search space of the method's own hyper-parameters (tune)
    params: tuple = ()             # declarations of the method's own (non-loss) hyper-parameters
    origin: str = "built-in"       # where it was registered (a plugin file, a module)
    # the recipe details its source's stage-2 script fixes (besides the presets' values):
    steps: str = ""                # batches per epoch: floor | ceil | ceil+1 ("": the sampler's default)
    no_wd: tuple = ()              # parameters trained without weight decay (e.g. ("b",))
    scripts: tuple = ()            # ((preset, the script its recipe follows, verified against), ...)
    # the cache's feature set its source's BatchNorm mode reads, per class count (ltcache.cache.feature_sets):
    feature_sets: tuple = ()       # ((num_classes or "*", set name), ...): e.g. ((10, "bn-eval"),)
    cache_gap: str = ""            # measured: cache All - through-the-backbone All, on what ("": not measured)

    def feature_set(self, num_classes: int) -> Optional[str]:
        """The feature set this method trains on at ``num_classes`` classes (None: the main features)."""
        sets = dict(self.feature_sets)
        return sets.get(int(num_classes), sets.get("*"))

    def script(self, preset: str) -> tuple[str, str]:
        """(the script ``preset``'s recipe follows, what it was checked against: a repository
        at a commit, or "" when unchecked)."""
        for pre, script, verified in self.scripts:
            if pre == preset:
                return script, verified
        return "", ""

    def defaults(self, preset: str) -> dict:
        """All hyper-parameters of ``preset`` (generic and the method's own)."""
        if preset not in self.presets:
            raise LtcacheError(f"unknown preset '{preset}'; use one of {', '.join(self.presets)}")
        return dict(self.presets[preset])


METHODS: Registry = Registry("method", "`ltcache methods` lists them; a method of your own: --plugin FILE")

CRT_CIFAR = dict(lr=0.1, wd=5e-4, epochs=30, batch_size=128, schedule="cosine", momentum=0.9)
CRT_IMNET = dict(lr=0.2, wd=5e-4, epochs=10, batch_size=512, schedule="cosine", momentum=0.9)
LOS_CIFAR = dict(lr=5e-4, wd=0.0, epochs=20, batch_size=64, schedule="cosine", momentum=0.9)
LTWB_CIFAR = dict(lr=0.01, wd=0.1, epochs=10, batch_size=64, schedule="cosine", momentum=0.9)
STATED_DEFAULTS = {"cifar": CRT_CIFAR, "imagenet": CRT_IMNET}    # a preset's generic values unless given
# a closed form on the bn-eval set applies its layer to the features the stage-1 model gives in eval
# mode, exactly what the source evaluates (on the main, BN-shifted features: -0.26 to +0.23, bundled cache)
CLOSED_FORM_GAP = "0 on bn-eval (by construction)"
# why the cache over-states the class-balanced methods whose source keeps BN in train mode (cRT, LWS)
CB_TRAIN_BN_GAP = ("; cache gap, its cause: the source trains stage 2 with BN in train mode on class-balanced "
                   "batches, so the backbone's BN statistics (of the train and the test features) move toward "
                   "class-balanced ones, which neither the main features (instance-batch statistics, instance "
                   "shift) nor the bn-eval set reproduce; a class-balanced shift of the test features alone is "
                   "far worse (crt 54.42: train and test statistics then disagree); closing it needs train views "
                   "under class-balanced batch statistics (not built)")
START = dict(schedule="cosine-start")    # cRT, BALMS, BagofTricks, LTWB: scheduler.step() at each epoch's start
# the repositories (at the commits) whose stage-2 scripts the method files' recipes were checked against
LOS_REPO = "Thinklab-SJTU/LOS@f449425"
CRT_REPO = "facebookresearch/classifier-balancing@f162ade"
BOT_REPO = "zhangyongshun/BagofTricks-LT@ce7859a"
BALMS_REPO = "jiawei-ren/BalancedMetaSoftmax-Classification@34a61e4"
CB_REPO = "richardaecn/class-balanced-loss@1d78572"
MISLAS_REPO = "dvlab-research/MiSLAS@0fc381e"
LTWB_REPO = "ShadeAlsha/LTR-weight-balancing@e89f292"
CRT_SCRIPT = "cRT run_networks.py"
BOT_SCRIPT = "BagofTricks-LT main/train.py"
UNVERIFIED = ("stage-2 hyper-parameters UNVERIFIED (source gives end-to-end values only): "
              "uses the stated stage-2 default (cRT budget, IB sampler)")


# ---------------------------------------------------------------------------------------------
# hyper-parameters: every declaration (generic, each loss's, each method's own)
# ---------------------------------------------------------------------------------------------

def method_params(method: Method) -> dict[str, Param]:
    """name -> declaration of every hyper-parameter ``method`` accepts: the generic ones (trained
    methods), its loss's and its own, in that order."""
    out = {} if method.closed_form else {p.name: p for p in GENERIC_PARAMS}
    if not method.closed_form:
        out.update({p.name: p for p in get_loss(method.loss).params})
    out.update({p.name: p for p in method.params})
    return out


def declarations(name: str) -> list[tuple[Param, str]]:
    """Every declaration of hyper-parameter ``name``: (Param, owner) -- generic, loss units,
    registered methods' own."""
    out = [(p, "generic") for p in GENERIC_PARAMS if p.name == name]
    out += losses_core.declarations(name)
    out += [(p, f"method '{m.name}'") for m in METHODS.values() for p in m.params if p.name == name]
    return out


def check_param(name: str, value, method: str = ""):
    """Convert and range-check one hyper-parameter; LtcacheError naming the fix if bad.

    With ``method`` (a registered method's name) its own declaration is used; without, the
    value must satisfy one declaration of ``name``."""
    if method and method in METHODS:
        decl = method_params(METHODS[method]).get(name)
        if decl is not None:
            return decl.check(value)
    decls = declarations(name)
    if not decls:
        raise LtcacheError(f"unknown hyper-parameter '{name}'" + (f" for method {method}" if method else ""))
    first = None
    for p, _ in decls:
        try:
            return p.check(value)
        except LtcacheError as exc:
            first = first or exc
    raise first


def split_key(key: str) -> tuple[str, str]:
    """``"la-loss.tau"`` -> ("la-loss", "tau"); ``"tau"`` -> ("", "tau"): a hyper-parameter name,
    short or qualified by its method (``method.param``, for a name several methods give different
    meanings, e.g. ``la-loss.tau`` and ``vs.tau``). The param part's dashes become underscores."""
    method, _, name = str(key).strip().lstrip("-").rpartition(".")
    return method.strip(), name.strip().replace("-", "_")


def join_key(method: str, name: str) -> str:
    """The inverse of :func:`split_key`: ``method.name``, or ``name`` without a method."""
    return f"{method}.{name}" if method else name


def check_key(key: str, value):
    """A ``--grid`` value of a short or qualified (``method.param``) name, converted and range-checked:
    a qualified name is checked against its method's own declaration (an unknown method is an error)."""
    method, name = split_key(key)
    if method:
        return check_param(name, value, get_method(method).name)
    return check_param(name, value)


def option_table() -> dict[str, list[tuple[Param, list[str]]]]:
    """name -> [(declaration, methods using it)] over the registered methods (generic first):
    what the ``retrain`` options and the pipeline ``[sweep]`` keys are generated from."""
    table: dict[str, list[tuple[Param, list[str]]]] = {p.name: [(p, [])] for p in GENERIC_PARAMS}
    for m in METHODS.values():
        for name, p in method_params(m).items():
            if name in GENERIC:
                continue
            rows = table.setdefault(name, [])
            for q, users in rows:
                if q == p:
                    users.append(m.name)
                    break
            else:
                rows.append((p, [m.name]))
    return table


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------

def register_method(name: str, *, loss: str, head: str = "linear", sampler: str = "ib", init: str = "stage1",
                    presets: Optional[dict] = None, source: str = "", notes: str = "",
                    params: Sequence[Param] = (), tunables: Optional[Sequence[str]] = None,
                    space: Union[Space, Sequence[Dim], None] = None, sigmoid_bias: bool = False,
                    closed_form: bool = False, steps: str = "", no_wd: Sequence[str] = (),
                    scripts: Optional[dict] = None, feature_sets: Optional[dict] = None,
                    cache_gap: str = "") -> Method:
    """Register a stage-2 method: a head, a registered loss, a sampler and an initialisation.

    ``presets``: {"cifar": {...}, "imagenet": {...}} (or one dict for both) of generic values
    (lr, wd, epochs, batch_size, schedule, momentum) and the method's hyper-parameters; what is
    not given comes from the stated stage-2 default (the cRT budget) and the declarations'
    defaults. ``params``: declarations of hyper-parameters of the method itself (not of its
    loss, e.g. a head's). ``tunables``: the order of its hyper-parameters in run names
    (default: its loss's, then ``params``). ``space``: its search space for ``ltcache tune``.
    ``steps``: batches per epoch as its source's loop has them (``floor`` int(N/B), ``ceil``,
    ``ceil+1``; default: the sampler's, :mod:`ltcache.stage2.samplers`); ``no_wd``: parameters
    trained without weight decay; ``scripts``: {preset: (script, verified against)} (or one pair
    for both presets): the script each preset's recipe follows and the repository@commit whose
    code it was checked against ("" if not). ``feature_sets``: {num_classes: set name}, the cache's
    feature set (:mod:`ltcache.cache.feature_sets`) to train on where the source runs BatchNorm in
    another mode than the cache's main features assume. ``cache_gap``: the measured gap between
    training on the cache and through the frozen backbone (``ltcache retrain --through-backbone``),
    with what it was measured on. Registering a name that exists is an error.
    """
    where = f"method '{name}'"
    METHODS.check_free(name)
    origin = origin_of(depth=2)
    loss_params = _loss_params(where, loss, head, sampler, init, closed_form)
    params = tuple(params)
    ordered = tunables is not None
    tunables, decl = _declarations(where, loss_params, params, tunables)
    full = {pre: _preset(where, pre, presets, decl, tunables, closed_form, ordered) for pre in PRESETS}
    space = _space(where, space, tunables, closed_form)
    if steps and steps not in STEP_RULES:
        raise LtcacheError(f"{where}: unknown step rule '{steps}'; use one of {', '.join(STEP_RULES)}")
    bad = [a for a in no_wd if a not in H.AFFINE_PARAMS + H.COSINE_PARAMS]
    if bad:
        raise LtcacheError(f"{where}: no_wd names {', '.join(bad)}, which no head has (W, b, s, c)")
    given_scripts = _scripts(where, scripts)
    for k, set_name in (feature_sets or {}).items():
        check_feature_set(set_name)
        if k != "*" and (not isinstance(k, int) or k < 2):
            raise LtcacheError(f"{where}: feature_sets keys are class counts (int >= 2) or '*' (any), got {k!r}")
    m = Method(name, head, loss if not closed_form else "-", sampler if not closed_form else "-",
               init if not closed_form else "-", tuple(tunables), full, source, notes, closed_form, sigmoid_bias,
               space, params, origin, steps=steps, no_wd=tuple(no_wd),
               scripts=tuple((pre, *given_scripts[pre]) for pre in PRESETS if pre in given_scripts),
               feature_sets=tuple(sorted((feature_sets or {}).items(), key=str)), cache_gap=cache_gap)
    return METHODS.register(name, m, origin)


def _loss_params(where: str, loss: str, head: str, sampler: str, init: str, closed_form: bool) -> tuple:
    """The declarations of the method's loss (none for a closed form), its parts checked as registered."""
    if closed_form:
        if head not in POSTHOC:
            raise LtcacheError(f"{where}: {POSTHOC.unknown(head)}")
        return ()
    if head not in H.HEADS:
        raise LtcacheError(f"{where}: {H.HEADS.unknown(head)}")
    if sampler not in SAMPLERS:
        raise LtcacheError(f"{where}: {SAMPLERS.unknown(sampler)}")
    if init not in INITS:
        raise LtcacheError(f"{where}: unknown init '{init}'; use stage1 or fresh")
    if loss not in losses_core.LOSSES:
        raise LtcacheError(f"{where}: unknown loss '{loss}'; register it first with @ltcache.register_loss "
                           f"(registered: {', '.join(losses_core.LOSSES)})")
    return get_loss(loss).params


def _declarations(where: str, loss_params: tuple, params: tuple, tunables: Optional[Sequence[str]]) -> tuple:
    """(the tunables in run-name order, {name: Param} of every hyper-parameter), checked against
    the declarations of the same names elsewhere."""
    losses_core._check_declared(params, where)
    for p in params:
        for other, owner in declarations(p.name):
            if (other.type, other.choices) != (p.type, p.choices):
                raise LtcacheError(f"{where}: hyper-parameter {p.name} is a {p.type.__name__} here but "
                                   f"differs in {owner}; use another name")
    own = [p.name for p in loss_params] + [p.name for p in params if p.name not in {q.name for q in loss_params}]
    if tunables is None:
        tunables = own
    elif sorted(tunables) != sorted(own):
        raise LtcacheError(f"{where}: tunables must list exactly its hyper-parameters ({', '.join(own) or 'none'})")
    return tunables, {p.name: p for p in (*loss_params, *params)}


def _preset(where: str, pre: str, presets: Optional[dict], decl: dict, tunables, closed_form: bool,
            ordered: bool = False) -> dict:
    """One preset's full values: the stated defaults, the declarations' defaults, then what is given
    (``ordered``: the method's own values in the order of ``tunables``)."""
    given = dict(presets or {})
    if given and not set(given) <= set(PRESETS):
        given = {p: given for p in PRESETS}               # one dict for both presets
    d = {} if closed_form else dict(STATED_DEFAULTS[pre])
    d.update({n: p.default for n, p in decl.items() if p.default is not None})
    d.update(given.get(pre, {}))
    allowed = set(decl) | (set() if closed_form else set(GENERIC) | {"iterations"})
    for key, value in d.items():
        if key not in allowed:
            raise LtcacheError(f"{where}: preset {pre} sets '{key}', which is not one of its hyper-parameters "
                               f"({', '.join(sorted(allowed))})")
        if value is not None and key != "iterations":
            try:
                d[key] = (decl.get(key) or method_params_generic(key)).check(value)
            except LtcacheError as exc:
                raise LtcacheError(f"{where}: preset {pre}: {exc}") from None
    if ordered:                      # an explicit tunables order: the method's own values in that order
        own = [n for n in tunables if n in d]
        d = {**{k: v for k, v in d.items() if k not in own}, **{k: d[k] for k in own}}
    missing = [n for n in tunables if n not in d or (d[n] is None and not closed_form)]
    if missing:
        raise LtcacheError(f"{where}: preset {pre} has no value for {', '.join(missing)}; give it in presets "
                           "or as Param(default=...)")
    return d


def _space(where: str, space, tunables, closed_form: bool) -> Space:
    """The method's search space, searching only hyper-parameters it has."""
    if space is None:
        space = Space()
    elif not isinstance(space, Space):
        space = Space(dims=tuple(space))
    allowed = set(tunables) | (set() if closed_form else set(GENERIC))
    bad = [n for n in space.names if n not in allowed]
    if bad:
        raise LtcacheError(f"{where}: its space searches {', '.join(bad)}, which it does not have")
    return space


def _scripts(where: str, scripts) -> dict:
    """{preset: (script, verified against)}: one pair for both presets, or keyed by preset."""
    if isinstance(scripts, dict):
        given_scripts = {pre: tuple(v) for pre, v in scripts.items()}
        if not set(given_scripts) <= set(PRESETS):
            raise LtcacheError(f"{where}: scripts is keyed by preset ({', '.join(PRESETS)}); "
                               f"got {', '.join(given_scripts)}")
        return given_scripts
    return {pre: tuple(scripts) for pre in PRESETS} if scripts else {}


def method_params_generic(name: str) -> Param:
    """The generic declaration ``name``."""
    return next(p for p in GENERIC_PARAMS if p.name == name)


# ---------------------------------------------------------------------------------------------
# search spaces (``ltcache tune``): ranges from the sources' values and ablations (docs/methods.md)
# ---------------------------------------------------------------------------------------------

def linear_dim(name: str, lo: float, hi: float, src: str) -> Dim:
    """A search dimension on a linear scale; ``src``: where its range comes from."""
    return Dim(name, "linear", lo, hi, source=src)


def log_dim(name: str, lo: float, hi: float, src: str) -> Dim:
    """A search dimension on a log scale; ``src``: where its range comes from."""
    return Dim(name, "log", lo, hi, source=src)


def choice_dim(name: str, values, src: str) -> Dim:
    """A search dimension over ``values``; ``src``: where they come from."""
    return Dim(name, "choice", choices=tuple(values), source=src)


def space(*dims: Dim) -> Space:
    """A method's own search dimensions (the generic lr / wd / epochs are added by
    :func:`method_space`)."""
    return Space(dims=tuple(dims))


# a head's hyper-parameter that several methods share (the cosine head's; a method's own ones sit in
# its file, a loss's in its loss unit)
SCALE = Param("scale", float, lo=0, lo_open=True, help="cosine head scale")
# search dimensions that several methods share (a method's own ones sit in its file)
BETA_DIM = choice_dim("beta", (0.9, 0.99, 0.999, 0.9999),
                      "CB paper's beta values; 0.9999 in LDAM-DRW, LTWB (docs/methods.md#cb)")
LDAM_MARGIN_DIM = linear_dim("margin", 0.1, 1.0, "max_m = 0.5 (docs/methods.md#ldam)")
LDAM_SCALE_DIM = log_dim("scale", 4.0, 64.0, "s = 30 (docs/methods.md#ldam)")

GENERIC_EPOCHS = choice_dim("epochs", (10, 20, 30), "the sources disagree: MiSLAS, LTWB 10; LOS 20; cRT/BoT 30 "
                         "(docs/methods.md#search-spaces)")


def method_space(method: Method, preset: str) -> Space:
    """The full search space of ``method``: its own dimensions, plus (for a trained method) lr a
    decade either side of the preset's, wd and epochs, unless the method declares them itself."""
    if method.closed_form:
        return method.space
    d = method.defaults(preset)
    own = {x.name for x in method.space.dims}
    generic = [log_dim("lr", d["lr"] / 10, d["lr"] * 10, f"the {preset} preset's lr {d['lr']:g}, a decade either side"),
               log_dim("wd", 1e-5, 1e-1, "cRT / MiSLAS 5e-4 and 2e-4, LTWB 0.1; LOS uses 0 (docs/methods.md#search-spaces)"),
               GENERIC_EPOCHS]
    extra: tuple = ()
    if method.origin != "built-in":          # a plugin's own hyper-parameters join the search
        from ltcache.stage2.space import param_dim
        decl = {p.name: p for p in (*(get_loss(method.loss).params if not method.closed_form else ()),
                                    *method.params)}
        dims = [param_dim(decl[n]) for n in method.tunables if n not in own and n in decl]
        extra = tuple(x for x in dims if x is not None)
    return Space(dims=tuple(x for x in generic if x.name not in own) + method.space.dims + extra)


def get_method(name: str) -> Method:
    """The registry entry ``name``; unknown names suggest the closest ones."""
    return METHODS.get(name)


def choose_preset(num_classes: int, feature_dim: int, preset: Optional[str] = None) -> str:
    """``preset`` if given, else cifar for K <= 100 and D <= 512, imagenet otherwise."""
    if preset:
        if preset not in PRESETS:
            raise LtcacheError(f"unknown preset '{preset}'; use cifar or imagenet")
        return preset
    return "cifar" if num_classes <= 100 and feature_dim <= 512 else "imagenet"


def validate_overrides(method: Method, overrides: Optional[dict]) -> dict:
    """Check that every override belongs to ``method`` and is in range; returns converted values."""
    allowed = set(method.tunables) | (set() if method.closed_form else set(GENERIC))
    out = {}
    for key, value in (overrides or {}).items():
        if key not in allowed:
            own = ", ".join("--" + k.replace("_", "-") for k in sorted(allowed)) or "none"
            raise LtcacheError(f"option --{key.replace('_', '-')} does not apply to method {method.name} "
                               f"(its options: {own})")
        out[key] = check_param(key, value, method.name)
    return out


def resolve_params(method: Method, preset: str, overrides: Optional[dict], n_train: int) -> dict:
    """The method's full hyper-parameters: preset defaults, then checked overrides.

    An override that is neither generic nor one of the method's own tunables is refused.
    """
    params = method.defaults(preset)
    params.update(validate_overrides(method, overrides))
    if params.get("iterations") and (overrides or {}).get("epochs") is None and not method.closed_form:
        steps = math.ceil(n_train / params["batch_size"])
        params["epochs"] = math.ceil(params["iterations"] / steps)
    params.pop("iterations", None)
    return params


def run_name(method: Method, params: dict, overrides: Optional[dict]) -> str:
    """``los[delta=0.98]``: the method's tunables plus any overridden generic option."""
    keys = [k for k in method.tunables if params.get(k) is not None]
    keys += [k for k in (overrides or {}) if k not in keys]
    if not keys:
        return method.name
    return f"{method.name}[{','.join(f'{k}={params[k]:g}' if isinstance(params[k], float) else f'{k}={params[k]}' for k in keys)}]"


# ---------------------------------------------------------------------------------------------
# the built-in methods: one module each in this package, registered in this order (the order of
# `ltcache methods` and `bench --all-methods`); a module not listed here follows, by name
# ---------------------------------------------------------------------------------------------

BUILT_IN = ("ce", "crt", "sqrt", "progressive", "lws", "tau_norm", "ncm", "cosine", "posthoc_la", "la_loss",
            "balanced_softmax", "ldam", "ldam_drw", "focal", "cb", "cb_focal", "cb_sigmoid", "ls", "los", "mislas",
            "maxnorm", "marc", "vs", "seesaw", "lade", "poly1")


def _import_built_ins() -> None:
    """Import every method module of this package: those of :data:`BUILT_IN` in its order, then the rest."""
    import importlib
    import pkgutil
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for mod in [m for m in BUILT_IN if m in found] + [m for m in found if m not in BUILT_IN]:
        importlib.import_module(f"{__name__}.{mod}")


_import_built_ins()
