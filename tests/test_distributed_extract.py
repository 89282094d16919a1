"""Extraction under torchrun: 2 CPU ranks (gloo) write the cache one process writes, row for row;
a rank that dies ends the other with one line naming it, no manifest, and a resume -- with any number
of processes -- keeps the completed shards; a streamed split's undecodable image is left out and counted
with --skip-bad-images (issue 17)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltcache import distributed
from ltcache.cache import extract, extraction, load
from ltcache.cache.manifest import MANIFEST, PROGRESS
from ltcache.errors import LtcacheError
from ltcache.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datagen import corrupt_image, make_imagefolder, make_large_imagefolder  # noqa: E402
import ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

needs_torchrun = pytest.mark.skipif(TORCHRUN is None or not distributed._dist().is_available(),
                                    reason="torchrun / torch.distributed not available")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-class 32-px image folder and a randomly initialised resnet32 saved as a plain state dict."""
    base = tmp_path_factory.mktemp("dist_extract")
    images = make_imagefolder(base / "images", num_classes=4, per_class_train=20, per_class_test=6)
    torch.manual_seed(0)
    torch.save(build_model("resnet32", 4).state_dict(), base / "net.pt")
    args = ["extract", "--ckpt", "net.pt", "--arch", "resnet32", "--dataset", f"imagefolder:{images}",
            "--imb-ratio", "2", "--val-per-class", "2", "--protocol", "clean", "--shard-rows", "8",
            "--batch-size", "8", "--device", "cpu", "--workers", "1", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "ltcache", *args, "--cache", "one"], cwd=base, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    return base, args


def _env(**extra: str) -> dict:
    return ranks.env(OMP_NUM_THREADS="1", **extra)


def _ranks(args: list, cwd: Path, **extra: str) -> list:
    """One ``python -m ltcache`` per rank (torchrun would stop the survivor before it speaks)."""
    return ranks.launch([args, args], cwd, timeout_min="0.5", **extra)


def _same_cache(a: Path, b: Path) -> None:
    """Every split: the same rows in the same order (labels, index) and features equal within one
    float16 step (they came out bit-identical here; a backend may round a batch differently)."""
    x, y = load(a, dtype=torch.float32), load(b, dtype=torch.float32)
    assert set(x.splits) == set(y.splits) == {"train", "val", "test"}
    for s in x.splits:
        assert torch.equal(x.splits[s].labels, y.splits[s].labels), s
        assert torch.equal(x.splits[s].index, y.splits[s].index), s
        torch.testing.assert_close(x.splits[s].features, y.splits[s].features, rtol=2 ** -10, atol=1e-4)
    assert torch.equal(x.weight, y.weight) and torch.equal(x.bias, y.bias)


@needs_torchrun
def test_two_ranks_equal_one_process(setup):
    # the default (faithful) protocol: batch-statistics views, augmentation and BN shift -- every
    # shard is the same for any number of processes, so the caches are equal row for row
    base, args = setup
    faithful = [a for a in args if a not in ("--protocol", "clean")]
    one = subprocess.run([sys.executable, "-m", "ltcache", *faithful, "--cache", "one-faithful"], cwd=base, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "ltcache", *faithful, "--cache",
                          "two"], cwd=base, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    _same_cache(base / "one-faithful", base / "two")
    man = json.loads((base / "two" / MANIFEST).read_text())
    assert man["extraction"]["world_size"] == 2 and [r["rank"] for r in man["extraction"]["ranks"]] == [0, 1]
    assert man["extraction"]["train_views"] == 4 and man["extraction"]["train_bn"] == "batch"
    names = [r["file"] for r in man["splits"]["train"]["shards"]]
    ref = json.loads((base / "one-faithful" / MANIFEST).read_text())
    assert names == [r["file"] for r in ref["splits"]["train"]["shards"]] and len(names) > 1
    assert not list((base / "two").glob("progress*.json")) and not (base / "two" / ".lock").exists()


@needs_torchrun
def test_dead_rank_is_named_and_the_rerun_resumes(setup):
    base, args = setup
    cmd = args + ["--cache", "three"]
    (rc0, _, err0), (rc1, _, _) = _ranks(cmd, base, LTCACHE_TEST_DIE_AFTER_SHARD="1")   # rank 1: first shard, exit
    assert rc1 == 17 and rc0 == 2, err0
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: lost rank 1 during the extraction"), err0
    cache = base / "three"
    assert not (cache / MANIFEST).exists() and not (cache / ".lock").exists()
    prog1 = json.loads((cache / "progress.rank1.json").read_text())
    assert len(prog1["shards"]) == 1 and prog1["world"] == 2
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.h5")}
    # one process finishes what two started: a shard is the same for any number of processes
    extract(base / "net.pt", cache=cache, arch="resnet32", dataset=args[args.index("--dataset") + 1],
            imb_ratio=2, val_per_class=2, protocol="clean", shard_rows=8, batch_size=8, device="cpu",
            workers=1, quiet=True)
    assert {n: p.stat().st_mtime_ns for n, p in ((n, cache / n) for n in kept)} == kept   # kept, not rewritten
    assert not (cache / PROGRESS).exists() and not (cache / "progress.rank1.json").exists()
    _same_cache(base / "one", cache)


def test_streamed_split_skips_bad_images(tmp_path, monkeypatch):
    monkeypatch.setattr(extraction, "bare_inference_rate", lambda *a, **k: 1.0)   # 224-px forwards: slow here
    folder = make_large_imagefolder(tmp_path / "large", num_classes=2, per_class_train=3, per_class_test=1)
    bad = corrupt_image(folder / "train" / "class1" / "0001.jpg")
    torch.manual_seed(0)
    torch.save(build_model("resnet32", 2).state_dict(), tmp_path / "net.pt")
    kw = dict(arch="resnet32", dataset=f"imagefolder:{folder}", imb_ratio=1, val_per_class=0, protocol="clean",
              splits=("train",), shard_rows=4, batch_size=4, device="cpu", workers=0, quiet=True)
    with pytest.raises(LtcacheError, match="skip-bad-images"):
        extract(tmp_path / "net.pt", cache=tmp_path / "c", **kw)
    fc = load(extract(tmp_path / "net.pt", cache=tmp_path / "c", skip_bad=True, **kw), splits=("train",))
    assert fc.manifest["extraction"]["skipped_images"] == {"count": 1, "first": [str(bad)]}
    assert fc.splits["train"].labels.tolist() == [0, 0, 0, 1, 1]            # the bad row is simply absent
