"""TOML pipelines: one file names a whole experiment (dataset, stage 1, extraction, sweep).

``ltcache run pipelines/X.toml`` runs the steps in order into one output directory and skips
steps whose outputs are already complete and valid, so an interrupted pipeline resumes.

``[pipeline] plugins = ["my_methods.py"]`` imports plugin files (methods and losses of your own,
paths relative to the pipeline file) before anything else is read; the ``[sweep]`` section
accepts every declared hyper-parameter (generic, each registered method's) as an override, e.g.
``delta = 0.9``, and as a ``grid`` key -- the keys come from the declarations, so a new loss
adds its own. ``[sweep] caches = [...]`` (and ``[tune] caches``) adds other caches (e.g. other
pipelines' ``cache`` folders: more stage-1 seeds, more datasets) to the step: one multi-cache
results file with the paper table (``ltcache table``).
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ltcache.errors import LtcacheError
from ltcache.options import (BN_SHIFTS, DTYPES, PRESETS, PROFILES, PROTOCOLS, SEARCHES, SELECT_METRICS, SELECTIONS,
                             SELECTS, STAGE1_SCHEDULES, TRAIN_BN, alternatives)
from ltcache.progress import echo

# Every accepted key per section: (type or tuple of types, description). Unknown keys and wrong
# types are refused with the key's full name, so a typo never silently falls back to a default.
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "pipeline": {
        "name": (str, "experiment name"),
        "out": (str, "output directory (relative to the directory ltcache run starts in, or absolute)"),
        "description": (str, "free text"),
        "plugins": (list, "plugin files (ltcache.register_method / register_loss) imported first, relative to "
                          "this file"),
    },
    "dataset": {
        "source": (str, "cifar10 | cifar100 | imagefolder:PATH | splitlist:DIR/NAME"),
        "imb_ratio": (_NUM, "imbalance ratio n_max/n_min (>= 1)"),
        "profile": (str, alternatives(PROFILES)),
        "selection": (str, alternatives(SELECTIONS)),
        "seed": (int, "selection / validation seed"),
        "val_per_class": (int, "balanced validation images per class"),
        "data_root": (str, "data root (default ./data or $LTCACHE_DATA)"),
        "download": (bool, "let torchvision download CIFAR (needs a network)"),
    },
    "stage1": {
        "arch": (str, "backbone name (ltcache train --help lists them)"),
        "epochs": (int, "training epochs"),
        "batch_size": (int, "batch size"),
        "lr": (_NUM, "base learning rate"),
        "momentum": (_NUM, "SGD momentum"),
        "wd": (_NUM, "weight decay"),
        "schedule": (str, alternatives(STAGE1_SCHEDULES)),
        "warmup_epochs": (int, "linear warm-up epochs (default 5, or the longest that fits a shorter run)"),
        "eval_every": (int, "evaluate val/test every N epochs and after the last (default 1; 0: last only)"),
        "label_smoothing": (_NUM, "label smoothing epsilon"),
        "mixup": (_NUM, "mixup alpha (0 = off)"),
        "maxnorm": (_NUM, "MaxNorm threshold (0 = off)"),
        "seed": (int, "training seed"),
        "pretrained": (str, "local backbone weights to start from (relative to this file or absolute), e.g. "
                            "ImageNet weights for Places-LT; nothing is downloaded"),
        "workers": (int, "image decoding workers"),
    },
    "extract": {
        "protocol": (str, f"{alternatives(PROTOCOLS)} (default {PROTOCOLS[0]}): fills the four options below when not given"),
        "splits": (list, "splits to extract"),
        "test_views": (list, "views of val/test: center, hflip"),
        "train_views": (int, "augmented views per training image besides the clean one"),
        "train_bn": (str, alternatives(TRAIN_BN)),
        "bn_shift": (str, alternatives(BN_SHIFTS)),
        "bn_shift_passes": (int, "passes over the training set for the BN shift"),
        "dtype": (str, alternatives(DTYPES)),
        "batch_size": (int, "extraction batch size"),
        "shard_rows": (int, "rows per HDF5 shard"),
        "workers": (int, "image decoding workers"),
    },
    "sweep": {
        "methods": ((str, list), "'all' or a list of method names"),
        "seeds": (list, "seeds, each trained as its own configuration"),
        "grid": (dict, "hyper-parameter grids, e.g. {delta = [0.9, 0.98]}; one method's: {\"vs.tau\" = [1, 1.5]}"),
        "select": (str, alternatives(SELECTS)),
        "test_views": (list, "views averaged at evaluation"),
        "preset": (str, f"{alternatives(PRESETS)} (default: from the cache)"),
        "clean_view": (bool, "also draw the clean train view (default false: augmented views only)"),
        "caches": (list, "more caches swept with this pipeline's own (paths relative to this file), e.g. other "
                         "stage-1 seeds and datasets: one results file and the paper table"),
        "against": (str, "with caches: the paper table's reference method (default ce)"),
    },
    "tune": {
        "methods": ((str, list), "'all' or a list of method names to tune on val (`ltcache tune`)"),
        "budget": (int, "points of each method's search space in stage A (default 32)"),
        "search": (str, alternatives(SEARCHES)),
        "select_metric": (str, alternatives(SELECT_METRICS)),
        "tune_seeds": (list, "seeds of stage A"),
        "seeds": (list, "seeds the picks and presets are re-trained with (stage B)"),
        "space": (dict, "replacement dimensions, e.g. {delta = \"0.5:0.99\", epochs = \"10,20\"}; one method's: "
                        "{\"la-loss.tau\" = \"0:1\"}"),
        "test_views": (list, "views averaged at evaluation"),
        "preset": (str, f"{alternatives(PRESETS)} (default: from the cache)"),
        "caches": (list, "more caches tuned with this pipeline's own (paths relative to this file): one results "
                         "file and the paper table"),
        "against": (str, "with caches: the paper table's reference method (default ce)"),
    },
}
REQUIRED = {"dataset": ("source",), "stage1": ("arch",)}
_PY_TYPES = {float: _NUM, int: int, str: str}


def hyper_keys() -> dict[str, tuple[Any, str]]:
    """The [sweep] hyper-parameter keys, from the declarations (``ltcache.stage2.methods.
    option_table``): each an override for the methods that have it, and a valid ``grid`` key."""
    from ltcache.stage2.methods import option_table
    out = {}
    for name, rows in option_table().items():
        if len(rows) == 1:
            users = sorted(rows[0][1])
            text = f"{rows[0][0].help} (override{' for ' + ', '.join(users) if users else ''})"
        else:                       # one name, a different hyper-parameter per method
            text = "override; " + "; ".join(f"{', '.join(us)}: {q.help}" for q, us in rows)
        out[name] = (_PY_TYPES[rows[0][0].type], text)
    return out


def schema() -> dict[str, dict[str, tuple[Any, str]]]:
    """Every accepted key per section, the [sweep] hyper-parameters included."""
    return {**SCHEMA, "sweep": {**SCHEMA["sweep"], **hyper_keys()}}


@dataclass
class Pipeline:
    """A parsed, validated pipeline file."""

    path: Path
    name: str
    out: Path
    dataset: dict = field(default_factory=dict)
    stage1: dict = field(default_factory=dict)
    extract: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    tune: Optional[dict] = None             # an optional [tune] step after the sweep
    plugins: list = field(default_factory=list)   # plugin files, resolved against the pipeline's folder


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t if not (x is int and float in t))
    return {int: "integer", float: "number", str: "string", bool: "true/false", list: "list",
            dict: "table"}.get(t, str(t))


def _check(section: str, key: str, value: Any, where: str, table: Optional[dict] = None) -> None:
    expected = (table or SCHEMA[section])[key][0]
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        name = _type_name(expected)
        article = "an" if name[0] in "aeiou" else "a"
        raise LtcacheError(f"{where}: [{section}] {key} must be {article} {name}, "
                           f"got {type(value).__name__} {value!r}")


def flat_grid(grid: dict) -> dict:
    """A [sweep] grid or [tune] space with one method's table flattened to qualified keys: ``{vs = {tau = [1]}}``
    (what TOML makes of an unquoted ``vs.tau = [1]``) -> ``{"vs.tau": [1]}``."""
    out = {}
    for key, values in (grid or {}).items():
        if isinstance(values, dict):
            out.update({f"{key}.{name}": v for name, v in values.items()})
        else:
            out[key] = values
    return out


def _check_grid(grid: dict, keys: dict, where: str) -> None:
    """Each grid key a declared hyper-parameter (short, or qualified ``method.name``), its values
    (a list) of the declared type; the methods of qualified keys are checked against the run later."""
    from ltcache.stage2.methods import split_key
    for key, values in flat_grid(grid).items():
        name = split_key(key)[1] if "." in key else key
        if name not in keys:
            raise LtcacheError(f"{where}: [sweep] grid key '{key}' is not a hyper-parameter; valid keys: "
                               + ", ".join(keys) + " (each also as METHOD.NAME, e.g. \"vs.tau\")")
        _check("sweep", f"grid.{key}", values if isinstance(values, list) else [values], where, {f"grid.{key}": (list, "")})
        for v in values if isinstance(values, list) else [values]:
            _check("sweep", f"grid.{key}", v, where, {f"grid.{key}": (keys[name][0], "")})


def parse_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline TOML file (unknown keys and wrong types are errors)."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"pipeline file {path} not found; the shipped ones are in pipelines/")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LtcacheError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    if "plugins" in doc and not isinstance(doc["plugins"], dict):
        raise LtcacheError(f"{path}: put plugins = [...] under [pipeline]")
    plugins = doc.get("pipeline", {}).get("plugins", []) if isinstance(doc.get("pipeline"), dict) else []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise LtcacheError(f"{path}: [pipeline] plugins must be a list of file paths, got {plugins!r}")
    from ltcache.plugins import load_plugins
    try:
        load_plugins(plugins, base=path.parent)         # before the [sweep] keys, which they may add
    except LtcacheError as exc:
        raise LtcacheError(f"{path}: [pipeline] {exc}") from None
    full = schema()
    for section, table in doc.items():
        if section not in full:
            raise LtcacheError(f"{path}: unknown section [{section}]; valid sections: "
                               + ", ".join(f"[{s}]" for s in full))
        if not isinstance(table, dict):
            raise LtcacheError(f"{path}: '{section}' must be a table ([{section}])")
        for key, value in table.items():
            if key not in full[section]:
                raise LtcacheError(f"{path}: unknown key [{section}] {key}; valid keys: "
                                   + ", ".join(full[section]))
            _check(section, key, value, str(path), full[section])
    if "grid" in doc.get("sweep", {}):
        _check_grid(doc["sweep"]["grid"], hyper_keys(), str(path))
    for section, keys in REQUIRED.items():
        for key in keys:
            if key not in doc.get(section, {}):
                raise LtcacheError(f"{path}: missing [{section}] {key}")
    meta = doc.get("pipeline", {})
    name = meta.get("name", path.stem)
    out = Path(meta.get("out", f"runs/{name}"))
    return Pipeline(path=path, name=name, out=out, dataset=dict(doc.get("dataset", {})),
                    stage1=dict(doc.get("stage1", {})), extract=dict(doc.get("extract", {})),
                    sweep=dict(doc.get("sweep", {})),
                    tune=dict(doc["tune"]) if "tune" in doc else None,
                    plugins=[_resolve(path.parent, p) for p in plugins])


def _resolve(base: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else base / p


def check_steps(pl: "Pipeline", path: str | Path) -> None:
    """Every later step's options checked before stage 1 starts (hours on a real dataset): method
    names, grid keys and values, overrides, seeds, presets, the tune budget, search, metric and space.
    A problem is one line naming the file and the section."""
    from ltcache.stage2.methods import METHODS
    from ltcache.stage2.plan import expand, parse_seeds
    from ltcache.stage2.tune import SELECT_METRICS, check_space, parse_space
    from ltcache.stage2.space import SEARCHES

    def methods_of(sec: dict) -> list:
        m = sec.get("methods", "all")
        return list(METHODS) if m == "all" else [str(x) for x in (m if isinstance(m, list) else [m])]

    def check(section: str, sec: dict) -> None:
        try:
            names = methods_of(sec)
            if not names:
                raise LtcacheError("methods is empty; give \"all\" or a list such as [\"ce\", \"los\"]")
            overrides = {k: v for k, v in sec.items() if k in hyper_keys()}
            grid = {k: list(v) if isinstance(v, list) else [v] for k, v in flat_grid(sec.get("grid", {})).items()}
            expand(names, overrides, grid, "cifar", 1000, notice=False)   # names, keys and values, as the sweep will
            parse_seeds(sec.get("seeds", [0]))
            parse_seeds(sec.get("tune_seeds", [0]))
            if sec.get("preset") is not None and sec["preset"] not in PRESETS:
                raise LtcacheError(f"preset '{sec['preset']}' is unknown; use one of: {', '.join(PRESETS)}")
            if section == "sweep" and sec.get("select", "last") not in SELECTS:
                raise LtcacheError(f"select '{sec['select']}' is unknown; use last or val")
            if section == "tune":
                budget = sec.get("budget", 32)
                if not isinstance(budget, int) or budget < 1:
                    raise LtcacheError(f"budget must be an integer >= 1 (got {budget!r}); e.g. budget = 32")
                if sec.get("search", "sobol") not in SEARCHES:
                    raise LtcacheError(f"search '{sec['search']}' is unknown; use one of: {', '.join(SEARCHES)}")
                if sec.get("select_metric", "val-balanced") not in SELECT_METRICS:
                    raise LtcacheError(f"select_metric '{sec['select_metric']}' is unknown; use one of: "
                                       f"{', '.join(SELECT_METRICS)}")
                space = parse_space([f"{k}={v if isinstance(v, str) else ','.join(map(str, v))}"
                                     for k, v in flat_grid(sec.get("space", {})).items()])
                check_space([METHODS.get(n) for n in names], space)
        except LtcacheError as exc:
            raise LtcacheError(f"{path} [{section}]: {exc}") from None

    check("sweep", pl.sweep)
    if pl.tune is not None:
        check("tune", pl.tune)


def _stage1_complete(ckpt: Path, run_args: dict) -> bool:
    """A finished stage 1 with exactly these options."""
    if not ckpt.is_file():
        return False
    from ltcache.stage1 import load_checkpoint
    ck = load_checkpoint(ckpt)
    same = all(ck.get("train_args", {}).get(k) == v for k, v in run_args.items())
    if not same:
        raise LtcacheError(f"{ckpt} was trained with other options than this pipeline; give --out DIR (or "
                           "another [pipeline] out), or --force to replace that run")
    return int(ck["epoch"]) >= int(ck["epochs"])


def plan_hash(step: str, section: dict, caches: list, plugins: list[Path]) -> str:
    """What a sweep or tune step's results depend on, as a short hash recorded in their
    results.json (``pipeline_plan``): the step's section, the caches' manifests (so the stage-1
    checkpoint and the extraction options) and the plugin files' contents."""
    manifests = [json.loads((Path(c) / "manifest.json").read_text(encoding="utf-8"))
                 if (Path(c) / "manifest.json").is_file() else str(c) for c in caches]   # a missing one: bench says
    body = {"step": step, "section": section, "caches": manifests,
            "plugins": [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in plugins]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_done(out: Path, plan: str, force: bool, step: str) -> Optional[dict]:
    """The results of a step already run with this plan (then it is skipped), or None (run it).
    Results of other inputs are refused unless ``force`` (which replaces them)."""
    f = Path(out) / "results.json"
    if not f.is_file():
        return None
    try:
        old = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    if old.get("pipeline_plan") == plan:
        return old
    if force:
        return None
    raise LtcacheError(f"{f} holds results of other inputs than this pipeline's [{step}] step (its section, the "
                       "cache or a plugin changed); pass --force to replace them, or give another --out")


RUN_OPTIONS = ("epochs", "data_root", "device", "out")     # stage-1 options `ltcache run` has itself


def as_pipeline_hint(msg: str, path) -> str:
    """A `ltcache train` message rephrased for `ltcache run`: an option run lacks becomes the pipeline
    key that sets it (``--schedule cosine`` -> ``schedule = "cosine" under [stage1] in FILE``)."""
    def key(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        if name in RUN_OPTIONS:
            return m.group(0)
        section = next((sec for sec in ("stage1", "dataset") if name in SCHEMA[sec]), None)
        if section is None:
            return m.group(0)
        value = m.group(2)
        shown = f'"{value}"' if value and not re.fullmatch(r"[-+0-9.e]+", value) else value
        return f"{name} = {shown} under [{section}] in {path}" if value else f"[{section}] {name} in {path}"
    return re.sub(r"--([a-z][a-z-]*)(?: ([A-Za-z0-9.+-]+))?", key, msg)


def run_pipeline(path: str | Path, out: Optional[str] = None, device: str = "auto", data_root: Optional[str] = None,
                 quiet: bool = False, epochs: Optional[int] = None, force: bool = False) -> dict:
    """Run a pipeline file: stage 1 -> extraction -> sweep (-> tune, when the file has [tune]),
    skipping complete steps.

    Returns the sweep results. ``epochs`` overrides ``[stage1] epochs`` (e.g. a shorter CPU run;
    the checkpoint records what was actually run). A step whose inputs are unchanged is skipped
    (stage 1 by its options, extraction by the checkpoint and options, the sweep and tune by the
    plan hash in their results.json); a step whose earlier outputs came from other inputs is
    refused unless ``force``, which replaces them. Under torchrun (the process group joined by the
    caller) every step runs on every rank; only rank 0 writes the sweep and tune results.
    """
    from ltcache import distributed
    from ltcache.cache.extraction import extract
    from ltcache.stage1 import load_checkpoint
    from ltcache.threads import default_workers

    pl = parse_pipeline(path)
    quiet = quiet or not distributed.is_main()
    out_dir = Path(out) if out else _resolve(Path.cwd(), pl.out)
    opts, root = _stage1_options(pl, Path(path), out_dir, device, data_root, quiet, epochs)
    check_steps(pl, path)                        # every step's options, before hours of stage 1
    ckpt = out_dir / "stage1" / "stage1.pt"
    steps = 4 if pl.tune is not None else 3
    _stage1_step(opts, ckpt, force, steps, quiet)
    cache_dir = out_dir / "cache"
    echo(f"[2/{steps}] extract -> {cache_dir}", quiet)
    ex = dict(pl.extract)
    ex.setdefault("workers", default_workers())
    extract(ckpt, cache=cache_dir, device=device, data_root=root, quiet=quiet, force=force, **ex)
    results = _sweep_step(pl, Path(path), out_dir, cache_dir, device, quiet, force, steps)
    if pl.tune is not None:
        results["tune"] = _tune_step(pl, Path(path), out_dir, cache_dir, device, quiet, force, steps)
    ck = load_checkpoint(ckpt)
    results["pipeline"] = {"file": str(Path(path)), "name": pl.name, "stage1_epochs": ck["epoch"],
                           "stage1_test": ck["history"][-1]["test"] if ck["history"] else None}
    return results


def _stage1_options(pl, path: Path, out_dir: Path, device: str, data_root: Optional[str], quiet: bool,
                    epochs: Optional[int]):
    """(the stage-1 options of a pipeline's [dataset] and [stage1], ``epochs`` overriding, checked;
    the data root)."""
    from ltcache.stage1 import Stage1Options
    from ltcache.threads import default_workers

    ds = dict(pl.dataset)
    root = data_root or ds.pop("data_root", None)
    ds.pop("data_root", None)
    download = bool(ds.pop("download", False))
    source = ds.pop("source")
    s1 = dict(pl.stage1)
    if epochs is not None:
        s1["epochs"] = int(epochs)
    s1.setdefault("workers", default_workers())
    if "pretrained" in s1:
        s1["pretrained"] = str(_resolve(path.parent, s1["pretrained"]))
    if "seed" in ds and "seed" in s1 and ds["seed"] != s1["seed"]:
        raise LtcacheError(f"{path}: [dataset] seed and [stage1] seed differ; ltcache uses one seed for both")
    opts = Stage1Options(dataset=source, data_root=root, download=download, device=device, quiet=quiet,
                         out=str(out_dir / "stage1"), **{**ds, **s1})
    try:
        opts.validate()
    except LtcacheError as exc:
        raise LtcacheError(as_pipeline_hint(str(exc), path)) from None
    return opts, root


def _stage1_step(opts, ckpt: Path, force: bool, steps: int, quiet: bool) -> None:
    """Stage 1, skipped when its checkpoint is complete for these options, resumed when it is partial."""
    from ltcache.stage1 import train_stage1

    echo(f"[1/{steps}] stage 1 -> {ckpt}", quiet)
    if not (force and ckpt.is_file() and not _same_run(ckpt, opts.run_args())) and _stage1_complete(ckpt, opts.run_args()):
        echo("      complete, skipped", quiet)
    else:
        opts.resume = ckpt.is_file() and _same_run(ckpt, opts.run_args())
        opts.force = force
        train_stage1(opts)


def _sweep_step(pl, path: Path, out_dir: Path, cache_dir: Path, device: str, quiet: bool, force: bool,
                steps: int) -> dict:
    """The [sweep] step (skipped when its results hold the same plan); its results, printed."""
    from ltcache import distributed
    from ltcache.stage2.results import format_table

    main = distributed.is_main()
    echo(f"[3/{steps}] sweep -> {out_dir / 'results'}", quiet)
    more = _more_caches(pl.sweep.get("caches", []), path, cache_dir)
    plan = plan_hash("sweep", pl.sweep, [cache_dir] + more, pl.plugins)
    results = distributed.on_main(lambda: step_done(out_dir / "results", plan, force, "sweep"), "the sweep's check")
    if results is not None:
        echo("      complete (same plan), skipped", quiet)
    else:
        results = _run_sweep(pl.sweep, cache_dir, device, quiet, path)
        results["pipeline_plan"] = plan
        if main and more:
            from ltcache.stage2.multi import write_multi
            write_multi(results, out_dir / "results")
        elif main:
            from ltcache.stage2.results import write_all
            write_all(results, out_dir / "results")
    if not quiet:
        echo(format_table(results) if not more else _paper(results))
    return results


def _tune_step(pl, path: Path, out_dir: Path, cache_dir: Path, device: str, quiet: bool, force: bool,
               steps: int) -> dict:
    """The [tune] step (skipped when its results hold the same plan); its table."""
    from ltcache import distributed

    echo(f"[{steps}/{steps}] tune -> {out_dir / 'tune'}", quiet)
    more_t = _more_caches(pl.tune.get("caches", []), path, cache_dir)
    plan = plan_hash("tune", pl.tune, [cache_dir] + more_t, pl.plugins)
    done = distributed.on_main(lambda: step_done(out_dir / "tune", plan, force, "tune"), "the tune step's check")
    if done is not None:
        echo("      complete (same plan), skipped", quiet)
        return _tune_table(done)
    return _run_tune(pl.tune, cache_dir, out_dir / "tune" if distributed.is_main() else None, device, quiet, plan,
                     force, path)


def _same_run(ckpt: Path, run_args: dict) -> bool:
    from ltcache.stage1 import load_checkpoint
    ck = load_checkpoint(ckpt)
    return all(ck.get("train_args", {}).get(k) == v for k, v in run_args.items())


def _run_sweep(section: dict, cache_dir: Path, device: str, quiet: bool, path: Path) -> dict:
    """The [sweep] step: ``ltcache bench`` on the pipeline's cache and any [sweep] caches (results
    not written here)."""
    from ltcache.stage2.api import bench
    sw = dict(section)
    overrides = {k: sw.pop(k) for k in list(sw) if k in hyper_keys()}
    methods = sw.pop("methods", "all")
    grid = {k: list(v) if isinstance(v, list) else [v] for k, v in flat_grid(sw.pop("grid", {})).items()}
    test_views = sw.pop("test_views", ["center", "hflip"])
    more = _more_caches(sw.pop("caches", []), Path(path), cache_dir)
    results = bench([cache_dir] + more if more else cache_dir, None if methods == "all" else list(methods), grid=grid or None,
                    seeds=sw.pop("seeds", [0]), select=sw.pop("select", "last"),
                    test_views="all" if len(test_views) > 1 else "center", device=device, quiet=quiet,
                    preset=sw.pop("preset", None), out_dir=None, overrides=overrides or None,
                    clean_view=bool(sw.pop("clean_view", False)), against=sw.pop("against", "ce"))
    return results


def _run_tune(tn: dict, cache_dir: Path, out: Optional[Path], device: str, quiet: bool, plan: str,
              force: bool = False, path: Path = Path(".")) -> dict:
    """The [tune] step: ``ltcache tune`` on the pipeline's cache (and any [tune] caches; its
    results.json records ``plan``); returns the tuned table. Called only when no results of this
    plan exist there; other results were refused or --force was given."""
    from ltcache.stage2.api import tune
    from ltcache.stage2.tune import format_tune_table, parse_space, write_tune

    tn = dict(tn)
    methods = tn.pop("methods", "all")
    test_views = tn.pop("test_views", ["center", "hflip"])
    space = parse_space([f"{k}={v if isinstance(v, str) else ','.join(map(str, v))}"
                         for k, v in flat_grid(tn.pop("space", {})).items()])
    more = _more_caches(tn.pop("caches", []), path, cache_dir)
    res = tune([cache_dir] + more if more else cache_dir, None if methods == "all" else list(methods),
               budget=int(tn.pop("budget", 32)), against=tn.pop("against", "ce"),
               search=tn.pop("search", "sobol"), select_metric=tn.pop("select_metric", "val-balanced"),
               tune_seeds=tn.pop("tune_seeds", [0]), seeds=tn.pop("seeds", [0, 1, 2, 3, 4]),
               test_views="all" if len(test_views) > 1 else "center", device=device, quiet=quiet,
               preset=tn.pop("preset", None), out_dir=out, force=force, space=space)
    res["pipeline_plan"] = plan
    if out is not None:
        if more:
            from ltcache.stage2.multi import write_multi
            write_multi(res, out)
        else:
            write_tune(res, out)
    if more and not quiet:
        echo(_paper(res))
    elif not quiet:
        echo(format_tune_table(res))
    return _tune_table(res)


def _tune_table(res: dict) -> list:
    """The tuned table of a tune results document (one cache) or its paper-table rows (several)."""
    if "tune" in res and "table" in res["tune"]:
        return res["tune"]["table"]
    from ltcache.stage2.paper_table import compute
    return [{k: v for k, v in r.items() if k != "cells"} for r in compute(res)["rows"]]


def _more_caches(paths: list, pipeline: Path, own: Path) -> list[Path]:
    """[sweep] / [tune] caches: paths relative to the pipeline file, beside its own cache."""
    if not all(isinstance(p, str) for p in paths):
        raise LtcacheError(f"{pipeline}: caches must be a list of cache folder paths, got {paths!r}")
    return [_resolve(pipeline.parent, p) for p in paths]


def _paper(doc: dict) -> str:
    from ltcache.stage2.paper_format import render
    return render(doc, "terminal")
