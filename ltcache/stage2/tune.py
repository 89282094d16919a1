"""``tune``: every method tuned on val with the same budget, then re-trained over the final seeds.

Stage A draws ``budget`` points of each method's search space (:mod:`ltcache.stage2.space`,
declared in the registry) and trains every method x point x tune seed in ONE batched sweep on
a view of the cache that holds no test split (:func:`without_test`): the selection code
cannot read a test label. Per method it keeps the point with the best val metric (ties: the
lower val NLL, then the earlier point). Stage B re-trains each pick and each method's preset
over the final seeds in one sweep and reports test beside the val score.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from ltcache import interrupts
from ltcache.errors import LtcacheError
from ltcache.metrics import fmt_pct
from ltcache.devices import resolve_device
from ltcache.progress import echo
from ltcache.stage2.evaluate import VAL_METRICS
from ltcache.stage2.methods import (GENERIC, METHODS, check_key, choose_preset, get_method, join_key,
                                    method_space, resolve_params, run_name, split_key)
from ltcache.stage2.plan import _load_cache, parse_seeds
from ltcache.stage2.requirements import check, require_val
from ltcache.stage2.precision import check_precision
from ltcache.stage2.runner import run_sweep
from ltcache.stage2.space import SEARCHES, Dim, Space, draw

SELECT_METRICS = {"val-balanced": ("balanced", True), "val-all": ("all", True), "val-nll": ("nll", False)}
TUNE_SCHEMA = "ltcache-tune/1"
STAGE_A_SCHEMA = "ltcache-tune-stage-a/1"
STAGE_A = "stage_a.json"
CACHE_DIRS = "caches"          # a multi-cache tune: OUT/caches/NN/ holds cache NN's tune (stage A, then its results)
OUTPUTS = ("results.json", "tune.csv", "tune.md")      # a finished tune: never replaced without --force


def parse_space(items: Sequence[str]) -> dict[str, Dim]:
    """``("delta=0.5:0.99", "epochs=10,20", "lr=log:1e-4:1e-2")`` -> replacement dimensions:
    ``LOW:HIGH`` is linear (``log:LOW:HIGH`` log), ``a,b,c`` a choice; values are range-checked.
    A name may be qualified by a method (``la-loss.tau=0:1``: that method's only)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise LtcacheError(f"--space '{item}' must look like name=LOW:HIGH, name=log:LOW:HIGH or name=a,b,c")
        key, spec = item.split("=", 1)
        method, name = split_key(key)
        key = join_key(method, name)        # a short name, or qualified by one method: la-loss.tau
        try:
            if ":" in spec:
                parts = spec.split(":")
                scale = "log" if parts[0] == "log" else "linear"
                lo, hi = (parts[1:] if scale == "log" else parts)
                lo, hi = check_key(key, lo), check_key(key, hi)
                out[key] = Dim(name, "int" if isinstance(lo, int) else scale, lo, hi, source="--space")
            else:
                values = tuple(check_key(key, v.strip()) for v in spec.split(",") if v.strip())
                out[key] = Dim(name, "choice", choices=values, source="--space")
        except ValueError:
            raise LtcacheError(f"--space '{item}': give LOW <= HIGH (a log range needs LOW > 0) or a list "
                               "of values") from None
    return out


def method_dims(space: Optional[dict], method: str) -> dict[str, Dim]:
    """The replacement dimensions of ``method`` (param name -> Dim): the short names, and over them
    the names qualified by this method."""
    out = {k: d for k, d in (space or {}).items() if "." not in k}
    for key, d in (space or {}).items():
        owner, name = split_key(key)
        if owner and get_method(owner).name == method:
            out[name] = d
    return out


def _with_overrides(space: Space, method, overrides: dict[str, Dim]) -> Space:
    """``space`` with the dimensions named in ``overrides`` replaced (added when the method has
    the hyper-parameter but did not search it)."""
    if not overrides:
        return space
    if space.candidates:
        (name, _), = space.candidates.items()
        if name in overrides:
            d = overrides[name]
            values = d.choices if d.scale == "choice" else tuple(d.levels(21))
            return Space(candidates={name: values})
        return space
    dims = [overrides.get(d.name, d) for d in space.dims]
    have = {d.name for d in dims}
    from ltcache.stage2.methods import GENERIC
    dims += [d for n, d in overrides.items() if n not in have and (n in method.tunables or n in GENERIC)]
    return Space(dims=tuple(dims))


def without_test(cache):
    """A shallow view of a loaded cache without its test split: what selection code is given."""
    view = copy.copy(cache)
    view.splits = {k: v for k, v in cache.splits.items() if k != "test"}
    return view


def cache_fingerprint(cache) -> str:
    """sha256 of the cache's manifest (canonical JSON): the same cache, the same fingerprint."""
    man = dict(getattr(cache, "manifest", None) or {})
    if not man:
        raise LtcacheError("this cache has no manifest; tune and --from-tune need a cache made by `ltcache extract`")
    return hashlib.sha256(json.dumps(man, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _score(val: Optional[dict], key: str) -> Optional[float]:
    v = None if val is None else val.get(key)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def pick(points: list[dict], select_metric: str) -> int:
    """Index of the best point: best mean val metric, ties to the lower val NLL, then the
    earlier point; a point whose metric is undefined (e.g. NaN) never wins over one that is."""
    key, higher = SELECT_METRICS[select_metric]

    def rank(i):
        s, nll = _score(points[i]["val"], key), _score(points[i]["val"], "nll")
        primary = (-s if higher else s) if s is not None else math.inf
        return (primary, nll if nll is not None else math.inf, i)

    return min(range(len(points)), key=rank)


def _mean_val(runs: list[dict]) -> dict:
    vals = [r["val"] for r in runs if r.get("val") and not r.get("failed")]      # a diverged run never wins
    out = {}
    for k in VAL_METRICS:
        xs = [v[k] for v in vals if v.get(k) is not None and math.isfinite(v[k])]
        out[k] = sum(xs) / len(xs) if xs else None
    return out


def tune(cache=None, methods: Optional[Sequence[str]] = None, budget: int = 32, search: str = "sobol",
         select_metric: str = "val-balanced", tune_seeds: Sequence[int] = (0,),
         seeds: Sequence[int] = (0, 1, 2, 3, 4), test_views: str = "all", device: str = "auto",
         quiet: bool = False, preset: Optional[str] = None, out_dir: Optional[Union[str, Path]] = None,
         force: bool = False, jobs: Optional[int] = None, clean_view: bool = False,
         space: Optional[dict[str, Dim]] = None, precision: str = "fp32", against: str = "ce") -> dict:
    """Tune every method in ``methods`` (default: all) on val with ``budget`` points each, pick
    per method by ``select_metric``, re-train picks and presets over ``seeds``; the results
    document (``results["tune"]`` holds the picks, every point's val score and the timings).
    ``space``: replacement dimensions (:func:`parse_space`) for the methods that have them.
    ``precision``: the training GEMMs' arithmetic in both stages (:mod:`ltcache.stage2.precision`).
    With ``out_dir``, stage A's points are written (``stage_a.json``) as soon as they exist, so
    a failure in stage B keeps them.

    ``cache`` may be a list of caches: every cache is checked (val split included) and grouped
    into datasets before anything trains, then tuned on its own val split in turn; the result is
    one multi-cache document (:mod:`ltcache.stage2.multi`) whose paper table, against the method
    ``against``, is written to ``out_dir`` beside results.json."""
    if isinstance(cache, (list, tuple)) and len(cache) != 1:
        return _tune_many(list(cache), methods, against, out_dir, force, quiet,
                          dict(budget=budget, search=search, select_metric=select_metric, tune_seeds=tune_seeds,
                               seeds=seeds, test_views=test_views, device=device, preset=preset, jobs=jobs,
                               clean_view=clean_view, space=space, precision=precision))
    if isinstance(cache, (list, tuple)):
        cache = cache[0]
    return _tune_one(cache, methods, budget, search, select_metric, tune_seeds, seeds, test_views, device, quiet,
                     preset, out_dir, force, jobs, clean_view, space, precision)


def _tune_one(cache, methods, budget: int, search: str, select_metric: str, tune_seeds, seeds, test_views: str,
              device: str, quiet: bool, preset, out_dir, force: bool, jobs, clean_view: bool, space, precision: str,
              keep_finished: bool = False) -> dict:
    """:func:`tune` on one cache. ``keep_finished`` (a cache of a multi-cache tune, in its own
    sub-folder): a finished tune of the same plan there is read back instead of re-run, and the
    sub-folder's earlier files do not need ``--force``."""
    chosen_methods, tune_seeds, seeds = _check_request(methods, budget, search, select_metric, space, tune_seeds,
                                                       seeds, None if keep_finished else out_dir, force)
    dev = resolve_device(device)
    check_precision(precision, dev)
    ck = check(_load_cache(cache, dev))                 # loaded and checked once; run_sweep trusts it
    full = ck.cache
    require_val(ck, "tune")
    pre = choose_preset(full.num_classes, full.feature_dim, preset)
    n_train = int(full.splits["train"].labels.numel())
    t0 = time.perf_counter()

    # stage A: every method x budget points x tune seeds, one sweep, no test split in sight
    plans, owner = _stage_a_plans(chosen_methods, pre, space, budget, search, n_train)
    from ltcache.stage2.results import run_header
    echo(run_header(full, pre, dev, "tune"), quiet)
    plan = plan_hash(full, plans, tune_seeds, select_metric, test_views, clean_view, precision)
    finished = _finished_tune(out_dir, plan, force) if keep_finished else None
    if finished is not None:
        echo(f"tune: complete in {Path(out_dir) / 'results.json'} (the same plan), kept", quiet)
        return finished
    done = _completed_stage_a(out_dir, plan, force)
    if done is not None:
        picks, points, wall_a = done["picks"], done["points"], float(done["wall_time_s"])
        echo(f"tune stage A: complete in {Path(out_dir) / STAGE_A} (the same plan), kept; continuing with stage B",
             quiet)
    else:
        echo(f"tune stage A: {len(plans)} points x {len(tune_seeds)} seed(s) on val", quiet)
        picks, points, wall_a = _stage_a(ck, chosen_methods, plans, owner, tune_seeds, select_metric, test_views,
                                         device, quiet, jobs, clean_view, precision)
        if out_dir is not None:                           # kept even if stage B fails or is stopped
            _write_stage_a(out_dir, full, plan, budget, search, select_metric, tune_seeds, wall_a, picks, points)
    keep = (f"stage A's picks are kept in {Path(out_dir) / STAGE_A}; the same command continues with stage B"
            if out_dir is not None else "nothing was written (no --out); the same command starts over")
    with interrupts.keeps(keep):
        interrupts.test_point("stage-b")
        results = _stage_b(ck, chosen_methods, picks, points, pre, n_train, plans, tune_seeds, seeds, budget,
                           search, select_metric, test_views, device, quiet, jobs, clean_view, precision, out_dir, t0,
                           wall_a, resumed=done is not None, plan=plan)
    return results


def check_space(chosen_methods: Sequence, space: Optional[dict]) -> None:
    """Each --space name one that a chosen method searches: a short name some method has, a
    qualified one (``la-loss.tau``) a method of the run that has it."""
    by_name = {m.name: m for m in chosen_methods}
    for name in space or {}:
        method, param = split_key(name)
        if method:
            m = by_name.get(get_method(method).name)
            if m is None:
                raise LtcacheError(f"--space {name}: method {method} is not in this run ({', '.join(by_name)}); "
                                   f"add it to the methods or drop {name}")
            if param not in m.tunables and (param not in ("lr", "wd", "epochs", "batch_size") or m.closed_form):
                raise LtcacheError(f"--space {name}: method {m.name} has no hyper-parameter {param} "
                                   "(`ltcache methods --space` lists each method's)")
            continue
        if not any(name in m.tunables or (name in ("lr", "wd", "epochs", "batch_size") and not m.closed_form)
                   for m in chosen_methods):
            raise LtcacheError(f"--space {name}: none of the chosen methods has a hyper-parameter '{name}' "
                               "(`ltcache methods --space` lists each method's)")


def _check_request(methods: Optional[Sequence[str]], budget: int, search: str, select_metric: str,
                   space: Optional[dict], tune_seeds, seeds, out_dir, force: bool) -> tuple:
    """(the methods to tune, the tune seeds, the final seeds), with the budget, search, selection
    metric, space and output folder checked before any work."""
    if budget < 1:
        raise LtcacheError(f"--budget must be >= 1 (got {budget}); e.g. --budget 32")
    if search not in SEARCHES:
        raise LtcacheError(f"unknown --search '{search}'; use one of: {', '.join(SEARCHES)}")
    if select_metric not in SELECT_METRICS:
        raise LtcacheError(f"unknown --select-metric '{select_metric}'; use one of: {', '.join(SELECT_METRICS)}")
    tune_seeds, seeds = parse_seeds(tune_seeds), parse_seeds(seeds)
    names = list(methods) if methods else list(METHODS)
    if not names:
        raise LtcacheError("no methods given; use --all-methods or --methods a,b")
    chosen_methods = [get_method(n) for n in names]
    check_space(chosen_methods, space)
    if out_dir is not None:
        from ltcache.outputs import check_output_dir
        check_output_dir(out_dir, force=force, outputs=OUTPUTS, what="--out folder")
    return chosen_methods, tune_seeds, seeds


def _stage_a_plans(chosen_methods: list, pre: str, space: Optional[dict], budget: int, search: str,
                   n_train: int) -> tuple[list, list]:
    """(the plans of stage A: ``budget`` points of each method's space, whose method and point each is)."""
    plans, owner = [], []
    for m in chosen_methods:
        for point in draw(_with_overrides(method_space(m, pre), m, method_dims(space, m.name)), budget, search,
                          seed=0):
            plans.append((m, resolve_params(m, pre, point, n_train), point))
            owner.append((m.name, point))
    return plans, owner


def _write_stage_a(out_dir, full, plan: str, budget: int, search: str, select_metric: str, tune_seeds,
                   wall_a: float, picks: dict, points: dict) -> None:
    """``stage_a.json``: stage A's picks and points, kept even if stage B fails or is stopped."""
    from ltcache.stage2.results import _cache_block, write_json
    write_json({"schema": STAGE_A_SCHEMA, "plan_hash": plan, "cache": _cache_block(full), "budget": budget,
                "search": search, "select_metric": select_metric, "tune_seeds": tune_seeds,
                "wall_time_s": wall_a, "picks": picks, "points": points}, Path(out_dir) / STAGE_A)


def plan_hash(full, plans: list, tune_seeds, select_metric: str, test_views: str, clean_view: bool,
              precision: str) -> str:
    """What stage A's result depends on (the cache, every configuration, the tune seeds, the rule that
    picks): equal hashes, equal stage A."""
    key = {"cache": cache_fingerprint(full), "runs": [run_name(*p) for p in plans],
           "params": [json.dumps(p[1], sort_keys=True, default=str) for p in plans], "tune_seeds": list(tune_seeds),
           "select_metric": select_metric, "test_views": test_views, "clean_view": bool(clean_view),
           "precision": precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _completed_stage_a(out_dir, plan: str, force: bool) -> Optional[dict]:
    """Stage A of an interrupted tune into ``out_dir`` with this very plan (None: run stage A). Decided
    on rank 0 (the one that writes) and shared, so every torchrun rank skips it or none does."""
    from ltcache import distributed

    def read() -> Optional[dict]:
        path = None if out_dir is None else Path(out_dir) / STAGE_A
        if path is None or force or not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            ok = doc.get("schema") == STAGE_A_SCHEMA and isinstance(doc.get("picks"), dict)
        except (OSError, ValueError):
            ok, doc = False, {}
        if not ok:
            raise LtcacheError(f"{path} is not a readable stage-A file (damaged?); use --force to start the tune "
                               "over, or another --out folder")
        if doc.get("plan_hash") != plan:
            raise LtcacheError(f"{path} holds stage A of a different tune (other methods, budget, seeds, options or "
                               "cache); give the same command to continue it, another --out, or --force to start over")
        return doc
    return distributed.on_main(read, "the check of stage A") if distributed.active() else read()


def _finished_tune(out_dir, plan: str, force: bool) -> Optional[dict]:
    """The finished tune in ``out_dir`` when it ran this very plan (None: tune). A finished tune of
    another plan there is refused unless ``force``. Decided on rank 0 and shared."""
    from ltcache import distributed

    def read() -> Optional[dict]:
        path = Path(out_dir) / "results.json"
        if force or not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            same = doc["tune"].get("plan_hash") == plan
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise LtcacheError(f"{path} is not a readable tune result (damaged?); use --force to tune again, or "
                               "another --out folder") from None
        if not same:
            raise LtcacheError(f"{path} holds a finished tune of a different plan (other methods, budget, seeds, "
                               "options or cache); give the same command, another --out, or --force to tune again")
        return doc
    return distributed.on_main(read, "the check of a finished tune") if distributed.active() else read()


def _stage_a(ck, chosen_methods, plans, owner, tune_seeds, select_metric, test_views, device, quiet, jobs,
             clean_view, precision) -> tuple:
    """Every point on val (no test split in sight): (picks, points, wall time). ``ck``: the
    checked cache (:class:`~ltcache.stage2.requirements.Checked`)."""
    t0 = time.perf_counter()
    res_a, _ = run_sweep(ck.with_cache(without_test(ck.cache)), plans, tune_seeds, "last", test_views, device, quiet, jobs,
                         clean_view, evaluate_test=False, precision=precision)
    by_name: dict[str, list[dict]] = {}
    for r in res_a["runs"]:
        by_name.setdefault(r["name"], []).append(r)
    points: dict[str, list[dict]] = {}
    for (m, p, ov), (mname, point) in zip(plans, owner):
        runs = by_name[run_name(m, p, ov)]
        points.setdefault(mname, []).append({"point": point, "params": runs[0]["params"], "val": _mean_val(runs)})
    picks = {}
    for m in chosen_methods:
        pts = points[m.name]
        best = pts[pick(pts, select_metric)]
        picks[m.name] = {"point": best["point"], "params": best["params"], "val": best["val"], "points": len(pts)}
    return picks, points, time.perf_counter() - t0


def _stage_b(ck, chosen_methods, picks, points, pre, n_train, plans, tune_seeds, seeds, budget, search,
             select_metric, test_views, device, quiet, jobs, clean_view, precision, out_dir, t0, wall_a,
             resumed: bool, plan: str = "") -> dict:

    # stage B: each pick and each preset over the final seeds, evaluated on test
    t1 = time.perf_counter()
    plans_b, tags = [], {}
    for m in chosen_methods:
        point = picks[m.name]["point"]
        tuned = (m, resolve_params(m, pre, point, n_train), point)
        tags[run_name(*tuned)] = (m.name, "tuned")
        plans_b.append(tuned)
        base = (m, resolve_params(m, pre, {}, n_train), {})
        if run_name(*base) not in tags:
            tags[run_name(*base)] = (m.name, "preset")
            plans_b.append(base)
    echo(f"tune stage B: {len(plans_b)} configurations x {len(seeds)} seeds on test", quiet)
    results, _ = run_sweep(ck, plans_b, seeds, "last", test_views, device, quiet, jobs, clean_view,
                           precision=precision)
    wall_b = time.perf_counter() - t1
    for r in results["runs"]:
        r["tune_role"] = tags.get(r["name"], (r["method"], "tuned"))[1]
    summary = {row["name"]: row for row in results["summary"]}
    table = []
    for m in chosen_methods:
        pk = picks[m.name]
        tuned_name = run_name(m, resolve_params(m, pre, pk["point"], n_train), pk["point"])
        preset_name = run_name(m, resolve_params(m, pre, {}, n_train), {})
        t, p = summary[tuned_name], summary[preset_name]
        table.append({"method": m.name, "tuned_name": tuned_name, "preset_name": preset_name,
                      "chosen": pk["point"], "val_score": _score(pk["val"], SELECT_METRICS[select_metric][0]),
                      "val_nll": pk["val"]["nll"], "points": pk["points"],
                      "all_mean": t["all_mean"], "all_std": t["all_std"], "many": t["many"], "medium": t["medium"],
                      "few": t["few"], "preset_all_mean": p["all_mean"], "preset_all_std": p["all_std"]})
    table.sort(key=lambda r: -1e9 if r["all_mean"] is None else -r["all_mean"])
    wall = time.perf_counter() - t0
    results["preset"] = pre
    results["wall_time_s"] = wall
    results["tune"] = {"schema": TUNE_SCHEMA, "plan_hash": plan, "cache_fingerprint": cache_fingerprint(ck.cache),
                       "budget": budget,
                       "search": search, "select_metric": select_metric, "tune_seeds": tune_seeds, "seeds": seeds,
                       "stage_a": {"configurations": len(plans) * len(tune_seeds), "wall_time_s": wall_a,
                                   "resumed": resumed},
                       "stage_b": {"configurations": len(plans_b) * len(seeds), "wall_time_s": wall_b},
                       "picks": picks, "points": points, "table": table}
    a_done = "kept from the interrupted run, which took" if resumed else ""
    echo(f"tune: stage A {a_done}{' ' if a_done else ''}{wall_a:.1f} s ({len(plans) * len(tune_seeds)} "
         f"configurations), stage B {wall_b:.1f} s ({len(plans_b) * len(seeds)}), {wall:.1f} s in "
         f"{'this run' if resumed else 'all'}", quiet)
    if out_dir is not None:
        write_tune(results, out_dir)
    return results


def _tune_many(caches: list, methods, against: str, out_dir, force: bool, quiet: bool, kw: dict) -> dict:
    """:func:`tune` on each of several caches; one multi-cache document (see :func:`tune`)."""
    from ltcache.stage2 import multi
    if not caches:
        raise LtcacheError("no cache given; pass one or more caches")
    names = [get_method(n).name for n in methods] if methods else list(METHODS)
    ref = multi.check_against(against, names)
    if kw["budget"] < 1:
        raise LtcacheError(f"--budget must be >= 1 (got {kw['budget']}); e.g. --budget 32")
    if out_dir is not None:
        from ltcache.outputs import check_output_dir
        check_output_dir(out_dir, force=force, outputs=multi.MULTI_OUTPUTS, what="--out folder")
    subs = iter(range(len(caches)))

    def one(c) -> dict:                       # each cache in its own sub-folder: a re-run continues where it ended
        sub = None if out_dir is None else Path(out_dir) / CACHE_DIRS / f"{next(subs):02d}"
        return _tune_one(c, names, quiet=quiet, out_dir=sub, force=force, keep_finished=True, **kw)
    doc = multi.run_caches("tune", caches, one, ref, need_val="tune", quiet=quiet)
    if out_dir is not None:
        multi.write_multi(doc, out_dir)
    return doc


# ---------------------------------------------------------------------------------------------
# tables and files
# ---------------------------------------------------------------------------------------------

def _fmt_point(point: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "-"


def tune_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tuned table: test All ± std of the pick, Many / Medium / Few, the
    chosen values, the val score they were chosen by, and the preset's All beside it."""
    t = results["tune"]
    metric = t["select_metric"]
    head = ["method", "tuned All", "Many", "Medium", "Few", f"{metric}", "preset All", "points", "chosen"]
    rows = []
    for r in t["table"]:
        rows.append([r["method"] + (" (reference)" if r["method"] == "ce" else ""),
                     fmt_pct(r["all_mean"], r["all_std"] if len(t["seeds"]) > 1 else None),
                     fmt_pct(r["many"]), fmt_pct(r["medium"]), fmt_pct(r["few"]),
                     ("-" if r["val_score"] is None else f"{r['val_score']:.3f}" if metric == "val-nll"
                      else f"{r['val_score']:.2f}"),
                     fmt_pct(r["preset_all_mean"], r["preset_all_std"] if len(t["seeds"]) > 1 else None),
                     str(r["points"]), _fmt_point(r["chosen"])])
    return head, rows


def format_tune_table(results: dict) -> str:
    """The tuned table for the terminal, with the budget and the two stages' times."""
    head, rows = tune_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i in (0, len(cells) - 1) else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    t = results["tune"]
    cache = results.get("cache") or {}
    out = [f"cache: {cache.get('path', '?')}",
           line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    out.append(f"{t['search']} search, budget {t['budget']} points per method, chosen by {t['select_metric']} "
               f"(tune seeds {','.join(map(str, t['tune_seeds']))}); test over seeds "
               f"{','.join(map(str, t['seeds']))}. Stage A {t['stage_a']['configurations']} configurations in "
               f"{t['stage_a']['wall_time_s']:.1f} s, stage B {t['stage_b']['configurations']} in "
               f"{t['stage_b']['wall_time_s']:.1f} s on {results['device']}.")
    return "\n".join(out)


def format_tune_markdown(results: dict) -> str:
    """The tuned table as GitHub markdown."""
    head, rows = tune_rows(results)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md) + "\n\n" + format_tune_table(results).splitlines()[-1] + "\n"


def write_tune(results: dict, out_dir: Union[str, Path]) -> dict:
    """results.json, tune.csv and tune.md in ``out_dir`` (each written atomically)."""
    import csv
    import io

    from ltcache.outputs import write_text
    from ltcache.stage2.results import write_json
    out = Path(out_dir)
    buf = io.StringIO()
    w = csv.writer(buf)
    fields = ("method", "all_mean", "all_std", "many", "medium", "few", "val_score", "val_nll", "preset_all_mean",
              "preset_all_std", "points")
    w.writerow(fields + ("chosen", "select_metric"))
    for r in results["tune"]["table"]:
        w.writerow([("" if r[f] is None else r[f]) for f in fields]
                   + [json.dumps(r["chosen"], sort_keys=True), results["tune"]["select_metric"]])
    paths = {"json": write_json(results, out / "results.json"), "csv": write_text(out / "tune.csv", buf.getvalue()),
             "md": write_text(out / "tune.md", format_tune_markdown(results))}
    return paths


# ---------------------------------------------------------------------------------------------
# --from-tune: re-run the chosen configurations
# ---------------------------------------------------------------------------------------------

def load_choices(path: Union[str, Path], cache) -> dict[str, dict]:
    """{method: chosen point} from a tune results.json made on this very cache."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"--from-tune {path}: no such file; give the results.json that `ltcache tune --out DIR` wrote")
    try:
        doc = json.loads(path.read_text())
        t = doc["tune"]
        if t.get("schema") != TUNE_SCHEMA:
            raise KeyError("schema")
        picks = {m: dict(p["point"]) for m, p in t["picks"].items()}
        fp = t["cache_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise LtcacheError(f"--from-tune {path} is not a readable tune results file (damaged, or written by "
                           "`bench`/`retrain`); re-run `ltcache tune --out DIR`") from None
    if fp != cache_fingerprint(cache):
        raise LtcacheError(f"--from-tune {path} was tuned on another cache ({doc.get('cache', {}).get('path', '?')}); "
                           "its choices only hold for that cache: pass that --cache, or tune this one")
    return {m: _checked_pick(path, m, point) for m, point in picks.items()}


def _checked_pick(path: Path, name: str, point: dict) -> dict:
    """One method's chosen point from a tune file, checked as the file's own content (so an edited
    file is refused naming the file and the key, not as if the user had passed an option)."""
    from ltcache.stage2.methods import validate_overrides
    try:
        method = get_method(name)
    except LtcacheError as exc:
        raise LtcacheError(f"--from-tune {path}: {exc}") from None
    allowed = set(method.tunables) | (set() if method.closed_form else set(GENERIC))
    unknown = sorted(k for k in point if k not in allowed)
    if unknown:
        raise LtcacheError(f"--from-tune {path}: the choice for {name} has unknown key '{unknown[0]}' (not a "
                           f"hyper-parameter of {name}: {', '.join(sorted(allowed)) or 'none'}); fix or re-make the "
                           "file with `ltcache tune`")
    try:
        return validate_overrides(method, point)
    except LtcacheError as exc:
        raise LtcacheError(f"--from-tune {path}: the choice for {name} is out of range: {exc}; fix or re-make the "
                           "file with `ltcache tune`") from None
