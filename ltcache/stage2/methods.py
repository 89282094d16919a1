"""The method registry: every stage-2 method as data (head, loss, sampler, defaults, source).

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

Every method is one ``register_method(...)`` call below (a plugin adds its own the same way,
see :mod:`ltcache.plugins`); its hyper-parameters are declared once, by its loss unit
(``ltcache/stage2/losses/``), by the method itself (``params=``) or as generic
(:mod:`ltcache.stage2.params`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, origin_of
from ltcache.stage2 import head_kinds as H
from ltcache.stage2.closed_form import POSTHOC
from ltcache.stage2.losses import _core as losses_core
from ltcache.stage2.losses import get_loss
from ltcache.stage2.params import GENERIC, GENERIC_PARAMS, SCHEDULES, Param  # noqa: F401  (re-exported)
from ltcache.stage2.samplers import SAMPLERS, STEP_RULES
from ltcache.stage2.space import Dim, Space

INITS = ("stage1", "fresh")
PRESETS = ("cifar", "imagenet")


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
START = dict(schedule="cosine-start")    # cRT, BALMS, BagofTricks, LTWB: scheduler.step() at each epoch's start
# the repositories (at the commits) whose stage-2 scripts the recipes below were checked against
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
                    scripts: Optional[dict] = None) -> Method:
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
    code it was checked against ("" if not). Registering a name that exists is an error.
    """
    where = f"method '{name}'"
    METHODS.check_free(name)
    origin = origin_of(depth=2)
    loss_params = _loss_params(where, loss, head, sampler, init, closed_form)
    params = tuple(params)
    tunables, decl = _declarations(where, loss_params, params, tunables)
    full = {pre: _preset(where, pre, presets, decl, tunables, closed_form) for pre in PRESETS}
    space = _space(where, space, tunables, closed_form)
    if steps and steps not in STEP_RULES:
        raise LtcacheError(f"{where}: unknown step rule '{steps}'; use one of {', '.join(STEP_RULES)}")
    bad = [a for a in no_wd if a not in H.AFFINE_PARAMS + H.COSINE_PARAMS]
    if bad:
        raise LtcacheError(f"{where}: no_wd names {', '.join(bad)}, which no head has (W, b, s, c)")
    given_scripts = _scripts(where, scripts)
    m = Method(name, head, loss if not closed_form else "-", sampler if not closed_form else "-",
               init if not closed_form else "-", tuple(tunables), full, source, notes, closed_form, sigmoid_bias,
               space, params, origin, steps=steps, no_wd=tuple(no_wd),
               scripts=tuple((pre, *given_scripts[pre]) for pre in PRESETS if pre in given_scripts))
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


def _preset(where: str, pre: str, presets: Optional[dict], decl: dict, tunables, closed_form: bool) -> dict:
    """One preset's full values: the stated defaults, the declarations' defaults, then what is given."""
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

def _lin(name, lo, hi, src):
    return Dim(name, "linear", lo, hi, source=src)


def _log(name, lo, hi, src):
    return Dim(name, "log", lo, hi, source=src)


def _choice(name, values, src):
    return Dim(name, "choice", choices=tuple(values), source=src)


BETA = _choice("beta", (0.9, 0.99, 0.999, 0.9999), "CB paper's beta values; 0.9999 in LDAM-DRW, LTWB (docs/methods.md#cb)")
TAU_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(21))     # cRT tau_norm.py: linspace(0, 2, 21)
# post-hoc LA: Menon et al.'s tau = 1; on the bundled CIFAR-10-LT cache the val pick sat on the top
# of 0..2, so its candidates reach 3 (0.1 steps; a --budget below 31 spreads them evenly)
LA_TAU_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(31))


def space(*dims: Dim) -> Space:
    """A method's own search dimensions (the generic lr / wd / epochs are added by
    :func:`method_space`)."""
    return Space(dims=tuple(dims))


# hyper-parameters of a head or a closed form (the losses declare theirs in their own files)
SCALE = Param("scale", float, lo=0, lo_open=True, help="cosine head scale")
LR_FACTOR = Param("lr_factor", float, lo=0, help="MiSLAS lr ratio of W, b")
MAXNORM_THRESH = Param("maxnorm_thresh", float, lo=0, help="LTWB MaxNorm threshold")
TAU_NORM = Param("tau", float, lo=0, help="tau-norm exponent, chosen on val unless given")
TAU_POSTHOC = Param("tau", float, lo=0, help="post-hoc logit adjustment tau")

# ---------------------------------------------------------------------------------------------
# the built-in methods
# ---------------------------------------------------------------------------------------------

register_method("ce", loss="ce", presets={"cifar": LOS_CIFAR, "imagenet": CRT_IMNET},
                source="LOS main_stage2.py with delta=0 (docs/methods.md#ce)",
                notes="CE re-train from the stage-1 head, LOS protocol; ImageNet preset: cRT budget (UNVERIFIED)",
                scripts={"cifar": ("LOS main_stage2.py", LOS_REPO)})
register_method("crt", loss="ce", sampler="cb", init="fresh",
                presets={"cifar": dict(CRT_CIFAR, **START), "imagenet": dict(CRT_IMNET, **START)},
                source="cRT config/*/cls_crt.yaml; BagofTricks cRT/cifar100_im100.yaml (docs/methods.md#crt)",
                notes="fresh nn.Linear head, ClassAwareSampler(4); scheduler stepped at each epoch's start, int(N/B) "
                      "batches (both scripts); cifar: BoT's warmup+step schedule replaced by cosine (not measured), "
                      "cRT's ClassAwareSampler(4) instead of BoT's class-uniform draw with replacement (bundled "
                      "CIFAR-10-LT cache, 5 seeds: 73.11 +- 0.06 vs 73.04 +- 0.07 with BoT's draw); the class "
                      "streams restart each epoch",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", cRT/cifar100_im100.yaml", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", cls_crt.yaml", CRT_REPO)})
register_method("sqrt", loss="ce", sampler="sqrt", init="fresh",
                presets={"cifar": dict(CRT_CIFAR, **START), "imagenet": dict(CRT_IMNET, **START)},
                source="cRT MixedPrioritizedSampler nroot=2 (docs/methods.md#sqrt)",
                notes="fresh nn.Linear head; no stage-2 config in the source: cRT values (UNVERIFIED); cRT's loop: "
                      "scheduler stepped at each epoch's start, int(N/B) batches",
                steps="floor", scripts=(CRT_SCRIPT, CRT_REPO))
register_method("progressive", loss="ce", sampler="progressive", init="fresh",
                presets={"cifar": dict(CRT_CIFAR, **START), "imagenet": dict(CRT_IMNET, **START)},
                source="cRT feat_shift.yaml / BoT progressive (docs/methods.md#progressive)",
                notes="fresh nn.Linear head; cRT values (UNVERIFIED as stage 2); scheduler stepped at each epoch's start, "
                      "int(N/B) batches (both scripts); balanced weight linspace(0, 1, E) (cRT ClassPrioritySampler) on "
                      "both presets: BoT's (e+1)/E (1-based epochs, also 1 at the end) is not used (bundled cache, "
                      "5 seeds: 72.90 +- 0.09 vs 72.85 +- 0.07 with BoT's); draws with replacement inside a class "
                      "(cRT cycles a per-class permutation)",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", lib/dataset/cao_cifar.py", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", data/ClassPrioritySampler.py", CRT_REPO)})
register_method("lws", head="lws", loss="ce", sampler="cb",
                presets={"cifar": dict(CRT_CIFAR, **START), "imagenet": dict(CRT_IMNET, epochs=5, **START)},
                source="cRT cls_lws.yaml, TauNormClassifier.py; BoT LWS/cifar100_im100.yaml (docs/methods.md#lws)",
                notes="s in R^K on the frozen stage-1 W, b (bias scaled too); wd applies to s; scheduler stepped at each "
                      "epoch's start, int(N/B) batches (both scripts); cifar: BoT's warmup+step schedule replaced by "
                      "cosine (not measured), cRT's ClassAwareSampler(4) instead of BoT's class-uniform draw (bundled "
                      "cache, 5 seeds: 72.82 +- 0.12 vs 72.93 +- 0.08 with BoT's draw); the class streams restart "
                      "each epoch",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", LWS/cifar100_im100.yaml", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", cls_lws.yaml", CRT_REPO)})
register_method("tau-norm", head="tau-norm", loss="-", closed_form=True, params=(TAU_NORM,),
                presets={"cifar": {"tau": None}, "imagenet": {"tau": None}}, source="cRT tau_norm.py (docs/methods.md#tau-norm)",
                notes="from the stage-1 weights, bias dropped (cRT); tau from linspace(0,2,21) chosen on val unless --tau",
                space=Space(candidates={"tau": TAU_CANDIDATES}))
register_method("ncm", head="ncm", loss="-", closed_form=True, presets={"cifar": {}, "imagenet": {}},
                source="cRT KNNClassifier.py cl2n + l2 (docs/methods.md#ncm)", notes="no head trained or read: centroids from the clean train view")
register_method("cosine", head="cosine", loss="ce", init="fresh", params=(SCALE,),
                presets={"cifar": dict(CRT_CIFAR, scale=16.0), "imagenet": dict(CRT_IMNET, scale=16.0)},
                source="cRT CosNormClassifier (s=16) / LDAM NormedLinear (docs/methods.md#cosine)",
                notes="z = s cos(f, w_j), no squash, unit-row fresh init; " + UNVERIFIED,
                space=space(_log("scale", 4.0, 64.0, "cRT s=16, LDAM s=30 (docs/methods.md#cosine)")))
register_method("posthoc-la", head="posthoc-la", loss="-", closed_form=True, params=(TAU_POSTHOC,),
                presets={"cifar": {"tau": 1.0}, "imagenet": {"tau": 1.0}},
                source="google-research logit_adjustment (docs/methods.md#posthoc-la)", notes="z - tau log pi on the stage-1 head",
                space=Space(candidates={"tau": LA_TAU_CANDIDATES}))
register_method("la-loss", loss="la", presets={"cifar": dict(CRT_CIFAR, tau=1.0), "imagenet": dict(CRT_IMNET, tau=1.0)},
                source="google-research logit_adjustment (docs/methods.md#la-loss)", notes="from the stage-1 head; " + UNVERIFIED,
                space=space(_lin("tau", 0.0, 2.0, "tau = 1 (docs/methods.md#la-loss); 0 = plain CE")))
register_method("balanced-softmax", loss="balanced-softmax", init="fresh",
                presets={"cifar": dict(lr=0.1, wd=5e-4, batch_size=512, epochs=None, iterations=2000,
                                       schedule="cosine-start", momentum=0.9),
                         "imagenet": dict(lr=0.4, wd=5e-4, epochs=10, batch_size=512, schedule="cosine-start",
                                          momentum=0.9)},
                source="BALMS config/*/decouple_balanced_softmax*.yaml (docs/methods.md#balanced-softmax)",
                notes="fresh nn.Linear head; CIFAR: 2000 iterations -> epochs = ceil(2000 / ceil(N/B)) (IF200 config; IF100 "
                      "UNVERIFIED); BALMS's loop: scheduler stepped at each epoch's start, int(N/B) batches an epoch",
                steps="floor", scripts=("BALMS run_networks.py, decouple_balanced_softmax*.yaml", BALMS_REPO))
register_method("ldam", head="cosine", loss="ldam", init="fresh", params=(SCALE,),
                presets={"cifar": dict(CRT_CIFAR, margin=0.5, scale=30.0), "imagenet": dict(CRT_IMNET, margin=0.5, scale=30.0)},
                source="LDAM-DRW losses.py (docs/methods.md#ldam)", notes="fresh cosine head (unit rows); s (cos - m_y), m_j = 0.5 (n_min/n_j)^(1/4); " + UNVERIFIED,
                space=space(_lin("margin", 0.1, 1.0, "max_m = 0.5 (docs/methods.md#ldam)"), _log("scale", 4.0, 64.0, "s = 30 (docs/methods.md#ldam)")))
register_method("ldam-drw", head="cosine", loss="ldam-drw", init="fresh", params=(SCALE,),
                tunables=("margin", "scale", "beta"),
                presets={"cifar": dict(CRT_CIFAR, margin=0.5, scale=30.0, beta=0.9999),
                         "imagenet": dict(CRT_IMNET, margin=0.5, scale=30.0, beta=0.9999)},
                source="LDAM-DRW losses.py, cifar_train.py (docs/methods.md#ldam-drw)",
                notes="fresh cosine head (unit rows); DRW = CB weights (beta) for the whole re-training, PyTorch weighted mean; " + UNVERIFIED,
                space=space(_lin("margin", 0.1, 1.0, "max_m = 0.5 (docs/methods.md#ldam)"), _log("scale", 4.0, 64.0, "s = 30 (docs/methods.md#ldam)"), BETA))
register_method("focal", loss="focal", presets={"cifar": dict(CRT_CIFAR, gamma=1.0), "imagenet": dict(CRT_IMNET, gamma=1.0)},
                source="LDAM-DRW FocalLoss (docs/methods.md#focal)", notes="from the stage-1 head; (1-p)^gamma CE, p = exp(-CE); " + UNVERIFIED,
                space=space(_lin("gamma", 0.0, 3.0, "gamma = 1 (LDAM-DRW), 2 (original focal) (docs/methods.md#focal)")))
register_method("cb", loss="cb", presets={"cifar": dict(CRT_CIFAR, beta=0.9999), "imagenet": dict(CRT_IMNET, beta=0.9999)},
                source="class-balanced-loss (TF) src/cifar_main.py (docs/methods.md#cb)",
                notes="from the stage-1 head; softmax form, TF normalisation sum w_y CE / B; " + UNVERIFIED, space=space(BETA))
register_method("cb-focal", loss="cb-focal", sigmoid_bias=True,
                presets={"cifar": dict(CRT_CIFAR, beta=0.9999, gamma=1.0), "imagenet": dict(CRT_IMNET, beta=0.9999, gamma=1.0)},
                source="class-balanced-loss (TF) sigmoid focal (docs/methods.md#cb-focal)",
                notes="W from the stage-1 head, bias init -log(K-1), no weight decay on the bias (the script's "
                      "regularisation); " + UNVERIFIED,
                no_wd=("b",), scripts=("class-balanced-loss src/cifar_main.py (loss, bias init, bias decay)", CB_REPO),
                space=space(BETA, _lin("gamma", 0.0, 3.0, "gamma = 1 (CB script), 2 (original focal) (docs/methods.md#cb-focal)")))
register_method("cb-sigmoid", loss="cb-sigmoid", sigmoid_bias=True,
                presets={"cifar": dict(CRT_CIFAR, beta=0.9999), "imagenet": dict(CRT_IMNET, beta=0.9999)},
                source="class-balanced-loss (TF) sigmoid (docs/methods.md#cb-sigmoid)",
                notes="W from the stage-1 head, bias init -log(K-1), no weight decay on the bias (the script's "
                      "regularisation); " + UNVERIFIED,
                no_wd=("b",), scripts=("class-balanced-loss src/cifar_main.py (loss, bias init, bias decay)", CB_REPO),
                space=space(BETA))
register_method("ls", loss="ls", presets={"cifar": dict(CRT_CIFAR, eps=0.1), "imagenet": dict(CRT_IMNET, eps=0.1)},
                source="PyTorch label_smoothing (docs/methods.md#ls)", notes="from the stage-1 head; eps is free (0.1 stated default); " + UNVERIFIED,
                space=space(_lin("eps", 0.0, 0.5, "0.1 stated default (docs/methods.md#ls); LOS is eps near 1")))
register_method("los", loss="los", presets={"cifar": dict(LOS_CIFAR, delta=0.98), "imagenet": dict(LOS_CIFAR, delta=0.98)},
                source="LOS main_stage2.py, utils/config.py (docs/methods.md#los)",
                notes="from the stage-1 head; CE with label_smoothing delta; ImageNet values not in the repo: CIFAR values (UNVERIFIED)",
                scripts=("LOS main_stage2.py", LOS_REPO),
                space=space(_lin("delta", 0.0, 0.99, "0.98 at K = 100 (docs/methods.md#los); the target q_y = 1 - delta (K-1)/K "
                                 "flattens faster at small K, so the range reaches down to plain CE")))
register_method("mislas", head="mislas", loss="las", sampler="cb", params=(LR_FACTOR,),
                presets={"cifar": dict(lr=0.1, wd=2e-4, epochs=10, batch_size=128, schedule="cosine", momentum=0.9,
                                       eps_head=0.4, eps_tail=0.1, shape="concave", lr_factor=0.2),
                         "imagenet": dict(lr=0.1, wd=5e-4, epochs=10, batch_size=256, schedule="cosine", momentum=0.9,
                                          eps_head=0.3, eps_tail=0.0, shape="concave", lr_factor=0.05)},
                source="MiSLAS config/*/*_stage2_mislas.yaml (docs/methods.md#mislas)",
                notes="from the stage-1 head; cifar = CIFAR-100 IF100 row (CIFAR-10 IF100: eps 0.3/0.0, lr_factor 0.5); BN shift not "
                      "reproducible on a cache; ceil(N/B) + 1 class-balanced batches an epoch (the script's `if i > "
                      "end_steps: break`); the class and per-class streams restart each epoch",
                steps="ceil+1", scripts=("MiSLAS train_stage2.py, datasets/sampler.py", MISLAS_REPO),
                space=space(_lin("eps_head", 0.0, 0.5, "0.2-0.4 in the MiSLAS configs (docs/methods.md#mislas)"),
                            _lin("eps_tail", 0.0, 0.2, "0.0-0.1 in the MiSLAS configs (docs/methods.md#mislas)"),
                            _log("lr_factor", 0.05, 0.5, "0.05-0.5 in the MiSLAS configs (docs/methods.md#mislas)")))
register_method("maxnorm", loss="ltwb-cb", params=(MAXNORM_THRESH,),
                presets={"cifar": dict(LTWB_CIFAR, beta=0.9999, maxnorm_thresh=0.1, **START),
                         "imagenet": dict(LTWB_CIFAR, beta=0.9999, maxnorm_thresh=0.1, **START)},
                source="LTWB demo2_second-stage-training.py, utils/regularizers.py (docs/methods.md#maxnorm)",
                notes="from the stage-1 head; CB 'softmax' = BCE on softmax, wd 0.1, MaxNorm once per epoch; scheduler "
                      "stepped at each epoch's start (utils/trainval.py); ImageNet UNVERIFIED (CIFAR values)",
                scripts=("LTWB demo2_second-stage-training.py, utils/trainval.py, utils/regularizers.py", LTWB_REPO),
                space=space(_lin("maxnorm_thresh", 0.0, 0.5, "thresh = 0.1 (docs/methods.md#maxnorm)"),
                            _log("wd", 1e-3, 1.0, "LTWB's wd 0.1 was chosen by grid search (docs/methods.md#maxnorm)")))
register_method("marc", head="marc", loss="grw", presets={"cifar": dict(CRT_CIFAR, rho=1.2), "imagenet": dict(CRT_IMNET, rho=1.2)},
                source="MARC official code MARCLinear + GRWCrossEntropyLoss (docs/methods.md#marc)",
                notes="a z + b ||w|| on the frozen stage-1 head, GRW exponent 1.2 (code default); sampler/epochs/lr UNVERIFIED: stated default",
                space=space(_lin("rho", 0.0, 2.0, "exp_scale 1.2 (docs/methods.md#marc)")))
register_method("vs", loss="vs", presets={"cifar": dict(CRT_CIFAR, gamma=0.2, tau=1.2), "imagenet": dict(CRT_IMNET, gamma=0.3, tau=1.0)},
                source="VS-Loss class_imbalance/losses.py (docs/methods.md#vs)",
                notes="from the stage-1 head; cifar: README CIFAR-10 example; imagenet: parser defaults; " + UNVERIFIED,
                space=space(_lin("gamma", 0.0, 0.5, "0.2 (README CIFAR-10), 0.3 (parser) (docs/methods.md#vs)"),
                            _lin("tau", 0.0, 2.0, "1.2 (README CIFAR-10), 1.0 (parser) (docs/methods.md#vs)")))
register_method("seesaw", loss="seesaw", presets={"cifar": dict(CRT_CIFAR, p=0.8, q=2.0), "imagenet": dict(CRT_IMNET, p=0.8, q=2.0)},
                source="mmdet seesaw_loss.py (docs/methods.md#seesaw)", notes="from the stage-1 head; static class counts instead of cumulative; " + UNVERIFIED,
                space=space(_lin("p", 0.0, 1.5, "p = 0.8 (docs/methods.md#seesaw)"), _lin("q", 0.0, 3.0, "q = 2 (docs/methods.md#seesaw)")))
register_method("lade", loss="lade", presets={"cifar": dict(CRT_CIFAR, alpha=0.1, lam=0.01), "imagenet": dict(CRT_IMNET, alpha=0.05, lam=0.5)},
                source="hyperconnect/LADE loss/LADELoss.py, README (docs/methods.md#lade)", notes="from the stage-1 head; PriorCE + alpha LADER; " + UNVERIFIED,
                space=space(_log("alpha", 0.005, 0.5, "0.005-0.1 in the LADE README (docs/methods.md#lade)"),
                            _log("lam", 0.005, 1.0, "0.01-0.5 in the LADE README (docs/methods.md#lade)")))
register_method("poly1", loss="poly1", presets={"cifar": LOS_CIFAR, "imagenet": CRT_IMNET},
                source="Leng et al., PolyLoss, ICLR 2022 (docs/methods.md#poly1)",
                notes="from the stage-1 head; CE + epsilon (1 - p_y), epsilon = 1 (the paper's default); generic CE budgets (UNVERIFIED)",
                space=space(_lin("epsilon", -1.0, 3.0, "epsilon = 1 the Poly-1 default; -1 cancels the first "
                                 "polynomial term of CE (Leng et al.)")))


GENERIC_EPOCHS = _choice("epochs", (10, 20, 30), "the sources disagree: MiSLAS, LTWB 10; LOS 20; cRT/BoT 30 "
                         "(docs/methods.md#search-spaces)")


def method_space(method: Method, preset: str) -> Space:
    """The full search space of ``method``: its own dimensions, plus (for a trained method) lr a
    decade either side of the preset's, wd and epochs, unless the method declares them itself."""
    if method.closed_form:
        return method.space
    d = method.defaults(preset)
    own = {x.name for x in method.space.dims}
    generic = [_log("lr", d["lr"] / 10, d["lr"] * 10, f"the {preset} preset's lr {d['lr']:g}, a decade either side"),
               _log("wd", 1e-5, 1e-1, "cRT / MiSLAS 5e-4 and 2e-4, LTWB 0.1; LOS uses 0 (docs/methods.md#search-spaces)"),
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
