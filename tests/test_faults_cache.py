"""Nothing lost, ever -- the cache and stage-1 side: a manifest that checks itself, ``info --verify``,
one stage-1 writer per --out, atomic checkpoints, a full disk during extraction, and one-line errors
for a bad tarball or a dataset not found from another folder.

Tiny generated data on the CPU: a 4-class 32-px image folder, a one-epoch ResNet-32, shards of 8 rows;
caches without a backbone come from write_cache.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch
from click.testing import CliRunner

torch.set_num_threads(1)

import datagen  # noqa: E402
import ltcache.cache.extraction as extraction  # noqa: E402
import ltcache.cache.manifest as manifest_mod  # noqa: E402
import ltcache.cache.shards as shards  # noqa: E402
import ltcache.stage1 as stage1  # noqa: E402
from ltcache.cache import load, write_cache  # noqa: E402
from ltcache.cache.bundle import bundle_cache  # noqa: E402
from ltcache.cache.load import BUNDLED  # noqa: E402
from ltcache.cache.manifest import (CHECKSUM, MANIFEST, PROGRESS, checksum_ok, manifest_checksum,  # noqa: E402
                                    sha256_file)
from ltcache.lock import LOCK, CacheLock, OutputLock  # noqa: E402
from ltcache.cli import cli  # noqa: E402
from ltcache.errors import LtcacheError  # noqa: E402
from ltcache.stage1 import Stage1Options, train_stage1  # noqa: E402

SHARD_ROWS = 8
ENOSPC = "No space left on device"


# -- helpers -------------------------------------------------------------------------------------
def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error(res, *needles) -> str:
    """Exit 2, exactly one non-empty line ``error: ...`` holding every needle, no traceback."""
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def _small_cache(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    splits = {"train": (torch.randn(20, 2, 4, generator=g), torch.arange(20) % 3, torch.arange(20), ["clean", "aug1"]),
              "test": (torch.randn(9, 1, 4, generator=g), torch.arange(9) % 3, torch.arange(9), ["center"])}
    return write_cache(path, splits, torch.randn(3, 4, generator=g), torch.randn(3, generator=g),
                       dataset={"source": "synthetic"}, class_counts=[8, 7, 5], arch="toy", shard_rows=SHARD_ROWS)


def _temps(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))


def _tree(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch stage-1 run trained from ``base`` on ``imagefolder:data/tiny`` (a path relative to
    the folder it was trained in), and its cache."""
    base = tmp_path_factory.mktemp("faults_cache")
    datagen.make_imagefolder(base / "data" / "tiny", num_classes=4, per_class_train=20, per_class_test=6)
    here = os.getcwd()
    os.chdir(base)
    try:
        ckpt = train_stage1(Stage1Options(dataset="imagefolder:data/tiny", imb_ratio=2, val_per_class=2, epochs=1,
                                          lr=0.01, batch_size=16, warmup_epochs=0, workers=2, device="cpu",
                                          out=str(base / "run"), quiet=True))
    finally:
        os.chdir(here)
    cache = extraction.extract(ckpt, protocol="clean", cache=base / "cache", shard_rows=SHARD_ROWS, batch_size=16, data_root=base,
                               device="cpu", workers=2, quiet=True)
    return SimpleNamespace(base=base, ckpt=ckpt, cache=cache)


def _extract_args(run, cache, *extra):
    return ["extract", "--ckpt", run.ckpt, "--cache", cache, "--protocol", "clean", "--shard-rows", SHARD_ROWS, "--batch-size", 16,
            "--data-root", run.base, "--device", "cpu", "--workers", 2, "--quiet", *extra]


# -- 1. the manifest's own checksum --------------------------------------------------------------
def test_manifest_checksum_is_written_and_an_edit_is_refused(tmp_path):
    path = _small_cache(tmp_path / "c")
    man = json.loads((path / MANIFEST).read_text())
    assert man[CHECKSUM] == manifest_checksum(man) and checksum_ok(man)
    # one number changed, the JSON still valid: refused on load, by info, and by a re-write
    edited = {**man, "class_counts": [9] + man["class_counts"][1:]}
    (path / MANIFEST).write_text(json.dumps(edited, indent=1))
    with pytest.raises(LtcacheError, match="checksum mismatch") as exc:
        load(path)
    msg = str(exc.value)
    assert str(path / MANIFEST) in msg and "--force" in msg and "\n" not in msg
    _one_error(_invoke("info", path), MANIFEST, "checksum mismatch", "--force")
    with pytest.raises(LtcacheError, match="checksum mismatch.*--force"):
        _small_cache(path)
    # the fix the message names: --force rebuilds it
    g = torch.Generator().manual_seed(0)
    splits = {"train": (torch.randn(20, 2, 4, generator=g), torch.arange(20) % 3, torch.arange(20), ["clean", "aug1"]),
              "test": (torch.randn(9, 1, 4, generator=g), torch.arange(9) % 3, torch.arange(9), ["center"])}
    write_cache(path, splits, torch.randn(3, 4, generator=g), torch.randn(3, generator=g),
                dataset={"source": "synthetic"}, class_counts=[8, 7, 5], arch="toy", shard_rows=SHARD_ROWS, force=True)
    assert load(path).manifest["class_counts"] == [8, 7, 5]


def test_manifest_without_checksum_still_loads_but_a_wrong_one_does_not(tmp_path):
    path = _small_cache(tmp_path / "c")
    man = json.loads((path / MANIFEST).read_text())
    old = {k: v for k, v in man.items() if k != CHECKSUM}          # a cache made before checksums
    (path / MANIFEST).write_text(json.dumps(old, indent=1))
    assert load(path).num_classes == 3
    res = _invoke("info", "--verify", path)
    assert res.exit_code == 0 and res.output.startswith("verified: 5 shards OK"), res.output
    (path / MANIFEST).write_text(json.dumps({**old, CHECKSUM: "0" * 64}, indent=1))
    with pytest.raises(LtcacheError, match="checksum mismatch"):
        load(path)


def test_bundled_manifest_is_sealed_and_bundling_reseals(tmp_path):
    man = json.loads((BUNDLED / MANIFEST).read_text())
    assert man[CHECKSUM] == manifest_checksum(man)
    src = _small_cache(tmp_path / "c")
    dest = bundle_cache(src, {"commands": ["test"]}, dest=tmp_path / "bundled", with_checkpoint=False)
    shipped = load(dest).manifest
    assert shipped["provenance"] == {"commands": ["test"]} and checksum_ok(shipped)


# -- 2. info --verify ----------------------------------------------------------------------------
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_manifest(path: Path) -> None:
    man = json.loads(path.read_text())
    man["class_counts"][0] += 1
    path.write_text(json.dumps(man, indent=1))


def _wrong_rows(path: Path) -> None:
    """A consistent-looking but wrong cache: a shard rewritten with fewer rows, its checksum and
    the manifest's checksum updated."""
    shard = path.parent / "train-00001.h5"
    with h5py.File(shard, "r+") as f:
        for key in ("features", "labels", "index"):
            data = f[key][()]
            del f[key]
            f.create_dataset(key, data=data[:3])
    man = json.loads(path.read_text())
    man["splits"]["train"]["shards"][1]["sha256"] = sha256_file(shard)
    (path).write_text(json.dumps(manifest_mod.seal(man), indent=1))


@pytest.mark.parametrize("target,damage,needle", [
    ("train-00001.h5", _truncate, "corrupt"),
    ("train-00001.h5", _flip, "corrupt"),
    ("test-00000.h5", Path.unlink, "missing"),
    ("classifier.h5", _flip, "corrupt"),
    (MANIFEST, _edit_manifest, "checksum mismatch"),
    (MANIFEST, _wrong_rows, "train-00001.h5 holds"),
])
def test_info_verify_names_the_first_damaged_file(tmp_path, target, damage, needle):
    path = _small_cache(tmp_path / "c")
    res = _invoke("info", "--verify", path)
    assert res.exit_code == 0 and res.output.strip() == "verified: 5 shards OK", res.output
    damage(path / target)
    line = _one_error(_invoke("info", "--verify", path), needle)
    assert (target if target != MANIFEST or needle.startswith("checksum") else "train-00001.h5") in line


def test_info_verify_on_an_extracted_cache(run):
    res = _invoke("info", "--verify", run.cache)
    n = sum(len(b["shards"]) for b in json.loads((run.cache / MANIFEST).read_text())["splits"].values())
    assert res.exit_code == 0 and res.output.strip() == f"verified: {n} shards OK", res.output


# -- 3. one stage-1 writer per --out -------------------------------------------------------------
def _train_args(run, out, *extra):
    return ["train", "--dataset", f"imagefolder:{run.base / 'data' / 'tiny'}", "--data-root", run.base,
            "--imb-ratio", "2", "--val-per-class", "2", "--epochs", "1", "--batch-size", "16", "--warmup-epochs",
            "0", "--device", "cpu", "--workers", "2", "--out", out, "--quiet", *extra]


def _no_dataset(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the dataset was built before the refusal")
    monkeypatch.setattr(stage1, "build_dataset", refuse)


def test_second_train_into_the_same_out_is_refused_with_the_first_pid(run, tmp_path, monkeypatch):
    _no_dataset(monkeypatch)
    out = tmp_path / "busy"
    with OutputLock(out):
        held = (out / LOCK).read_text()
        _one_error(_invoke(*_train_args(run, out)), f"pid {os.getpid()}", str(out))
        assert (out / LOCK).read_text() == held                  # the first writer's lock stays
    assert not out.exists() or list(out.iterdir()) == []
    with CacheLock(tmp_path / "cache"):                          # the cache lock is the same lock
        with pytest.raises(LtcacheError, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path / "cache").acquire()


# -- 4. checkpoints atomic, refusals before the dataset ------------------------------------------
def test_out_that_is_a_file_and_unknown_arch_are_refused_before_the_dataset(run, tmp_path, monkeypatch):
    _no_dataset(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _one_error(_invoke(*_train_args(run, afile)), str(afile), "is a file")
    assert afile.read_text() == "not a folder"
    line = _one_error(_invoke(*_train_args(run, tmp_path / "new", "--arch", "resnet33")), "unknown arch 'resnet33'")
    assert "val split" not in line and not (tmp_path / "new").exists()


def test_a_full_disk_while_saving_a_checkpoint_leaves_nothing_half_written(run, tmp_path, monkeypatch):
    real = torch.save

    def full(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)) and Path(f).name.startswith((".best.pt", ".stage1.pt")):
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, ENOSPC)
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    _one_error(_invoke(*_train_args(run, out)), "no space left", ".pt")
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == []                                            # no checkpoint, no temp file, no lock


# -- 5. a full disk during extraction ------------------------------------------------------------
class _FullAt:
    """The n-th shard (or classifier) file written fails as on a full disk: ``disk`` -- the write of
    its temporary file stops half-way with ENOSPC; ``h5py`` -- h5py fails while building it, the way
    it reports a failed write when a file is closed (a RuntimeError holding ``errno = 28``)."""

    def __init__(self, monkeypatch, n: int, how: str):
        self.n, self.how, self.count = n, how, 0
        if how == "disk":
            monkeypatch.setattr(shards, "open", self.open, raising=False)
        else:
            monkeypatch.setattr(shards, "h5py", SimpleNamespace(File=self.File))

    def _due(self) -> bool:
        self.count += 1
        return self.count == self.n

    def open(self, file, mode="r", *a, **kw):
        fh = open(file, mode, *a, **kw)
        if "w" in mode and str(file).endswith(".h5.tmp") and self._due():
            fh.write(b"\x89HDF\r\n\x1a\n half a shard")
            fh.close()
            raise OSError(errno.ENOSPC, ENOSPC)
        return fh

    def File(self, name, mode="r", *a, **kw):
        if mode == "w" and self._due():
            raise RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 28, "
                               "error message = 'No space left on device')")
        return h5py.File(name, mode, *a, **kw)


@pytest.mark.parametrize("how", ["disk", "h5py"])
def test_full_disk_while_writing_a_shard(run, tmp_path, monkeypatch, how):
    with monkeypatch.context() as m:
        _FullAt(m, 3, how)
        cache = tmp_path / "c"
        _one_error(_invoke(*_extract_args(run, cache, "--splits", "test")), "no space left", "test-00002.h5")
    assert not (cache / "test-00002.h5").exists() and _temps(cache) == []
    assert not (cache / MANIFEST).exists() and not (cache / LOCK).exists()
    prog = json.loads((cache / PROGRESS).read_text())
    assert sorted(prog["shards"]) == ["test-00000.h5", "test-00001.h5"]
    for name, rec in prog["shards"].items():                       # what is there is whole
        assert sha256_file(cache / name) == rec["sha256"]
    res = _invoke(*_extract_args(run, cache, "--splits", "test"))   # space freed: the same command finishes
    assert res.exit_code == 0, res.output
    load(cache, splits=("test",))


def test_a_real_write_failure_is_one_line_not_a_crash(run, tmp_path):
    """A real OS error under h5py's feet: a file-size limit (RLIMIT_FSIZE, EFBIG) just above the train
    shards, so the first val shard fails half-way. Written by HDF5 itself, this crashed the process."""
    import resource
    import subprocess
    import sys

    man = json.loads((run.cache / MANIFEST).read_text())
    limit = max((run.cache / r["file"]).stat().st_size for r in man["splits"]["train"]["shards"]) + 64
    assert (run.cache / "val-00000.h5").stat().st_size > limit
    cache = tmp_path / "c"

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [sys.executable, "-c", "from ltcache.cli import main; main()",
            *map(str, _extract_args(run, cache, "--splits", "train,val"))]
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: cannot write {cache / 'val-00000.h5'} (File too large); check the path and the disk"]
    assert not (cache / "val-00000.h5").exists() and _temps(cache) == [] and not (cache / MANIFEST).exists()


def test_full_disk_during_forced_replacement_keeps_the_old_cache(run, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    shutil.copytree(run.cache, cache)
    before = _tree(cache)
    _FullAt(monkeypatch, 2, "disk")
    _one_error(_invoke(*_extract_args(run, cache, "--splits", "test", "--test-views", "center", "--force")),
               "no space left")
    assert _tree(cache) == before                                   # the complete cache is untouched
    load(cache)
    staging = cache.with_name(".c.new")
    assert _temps(staging) == [] and not (staging / MANIFEST).exists()


def test_full_disk_while_writing_bn_stats(run, tmp_path, monkeypatch):
    real = torch.save

    def full(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)) and Path(f).name.startswith(f".{extraction.BN_STATS}"):
            Path(f).write_bytes(b"half")
            raise OSError(errno.ENOSPC, ENOSPC)
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    cache = tmp_path / "c"
    _one_error(_invoke(*_extract_args(run, cache, "--splits", "test", "--bn-shift", "instance")),
               "no space left", extraction.BN_STATS)
    assert not (cache / extraction.BN_STATS).exists() and not (cache / MANIFEST).exists() and _temps(cache) == []


def test_full_disk_while_writing_the_manifest(run, tmp_path, monkeypatch):
    real = manifest_mod.atomic_write

    @contextlib.contextmanager
    def full(path, mode="w", **kw):
        with real(path, mode, **kw) as fh:
            if Path(path).name == MANIFEST:
                fh.write('{"schema_version": 1, "spl')
                raise OSError(errno.ENOSPC, ENOSPC)
            yield fh

    monkeypatch.setattr(manifest_mod, "atomic_write", full)
    cache = tmp_path / "c"
    _one_error(_invoke(*_extract_args(run, cache, "--splits", "test")), "no space left", MANIFEST)
    assert not (cache / MANIFEST).exists() and _temps(cache) == [] and (cache / PROGRESS).is_file()
    monkeypatch.setattr(manifest_mod, "atomic_write", real)
    assert _invoke(*_extract_args(run, cache, "--splits", "test")).exit_code == 0
    load(cache, splits=("test",))


# -- 6, 7. data not found, a bad tarball: one line -----------------------------------------------
def test_bad_tarball_is_one_short_line(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.tar.gz").write_text("this is not a tarball\n")
    good = datagen.make_tarball(run.base / "data" / "tiny", tmp_path / "good.tar.gz").read_bytes()
    Path("cut.tar.gz").write_bytes(good[: len(good) // 2])
    for name, why in (("bad.tar.gz", "not a gzip/tar file"), ("cut.tar.gz", "truncated or damaged")):
        res = _invoke("train", "--dataset", f"imagefolder:{name}", "--data-root", tmp_path / "root", "--epochs", 1,
                      "--device", "cpu", "--out", tmp_path / "out", "--quiet")
        assert _one_error(res) == f"error: cannot unpack {name} ({why}); check the file"
    assert not (tmp_path / "out").exists() and not list((tmp_path / "root").glob(".*-*"))     # no half-unpacked folder


def test_extract_from_another_folder_says_data_root_and_leaves_no_cache_dir(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    args = [a for a in _extract_args(run, cache, "--splits", "test")]
    i = args.index("--data-root")
    del args[i:i + 2]
    _one_error(_invoke(*args), "data/tiny not found", "--data-root")
    assert not cache.exists()
    res = _invoke(*args, "--data-root", run.base)                  # the fix the message names
    assert res.exit_code == 0, res.output


# -- 8. the extraction progress bar --------------------------------------------------------------
def test_progress_bar_counts_images_of_every_split_per_batch(run, tmp_path, monkeypatch):
    bars = []
    real = extraction.progress

    def recording(*a, **kw):
        bar = real(*a, **kw)
        if kw.get("desc") == "extract":
            bars.append((kw, []))
            update = bar.update
            bar.update = lambda n=1: (bars[-1][1].append(n), update(n))[1]
        return bar

    monkeypatch.setattr(extraction, "progress", recording)
    cache = extraction.extract(run.ckpt, protocol="clean", cache=tmp_path / "c", shard_rows=SHARD_ROWS, batch_size=4,
                               data_root=run.base, device="cpu", workers=2, quiet=True)
    man = json.loads((cache / MANIFEST).read_text())
    (kw, updates), = bars
    total = sum(b["rows"] for b in man["splits"].values())
    assert kw["unit"] == "img" and kw["total"] == total and sum(updates) == total
    assert max(updates) <= 4 and len(updates) > sum(len(b["shards"]) for b in man["splits"].values())
