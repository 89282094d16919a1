"""What a stage-2 method needs from a cache beyond its features: the stage-1 classifier.

A cache imported without a classifier (``ltcache import`` with neither ``--classifier`` nor
``--fit-classifier``), or extracted from weights whose head does not fit its classes, records
``stage1_classifier: {"source": "none"}`` in its manifest (its classifier file holds zeros only so
that it loads). The methods that read the stage-1 W, b -- tau-norm, post-hoc LA, and every trained
method whose head starts from stage 1 (``Method.init == "stage1"``: CE, LWS, MiSLAS, MARC, ...) or
scales by its norms (MARC) -- are refused on it with one line saying how to add a classifier;
``bench`` over every method leaves them out with a notice instead.

What a sweep checks about a cache -- its val split (:func:`~ltcache.stage2.plan.val_gaps`) and its
stage-1 classifier -- is found once per command at the public boundary (:func:`check`) and
travels with the loaded cache as a :class:`Checked`; ``run_sweep`` reads it instead of the cache.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from ltcache.errors import LtcacheError
from ltcache.stage2.plan import val_gaps

STAGE1_KEY = "stage1_classifier"
DEFAULT_FIX = "re-import it with `ltcache import ... --classifier FILE` (W [K, D], b [K]) or `--fit-classifier`"


class Checked(NamedTuple):
    """A loaded cache and what a sweep checks about it, found once (:func:`check`)."""

    cache: Any
    val_gap: Optional[str]       # why its val split cannot back a val-based choice (None: it can)
    stage1_fix: Optional[str]    # how to give it a stage-1 classifier (None: it has one)

    def with_cache(self, cache) -> "Checked":
        """The same findings for a view of the same cache (e.g. without its test split)."""
        return self._replace(cache=cache)


def check(cache) -> Checked:
    """A loaded cache with its findings (a :class:`Checked` passes through unchanged)."""
    if isinstance(cache, Checked):
        return cache
    return Checked(cache, val_gaps(cache), missing_stage1(cache))


def require_val(cache, why: str) -> None:
    """Refuse a val-based choice (``why``) on a val split that is missing or lacks a class
    (``cache``: a loaded cache or its :class:`Checked`)."""
    gap = check(cache).val_gap
    if gap:
        raise LtcacheError(f"{why} chooses on the val split, but {gap}; use a cache whose val split covers every "
                           "class (stage 1 holds val out of the full training set since ltcache 0.2: re-run "
                           "`ltcache train` and `ltcache extract`)")


def missing_stage1(cache) -> Optional[str]:
    """None when the cache has a stage-1 classifier (every cache that does not say otherwise),
    else how to give it one."""
    man = getattr(cache, "manifest", None) or {}
    block = man.get(STAGE1_KEY) if isinstance(man, dict) else None
    if isinstance(block, dict) and block.get("source") == "none":
        return str(block.get("fix") or DEFAULT_FIX)
    return None


def needs_stage1(method) -> bool:
    """True for a method that reads the stage-1 classifier: tau-norm, post-hoc LA, a trained head
    initialised from stage 1, or one scaled by the stage-1 norms (MARC)."""
    if method.closed_form:
        from ltcache.stage2.closed_form import POSTHOC
        return POSTHOC.get(method.head).needs_stage1
    from ltcache.stage2.heads import HEADS
    kind = HEADS.get(method.head)
    return method.init == "stage1" or bool(kind is not None and kind.uses_base_norm)


def _why(method, cache, fix: str) -> str:
    path = getattr(cache, "path", None) or "this cache"
    what = "is computed from" if method.closed_form else "starts from"
    return f"method {method.name} {what} the stage-1 classifier, but {path} has none; {fix}"


def require_stage1(cache, plans: Sequence[tuple]) -> None:
    """Refuse, before anything trains, a plan whose method needs a stage-1 classifier the cache
    lacks (``cache``: its :class:`Checked`, or the loaded cache; ``plans``: (Method, params,
    overrides) tuples as ``api.expand`` makes them)."""
    ck = check(cache)
    if ck.stage1_fix is None:
        return
    for method, *_ in plans:
        if needs_stage1(method):
            raise LtcacheError(_why(method, ck.cache, ck.stage1_fix))


def skip_stage1(cache, plans: list, skipped: list, asked: Optional[Sequence[str]], quiet: bool = False) -> tuple[list, list]:
    """For ``bench``: on a cache without a stage-1 classifier, leave out (with a notice) the plans
    that need one when every method was asked for (``asked`` None), and the CE reference row bench
    adds itself; a method named explicitly stays (and is refused). Returns (plans, skipped).
    ``cache``: its :class:`Checked`, or the loaded cache."""
    ck = check(cache)
    fix, cache = ck.stage1_fix, ck.cache
    if fix is None:
        return plans, skipped
    from ltcache.progress import echo
    from ltcache.stage2.methods import run_name

    named = None if asked is None else {str(n) for n in asked}
    keep, out = [], list(skipped)
    for plan in plans:
        method, params, ov = plan[0], plan[1], plan[2]
        if needs_stage1(method) and (named is None or method.name not in named):
            out.append({"name": run_name(method, params, ov), "method": method.name,
                        "why": f"needs the stage-1 classifier, which this cache lacks; {fix}"})
        else:
            keep.append(plan)
    left = list(dict.fromkeys(s["method"] for s in out[len(skipped):]))
    if left:
        echo(f"skipped {len(left)} methods that need the stage-1 classifier ({', '.join(left)}): "
             f"{getattr(cache, 'path', 'the cache')} has none; {fix}", quiet)
    if not keep:
        raise LtcacheError(f"every chosen method needs the stage-1 classifier, which {getattr(cache, 'path', 'the cache')} "
                           f"lacks; {fix}, or choose methods that start fresh (crt, sqrt, cosine, ldam, ncm, ...)")
    return keep, out
