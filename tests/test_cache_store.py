"""The cache store without a backbone: write_cache -> load, what load refuses, default_cache_path,
the lock, and the shard/batch layout rules of extraction. Tiny random tensors, no images."""
from __future__ import annotations

import importlib
import json
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from ltcache.cache import default_cache_path, load, write_cache  # noqa: E402
from ltcache.cache.extraction import batches, shard_bounds  # noqa: E402
from ltcache.lock import LOCK, CacheLock  # noqa: E402
from ltcache.cache.manifest import MANIFEST, seal, sha256_file  # noqa: E402
from ltcache.errors import LtcacheError  # noqa: E402
from shard_faults import fail_after  # noqa: E402

cache_load = importlib.import_module("ltcache.cache.load")      # the module (ltcache.cache.load is the function)
K, D = 3, 4


def _tensors(seed: int = 0, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    splits = {"train": (torch.randn(n, 2, D, generator=g), torch.arange(n) % K, torch.arange(n), ["clean", "aug1"]),
              "test": (torch.randn(7, 1, D, generator=g), torch.arange(7) % K, torch.arange(7) + 100, ["center"])}
    return splits, torch.randn(K, D, generator=g), torch.randn(K, generator=g)


def _write(path, seed=0, **kw):
    splits, w, b = _tensors(seed)
    return write_cache(path, splits, w, b, dataset={"source": "synthetic"}, class_counts=[4, 3, 3],
                       arch="toy", shard_rows=4, **kw)


def _rewrite_shard(cache: Path, name: str, **datasets) -> None:
    """Replace datasets of a shard and update its checksum in the manifest (a consistent but wrong cache)."""
    shard = cache / name
    with h5py.File(shard, "r+") as f:
        for key, value in datasets.items():
            del f[key]
            f.create_dataset(key, data=value)
    man = json.loads((cache / MANIFEST).read_text())
    for block in man["splits"].values():
        for rec in block["shards"]:
            if rec["file"] == name:
                rec["sha256"] = sha256_file(shard)
    (cache / MANIFEST).write_text(json.dumps(seal(man)))      # re-sealed: consistent but wrong


def test_round_trip_float32_and_device_dtype(tmp_path):
    path = _write(tmp_path / "c", dtype="float32")
    splits, w, b = _tensors(0)
    fc = load(path)
    for name, (f, y, ix, views) in splits.items():
        assert torch.equal(fc.splits[name].features, f)
        assert torch.equal(fc.splits[name].labels, y) and torch.equal(fc.splits[name].index, ix)
        assert fc.splits[name].views == views
    assert len(fc.manifest["splits"]["train"]["shards"]) == 3
    assert torch.equal(fc.weight, w) and torch.equal(fc.bias, b)
    assert fc.class_counts.tolist() == [4, 3, 3] and fc.groups == ["few"] * 3
    half = load(path, splits=("test",), dtype=torch.float16)
    assert half.splits["test"].features.dtype == torch.float16


def test_same_content_is_a_no_op_other_content_needs_force(tmp_path):
    path = _write(tmp_path / "c")
    before = (path / MANIFEST).read_bytes()
    _write(path)
    assert (path / MANIFEST).read_bytes() == before
    with pytest.raises(LtcacheError, match="--force"):
        _write(path, seed=1)                      # other features at the same path: never silently kept
    assert (path / MANIFEST).read_bytes() == before
    _write(path, seed=1, force=True)
    splits, _, _ = _tensors(1)
    assert torch.equal(load(path).splits["test"].features, splits["test"][0].half().float())


@pytest.mark.parametrize("change,word", [
    (lambda s, w, b: s["test"][3].append("hflip"), "views"),
    (lambda s, w, b: s.update(test=(s["test"][0], s["test"][1][:3], s["test"][2], s["test"][3])), "labels"),
    (lambda s, w, b: s["test"][1].__setitem__(0, K), "outside"),
    (lambda s, w, b: s["test"][0].__setitem__((0, 0, 0), float("nan")), "non-finite"),
    (lambda s, w, b: s["test"][0].__setitem__((0, 0, 0), 1e6), "float32"),
])
def test_write_cache_refuses_inconsistent_tensors(tmp_path, change, word):
    splits, w, b = _tensors(0)
    change(splits, w, b)
    with pytest.raises(LtcacheError, match=word):
        write_cache(tmp_path / "c", splits, w, b, dataset={}, class_counts=[4, 3, 3])
    assert not (tmp_path / "c" / MANIFEST).exists() and not (tmp_path / "c" / LOCK).exists()


def test_verify_false_skips_checksums_only(tmp_path):
    path = _write(tmp_path / "c")
    man = json.loads((path / MANIFEST).read_text())
    man["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(seal(man)))      # re-sealed: consistent but wrong
    with pytest.raises(LtcacheError, match="checksum"):
        load(path)
    assert load(path, verify=False).splits["train"].features.shape == (10, 2, D)
    (path / "train-00001.h5").unlink()
    with pytest.raises(LtcacheError, match="missing"):       # a missing shard is caught even unverified
        load(path, verify=False)


@pytest.mark.parametrize("what,word", [
    ("labels_range", "labels outside"),
    ("nonfinite", "non-finite"),
    ("dtype", "float32"),
    ("labels_shape", "labels"),
])
def test_consistent_but_invalid_shard_is_refused(tmp_path, what, word):
    path = _write(tmp_path / "c")
    name = "train-00000.h5"
    with h5py.File(path / name, "r") as f:
        feats, labels = f["features"][()], f["labels"][()]
    if what == "labels_range":
        labels[0] = K
        _rewrite_shard(path, name, labels=labels)
    elif what == "nonfinite":
        feats[1, 0, 2] = np.inf
        _rewrite_shard(path, name, features=feats)
    elif what == "dtype":
        _rewrite_shard(path, name, features=feats.astype(np.float32))
    else:
        _rewrite_shard(path, name, labels=labels[:2])
    with pytest.raises(LtcacheError, match=word) as exc:
        load(path)
    msg = str(exc.value)
    assert "\n" not in msg and "ltcache extract" in msg
    load(path, splits=("test",))                                   # the other split is fine


def test_manifest_versions(tmp_path):
    path = _write(tmp_path / "c")
    man = json.loads((path / MANIFEST).read_text())
    for version, word in ((99, "newer"), (0, "unknown schema version"), (None, "not an ltcache manifest")):
        (path / MANIFEST).write_text(json.dumps({**man, "schema_version": version}))
        with pytest.raises(LtcacheError, match=word):
            load(path)


def test_interrupted_write_says_how_to_finish(tmp_path, monkeypatch):
    import ltcache.cache.build as cache_build

    real = fail_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "c")
    with pytest.raises(LtcacheError, match="re-run the same"):
        load(tmp_path / "c")
    monkeypatch.setattr(cache_build, "write_shard", real)
    path = _write(tmp_path / "c")
    uninterrupted = _write(tmp_path / "d")
    assert json.loads((path / MANIFEST).read_text())["splits"] == json.loads((uninterrupted / MANIFEST).read_text())["splits"]


def test_default_cache_path(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_load, "BUNDLED", tmp_path / "bundled")
    monkeypatch.delenv("LTCACHE_CACHE", raising=False)
    with pytest.raises(LtcacheError, match="ltcache extract --ckpt") as exc:
        default_cache_path()
    assert "ltcache train" in str(exc.value) and "--cache" in str(exc.value)
    monkeypatch.setenv("LTCACHE_CACHE", str(tmp_path / "nothing"))
    with pytest.raises(LtcacheError, match="LTCACHE_CACHE"):
        default_cache_path()
    path = _write(tmp_path / "c")
    monkeypatch.setenv("LTCACHE_CACHE", str(path))
    assert default_cache_path() == path
    assert load().path == path
    monkeypatch.delenv("LTCACHE_CACHE")
    _write(tmp_path / "bundled")
    assert default_cache_path() == tmp_path / "bundled"


def test_lock_live_and_stale(tmp_path):
    d = tmp_path / "c"
    with CacheLock(d):
        held = json.loads((d / LOCK).read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(LtcacheError, match="another process"):
            CacheLock(d).acquire()
        with pytest.raises(LtcacheError, match="another process"):
            _write(d)
    assert not (d / LOCK).exists()
    (d / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))   # no such pid
    _write(d)
    assert (d / MANIFEST).is_file() and not (d / LOCK).exists()
    (d / LOCK).write_text(json.dumps({"pid": 1, "host": "another-host"}))      # cannot tell: refuse
    with pytest.raises(LtcacheError, match="another-host"):
        _write(d, seed=3, force=True)


def test_shard_bounds_and_batches():
    assert shard_bounds(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert shard_bounds(17, 8, min_last=4) == [(0, 8), (8, 17)]
    assert shard_bounds(17, 8, min_last=1) == [(0, 8), (8, 16), (16, 17)]
    assert shard_bounds(5, 8, min_last=4) == [(0, 5)]
    assert shard_bounds(0, 8) == [(0, 0)]
    parts = batches(torch.arange(13), 6)
    assert [len(p) for p in parts] == [5, 4, 4] and torch.equal(torch.cat(parts), torch.arange(13))
    assert [len(p) for p in batches(torch.arange(12), 6)] == [6, 6]
    assert batches(torch.arange(0), 6) == ()
