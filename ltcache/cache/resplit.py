"""A val split for a cache whose stage 1 left none that covers every class.

Caches made before ltcache held val out of the full training set drew val from the training
images the long-tailed profile left over, so a class the profile takes in full (CIFAR-10-LT's
head class) has no val image, and no val-based choice can be made on them. Their backbone saw
every training image of that class, so no training image can serve as val either. The images
stage 1 never saw are the test images: :func:`val_from_test` carves a balanced, seeded val
split out of the test split (``per_class`` images per class) and keeps the rest as the test
split, so val and test stay disjoint and the test rows that report results are never used to
choose. The manifest records the rule, the seed and the counts. This is an interim remedy for
such a cache (the test split shrinks); re-training stage 1 with the holdout rule is the fix.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

import numpy as np

from ltcache.cache.load import load
from ltcache.cache.manifest import MANIFEST, read_manifest, write_manifest
from ltcache.cache.shards import shard_name, write_shard
from ltcache.errors import LtcacheError


def _write_split(dest: Path, split: str, features: np.ndarray, labels: np.ndarray, index: np.ndarray,
                 rows_per_shard: int) -> list[dict]:
    return [write_shard(dest / shard_name(split, i // rows_per_shard), features[i:i + rows_per_shard],
                        labels[i:i + rows_per_shard], index[i:i + rows_per_shard])
            for i in range(0, len(labels), rows_per_shard)]


def val_from_test(src: Union[str, Path], dest: Union[str, Path], per_class: int = 100, seed: int = 0,
                  force: bool = False) -> Path:
    """Copy the cache ``src`` to ``dest`` with its val split replaced by ``per_class`` test images
    per class (seeded), removed from its test split. Returns ``dest``."""
    src, dest = Path(src), Path(dest)
    if dest.exists() and not force:
        raise LtcacheError(f"{dest} already exists; pass force=True to replace it or choose another folder")
    cache = load(src, quiet=True)                      # verifies every shard first
    man = read_manifest(src)
    test = cache.splits.get("test")
    if test is None:
        raise LtcacheError(f"{src} has no test split to carve a val split from")
    y = test.labels.cpu().numpy()
    k = int(cache.num_classes)
    val_rows = _draw_val_rows(y, k, per_class, seed, cache.class_names)
    keep = np.ones(len(y), dtype=bool)
    keep[val_rows] = False
    test_rows = np.where(keep)[0]
    feats = test.features.cpu().numpy().astype(man.get("dtype", "float16"))   # lossless: stored in this dtype
    idx = test.index.cpu().numpy()
    rows_per_shard = int((man.get("key") or {}).get("shard_rows") or 8192)

    tmp = dest.with_name(f".{dest.name}.new")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        blocks = {"val": _write_split(tmp, "val", feats[val_rows], y[val_rows], idx[val_rows], rows_per_shard),
                  "test": _write_split(tmp, "test", feats[test_rows], y[test_rows], idx[test_rows], rows_per_shard)}
        _copy_unchanged(src, tmp, man)
        _record_resplit(man, blocks, y, k, val_rows, test_rows, per_class, seed)
        write_manifest(man, tmp / MANIFEST)
        load(tmp, quiet=True)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _draw_val_rows(y: np.ndarray, k: int, per_class: int, seed: int, class_names) -> np.ndarray:
    """``per_class`` seeded test rows of every class (each class keeps as many for test)."""
    rng = np.random.RandomState(seed)
    val_rows = []
    for c in range(k):
        rows = np.where(y == c)[0]
        if len(rows) < 2 * per_class:
            raise LtcacheError(f"class {class_names[c]} has {len(rows)} test images; too few to move "
                               f"{per_class} to val and keep as many for test (lower per_class)")
        val_rows.append(np.sort(rng.choice(rows, per_class, replace=False)))
    return np.concatenate(val_rows)


def _copy_unchanged(src: Path, tmp: Path, man: dict) -> None:
    """The files the new split leaves as they are: classifier, train shards, BN statistics, checkpoint."""
    names = [man["classifier"]["file"]] + [r["file"] for r in man["splits"]["train"]["shards"]]
    names += [n for n in ((man.get("extraction") or {}).get("bn_stats_file"),
                          (man.get("checkpoint") or {}).get("path")) if n and (src / n).is_file()]
    for name in dict.fromkeys(names):
        shutil.copy2(src / name, tmp / name)


def _record_resplit(man: dict, blocks: dict, y: np.ndarray, k: int, val_rows: np.ndarray, test_rows: np.ndarray,
                    per_class: int, seed: int) -> None:
    """The manifest's new val and test splits, and how they were made (``val_split``)."""
    old_val = man["splits"].get("val", {}).get("rows", 0)
    for split, shards in blocks.items():
        man["splits"][split] = {**man["splits"]["test"], "rows": int(sum(s["rows"] for s in shards)),
                                "shards": shards}
    val_counts = np.bincount(y[val_rows], minlength=k).astype(int).tolist()
    man["val_split"] = {
        "rule": "from-test", "per_class": per_class, "seed": seed, "val_counts": val_counts,
        "test_counts": np.bincount(y[test_rows], minlength=k).astype(int).tolist(),
        "replaced_val_rows": int(old_val),
        "index": "val rows index the source TEST split",
        "why": "stage 1 trained on every training image of the classes the profile takes in full, so the "
               "leftover-train val split lacked them; val is carved from test instead (disjoint from the "
               "test rows that report results). Made by ltcache.cache.resplit.val_from_test."}
