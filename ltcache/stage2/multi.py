"""``bench`` / ``tune`` over several caches: every cache checked and grouped into datasets
(:mod:`ltcache.stage2.replicates`) before anything trains, then one run per cache (each cache
its own batched sweep, tuned on its own val split), and one results document with a run per
(cache, method, configuration, seed).

The document (``schema: ltcache-multi/1``): ``caches`` (per cache: its identity -- path,
dataset, stage-1 seed -- and its single-cache results document without the runs), ``datasets``
(the replicate groups: label and the caches' indices), ``runs`` (every run, with ``cache``: the
index of its cache), ``against`` (the reference method of the paper table) and the wall time.
:func:`cache_results` gives back one cache's single-cache document (what ``ltcache report``
draws per cache). The paper table is :mod:`ltcache.stage2.paper_table` (rendered by
:mod:`ltcache.stage2.paper_format`).
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ltcache.version import __version__
from ltcache.errors import LtcacheError
from ltcache.progress import echo
from ltcache.stage2.replicates import CacheId, group_caches, identify

MULTI_SCHEMA = "ltcache-multi/1"
MULTI_OUTPUTS = ("results.json", "paper.md", "paper.csv", "paper.tex")


def cache_list(cache) -> list:
    """``cache`` as a list: a list / tuple of caches, or one cache (None: the bundled one)."""
    return list(cache) if isinstance(cache, (list, tuple)) else [cache]


def _peek(cache, need_val: bool):
    """A cache's identity (and, with ``need_val``, why its val split cannot back a choice), read
    without loading its train and test features."""
    from ltcache.stage2.plan import _load_cache, val_gaps
    if isinstance(cache, (str, Path)) or cache is None:
        from ltcache import cache as cache_mod
        path = cache_mod.default_cache_path() if cache is None else Path(cache)
        light = cache_mod.load(path, splits=("val",)) if need_val and _has_val(path) else _light(path)
        return identify(light, str(path)), (val_gaps(light) if need_val else None)
    loaded = _load_cache(cache, "cpu")
    return identify(loaded), (val_gaps(loaded) if need_val else None)


def _has_val(path: Path) -> bool:
    from ltcache.cache.manifest import read_manifest
    return "val" in (read_manifest(path).get("splits") or {})


def _light(path: Path):
    """Manifest, class names and counts of a cache on disk (no features)."""
    from types import SimpleNamespace

    from ltcache.cache.manifest import read_manifest
    man = read_manifest(path)
    return SimpleNamespace(manifest=man, path=str(path), class_counts=man["class_counts"],
                           class_names=man.get("class_names"), groups=man.get("groups"), splits={})


def check_caches(caches: Sequence, need_val: Optional[str] = None, quiet: bool = False
                 ) -> tuple[list[CacheId], list]:
    """Identify and group every cache before any training; ``need_val``: what needs each cache's
    val split (e.g. "tune"), refused on a cache whose val split is missing or lacks a class."""
    ids = []
    for c in caches:
        cid, gap = _peek(c, need_val is not None)
        if gap:
            raise LtcacheError(f"--cache {cid.path or c}: {need_val} chooses on the val split, but {gap}; "
                               "drop this cache or use one whose val split covers every class")
        ids.append(cid)
    groups, notices = group_caches(ids)
    for n in notices:
        echo(n, quiet)
    return ids, groups


def check_against(against: str, methods: Sequence[str]) -> str:
    """The reference method of the paper table, which must be one of the run's methods."""
    from ltcache.stage2.methods import get_method
    name = get_method(against).name
    if name not in methods:
        raise LtcacheError(f"--against {against}: the run has no method '{name}' (it runs {', '.join(methods)}); "
                           "give one of them, or add it to --methods")
    return name


def run_caches(kind: str, caches: Sequence, run_one: Callable[[object], dict], against: str,
               need_val: Optional[str] = None, quiet: bool = False) -> dict:
    """Check and group ``caches``, then ``run_one(cache)`` (a single-cache bench or tune) on each;
    the combined document."""
    ids, groups = check_caches(caches, need_val, quiet)
    t0 = time.perf_counter()
    docs = []
    for i, (c, cid) in enumerate(zip(caches, ids)):
        label = next(g.label for g in groups if i in g.members)
        echo(f"cache {i + 1}/{len(caches)}: {cid.path or c} ({label}, {cid.backbone})", quiet)
        docs.append(run_one(c))
    return combine(kind, ids, groups, docs, against, time.perf_counter() - t0)


def combine(kind: str, ids: Sequence[CacheId], groups, docs: Sequence[dict], against: str,
            wall_time_s: float) -> dict:
    """One document from the caches' single-cache results documents."""
    runs = [{**r, "cache": i} for i, d in enumerate(docs) for r in d["runs"]]
    caches = []
    for i, (cid, d) in enumerate(zip(ids, docs)):
        g = next(g for g in groups if i in g.members)
        caches.append({"id": {**asdict(cid), "class_names": list(cid.class_names), "groups": list(cid.groups)},
                       "dataset": g.label, "backbone": cid.backbone,
                       "results": {k: v for k, v in d.items() if k != "runs"}})
    return {"schema": MULTI_SCHEMA, "kind": kind, "ltcache_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "against": against, "wall_time_s": float(wall_time_s),
            "device": docs[0].get("device") if docs else None,
            "datasets": [{"label": g.label, "key": g.key, "caches": list(g.members), "groups": list(g.groups)}
                         for g in groups],
            "caches": caches, "runs": runs}


def is_multi(doc: dict) -> bool:
    """True for a multi-cache results document."""
    return isinstance(doc, dict) and doc.get("schema") == MULTI_SCHEMA


def load_multi(path) -> dict:
    """A multi-cache results document (results.json or its folder); one-line errors otherwise."""
    import json
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise LtcacheError(f"{p}: no such file; give the results.json of a `bench` / `tune` over several --cache")
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LtcacheError(f"{p} is unreadable ({str(exc).splitlines()[0]}); re-run the bench / tune") from None
    if not is_multi(doc):
        raise LtcacheError(f"{p} holds the runs of one cache; the paper table needs a `bench` / `tune` over several "
                           "caches (--cache A --cache B ...)")
    return doc


def cache_results(doc: dict, i: int) -> dict:
    """Cache ``i``'s single-cache results document, rebuilt from a multi-cache one."""
    runs = [{k: v for k, v in r.items() if k != "cache"} for r in doc["runs"] if r["cache"] == i]
    return {**doc["caches"][i]["results"], "runs": runs}


def write_multi(doc: dict, out_dir: Union[str, Path], against: Optional[str] = None) -> dict:
    """results.json and the paper table (paper.md, paper.csv, paper.tex) in ``out_dir``; every
    text is rendered before the first file is written, each written atomically."""
    from ltcache.errors import os_error
    from ltcache.outputs import write_text
    from ltcache.stage2.paper_format import format_csv, format_latex, format_markdown
    from ltcache.stage2.paper_table import compute
    from ltcache.stage2.results import write_json
    out = Path(out_dir)
    table = compute(doc, against or doc.get("against") or "ce")
    texts = {"paper.md": format_markdown(table), "paper.csv": format_csv(table), "paper.tex": format_latex(table)}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out) from None
    paths = {"results.json": write_json(doc, out / "results.json")}
    for name, text in texts.items():
        paths[name] = write_text(out / name, text)
    return paths
