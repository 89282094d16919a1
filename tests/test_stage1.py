"""`ltcache train` (stage 1) through the CLI: a tiny CPU run, its checkpoint, resume, bad inputs."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

import datagen
from ltcache.cli import cli
from ltcache.stage1 import load_checkpoint

torch.set_num_threads(1)

EPOCH_FIELDS = {"epoch", "train_loss", "lr", "val", "test", "seconds", "images_per_s"}
ACC_FIELDS = {"all", "many", "medium", "few"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    folder = datagen.make_imagefolder(root / "tiny", num_classes=4, per_class_train=24, per_class_test=6, size=32)
    return root, folder


def _args(folder, out, *extra, epochs=2):
    return ["train", "--dataset", f"imagefolder:{folder}", "--data-root", str(folder.parent / "root"),
            "--imb-ratio", "2", "--val-per-class", "2", "--arch", "resnet32", "--epochs", str(epochs),
            "--batch-size", "16", "--lr", "0.05", "--warmup-epochs", "0", "--schedule", "cosine",
            "--device", "cpu", "--workers", "2", "--seed", "0", "--out", str(out), "--quiet", *extra]


def _invoke(args):
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def run2(tiny):
    root, folder = tiny
    out = root / "run"
    res = _invoke(_args(folder, out))
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res


def test_two_epochs_run_and_update_the_weights(run2, tiny, tmp_path):
    """What holds on every machine: both epochs ran with finite losses, training moved
    the weights away from their seeded init, and the same seed reproduces the run on this machine. (Whether two
    epochs on a few random images lower the loss depends on the machine's floating point.)"""
    import math
    out, res = run2
    ck = load_checkpoint(out / "stage1.pt")
    h = ck["history"]
    assert len(h) == 2 and [e["epoch"] for e in h] == [1, 2]
    assert all(math.isfinite(e["train_loss"]) for e in h)
    assert "stage 1 done: 2/2 epochs" in res.output
    torch.manual_seed(0)                        # the initial weights of this run (seed 0)
    from ltcache.models import build_model
    init = build_model("resnet32", 4).state_dict()
    assert not torch.equal(init["fc.weight"], ck["state_dict"]["fc.weight"])
    _, folder = tiny
    again = _invoke(_args(folder, tmp_path / "again"))
    assert again.exit_code == 0, again.output
    assert [e["train_loss"] for e in load_checkpoint(tmp_path / "again" / "stage1.pt")["history"]] == \
        [e["train_loss"] for e in h]


def test_checkpoint_has_every_field(run2, tiny):
    out, _ = run2
    import ltcache
    for name in ("stage1.pt", "best.pt"):
        ck = load_checkpoint(out / name)
        assert ck["format"] == "ltcache-stage1" and ck["format_version"] == 1
        assert ck["ltcache_version"] == ltcache.__version__
        assert ck["arch"] == "resnet32" and ck["num_classes"] == 4 and ck["feature_dim"] == 64
        sd = ck["state_dict"]
        assert sd["fc.weight"].shape == (4, 64) and sd["fc.bias"].shape == (4,)
        from ltcache.models import build_model
        build_model("resnet32", 4).load_state_dict(sd)                  # loads strictly
        ds = ck["dataset"]
        assert ds["source"] == f"imagefolder:{tiny[1]}"
        assert ds["imb_ratio"] == 2.0 and ds["profile"] == "exp" and ds["selection"] == "shuffle"
        assert ds["seed"] == 0 and ds["val_per_class"] == 2
        assert ds["class_names"] == ["class0", "class1", "class2", "class3"]
        assert ds["class_counts"] == [22, 19, 15, 12]            # val (2 per class) held out first
        assert ds["val_split"] == "holdout" and ds["val_counts"] == [2, 2, 2, 2]
        assert ds["groups"] == ["medium", "few", "few", "few"]
        ta = ck["train_args"]
        assert ta["arch"] == "resnet32" and ta["epochs"] == 2 and ta["batch_size"] == 16 and ta["lr"] == 0.05
        assert ta["imb_ratio"] == 2.0 and ta["dataset"] == ds["source"] and ta["seed"] == 0
        assert isinstance(ck["history"], list) and ck["history"]
        for e in ck["history"]:
            assert EPOCH_FIELDS <= set(e)
            assert set(e["val"]) >= ACC_FIELDS and set(e["test"]) >= ACC_FIELDS
            assert e["train_loss"] > 0 and e["seconds"] > 0 and e["images_per_s"] > 0
            assert 0 <= e["test"]["all"] <= 100
        assert ck["epoch"] == len(ck["history"])
        assert isinstance(ck["optimizer"], dict) and "state" in ck["optimizer"]
        assert "best_val" in ck and "scaler" in ck
    last = load_checkpoint(out / "stage1.pt")
    best = load_checkpoint(out / "best.pt")
    assert last["epoch"] == 2
    assert best["history"][-1]["val"]["all"] == max(e["val"]["all"] for e in last["history"])


def test_resume_continues_to_more_epochs(run2, tmp_path):
    out, _ = run2
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = load_checkpoint(copy / "stage1.pt")
    res = _invoke(_args(out.parent / "tiny", copy, "--resume", epochs=3))
    assert res.exit_code == 0, res.output + repr(res.exception)
    ck = load_checkpoint(copy / "stage1.pt")
    assert ck["epoch"] == 3 and len(ck["history"]) == 3
    assert [e["epoch"] for e in ck["history"]] == [1, 2, 3]
    assert ck["history"][:2] == before["history"]               # earlier epochs kept as they were
    assert ck["train_args"]["epochs"] == 3
    # resuming a finished run does nothing and leaves the checkpoint alone
    data = (copy / "stage1.pt").read_bytes()
    res = _invoke(_args(out.parent / "tiny", copy, "--resume", epochs=3))
    assert res.exit_code == 0 and (copy / "stage1.pt").read_bytes() == data


def _bad(args, needle, ckpt=None):
    before = ckpt.read_bytes() if ckpt is not None else None
    res = _invoke(args)
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    assert needle in errors[0], errors[0]
    if ckpt is not None:
        assert ckpt.read_bytes() == before
    return errors[0]


def test_bad_inputs_exit_2_and_leave_the_run_alone(run2, tiny, tmp_path):
    out, _ = run2
    root, folder = tiny
    ckpt = out / "stage1.pt"
    best = (out / "best.pt").read_bytes()

    def swap(args, flag, value):
        a = list(args)
        a[a.index(flag) + 1] = value
        return a

    base = _args(folder, out, "--force")
    # the run's directory, --force: every bad input is refused before anything is written
    _bad(swap(base, "--dataset", "imagenet"), "unknown dataset 'imagenet'", ckpt)
    msg = _bad(swap(base, "--arch", "resnet33"), "unknown arch 'resnet33'", ckpt)
    assert "resnet32" in msg and "resnext50_32x4d" in msg
    empty = tmp_path / "empty-root"
    empty.mkdir()
    msg = _bad(swap(swap(base, "--dataset", "cifar10"), "--data-root", str(empty)), "cifar10 not found", ckpt)
    assert "--download" in msg and "imagefolder:" in msg
    _bad(swap(base, "--imb-ratio", "0.5"), "--imb-ratio must be >= 1", ckpt)
    _bad(swap(base, "--imb-ratio", "30"), "leaves class 3 with 0 images", ckpt)   # a class left empty
    # an out dir that already holds a run (no --resume / --force)
    msg = _bad(_args(folder, out), "already holds a training run", ckpt)
    assert "--resume" in msg and "--force" in msg
    # --resume with options that differ from the run's
    _bad(swap(_args(folder, out, "--resume"), "--batch-size", "8"), "batch_size=16, not 8", ckpt)
    _bad(swap(_args(folder, out, "--resume"), "--imb-ratio", "3"), "imb_ratio=2.0", ckpt)
    assert (out / "best.pt").read_bytes() == best
    # --resume where there is no checkpoint
    nock = tmp_path / "no-ckpt"
    nock.mkdir()
    _bad(_args(folder, nock, "--resume"), "not found", None)
    assert list(nock.iterdir()) == []
    # --resume on a corrupt checkpoint
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "stage1.pt").write_bytes(b"\x00garbage, not a checkpoint\xff" * 10)
    _bad(_args(folder, bad, "--resume"), "not a readable PyTorch checkpoint", bad / "stage1.pt")
    # --resume on a foreign (non-ltcache) checkpoint
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {}}, foreign / "stage1.pt")
    _bad(_args(folder, foreign, "--resume"), "not an ltcache stage-1 checkpoint", foreign / "stage1.pt")
