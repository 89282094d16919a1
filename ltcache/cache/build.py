"""Writing a cache: shards on a writer thread, resume bookkeeping, the manifest last.

One writer serves extraction and :func:`write_cache` (a cache from tensors: tests and
benchmarks), so there is a single code path for what lands on disk.

Several processes (torchrun ranks) write one cache: rank 0's :class:`CacheWriter` holds the lock,
chooses the folder and writes the manifest; every other rank writes its own shards into that
folder through a :class:`RankWriter`. Each rank keeps its own resume bookkeeping
(``progress.json`` for rank 0, ``progress.rank<r>.json`` for rank r), so no file has two writers.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ltcache import interrupts
from ltcache.version import __version__
from ltcache.cache.manifest import (CLASSIFIER, MANIFEST, PROGRESS, SCHEMA_VERSION, checksum_ok, sha256_file,
                                    write_json_atomic, write_manifest)
from ltcache.cache.shards import shard_name, write_classifier, write_shard
from ltcache.errors import LtcacheError, os_error
from ltcache.groups import shot_groups
from ltcache.lock import CacheLock
from ltcache.outputs import atomic_save, restore_interrupted_swap

DTYPES = {"float16": np.float16, "float32": np.float32}


def progress_name(rank: int) -> str:
    """The resume bookkeeping file of a rank (``progress.json`` for rank 0 and one process)."""
    return PROGRESS if rank == 0 else f"progress.rank{rank}.json"


def read_progress(folder: Path) -> list:
    """Every rank's progress document in ``folder`` (rank 0's first); unreadable ones count as empty."""
    paths = [folder / PROGRESS] + sorted(folder.glob("progress.rank*.json"))
    docs = []
    for path in paths:
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                doc = {}
            docs.append(doc if isinstance(doc, dict) else {})
    return docs


class _ShardQueue:
    """The writer thread shared by both writers: shards are written in the background and each
    completed shard is recorded in this rank's progress file."""

    dir: Path
    key: dict
    world: int = 1
    rank: int = 0

    def _start(self) -> None:
        self._queue: "queue.Queue" = queue.Queue(maxsize=2)    # bounded: at most two shards waiting in memory
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def has_shard(self, split: str, i: int) -> bool:
        """True when shard i of split is already complete (kept from an interrupted run)."""
        return shard_name(split, i) in self.records

    def submit(self, split: str, i: int, features: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        """Queue a shard for the writer thread (overlaps HDF5 writes with compute)."""
        if self._error is not None:
            raise self._error
        self._queue.put((split, i, features, labels, index))

    def _progress_doc(self) -> dict:
        doc = {"key": self.key, "shards": self.records}
        if self.world > 1:
            doc["world"] = self.world
        return doc

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            split, i, feats, labels, index = item
            try:
                rec = write_shard(self.dir / shard_name(split, i), feats, labels, index)
                self.records[rec["file"]] = rec
                write_json_atomic(self._progress_doc(), self.dir / progress_name(self.rank))
                interrupts.test_point("shard")
                if os.environ.get("LTCACHE_TEST_DIE_AFTER_SHARD") == str(self.rank):
                    os._exit(17)                  # tests: this rank dies once its first shard is on disk
            except OSError as exc:        # e.g. a full disk: a one-line error in the main thread
                self._error = os_error(exc, self.dir / shard_name(split, i))
            except BaseException as exc:  # surfaced in the main thread
                self._error = exc

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


class CacheWriter(_ShardQueue):
    """Writes one cache directory. ``key`` identifies what is being made (checkpoint hash and
    options): complete shards of an interrupted run with the same key are kept; a cache with
    another key is refused unless ``force``, and then replaced only once the new one is whole.

    ``world`` > 1: rank 0 of a multi-process extraction (the other ranks write through
    :class:`RankWriter` into :attr:`dir`); an unfinished extraction by another number of
    processes is resumed like one's own (every shard is the same for any number of processes)."""

    def __init__(self, cache_dir, key: dict, force: bool = False, world: int = 1):
        self.final = Path(cache_dir)
        restore_interrupted_swap(self.final)             # a replacement killed between its two renames
        self.key = json.loads(json.dumps(key))          # normalise (tuples -> lists)
        self.world = world
        self.complete = False
        self.records: dict[str, dict] = {}
        self._created = [] if self.final.exists() else [self.final]     # removed again if left empty
        self.dir = self.final
        self.lock = CacheLock(self.final)
        self.lock.acquire()
        try:
            self.dir = self._choose_dir(force)
        except BaseException:
            self.lock.release()
            self._remove_empty()
            raise
        self._start()

    # -- where to write ------------------------------------------------------------------------
    def _choose_dir(self, force: bool) -> Path:
        man = self.final / MANIFEST
        if man.is_file():
            try:
                old = json.loads(man.read_text())
            except (OSError, ValueError):
                old = {}
            old = old if isinstance(old, dict) else {}
            if not checksum_ok(old):
                if not force:
                    raise LtcacheError(f"{man} is damaged or was edited (checksum mismatch); re-extract the cache "
                                       "with --force")
                old = {}                              # not to be trusted: rebuilt beside it, as for --force
            if old.get("key") == self.key:
                shards = {r["file"]: r for b in old.get("splits", {}).values() for r in b.get("shards", [])}
                extras_ok = all((self.final / n).is_file() and sha256_file(self.final / n) == r.get("sha256")
                                for n, r in (old.get("extra_files") or {}).items())
                if self._keep_intact(self.final, shards) and extras_ok:
                    self.complete = True
                    return self.final
                # same cache, but a shard is damaged or gone: recompute only those (any number of
                # processes: a shard does not depend on it)
                write_json_atomic(self._progress_doc(), self.final / PROGRESS)
                man.unlink()
                return self.final
            if not force:
                raise LtcacheError(f"{self.final} already holds a cache made from a different checkpoint or "
                                   "options; pass --force to replace it, or choose another --cache")
            staging = self.final.with_name(f".{self.final.name}.new")
            if not self._resume_from(staging, force=True):
                if staging.exists():
                    shutil.rmtree(staging)
                try:
                    staging.mkdir(parents=True)
                except OSError as exc:
                    raise os_error(exc, staging) from None
                self._created.append(staging)
            return staging
        self._resume_from(self.final, force)
        self.final.mkdir(parents=True, exist_ok=True)
        return self.final

    def _resume_from(self, folder: Path, force: bool) -> bool:
        """Keep the intact shards of an interrupted run with the same key (by any number of
        processes: a shard does not depend on it) in ``folder``; True when there was such a run."""
        docs = read_progress(folder)
        if not docs:
            return False
        if any(d.get("key") != self.key for d in docs) and not force:
            raise LtcacheError(f"{folder} holds an unfinished extraction with other options; "
                               "re-run it with the same options to finish it, or pass --force to start over")
        kept = [d for d in docs if d.get("key") == self.key]      # by any number of processes
        for doc in kept:
            self._keep_intact(folder, doc.get("shards", {}))
        return bool(kept)

    def _keep_intact(self, folder: Path, shards: dict) -> bool:
        """Record the shards whose file matches its checksum; True when all of them do."""
        whole = True
        for name, rec in shards.items():
            path = folder / name
            if path.is_file() and sha256_file(path) == rec.get("sha256"):
                self.records[name] = rec
            else:
                whole = False
        clf = folder / CLASSIFIER
        return whole and clf.is_file()

    # -- finishing -----------------------------------------------------------------------------
    def drain(self) -> dict:
        """Wait until every queued shard is on disk; this rank's shard records."""
        self._drain()
        return dict(self.records)

    def finish(self, body: dict, splits: dict, weight: np.ndarray, bias: np.ndarray,
               extra_files: Optional[dict] = None, more_records: Optional[dict] = None) -> Path:
        """Write the classifier and the manifest (last), swap a forced replacement in place.
        ``more_records``: the shard records of the other ranks."""
        self._drain()
        self.records.update(more_records or {})
        try:
            clf = write_classifier(self.dir / CLASSIFIER, weight, bias)
            extras = {}
            for name, save in (extra_files or {}).items():
                atomic_save(self.dir / name, save)       # complete under its name, or not there
                extras[name] = {"file": name, "sha256": sha256_file(self.dir / name)}
            split_block = {}
            for split, (views, n_shards) in splits.items():
                recs = [self.records[shard_name(split, i)] for i in range(n_shards)]
                split_block[split] = {"views": list(views), "rows": sum(r["rows"] for r in recs), "shards": recs}
            man = {"schema_version": SCHEMA_VERSION, "ltcache_version": __version__,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **body,
                   "splits": split_block, "classifier": clf, "extra_files": extras, "key": self.key}
            write_manifest(man, self.dir / MANIFEST)
            (self.dir / PROGRESS).unlink(missing_ok=True)
            for rank_file in self.dir.glob("progress.rank*.json"):
                rank_file.unlink(missing_ok=True)
            if self.dir != self.final:
                old = self.final.with_name(f".{self.final.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.final, old)          # the old cache (and our lock file) moves aside
                os.replace(self.dir, self.final)     # only now does the new cache take its place
                shutil.rmtree(old, ignore_errors=True)
            return self.final
        finally:
            self.lock.release()

    def abort(self) -> None:
        """Stop the writer thread and release the lock; completed shards stay for a resume, and a
        folder this writer created is removed when nothing was written into it."""
        try:
            self._drain()
        except BaseException:
            pass
        self.lock.release()
        self._remove_empty()

    def _remove_empty(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()                   # only succeeds when it is empty
            except OSError:
                pass


class RankWriter(_ShardQueue):
    """The shard writer of rank r > 0: writes into the folder rank 0 chose (``folder``), takes no
    lock (rank 0 holds it for the whole extraction), and keeps the intact shards an interrupted
    run with the same key recorded, by any number of processes (checked when asked for)."""

    def __init__(self, folder, key: dict, world: int, rank: int):
        self.dir = Path(folder)
        self.key = json.loads(json.dumps(key))
        self.world, self.rank = world, rank
        if not self.dir.is_dir():
            raise LtcacheError(f"rank {rank} cannot see the cache folder {self.dir} that rank 0 writes; put --cache "
                               "on a file system every node shares")
        self._candidates = {}
        for doc in read_progress(self.dir):
            if doc.get("key") == self.key:                 # by any number of processes
                self._candidates.update(doc.get("shards") or {})
        self.records: dict[str, dict] = {}
        self._start()

    def has_shard(self, split: str, i: int) -> bool:
        name = shard_name(split, i)
        rec = self._candidates.pop(name, None)
        if rec is not None and (self.dir / name).is_file() and sha256_file(self.dir / name) == rec.get("sha256"):
            self.records[name] = rec
        return name in self.records

    def drain(self) -> dict:
        """Wait until every queued shard is on disk; this rank's shard records."""
        self._drain()
        return dict(self.records)

    def abort(self) -> None:
        """Stop the writer thread; completed shards stay for a resume."""
        try:
            self._drain()
        except BaseException:
            pass


def manifest_body(dataset: dict, class_counts, arch: str, feature_dim: int, checkpoint: dict,
                  dtype: str, extraction: dict) -> dict:
    """The descriptive part of a manifest (what and how), shared by every writer."""
    counts = [int(c) for c in class_counts]
    names = list(dataset.get("class_names") or [str(i) for i in range(len(counts))])
    groups = shot_groups(counts)
    return {"dataset": dataset, "class_names": names, "class_counts": counts, "num_classes": len(counts),
            "groups": groups, "group_sizes": {g: groups.count(g) for g in ("many", "medium", "few")},
            "arch": arch, "feature_dim": int(feature_dim), "checkpoint": checkpoint, "dtype": dtype,
            "extraction": extraction}


def _validate(arrays: dict, w: np.ndarray, b: np.ndarray, k: int) -> None:
    """Refuse tensors that would make a cache ``load`` rejects (or, worse, misreads)."""
    if w.ndim != 2 or w.shape[0] != k or b.shape != (k,):
        raise LtcacheError(f"write_cache: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not match "
                           f"{k} classes; pass weight [K, D] and bias [K] with K = len(class_counts)")
    for split, (f, y, ix, views) in arrays.items():
        n = f.shape[0] if f.ndim == 3 else -1
        if f.ndim != 3 or f.shape[1] != len(views) or f.shape[2] != w.shape[1]:
            raise LtcacheError(f"write_cache: split {split} features {tuple(f.shape)} must be [N, {len(views)} views, "
                               f"D={w.shape[1]}]; fix the features or the view names")
        if y.shape != (n,) or ix.shape != (n,):
            raise LtcacheError(f"write_cache: split {split} labels {tuple(y.shape)} / index {tuple(ix.shape)} "
                               f"must both be [{n}]")
        if n and (y.min() < 0 or y.max() >= k):
            raise LtcacheError(f"write_cache: split {split} has labels outside [0, {k - 1}]")
        if not np.isfinite(f).all():
            raise LtcacheError(f"write_cache: split {split} has non-finite features (NaN/inf)")


def write_cache(path, splits: dict, weight, bias, dataset: dict, class_counts, arch: str = "unknown",
                checkpoint_sha256: str = "", extraction_args: Optional[dict] = None, dtype: str = "float16",
                shard_rows: int = 8192, force: bool = False, checkpoint_path: Optional[str] = None,
                stage1_seed: Optional[int] = None) -> Path:
    """Write a valid cache from tensors: ``splits = {name: (features [N,V,D], labels, index, views)}``.
    ``stage1_seed``: the training seed of the backbone the features come from (recorded in the
    manifest's checkpoint block; it tells replicate backbones of one dataset apart)."""
    if dtype not in DTYPES:
        raise LtcacheError(f"unknown dtype '{dtype}'; use float16 or float32")
    w = torch.as_tensor(weight).float().cpu().numpy()
    b = torch.as_tensor(bias).float().cpu().numpy()
    arrays = {}
    digest = hashlib.sha256()
    for split, (feats, labels, index, views) in splits.items():
        f32 = torch.as_tensor(feats).float().cpu().numpy()
        if f32.size and np.isfinite(f32).all() and np.abs(f32).max() > np.finfo(DTYPES[dtype]).max:
            raise LtcacheError(f"write_cache: split {split} has features beyond the {dtype} range; use dtype='float32'")
        arrays[split] = (f32.astype(DTYPES[dtype]), torch.as_tensor(labels).cpu().numpy(),
                         torch.as_tensor(index).cpu().numpy(), list(views))
        for a in arrays[split][:3]:
            digest.update(np.ascontiguousarray(a).tobytes())
        digest.update(json.dumps([split, list(views)]).encode())
    for a in (w, b):
        digest.update(np.ascontiguousarray(a).tobytes())
    _validate(arrays, w, b, len(class_counts))
    # the content is part of the key: other tensors at the same path are never taken for this cache
    key = {"source": "tensors", "content_sha256": digest.hexdigest(), "checkpoint_sha256": checkpoint_sha256,
           "dtype": dtype, "shard_rows": shard_rows, "extraction": extraction_args or {},
           "dataset": dataset, "class_counts": [int(c) for c in class_counts], "arch": arch,
           "stage1_seed": stage1_seed}
    writer = CacheWriter(path, key, force=force)
    if writer.complete:
        writer.abort()
        return Path(path)
    try:
        layout = {}
        for split, (f, y, ix, views) in arrays.items():
            n_shards = max(1, -(-len(y) // shard_rows))
            for i in range(n_shards):
                sl = slice(i * shard_rows, (i + 1) * shard_rows)
                if not writer.has_shard(split, i):
                    writer.submit(split, i, f[sl], y[sl], ix[sl])
            layout[split] = (list(views), n_shards)
        ck = {"path": checkpoint_path, "sha256": checkpoint_sha256}
        if stage1_seed is not None:
            ck["stage1_seed"] = int(stage1_seed)
        body = manifest_body(dataset, class_counts, arch, w.shape[1], ck, dtype, extraction_args or {})
        return writer.finish(body, layout, w, b)
    except BaseException:
        writer.abort()
        raise
