"""The method registry: every stage-2 method as data (head, loss, sampler, defaults, source).

Hyper-parameters come from METHODS.md (the commit each was read from is listed there).
Where a method's source only has end-to-end values (marked UNVERIFIED in METHODS.md), the
preset uses the **stated stage-2 default** below and the entry's ``notes`` say so:

* cifar    stage-1 init, instance-balanced, 30 epochs, lr 0.1, wd 5e-4, batch 128, cosine --
           the cRT/BagofTricks CIFAR-100-LT stage-2 budget (METHODS §4), which METHODS.md
           itself suggests reusing where nothing else is known.
* imagenet stage-1 init, instance-balanced, 10 epochs, lr 0.2, wd 5e-4, batch 512, cosine --
           the cRT ImageNet-LT stage-2 budget.

All presets use the per-epoch cosine schedule of LOS/MiSLAS (``cosine``); cRT, BALMS and
LTWB stepped it at the start of each epoch (``--schedule cosine-start`` reproduces that).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Optional

from ltcache.errors import LtcacheError
from ltcache.stage2.space import Dim, Space

# ---------------------------------------------------------------------------------------------
# hyper-parameters: name -> (type, check, description)
# ---------------------------------------------------------------------------------------------

GENERIC = ("lr", "wd", "epochs", "batch_size", "schedule", "momentum")


def _rng(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = (v < hi if hi_open else v <= hi) if hi is not None else True
        return ok_lo and ok_hi
    lo_s = "(" if lo_open else "["
    hi_s = (")" if hi_open else "]") if hi is not None else ")"
    return check, f"{lo_s}{lo}, {hi if hi is not None else 'inf'}{hi_s}"


PARAMS: dict[str, tuple] = {
    "lr": (float, _rng(0, None), "learning rate"),
    "wd": (float, _rng(0, None), "weight decay"),
    "epochs": (int, _rng(1, None), "epochs"),
    "batch_size": (int, _rng(1, None), "batch size"),
    "momentum": (float, _rng(0, 1, hi_open=True), "SGD momentum"),
    "schedule": (str, (lambda v: v in ("cosine", "cosine-start", "constant"), "{cosine, cosine-start, constant}"),
                 "lr schedule"),
    "delta": (float, _rng(0, 1), "LOS label over-smoothing"),
    "eps": (float, _rng(0, 1), "label smoothing"),
    "eps_head": (float, _rng(0, 1), "MiSLAS smoothing of the most frequent class"),
    "eps_tail": (float, _rng(0, 1), "MiSLAS smoothing of the rarest class"),
    "shape": (str, (lambda v: v in ("concave", "linear", "convex"), "{concave, linear, convex}"),
              "MiSLAS smoothing shape"),
    "gamma": (float, _rng(0, None), "focal / VS exponent"),
    "beta": (float, _rng(0, 1, hi_open=True), "class-balanced effective-number beta"),
    "tau": (float, _rng(0, None), "logit adjustment / tau-norm exponent"),
    "margin": (float, _rng(0, None), "LDAM largest margin"),
    "scale": (float, _rng(0, None, lo_open=True), "cosine head scale"),
    "lr_factor": (float, _rng(0, None), "MiSLAS lr ratio of W, b"),
    "maxnorm_thresh": (float, _rng(0, None), "LTWB MaxNorm threshold"),
    "alpha": (float, _rng(0, None), "LADE regulariser weight"),
    "lam": (float, _rng(0, None), "LADE lambda"),
    "p": (float, _rng(0, None), "Seesaw mitigation exponent"),
    "q": (float, _rng(0, None), "Seesaw compensation exponent"),
    "rho": (float, _rng(0, None), "GRW exponent (MARC)"),
}


def check_param(name: str, value, method: str = ""):
    """Convert and range-check one hyper-parameter; LtcacheError naming the fix if bad."""
    if name not in PARAMS:
        raise LtcacheError(f"unknown hyper-parameter '{name}'" + (f" for method {method}" if method else ""))
    typ, (check, rng), desc = PARAMS[name]
    try:
        v = typ(value) if not (typ is int and isinstance(value, float) and not value.is_integer()) else None
        if v is None:
            raise ValueError
    except (TypeError, ValueError):
        raise LtcacheError(f"{name} ({desc}) must be a {typ.__name__}, got '{value}'") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise LtcacheError(f"{name} ({desc}) must be finite, got {v}")
    if not check(v):
        raise LtcacheError(f"{name} ({desc}) must be in {rng}, got {v}")
    return v


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One stage-2 method, as data."""

    name: str
    head: str              # linear | cosine | lws | mislas | marc | tau-norm | posthoc-la | ncm
    loss: str              # a losses.build_loss kind ("-" for closed-form methods)
    sampler: str           # ib | cb | sqrt | progressive ("-" for closed form)
    init: str              # stage1 | fresh ("-" for closed form)
    tunables: tuple        # the method's own hyper-parameters (CLI options)
    presets: dict          # {"cifar": {...}, "imagenet": {...}}: generic + tunable defaults
    source: str
    notes: str = ""
    closed_form: bool = False
    sigmoid_bias: bool = False     # bias initialised to -log(K-1) (CB repo sigmoid/focal)
    space: Space = Space()         # the search space of the method's own hyper-parameters (tune)

    def defaults(self, preset: str) -> dict:
        """All hyper-parameters of ``preset`` (generic and the method's own)."""
        if preset not in self.presets:
            raise LtcacheError(f"unknown preset '{preset}'; use one of {', '.join(self.presets)}")
        return dict(self.presets[preset])


CRT_CIFAR = dict(lr=0.1, wd=5e-4, epochs=30, batch_size=128, schedule="cosine", momentum=0.9)
CRT_IMNET = dict(lr=0.2, wd=5e-4, epochs=10, batch_size=512, schedule="cosine", momentum=0.9)
LOS_CIFAR = dict(lr=5e-4, wd=0.0, epochs=20, batch_size=64, schedule="cosine", momentum=0.9)
LTWB_CIFAR = dict(lr=0.01, wd=0.1, epochs=10, batch_size=64, schedule="cosine", momentum=0.9)
UNVERIFIED = ("stage-2 hyper-parameters UNVERIFIED (source gives end-to-end values only): "
              "uses the stated stage-2 default (cRT budget, stage-1 init, IB)")


# ---------------------------------------------------------------------------------------------
# search spaces (``ltcache tune``): ranges from the sources' values and ablations (METHODS.md)
# ---------------------------------------------------------------------------------------------

def _lin(name, lo, hi, src):
    return Dim(name, "linear", lo, hi, source=src)


def _log(name, lo, hi, src):
    return Dim(name, "log", lo, hi, source=src)


def _choice(name, values, src):
    return Dim(name, "choice", choices=tuple(values), source=src)


BETA = _choice("beta", (0.9, 0.99, 0.999, 0.9999), "CB paper's beta values; 0.9999 in LDAM-DRW, LTWB (§13, §15)")
TAU_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(21))     # cRT tau_norm.py: linspace(0, 2, 21)
# post-hoc LA: Menon et al.'s tau = 1; on the bundled CIFAR-10-LT cache the val pick sat on the top
# of 0..2, so its candidates reach 3 (0.1 steps; a --budget below 31 spreads them evenly)
LA_TAU_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(31))


def space(*dims: Dim) -> Space:
    """A method's own search dimensions (the generic lr / wd / epochs are added by
    :func:`method_space`)."""
    return Space(dims=tuple(dims))


def _m(name, head, loss, sampler, init, tunables, cifar, imagenet, source, notes="", **kw) -> Method:
    return Method(name, head, loss, sampler, init, tuple(tunables), {"cifar": cifar, "imagenet": imagenet},
                  source, notes, **kw)


_CLOSED = dict(closed_form=True)

METHODS: dict[str, Method] = {m.name: m for m in [
    _m("ce", "linear", "ce", "ib", "stage1", [], LOS_CIFAR, CRT_IMNET,
       "LOS main_stage2.py with delta=0 (METHODS §3)",
       "CE re-train from the stage-1 head, LOS protocol; ImageNet preset: cRT budget (UNVERIFIED)"),
    _m("crt", "linear", "ce", "cb", "fresh", [], CRT_CIFAR, CRT_IMNET,
       "cRT config/*/cls_crt.yaml; BagofTricks cRT/cifar100_im100.yaml (METHODS §4)",
       "fresh nn.Linear head, ClassAwareSampler(4); BoT's CIFAR warmup+step schedule replaced by cosine"),
    _m("sqrt", "linear", "ce", "sqrt", "fresh", [], CRT_CIFAR, CRT_IMNET,
       "cRT MixedPrioritizedSampler nroot=2 (METHODS §5)", "no stage-2 config in the source: cRT values (UNVERIFIED)"),
    _m("progressive", "linear", "ce", "progressive", "fresh", [], CRT_CIFAR, CRT_IMNET,
       "cRT feat_shift.yaml / BoT progressive (METHODS §2)", "cRT values (UNVERIFIED as stage 2)"),
    _m("lws", "lws", "ce", "cb", "stage1", [], CRT_CIFAR, dict(CRT_IMNET, epochs=5),
       "cRT cls_lws.yaml, TauNormClassifier.py; BoT LWS/cifar100_im100.yaml (METHODS §6)",
       "s in R^K on the frozen stage-1 W, b (bias scaled too); wd applies to s"),
    _m("tau-norm", "tau-norm", "-", "-", "-", ["tau"], {"tau": None}, {"tau": None},
       "cRT tau_norm.py (METHODS §7)", "bias dropped (cRT); tau from linspace(0,2,21) chosen on val unless --tau",
       space=Space(candidates={"tau": TAU_CANDIDATES}), **_CLOSED),
    _m("ncm", "ncm", "-", "-", "-", [], {}, {}, "cRT KNNClassifier.py cl2n + l2 (METHODS §8)",
       "centroids from the clean train view", **_CLOSED),
    _m("cosine", "cosine", "ce", "ib", "fresh", ["scale"], dict(CRT_CIFAR, scale=16.0), dict(CRT_IMNET, scale=16.0),
       "cRT CosNormClassifier (s=16) / LDAM NormedLinear (METHODS §9)",
       "z = s cos(f, w_j), no squash, unit-row fresh init; " + UNVERIFIED,
       space=space(_log("scale", 4.0, 64.0, "cRT s=16, LDAM s=30 (§9, §13)"))),
    _m("posthoc-la", "posthoc-la", "-", "-", "-", ["tau"], {"tau": 1.0}, {"tau": 1.0},
       "google-research logit_adjustment (METHODS §10)", "z - tau log pi on the stage-1 head",
       space=Space(candidates={"tau": LA_TAU_CANDIDATES}), **_CLOSED),
    _m("la-loss", "linear", "la", "ib", "stage1", ["tau"], dict(CRT_CIFAR, tau=1.0), dict(CRT_IMNET, tau=1.0),
       "google-research logit_adjustment (METHODS §11)", UNVERIFIED,
       space=space(_lin("tau", 0.0, 2.0, "tau = 1 (§11); 0 = plain CE"))),
    _m("balanced-softmax", "linear", "balanced-softmax", "ib", "fresh", [],
       dict(lr=0.1, wd=5e-4, batch_size=512, epochs=None, iterations=2000, schedule="cosine", momentum=0.9),
       dict(lr=0.4, wd=5e-4, epochs=10, batch_size=512, schedule="cosine", momentum=0.9),
       "BALMS config/*/decouple_balanced_softmax*.yaml (METHODS §12)",
       "CIFAR: 2000 iterations -> epochs = ceil(2000 / steps per epoch) (IF200 config; IF100 UNVERIFIED)"),
    _m("ldam", "cosine", "ldam", "ib", "fresh", ["margin", "scale"], dict(CRT_CIFAR, margin=0.5, scale=30.0),
       dict(CRT_IMNET, margin=0.5, scale=30.0), "LDAM-DRW losses.py (METHODS §13)",
       "s (cos - m_y), m_j = 0.5 (n_min/n_j)^(1/4); " + UNVERIFIED,
       space=space(_lin("margin", 0.1, 1.0, "max_m = 0.5 (§13)"), _log("scale", 4.0, 64.0, "s = 30 (§13)"))),
    _m("ldam-drw", "cosine", "ldam-drw", "ib", "fresh", ["margin", "scale", "beta"],
       dict(CRT_CIFAR, margin=0.5, scale=30.0, beta=0.9999), dict(CRT_IMNET, margin=0.5, scale=30.0, beta=0.9999),
       "LDAM-DRW losses.py, cifar_train.py (METHODS §13)",
       "DRW = CB weights (beta) for the whole re-training, PyTorch weighted mean; " + UNVERIFIED,
       space=space(_lin("margin", 0.1, 1.0, "max_m = 0.5 (§13)"), _log("scale", 4.0, 64.0, "s = 30 (§13)"), BETA)),
    _m("focal", "linear", "focal", "ib", "stage1", ["gamma"], dict(CRT_CIFAR, gamma=1.0), dict(CRT_IMNET, gamma=1.0),
       "LDAM-DRW FocalLoss (METHODS §14)", "(1-p)^gamma CE, p = exp(-CE); " + UNVERIFIED,
       space=space(_lin("gamma", 0.0, 3.0, "gamma = 1 (LDAM-DRW), 2 (original focal) (§14)"))),
    _m("cb", "linear", "cb", "ib", "stage1", ["beta"], dict(CRT_CIFAR, beta=0.9999), dict(CRT_IMNET, beta=0.9999),
       "class-balanced-loss (TF) src/cifar_main.py (METHODS §15)",
       "softmax form, TF normalisation sum w_y CE / B; " + UNVERIFIED, space=space(BETA)),
    _m("cb-focal", "linear", "cb-focal", "ib", "stage1", ["beta", "gamma"], dict(CRT_CIFAR, beta=0.9999, gamma=1.0),
       dict(CRT_IMNET, beta=0.9999, gamma=1.0), "class-balanced-loss (TF) sigmoid focal (METHODS §14-15)",
       "bias init -log(K-1); " + UNVERIFIED, sigmoid_bias=True,
       space=space(BETA, _lin("gamma", 0.0, 3.0, "gamma = 1 (CB script), 2 (original focal) (§14)"))),
    _m("cb-sigmoid", "linear", "cb-sigmoid", "ib", "stage1", ["beta"], dict(CRT_CIFAR, beta=0.9999),
       dict(CRT_IMNET, beta=0.9999), "class-balanced-loss (TF) sigmoid (METHODS §15)",
       "bias init -log(K-1); " + UNVERIFIED, sigmoid_bias=True, space=space(BETA)),
    _m("ls", "linear", "ls", "ib", "stage1", ["eps"], dict(CRT_CIFAR, eps=0.1), dict(CRT_IMNET, eps=0.1),
       "PyTorch label_smoothing (METHODS §16)", "eps is free (0.1 stated default); " + UNVERIFIED,
       space=space(_lin("eps", 0.0, 0.5, "0.1 stated default (§16); LOS is eps near 1"))),
    _m("los", "linear", "los", "ib", "stage1", ["delta"], dict(LOS_CIFAR, delta=0.98), dict(LOS_CIFAR, delta=0.98),
       "LOS main_stage2.py, utils/config.py (METHODS §17)",
       "CE with label_smoothing delta; ImageNet values not in the repo: CIFAR values (UNVERIFIED)",
       space=space(_lin("delta", 0.0, 0.99, "0.98 at K = 100 (§17); the target q_y = 1 - delta (K-1)/K "
                        "flattens faster at small K, so the range reaches down to plain CE"))),
    _m("mislas", "mislas", "las", "cb", "stage1", ["eps_head", "eps_tail", "shape", "lr_factor"],
       dict(lr=0.1, wd=2e-4, epochs=10, batch_size=128, schedule="cosine", momentum=0.9,
            eps_head=0.4, eps_tail=0.1, shape="concave", lr_factor=0.2),
       dict(lr=0.1, wd=5e-4, epochs=10, batch_size=256, schedule="cosine", momentum=0.9,
            eps_head=0.3, eps_tail=0.0, shape="concave", lr_factor=0.05),
       "MiSLAS config/*/*_stage2_mislas.yaml (METHODS §18)",
       "cifar = CIFAR-100 IF100 row (CIFAR-10 IF100: eps 0.3/0.0, lr_factor 0.5); BN shift not reproducible on a cache",
       space=space(_lin("eps_head", 0.0, 0.5, "0.2-0.4 in the MiSLAS configs (§18)"),
                   _lin("eps_tail", 0.0, 0.2, "0.0-0.1 in the MiSLAS configs (§18)"),
                   _log("lr_factor", 0.05, 0.5, "0.05-0.5 in the MiSLAS configs (§18)"))),
    _m("maxnorm", "linear", "ltwb-cb", "ib", "stage1", ["beta", "maxnorm_thresh"],
       dict(LTWB_CIFAR, beta=0.9999, maxnorm_thresh=0.1), dict(LTWB_CIFAR, beta=0.9999, maxnorm_thresh=0.1),
       "LTWB demo2_second-stage-training.py, utils/regularizers.py (METHODS §19)",
       "CB 'softmax' = BCE on softmax, wd 0.1, MaxNorm once per epoch; ImageNet UNVERIFIED (CIFAR values)",
       space=space(_lin("maxnorm_thresh", 0.0, 0.5, "thresh = 0.1 (§19)"),
                   _log("wd", 1e-3, 1.0, "LTWB's wd 0.1 was chosen by grid search (§19)"))),
    _m("marc", "marc", "grw", "ib", "stage1", ["rho"], dict(CRT_CIFAR, rho=1.2), dict(CRT_IMNET, rho=1.2),
       "MARC official code MARCLinear + GRWCrossEntropyLoss (METHODS §20)",
       "a z + b ||w||, GRW exponent 1.2 (code default); sampler/epochs/lr UNVERIFIED: stated default",
       space=space(_lin("rho", 0.0, 2.0, "exp_scale 1.2 (§20)"))),
    _m("vs", "linear", "vs", "ib", "stage1", ["gamma", "tau"], dict(CRT_CIFAR, gamma=0.2, tau=1.2),
       dict(CRT_IMNET, gamma=0.3, tau=1.0), "VS-Loss class_imbalance/losses.py (METHODS §24)",
       "cifar: README CIFAR-10 example; imagenet: parser defaults; " + UNVERIFIED,
       space=space(_lin("gamma", 0.0, 0.5, "0.2 (README CIFAR-10), 0.3 (parser) (§24)"),
                   _lin("tau", 0.0, 2.0, "1.2 (README CIFAR-10), 1.0 (parser) (§24)"))),
    _m("seesaw", "linear", "seesaw", "ib", "stage1", ["p", "q"], dict(CRT_CIFAR, p=0.8, q=2.0),
       dict(CRT_IMNET, p=0.8, q=2.0), "mmdet seesaw_loss.py (METHODS §23)",
       "static class counts instead of cumulative; " + UNVERIFIED,
       space=space(_lin("p", 0.0, 1.5, "p = 0.8 (§23)"), _lin("q", 0.0, 3.0, "q = 2 (§23)"))),
    _m("lade", "linear", "lade", "ib", "stage1", ["alpha", "lam"], dict(CRT_CIFAR, alpha=0.1, lam=0.01),
       dict(CRT_IMNET, alpha=0.05, lam=0.5), "hyperconnect/LADE loss/LADELoss.py, README (METHODS §22)",
       "PriorCE + alpha LADER; " + UNVERIFIED,
       space=space(_log("alpha", 0.005, 0.5, "0.005-0.1 in the LADE README (§22)"),
                   _log("lam", 0.005, 1.0, "0.01-0.5 in the LADE README (§22)"))),
]}


GENERIC_EPOCHS = _choice("epochs", (10, 20, 30), "the sources disagree: MiSLAS, LTWB 10; LOS 20; cRT/BoT 30 "
                         "(§4, §17-19)")


def method_space(method: Method, preset: str) -> Space:
    """The full search space of ``method``: its own dimensions, plus (for a trained method) lr a
    decade either side of the preset's, wd and epochs, unless the method declares them itself."""
    if method.closed_form:
        return method.space
    d = method.defaults(preset)
    own = {x.name for x in method.space.dims}
    generic = [_log("lr", d["lr"] / 10, d["lr"] * 10, f"the {preset} preset's lr {d['lr']:g}, a decade either side"),
               _log("wd", 1e-5, 1e-1, "cRT / MiSLAS 5e-4 and 2e-4, LTWB 0.1; LOS uses 0 (§4, §17-19)"),
               GENERIC_EPOCHS]
    return Space(dims=tuple(x for x in generic if x.name not in own) + method.space.dims)


def get_method(name: str) -> Method:
    """The registry entry ``name``; unknown names suggest the closest ones."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise LtcacheError(f"unknown method '{name}'{hint} (`ltcache methods` lists all {len(METHODS)})")


def choose_preset(num_classes: int, feature_dim: int, preset: Optional[str] = None) -> str:
    """``preset`` if given, else cifar for K <= 100 and D <= 512, imagenet otherwise."""
    if preset:
        if preset not in ("cifar", "imagenet"):
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
