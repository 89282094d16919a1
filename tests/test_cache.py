"""The feature cache (issue 3): extract a tiny backbone on tiny generated images, load it back,
and check features, integrity, resume, locking, refusals, views and BatchNorm handling.

Everything runs on the CPU with one thread, on a 4-class 32-px image folder, with
``shard_rows=8`` so every split has several shards.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

torch.set_num_threads(1)

import ltcache.cache.build as cache_build  # noqa: E402
from ltcache.cache import describe, extract, load, write_cache  # noqa: E402
from ltcache.cache.extraction import BN_STATS, _seed, train_row_order  # noqa: E402
from ltcache.lock import LOCK  # noqa: E402
from ltcache.cache.manifest import MANIFEST, PROGRESS, seal, sha256_file  # noqa: E402
from ltcache.cli import cli  # noqa: E402
from ltcache.data import DatasetSpec, build_dataset, hflip  # noqa: E402
from ltcache.errors import LtcacheError  # noqa: E402
from ltcache.models import build_model  # noqa: E402
from ltcache.stage1 import Stage1Options, train_stage1  # noqa: E402
from shard_faults import fail_after, record_writes  # noqa: E402

SHARD_ROWS = 8
BATCH = 16
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 200, 40)]


def _make_imagefolder(root: Path, per_class_train: int = 20, per_class_test: int = 6, size: int = 32) -> Path:
    """root/{train,test}/<class>/NNNN.png, class-dependent colours plus noise and a bar."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 40, (size, size, 3)), 0, 255)
                x0 = int(rng.integers(0, size - 8))
                img[:, x0:x0 + 4, c % 3] = 255 - img[:, x0:x0 + 4, c % 3]       # asymmetric: hflip matters
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ltcache_cache")
    folder = _make_imagefolder(base / "images")
    opts = Stage1Options(dataset=f"imagefolder:{folder}", imb_ratio=2, val_per_class=2, epochs=1, lr=0.01, batch_size=BATCH,
                         workers=2, out=str(base / "run"), quiet=True, warmup_epochs=0, device="cpu")
    ckpt = train_stage1(opts)
    cache = extract(ckpt, protocol="clean", cache=base / "cache", batch_size=BATCH, shard_rows=SHARD_ROWS, data_root=base,
                    quiet=True, workers=2, device="cpu")
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    spec = DatasetSpec.from_dict(dict(ck["dataset"]))
    ds = build_dataset(spec, base, quiet=True, workers=2)
    model = build_model(ck["arch"], ds.num_classes)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return {"base": base, "folder": folder, "ckpt": ckpt, "cache": cache, "ck": ck, "ds": ds, "model": model,
            "loaded": load(cache, dtype=torch.float32)}


def _kw(setup, **over):
    kw = dict(batch_size=BATCH, shard_rows=SHARD_ROWS, data_root=setup["base"], quiet=True, workers=2, device="cpu")
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def batch_cache(setup):
    """An uninterrupted extraction with one augmented train view under batch-statistics BN."""
    return extract(setup["ckpt"], protocol="clean", cache=setup["base"] / "cache_batch",
                   **_kw(setup, splits=("train", "test"), train_views=1, train_bn="batch"))


def _copy_cache(setup, name) -> Path:
    dst = setup["base"] / name
    shutil.copytree(setup["cache"], dst)
    return dst


def _shard_records(path: Path) -> dict:
    man = json.loads((Path(path) / MANIFEST).read_text())
    return {split: [(r["file"], r["rows"], r["sha256"]) for r in block["shards"]]
            for split, block in man["splits"].items()}


def _close16(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)


# -- contents ------------------------------------------------------------------------------------
def test_layout_and_manifest(setup):
    cache, man = setup["cache"], setup["loaded"].manifest
    assert (cache / MANIFEST).is_file() and (cache / "classifier.h5").is_file()
    assert not (cache / PROGRESS).exists() and not (cache / LOCK).exists()
    assert not list(cache.glob(".*.tmp"))
    ds = setup["ds"]
    for split in ("train", "val", "test"):
        block = man["splits"][split]
        n = len(ds.splits[split])
        assert block["rows"] == n
        assert len(block["shards"]) == -(-n // SHARD_ROWS)
        assert [r["file"] for r in block["shards"]] == [f"{split}-{i:05d}.h5" for i in range(len(block["shards"]))]
        for r in block["shards"]:
            assert sha256_file(cache / r["file"]) == r["sha256"]
    assert len(man["splits"]["train"]["shards"]) >= 3
    assert man["splits"]["train"]["views"] == ["clean"]
    assert man["splits"]["test"]["views"] == ["center", "hflip"]
    assert man["splits"]["val"]["views"] == ["center", "hflip"]
    assert man["arch"] == "resnet32" and man["dtype"] == "float16"
    assert man["checkpoint"]["sha256"] == sha256_file(setup["ckpt"])
    assert man["checkpoint"]["stage1_seed"] == 0        # the stage-1 run's --seed (Stage1Options' default)
    assert man["class_counts"] == ds.class_counts and man["num_classes"] == 4
    assert man["class_names"] == ds.class_names
    assert len(man["groups"]) == 4
    assert man["feature_dim"] == setup["model"].fc.in_features
    ex = man["extraction"]
    assert ex["train_views"] == 0 and ex["train_bn"] == "running" and ex["bn_shift"] == "none"
    assert ex["images_per_s"] > 0 and ex["bare_inference_images_per_s"] > 0


@torch.no_grad()
def test_features_equal_direct_forward(setup):
    ds, model, fc = setup["ds"], setup["model"], setup["loaded"]
    for split in ("test", "val"):
        sp = fc.splits[split]
        assert sp.features.dtype == torch.float32
        assert sp.features.shape == (len(ds.splits[split]), 2, model.fc.in_features)
        assert torch.equal(sp.labels, ds.splits[split].labels)
        assert torch.equal(sp.index, ds.splits[split].index)
        imgs = ds.splits[split].images()
        _close16(sp.features[:, 0], model.features(ds.normalize(imgs)))
        _close16(sp.features[:, 1], model.features(ds.normalize(hflip(imgs))))
        assert not torch.allclose(sp.features[:, 0], sp.features[:, 1], atol=1e-2)
    tr = fc.splits["train"]
    assert tr.features.shape[1] == 1
    assert torch.equal(tr.labels, ds.splits["train"].labels) and torch.equal(tr.index, ds.splits["train"].index)
    _close16(tr.features[:, 0], model.features(ds.normalize(ds.splits["train"].images())))
    # the stored stage-1 classifier is the checkpoint's fc
    sd = setup["ck"]["state_dict"]
    assert torch.equal(fc.weight, sd["fc.weight"].float()) and torch.equal(fc.bias, sd["fc.bias"].float())
    assert fc.num_classes == 4 and fc.feature_dim == model.fc.in_features
    # the cached features through the stored head give the model's logits
    logits = fc.splits["test"].features[:, 0] @ fc.weight.T + fc.bias
    direct = model(ds.normalize(ds.splits["test"].images()))
    torch.testing.assert_close(logits, direct, rtol=1e-2, atol=1e-2)


def test_load_float16_and_split_selection(setup):
    fc = load(setup["cache"], splits=("test",), dtype=torch.float16)
    assert list(fc.splits) == ["test"]
    assert fc.splits["test"].features.dtype == torch.float16
    assert torch.equal(fc.splits["test"].features.float(), setup["loaded"].splits["test"].features)
    with pytest.raises(LtcacheError, match="no 'nope' split"):
        load(setup["cache"], splits=("nope",))


def test_rerun_same_options_is_a_no_op(setup):
    before = (setup["cache"] / MANIFEST).read_bytes()
    out = extract(setup["ckpt"], protocol="clean", cache=setup["cache"], **_kw(setup))
    assert out == setup["cache"]
    assert (setup["cache"] / MANIFEST).read_bytes() == before


# -- resume --------------------------------------------------------------------------------------
def test_interrupted_extraction_resumes_identically(setup, batch_cache, monkeypatch):
    target = setup["base"] / "cache_interrupted"
    opts = _kw(setup, splits=("train", "test"), train_views=1, train_bn="batch")
    k = 3
    real = fail_after(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        extract(setup["ckpt"], protocol="clean", cache=target, **opts)
    assert not (target / MANIFEST).exists()
    assert not (target / LOCK).exists()                       # released on the way out
    prog = json.loads((target / PROGRESS).read_text())
    assert len(prog["shards"]) == k
    with pytest.raises(LtcacheError, match="interrupted"):
        load(target)

    written = record_writes(monkeypatch, real)
    extract(setup["ckpt"], protocol="clean", cache=target, **opts)
    got, want = _shard_records(target), _shard_records(batch_cache)
    total = sum(len(v) for v in want.values())
    assert len(written) == total - k                           # the k complete shards were kept
    assert not set(written) & set(prog["shards"])
    assert got == want
    assert not (target / PROGRESS).exists()
    a, b = load(target), load(batch_cache)
    for split in ("train", "test"):
        assert torch.equal(a.splits[split].features, b.splits[split].features)


def test_interrupted_with_altered_partial_shard_recomputes_it(setup, monkeypatch):
    target = setup["base"] / "cache_interrupted2"
    opts = _kw(setup, splits=("test",))
    real = fail_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        extract(setup["ckpt"], protocol="clean", cache=target, **opts)
    monkeypatch.setattr(cache_build, "write_shard", real)
    first = target / "test-00000.h5"
    with open(first, "r+b") as fh:            # a shard damaged after it was recorded
        fh.seek(first.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    (target / ".test-00002.h5.tmp").write_bytes(b"half a shard")       # left by a kill -9
    extract(setup["ckpt"], protocol="clean", cache=target, **opts)
    recs = _shard_records(target)["test"]
    base = _shard_records(setup["cache"])["test"]
    assert recs == base                        # same options on the test split: same bytes
    load(target, splits=("test",))


# -- integrity on read ---------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    else:
        path.unlink()


@pytest.mark.parametrize("how,word", [("flip", "corrupt"), ("truncate", "corrupt"), ("missing", "missing")])
def test_damaged_shard_is_detected(setup, how, word):
    cache = _copy_cache(setup, f"cache_damaged_{how}")
    shard = cache / "train-00001.h5"
    _damage(shard, how)
    with pytest.raises(LtcacheError, match=word) as exc:
        load(cache)
    msg = str(exc.value)
    assert str(shard) in msg and "\n" not in msg and "ltcache extract" in msg
    # the other splits still load; only the damaged one is refused
    load(cache, splits=("test",))
    res = CliRunner().invoke(cli, ["retrain", "--cache", str(cache), "--method", "ce", "--epochs", "1", "--quiet"])
    assert res.exit_code == 2, res.output
    err_lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and shard.name in err_lines[0]
    assert "Traceback" not in res.output


def test_damaged_shard_unverified_and_shape_mismatch(setup):
    cache = _copy_cache(setup, "cache_damaged_shape")
    import h5py

    shard = cache / "test-00000.h5"
    with h5py.File(shard, "r+") as f:       # a wrong shape, with a matching checksum in the manifest
        feats = f["features"][()]
        del f["features"]
        f.create_dataset("features", data=feats[:, :1])
    man = json.loads((cache / MANIFEST).read_text())
    man["splits"]["test"]["shards"][0]["sha256"] = sha256_file(shard)
    (cache / MANIFEST).write_text(json.dumps(seal(man)))      # re-sealed: consistent but wrong
    with pytest.raises(LtcacheError, match="test-00000.h5") as exc:
        load(cache, splits=("test",))
    assert "\n" not in str(exc.value)


def test_classifier_and_manifest_damage(setup):
    cache = _copy_cache(setup, "cache_damaged_clf")
    _damage(cache / "classifier.h5", "flip")
    with pytest.raises(LtcacheError, match="classifier.h5"):
        load(cache, splits=("test",))
    cache2 = _copy_cache(setup, "cache_damaged_manifest")
    (cache2 / MANIFEST).write_text("{not json")
    with pytest.raises(LtcacheError, match="manifest.json"):
        load(cache2)
    with pytest.raises(LtcacheError, match="not found"):
        load(setup["base"] / "no_such_cache")


# -- lock ----------------------------------------------------------------------------------------
def test_second_writer_is_refused(setup):
    target = setup["base"] / "cache_locked"
    target.mkdir()
    lock = {"pid": os.getpid(), "host": socket.gethostname()}
    (target / LOCK).write_text(json.dumps(lock))
    with pytest.raises(LtcacheError, match="another process"):
        extract(setup["ckpt"], protocol="clean", cache=target, **_kw(setup, splits=("test",)))
    assert json.loads((target / LOCK).read_text()) == lock        # not ours to remove
    assert not (target / MANIFEST).exists()
    assert not list(target.glob("*.h5"))


def test_stale_lock_is_taken_over(setup):
    target = setup["base"] / "cache_stale"
    target.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (target / LOCK).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
    extract(setup["ckpt"], protocol="clean", cache=target, **_kw(setup, splits=("test",)))
    assert (target / MANIFEST).is_file() and not (target / LOCK).exists()
    assert _shard_records(target)["test"] == _shard_records(setup["cache"])["test"]


# -- overwrite -----------------------------------------------------------------------------------
def test_overwrite_needs_force(setup):
    cache = _copy_cache(setup, "cache_overwrite")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    with pytest.raises(LtcacheError, match="--force"):
        extract(setup["ckpt"], protocol="clean", cache=cache, **_kw(setup, test_views=("center",)))
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before     # untouched, no lock left
    # via the CLI: exit 2, one error line
    res = CliRunner().invoke(cli, ["extract", "--ckpt", str(setup["ckpt"]), "--cache", str(cache), "--protocol", "clean",
                                   "--test-views", "center", "--shard-rows", str(SHARD_ROWS),
                                   "--batch-size", str(BATCH), "--data-root", str(setup["base"]),
                                   "--device", "cpu", "--workers", "2", "--quiet"])
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    out = extract(setup["ckpt"], protocol="clean", cache=cache, **_kw(setup, splits=("test",), test_views=("center",), force=True))
    assert out == cache
    fc = load(cache, splits=("test",))
    assert list(fc.manifest["splits"]) == ["test"] and fc.splits["test"].views == ["center"]
    assert torch.equal(fc.splits["test"].features[:, 0], setup["loaded"].splits["test"].features[:, 0])
    assert not (cache / LOCK).exists() and not list(cache.glob("train-*.h5"))
    siblings = sorted(p.name for p in cache.parent.iterdir() if p.name.startswith(".cache_overwrite"))
    assert siblings == []


# -- foreign checkpoint --------------------------------------------------------------------------
def test_foreign_state_dict(setup):
    foreign = setup["base"] / "foreign.pt"
    torch.save(setup["model"].state_dict(), foreign)
    dataset = f"imagefolder:{setup['folder']}"
    with pytest.raises(LtcacheError, match="--arch"):
        extract(foreign, protocol="clean", cache=setup["base"] / "cache_foreign_noarch", dataset=dataset, imb_ratio=2,
                val_per_class=2, **_kw(setup, splits=("test",)))
    out = extract(foreign, protocol="clean", cache=setup["base"] / "cache_foreign", arch="resnet32", dataset=dataset, imb_ratio=2,
                  val_per_class=2, **_kw(setup, splits=("train", "test")))
    fc = load(out)
    ref = setup["loaded"]
    assert fc.manifest["arch"] == "resnet32"
    assert fc.manifest["class_counts"] == ref.manifest["class_counts"]
    assert fc.manifest["checkpoint"]["sha256"] == sha256_file(foreign)
    assert "stage1_seed" not in fc.manifest["checkpoint"]      # a foreign checkpoint: its training seed is unknown
    for split in ("train", "test"):
        assert torch.equal(fc.splits[split].index, ref.splits[split].index)
        assert torch.equal(fc.splits[split].features, ref.splits[split].features)
    assert torch.equal(fc.weight, ref.weight) and torch.equal(fc.bias, ref.bias)
    # a wrapped state dict ({"state_dict": ...}) works too; an ltcache checkpoint refuses a wrong --arch
    wrapped = setup["base"] / "wrapped.pt"
    torch.save({"state_dict": setup["model"].state_dict(), "epoch": 3}, wrapped)
    with pytest.raises(LtcacheError, match="--arch"):
        extract(wrapped, protocol="clean", cache=setup["base"] / "cache_wrapped", dataset=dataset, **_kw(setup, splits=("test",)))
    with pytest.raises(LtcacheError, match="contradicts"):
        extract(setup["ckpt"], protocol="clean", cache=setup["base"] / "cache_wrong_arch", arch="resnet18",
                **_kw(setup, splits=("test",)))
    bad = setup["base"] / "broken.pt"
    bad.write_bytes(foreign.read_bytes()[:200])
    with pytest.raises(LtcacheError, match="not a readable"):
        extract(bad, protocol="clean", cache=setup["base"] / "cache_broken", arch="resnet32", dataset=dataset,
                **_kw(setup, splits=("test",)))


# -- BN shift ------------------------------------------------------------------------------------
@torch.no_grad()
def test_bn_shift_moves_only_running_stats(setup):
    out = extract(setup["ckpt"], protocol="clean", cache=setup["base"] / "cache_shift", **_kw(setup, bn_shift="instance"))
    fc, ref = load(out), setup["loaded"]
    assert fc.manifest["extraction"]["bn_shift"] == "instance"
    assert fc.manifest["extraction"]["bn_stats_file"] == BN_STATS
    assert not (setup["cache"] / BN_STATS).exists()
    assert fc.manifest["extra_files"][BN_STATS]["sha256"] == sha256_file(out / BN_STATS)
    stats = torch.load(out / BN_STATS, map_location="cpu")
    sd = setup["ck"]["state_dict"]
    means = [k for k in stats if k.endswith("running_mean")]
    assert means and all(k in sd for k in stats)
    assert any(not torch.allclose(stats[k], sd[k]) for k in means)
    assert any(not torch.allclose(stats[k.replace("mean", "var")], sd[k.replace("mean", "var")]) for k in means)
    # the classifier (and the clean train view, extracted before the shift) are unchanged
    assert torch.equal(fc.weight, ref.weight) and torch.equal(fc.bias, ref.bias)
    assert torch.equal(fc.splits["train"].features, ref.splits["train"].features)
    assert not torch.allclose(fc.splits["test"].features, ref.splits["test"].features, atol=1e-2)
    assert not torch.allclose(fc.splits["val"].features, ref.splits["val"].features, atol=1e-2)
    # nothing but the running statistics moved: the checkpoint's weights with the shifted
    # statistics reproduce the cached test features
    ds = setup["ds"]
    model = build_model("resnet32", ds.num_classes)
    model.load_state_dict({**sd, **{k: v for k, v in stats.items() if "running_" in k}})
    model.eval()
    imgs = ds.splits["test"].images()
    _close16(fc.splits["test"].features[:, 0], model.features(ds.normalize(imgs)))
    _close16(fc.splits["test"].features[:, 1], model.features(ds.normalize(hflip(imgs))))
    # the statistics file is verified like a shard, and a re-run with the same options restores it
    shards = _shard_records(out)
    (out / BN_STATS).write_bytes(b"damaged")
    with pytest.raises(LtcacheError, match=BN_STATS):
        load(out, splits=("test",))
    extract(setup["ckpt"], protocol="clean", cache=out, **_kw(setup, bn_shift="instance"))
    restored = torch.load(out / BN_STATS, map_location="cpu")
    assert all(torch.equal(restored[k], stats[k]) for k in stats)
    assert _shard_records(out) == shards
    load(out)


# -- train views and train-mode BN ---------------------------------------------------------------
@torch.no_grad()
def test_train_bn_batch_equals_train_mode_forward(setup, batch_cache):
    fc, ref, ds = load(batch_cache), setup["loaded"], setup["ds"]
    tr = fc.splits["train"]
    assert tr.views == ["clean", "aug1"]
    assert fc.manifest["extraction"]["train_bn"] == "batch"
    # the train rows are stored in a seeded random order (the source order is sorted by class);
    # each row keeps its source position in ``index``, and its label follows it
    assert fc.manifest["extraction"]["train_row_order"] == "shuffled"
    perm = train_row_order(len(ds.splits["train"]), fc.manifest["extraction"]["seed"])
    assert torch.equal(tr.index, ref.splits["train"].index[perm])
    assert torch.equal(tr.labels, ref.splits["train"].labels[perm])
    assert not torch.equal(perm, torch.arange(len(perm)))
    # clean view and test features: running statistics untouched by the batch-statistics views
    assert torch.equal(tr.features[:, 0], ref.splits["train"].features[perm, 0])
    assert torch.equal(fc.splits["test"].features, ref.splits["test"].features)
    # reproduce every augmented view by hand: per shard of the stored order, the seeded permutation,
    # the same augmentation draws, and a train-mode (batch statistics) forward of that batch
    model = setup["model"]
    train_bn = copy.deepcopy(model)
    for m in train_bn.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    sp = ds.splits["train"]
    seed = fc.manifest["extraction"]["seed"]
    sizes = [r["rows"] for r in fc.manifest["splits"]["train"]["shards"]]
    assert min(sizes) >= SHARD_ROWS // 2            # a short last shard is folded into its predecessor
    for i, lo in enumerate(np.cumsum([0] + sizes[:-1])):
        rows = torch.arange(lo, lo + sizes[i])
        g = torch.Generator().manual_seed(_seed(seed, "train", i))
        order = torch.randperm(len(rows), generator=g)
        assert len(rows) <= BATCH                  # one BN batch per shard
        imgs = sp.images(perm[rows][order])
        aug = ds.augment(imgs, g)
        feats = train_bn.features(ds.normalize(aug))
        expect = torch.empty_like(feats)
        expect[order] = feats
        _close16(tr.features[rows, 1], expect)
        # the eval-mode (running statistics) forward of the same augmented batch differs
        evalf = torch.empty_like(feats)
        evalf[order] = model.features(ds.normalize(aug))
        assert not torch.allclose(tr.features[rows, 1], evalf, atol=1e-2)
    # the augmented view is not the clean one
    assert not torch.allclose(tr.features[:, 0], tr.features[:, 1], atol=1e-2)


def test_batch_statistics_batches_mix_the_classes():
    """Regression: with train rows in source order (sorted by class), the BN batches of a
    batch-statistics cache came from contiguous shards holding a few classes each (on CIFAR-10-LT
    IR 100: shard 0 = classes 0-2, shard 1 = classes 2-9), and the batch statistics carried the
    label. In the stored order every shard must be a uniform sample of the split."""
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor([500, 300, 180, 108, 65, 39, 23, 14, 8, 5]))
    perm = train_row_order(len(labels), 0)
    assert torch.equal(perm.sort().values, torch.arange(len(labels)))       # a permutation
    assert torch.equal(perm, train_row_order(len(labels), 0))               # seeded
    for lo, hi in ((0, 620), (620, len(labels))):                           # two shards of ~620 rows
        share = torch.bincount(labels[perm[lo:hi]], minlength=10).float() / (hi - lo)
        full = torch.bincount(labels, minlength=10).float() / len(labels)
        assert (share - full).abs().max() < 0.06                            # every class, at its share


@torch.no_grad()
def test_train_views_running_mode(setup, batch_cache):
    out = extract(setup["ckpt"], protocol="clean", cache=setup["base"] / "cache_aug_running",
                  **_kw(setup, splits=("train",), train_views=2, train_bn="running"))
    fc, ref, ds = load(out, splits=("train",)), setup["loaded"], setup["ds"]
    tr = fc.splits["train"]
    assert tr.views == ["clean", "aug1", "aug2"]
    assert torch.equal(tr.features[:, 0], ref.splits["train"].features[:, 0])
    assert not torch.allclose(tr.features[:, 1], tr.features[:, 2], atol=1e-2)   # new randomness per view
    batch_aug = load(batch_cache, splits=("train",)).splits["train"].features[:, 1]
    assert not torch.allclose(tr.features[:, 1], batch_aug, atol=1e-2)
    # running mode: augmented views are an eval-mode forward of the augmented images, in dataset order
    model, sp = setup["model"], ds.splits["train"]
    n = len(sp)
    for i in range(-(-n // SHARD_ROWS)):
        rows = torch.arange(i * SHARD_ROWS, min(n, (i + 1) * SHARD_ROWS))
        g = torch.Generator().manual_seed(_seed(0, "train", i))
        imgs = sp.images(rows)
        a1 = ds.augment(imgs, g)
        a2 = ds.augment(imgs, g)
        _close16(tr.features[rows, 1], model.features(ds.normalize(a1)))
        _close16(tr.features[rows, 2], model.features(ds.normalize(a2)))


# -- write_cache, info ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_cache_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    n, v, d, k = 21, 2, 5, 3
    feats = torch.randn(n, v, d, generator=g)
    labels = torch.arange(n) % k
    index = torch.arange(n) * 2
    tr = torch.randn(13, 1, d, generator=g)
    w, b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    path = write_cache(tmp_path / "c", {"train": (tr, torch.arange(13) % k, torch.arange(13), ["clean"]),
                                        "test": (feats, labels, index, ["center", "hflip"])},
                       w, b, dataset={"source": "synthetic"}, class_counts=[5, 4, 4], arch="toy", dtype=dtype,
                       shard_rows=6)
    fc = load(path, splits=("train", "test"), dtype=torch.float32)
    assert len(fc.manifest["splits"]["test"]["shards"]) == 4
    assert len(fc.manifest["splits"]["train"]["shards"]) == 3
    expect = feats if dtype == "float32" else feats.half().float()
    assert torch.equal(fc.splits["test"].features, expect)
    assert torch.equal(fc.splits["test"].labels, labels) and torch.equal(fc.splits["test"].index, index)
    assert fc.splits["test"].views == ["center", "hflip"]
    assert torch.equal(fc.weight, w) and torch.equal(fc.bias, b)
    assert fc.manifest["dtype"] == dtype and fc.feature_dim == d and fc.num_classes == k
    text = describe(path)
    for word in ("rows", "views", "dim", "size", dtype, "center,hflip", "21"):
        assert word in text
    res = CliRunner().invoke(cli, ["info", str(path)])
    assert res.exit_code == 0 and "rows" in res.output


def test_info_of_extracted_cache(setup):
    res = CliRunner().invoke(cli, ["info", str(setup["cache"])])
    assert res.exit_code == 0, res.output
    for word in ("rows", "views", "dim", "size", "resnet32", "float16", "clean", "center,hflip", "imagefolder"):
        assert word in res.output
    rows = setup["loaded"].manifest["splits"]["train"]["rows"]
    assert str(rows) in res.output
    res = CliRunner().invoke(cli, ["info", str(setup["base"] / "nothing")])
    assert res.exit_code == 2 and res.output.startswith("error: ")


# -- bad options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("over,word", [
    ({"splits": ("train", "tset")}, "splits"),
    ({"test_views": ("center", "rot90")}, "test-views"),
    ({"test_views": ()}, "test-views"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"train_bn": "frozen"}, "train-bn"),
    ({"bn_shift": "global"}, "bn-shift"),
    ({"train_views": -1}, "train-views"),
    ({"shard_rows": 0}, "shard-rows"),
])
def test_bad_options(setup, over, word):
    target = setup["base"] / "cache_bad"
    with pytest.raises(LtcacheError, match=word):
        extract(setup["ckpt"], protocol="clean", cache=target, **_kw(setup, **over))
    assert not target.exists()


def _tampered_checkpoint(setup, name, scale):
    """The stage-1 checkpoint with the last BatchNorm's weight scaled (huge or NaN features)."""
    ck = copy.deepcopy(setup["ck"])
    last = [k for k in ck["state_dict"] if k.endswith("running_var")][-1].replace("running_var", "weight")
    ck["state_dict"][last] = ck["state_dict"][last] * scale
    path = setup["base"] / name
    torch.save(ck, path)
    return path


def test_features_beyond_float16_or_non_finite_are_refused_at_extraction(setup):
    big = _tampered_checkpoint(setup, "huge.pt", 1e5)
    target = setup["base"] / "cache_huge"
    with pytest.raises(LtcacheError, match="float32"):
        extract(big, protocol="clean", cache=target, **_kw(setup, splits=("test",)))
    assert not (target / MANIFEST).exists() and not (target / LOCK).exists()
    extract(big, protocol="clean", cache=target, **_kw(setup, splits=("test",), dtype="float32", force=True))
    fc = load(target, splits=("test",))
    assert fc.manifest["dtype"] == "float32" and fc.splits["test"].features.abs().max() > 65504
    nan = _tampered_checkpoint(setup, "nan.pt", float("nan"))
    with pytest.raises(LtcacheError, match="non-finite"):
        extract(nan, protocol="clean", cache=setup["base"] / "cache_nan", **_kw(setup, splits=("test",), dtype="float32"))


def test_bad_write_cache_dtype_and_missing_checkpoint(setup, tmp_path):
    with pytest.raises(LtcacheError, match="dtype"):
        write_cache(tmp_path / "c", {"test": (torch.zeros(2, 1, 3), torch.zeros(2), torch.arange(2), ["center"])},
                    torch.zeros(1, 3), torch.zeros(1), dataset={}, class_counts=[2], dtype="float64")
    with pytest.raises(LtcacheError, match="not found"):
        extract(tmp_path / "nope.pt", protocol="clean", cache=tmp_path / "c2", **_kw(setup))


# -- batch-statistics views with several batches per shard, repair, forced resume ----------------
@torch.no_grad()
def test_train_bn_batch_several_batches_per_shard(setup):
    from ltcache.cache.extraction import batches

    rows_per_shard, bs = 16, 6
    out = extract(setup["ckpt"], protocol="clean", cache=setup["base"] / "cache_batch6",
                  **_kw(setup, splits=("train",), train_views=1, train_bn="batch", shard_rows=rows_per_shard,
                        batch_size=bs))
    fc, ds = load(out, splits=("train",)), setup["ds"]
    sizes = [r["rows"] for r in fc.manifest["splits"]["train"]["shards"]]
    assert sum(sizes) == len(ds.splits["train"]) and min(sizes) >= bs // 2
    train_bn = copy.deepcopy(setup["model"])
    for m in train_bn.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    sp, seen = ds.splits["train"], 0
    perm = train_row_order(len(sp), 0)              # stored order of the train rows
    for i, lo in enumerate(np.cumsum([0] + sizes[:-1])):
        rows = torch.arange(lo, lo + sizes[i])
        g = torch.Generator().manual_seed(_seed(0, "train", i))
        order = torch.randperm(len(rows), generator=g)
        parts = batches(order, bs)
        assert len(parts) == -(-len(rows) // bs) and min(len(p) for p in parts) >= bs // 2
        for pos in parts:                        # each batch: its own batch statistics
            aug = ds.augment(sp.images(perm[rows[pos]]), g)
            _close16(fc.splits["train"].features[rows[pos], 1], train_bn.features(ds.normalize(aug)))
            seen += len(pos)
    assert seen == len(sp)
    # the running statistics are untouched: the clean view is the eval-mode forward
    _close16(fc.splits["train"].features[:, 0], setup["loaded"].splits["train"].features[perm, 0])


def test_rerun_recomputes_a_damaged_shard_of_a_complete_cache(setup, monkeypatch):
    cache = _copy_cache(setup, "cache_repair")
    _damage(cache / "test-00001.h5", "flip")
    (cache / "val-00000.h5").unlink()
    with pytest.raises(LtcacheError, match="ltcache extract --ckpt"):
        load(cache)
    written = record_writes(monkeypatch, cache_build.write_shard)
    extract(setup["ckpt"], protocol="clean", cache=cache, **_kw(setup))           # the fix the error message names
    assert sorted(written) == ["test-00001.h5", "val-00000.h5"]
    assert _shard_records(cache) == _shard_records(setup["cache"])
    load(cache)


def test_interrupted_forced_replacement_keeps_the_old_cache_and_resumes(setup, monkeypatch):
    cache = _copy_cache(setup, "cache_force_resume")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    opts = _kw(setup, splits=("test",), test_views=("center",), force=True)
    real = fail_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        extract(setup["ckpt"], protocol="clean", cache=cache, **opts)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before      # nothing already written is lost
    load(cache)
    written = record_writes(monkeypatch, real)
    extract(setup["ckpt"], protocol="clean", cache=cache, **opts)
    assert written == ["test-00001.h5", "test-00002.h5"]                    # the first one was kept
    fc = load(cache, splits=("test",))
    assert list(fc.manifest["splits"]) == ["test"] and fc.splits["test"].views == ["center"]
    assert torch.equal(fc.splits["test"].features[:, 0], setup["loaded"].splits["test"].features[:, 0])
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".cache_force_resume")]


def test_empty_val_split(setup):
    foreign = setup["base"] / "foreign_noval.pt"
    torch.save(setup["model"].state_dict(), foreign)
    out = extract(foreign, protocol="clean", cache=setup["base"] / "cache_noval", arch="resnet32",
                  dataset=f"imagefolder:{setup['folder']}", imb_ratio=2, val_per_class=0,
                  **_kw(setup, splits=("val", "test")))
    fc = load(out, splits=("val", "test"))
    assert fc.splits["val"].features.shape == (0, 2, fc.feature_dim) and fc.splits["val"].labels.numel() == 0
    assert fc.splits["test"].features.shape[0] == len(setup["ds"].splits["test"])


@torch.no_grad()
def test_batch_statistics_views_leave_every_bn_buffer_untouched(setup):
    from ltcache.cache.extraction import _FrozenBN

    model = copy.deepcopy(setup["model"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = setup["ds"].normalize(setup["ds"].splits["train"].images(torch.arange(6)))
    with _FrozenBN(model):
        batch_feats = model.features(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # incl. num_batches_tracked
    assert not any(m.training for m in model.modules())
    train = copy.deepcopy(setup["model"]).train()
    torch.testing.assert_close(batch_feats, train.features(x))
