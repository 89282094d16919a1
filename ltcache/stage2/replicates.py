"""Which caches of a multi-cache run are replicates of one dataset.

A cache is identified by its manifest: the dataset it was made from (:func:`dataset_key`: the
source and long-tailed profile, *without* the seed, which is the stage-1 run's seed and so
varies between replicates) and the stage-1 backbone it holds (:func:`stage1_seed`). Caches with
the same dataset key and class list, made by backbones trained with different stage-1 seeds,
form one :class:`DatasetGroup`; the paper table's error bars are then over backbones x stage-2
seeds. :func:`group_caches` refuses what cannot be told apart or compared (the same cache twice,
different class lists under one dataset, one backbone twice, caches with and without a known
stage-1 seed in one group) with a one-line error, before anything trains.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ltcache.errors import LtcacheError

# the dataset spec fields that define "the same dataset" (the seed is the replicate's, not the dataset's)
DATASET_FIELDS = ("source", "imb_ratio", "profile", "selection", "val_per_class", "val_split")


@dataclass(frozen=True)
class CacheId:
    """What a multi-cache run needs to know about one cache."""

    path: str
    fingerprint: str                  # sha256 of the manifest: the same cache, the same fingerprint
    dataset_key: str                  # canonical JSON of the dataset's defining fields
    dataset_label: str                # e.g. "cifar10 IR 100" or an imported cache's --name
    class_names: tuple
    groups: tuple                     # the shot groups with classes: ("many", "medium") ...
    stage1_seed: Optional[int]
    seed_source: str                  # where the seed was read ("manifest", "dataset seed", "unknown")
    imported: bool

    @property
    def backbone(self) -> str:
        """How the table names this cache's backbone."""
        return f"stage-1 seed {self.stage1_seed}" if self.stage1_seed is not None else f"cache {self.path}"


@dataclass
class DatasetGroup:
    """One dataset of the run: its caches (indices into the run's cache list), one per backbone."""

    label: str
    key: str
    members: list = field(default_factory=list)
    groups: tuple = ()


def stage1_seed(man: dict) -> tuple[Optional[int], str]:
    """(the stage-1 training seed of the cache's backbone, where it was read).

    Recorded at extraction (``checkpoint.stage1_seed``, from the ltcache checkpoint's training
    options; ``ltcache import --stage1-seed``). Fallback for a cache extracted before that was
    recorded: an ltcache stage-1 checkpoint (not a foreign layout, not --pretrained weights) drew
    its dataset with its own seed, so the dataset seed is the stage-1 seed. Otherwise unknown."""
    ck = man.get("checkpoint") if isinstance(man.get("checkpoint"), dict) else {}
    if ck.get("stage1_seed") is not None:
        return int(ck["stage1_seed"]), "manifest"
    ds = man.get("dataset") if isinstance(man.get("dataset"), dict) else {}
    ext = man.get("extraction") if isinstance(man.get("extraction"), dict) else {}
    foreign = "layout" in ck or ext.get("weights") == "pretrained" or ds.get("imported") or ext.get("imported")
    if not foreign and ds.get("seed") is not None and ck.get("sha256"):
        return int(ds["seed"]), "dataset seed"
    return None, "unknown"


def dataset_key(man: dict) -> tuple[str, str]:
    """(canonical key, readable label) of the dataset a cache was made from."""
    ds = man.get("dataset") if isinstance(man.get("dataset"), dict) else {"source": str(man.get("dataset"))}
    if ds.get("imported"):
        name = ds.get("name") or "imported"
        return json.dumps({"imported": name}), str(name)
    body = {k: ds.get(k) for k in DATASET_FIELDS}
    src = str(ds.get("source") or "unknown")
    short = src.split(":", 1)[-1].rstrip("/").split("/")[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        short = short[: -len(suffix)] if short.endswith(suffix) else short
    label = short or src
    if ds.get("imb_ratio") is not None:
        label += f" IR {float(ds['imb_ratio']):g}"
    if ds.get("profile") not in (None, "exp"):
        label += f" {ds['profile']}"
    return json.dumps(body, sort_keys=True, default=str), label


def identify(cache, path: Optional[str] = None) -> CacheId:
    """The :class:`CacheId` of a loaded cache (or anything with ``manifest``, ``class_names``
    and ``class_counts``)."""
    from ltcache.groups import shot_groups
    man = dict(getattr(cache, "manifest", None) or {})
    where = str(path or getattr(cache, "path", None) or "")
    if where and Path(where).exists():
        where = str(Path(where).resolve())
    fp = hashlib.sha256(json.dumps(man, sort_keys=True, default=str).encode()).hexdigest() if man else \
        f"object-{id(cache)}"
    key, label = dataset_key(man)
    counts = [int(c) for c in list(cache.class_counts)]
    names = tuple(getattr(cache, "class_names", None) or [str(i) for i in range(len(counts))])
    groups = tuple(getattr(cache, "groups", None) or shot_groups(counts))
    seed, source = stage1_seed(man)
    ds = man.get("dataset") if isinstance(man.get("dataset"), dict) else {}
    return CacheId(where, fp, key, label, names, tuple(g for g in ("many", "medium", "few") if g in groups),
                   seed, source, bool(ds.get("imported")))


def group_caches(ids: Sequence[CacheId]) -> tuple[list[DatasetGroup], list[str]]:
    """The run's caches grouped into datasets (in first-seen order) and the notices to print.

    One-line errors: the same cache twice; one dataset with different class lists; one backbone
    (dataset and stage-1 seed) twice; caches with and without a known stage-1 seed in one group."""
    seen: dict[str, int] = {}
    for i, c in enumerate(ids):
        for k in (c.path, c.fingerprint):
            if k and k in seen:
                j = seen[k]
                what = (f"--cache {c.path} is given twice" if ids[j].path == c.path else
                        f"--cache {ids[j].path} and --cache {c.path} are the same cache (identical manifests)")
                raise LtcacheError(f"{what} (cache {j + 1} and {i + 1}); give each cache once")
        seen.update({k: i for k in (c.path, c.fingerprint) if k})
    out: dict[str, DatasetGroup] = {}
    for i, c in enumerate(ids):
        g = out.setdefault(c.dataset_key, DatasetGroup(c.dataset_label, c.dataset_key))
        g.members.append(i)
    notices = []
    # imported caches named like an extracted dataset (`ltcache import --name "cifar10 IR 100"`) join it
    extracted = {g.label: g for g in out.values() if not ids[g.members[0]].imported}
    for key, g in list(out.items()):
        if ids[g.members[0]].imported and g.label in extracted:
            extracted[g.label].members += g.members
            del out[key]
            notices.append(f"notice: imported cache(s) {', '.join(ids[i].path for i in g.members)} named "
                           f"'{g.label}' grouped with the extracted caches of that dataset")
    labels = [g.label for g in out.values()]
    nth: dict[str, int] = {}
    for g in out.values():
        g.members.sort()
        if labels.count(g.label) > 1:                    # two datasets that read alike: tell them apart
            nth[g.label] = nth.get(g.label, 0) + 1
            g.label = f"{g.label} #{nth[g.label]}"
        _check_group(ids, g, notices)
        g.groups = tuple(x for x in ("many", "medium", "few") if all(x in ids[i].groups for i in g.members))
    return list(out.values()), notices


def _check_group(ids: Sequence[CacheId], g: DatasetGroup, notices: list) -> None:
    """One dataset's caches: one class list, replicate backbones told apart by their stage-1 seeds."""
    first = ids[g.members[0]]
    for i in g.members[1:]:
        c = ids[i]
        if c.class_names != first.class_names:
            a, b = first.class_names, c.class_names
            why = (f"{len(a)} vs {len(b)} classes" if len(a) != len(b) else
                   "class '{}' vs '{}'".format(*next((x, y) for x, y in zip(a, b) if x != y)))
            raise LtcacheError(f"caches {first.path} and {c.path} are both '{g.label}' but have different classes "
                               f"({why}); caches of one dataset must share their class list: check the --cache "
                               "paths")
    seeds = [ids[i].stage1_seed for i in g.members]
    if len(g.members) > 1 and None in seeds and any(s is not None for s in seeds):
        unknown = next(ids[i].path for i in g.members if ids[i].stage1_seed is None)
        raise LtcacheError(f"'{g.label}': cache {unknown} has no stage-1 seed but other caches of this dataset do, "
                           "so it cannot be told apart from them as a replicate; record its seed "
                           "(`ltcache import --stage1-seed N`) or run it in a separate command")
    known = [s for s in seeds if s is not None]
    dup = sorted({s for s in known if known.count(s) > 1})
    if dup:
        twice = [ids[i].path for i in g.members if ids[i].stage1_seed == dup[0]]
        raise LtcacheError(f"'{g.label}': caches {' and '.join(twice)} hold the same backbone (stage-1 seed "
                           f"{dup[0]}), so they are not replicates; give one of them, or run them in separate "
                           "commands")
    if len(g.members) > 1 and not known:
        notices.append(f"notice: '{g.label}': {len(g.members)} caches without a stage-1 seed, each taken as a "
                       "backbone of its own")
