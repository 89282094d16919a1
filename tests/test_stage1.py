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


# -- --eval-every: val/test every N epochs and after the last; best.pt among the evaluated epochs ------
def _count_evaluations(monkeypatch) -> list:
    """Record (split) of every stage-1 evaluation."""
    from ltcache import stage1
    calls, real = [], stage1.evaluate

    def counting(model, ds, split, *a, **kw):
        calls.append(split)
        return real(model, ds, split, *a, **kw)
    monkeypatch.setattr(stage1, "evaluate", counting)
    return calls


def test_eval_every_2_evaluates_epochs_2_and_3(tiny, tmp_path, monkeypatch):
    _, folder = tiny
    calls = _count_evaluations(monkeypatch)
    res = _invoke(_args(folder, tmp_path / "run", "--eval-every", "2", epochs=3))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert calls == ["val", "test"] * 2
    ck = load_checkpoint(tmp_path / "run" / "stage1.pt")
    h = ck["history"]
    assert [e["epoch"] for e in h] == [1, 2, 3] and ck["eval_every"] == 2
    assert h[0]["val"] is None and h[0]["test"] is None                 # not evaluated: null, same fields
    assert all(EPOCH_FIELDS <= set(e) for e in h)
    assert all(set(e["val"]) >= ACC_FIELDS and set(e["test"]) >= ACC_FIELDS for e in h[1:])
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] in (2, 3)
    assert best["history"][-1]["val"]["all"] == max(e["val"]["all"] for e in h[1:])
    assert "stage 1 done: 3/3 epochs" in res.output and "val All -" not in res.output


def test_eval_every_0_evaluates_only_the_last_epoch_and_trains_the_same(run2, tiny, tmp_path, monkeypatch):
    _, folder = tiny
    calls = _count_evaluations(monkeypatch)
    res = _invoke(_args(folder, tmp_path / "run", "--eval-every", "0"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert calls == ["val", "test"]
    h = load_checkpoint(tmp_path / "run" / "stage1.pt")["history"]
    assert h[0]["val"] is None and h[0]["test"] is None and h[1]["val"] is not None and h[1]["test"] is not None
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2
    # evaluating or not does not change the training (same seed, same machine)
    assert [e["train_loss"] for e in h] == [e["train_loss"] for e in load_checkpoint(run2[0] / "stage1.pt")["history"]]


def test_eval_every_is_a_pipeline_key(tmp_path):
    from ltcache.pipeline import parse_pipeline
    path = tmp_path / "p.toml"
    path.write_text("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\neval_every = 0\n")
    assert parse_pipeline(path).stage1["eval_every"] == 0
    path.write_text("[dataset]\nsource = 'cifar10'\n[stage1]\narch = 'resnet32'\neval_every = 'often'\n")
    with pytest.raises(Exception, match=r"\[stage1\] eval_every must be an integer"):
        parse_pipeline(path)


# -- the schedule must fit --epochs: refused before the dataset is built ----------------------------
def test_a_schedule_that_does_not_fit_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    from ltcache import stage1
    _, folder = tiny

    def refuse(*a, **kw):
        raise AssertionError("the dataset was built before the refusal")
    monkeypatch.setattr(stage1, "build_dataset", refuse)

    def args(*extra, epochs):
        a = _args(folder, tmp_path / "out", epochs=epochs)
        del a[a.index("--warmup-epochs"):a.index("--warmup-epochs") + 2]
        del a[a.index("--schedule"):a.index("--schedule") + 2]
        return a + list(extra)

    # 5 epochs on the step schedule: both drops after epoch 4 (the run), with or without warm-up
    for extra in ((), ("--warmup-epochs", "0"), ("--schedule", "step", "--warmup-epochs", "5")):
        msg = _bad(args(*extra, epochs=5), "--epochs 5 is too short for --schedule step")
        assert "fall after epoch 4" in msg and "--schedule cosine" in msg and "--epochs 8 or more" in msg
    msg = _bad(args("--warmup-epochs", "8", epochs=10), "--warmup-epochs 8 does not fit --epochs 10")
    assert "8 epochs before the first lr drop" in msg and "--warmup-epochs 7 or less" in msg
    msg = _bad(args("--schedule", "cosine", "--warmup-epochs", "3", epochs=3), "--warmup-epochs 3 does not fit")
    assert "shorter than the run (3 epochs)" in msg and "--warmup-epochs 2 or less" in msg
    _bad(args("--eval-every", "-1", epochs=3), "--eval-every")
    assert not (tmp_path / "out").exists()                              # nothing written, not even the folder


def test_an_unset_warmup_is_5_or_the_longest_that_fits():
    from ltcache.errors import LtcacheError
    from ltcache.stage1 import Stage1Options

    def warmup(**kw) -> int:
        o = Stage1Options(**kw)
        o.validate()
        return o.warmup_epochs
    assert warmup(epochs=200) == 5 and warmup(epochs=30) == 5 and warmup(epochs=8) == 5
    assert warmup(epochs=1) == 0 and warmup(epochs=2) == 1 and warmup(epochs=4) == 2   # step: before the drop
    assert warmup(epochs=3, schedule="cosine") == 2 and warmup(epochs=6, schedule="cosine") == 5
    assert warmup(epochs=200, warmup_epochs=0) == 0
    for bad in (dict(epochs=6), dict(epochs=7, warmup_epochs=0), dict(epochs=8, warmup_epochs=6),
                dict(epochs=1, warmup_epochs=1), dict(epochs=10, eval_every=-1)):
        with pytest.raises(LtcacheError):
            Stage1Options(**bad).validate()
    Stage1Options(epochs=8, warmup_epochs=5).validate()                 # drops after epochs 6 and 7
    Stage1Options(epochs=5, schedule="cosine", warmup_epochs=4).validate()


def test_resume_keeps_the_runs_unset_warmup(tmp_path):
    """A run trained with the filled-in warm-up resumes with that warm-up when --epochs grows."""
    from ltcache.stage1 import FORMAT, Stage1Options, _prepare_out
    first = Stage1Options(epochs=2, schedule="cosine")
    first.validate()
    assert first.warmup_epochs == 1
    torch.save({"format": FORMAT, "format_version": 1, "train_args": first.run_args()}, tmp_path / "stage1.pt")
    again = Stage1Options(epochs=10, schedule="cosine", resume=True)
    again.validate()
    assert again.warmup_epochs == 5
    _prepare_out(again, tmp_path)
    assert again.warmup_epochs == 1
    explicit = Stage1Options(epochs=10, schedule="cosine", resume=True, warmup_epochs=5)
    explicit.validate()
    with pytest.raises(Exception, match="warmup_epochs=1, not 5"):
        _prepare_out(explicit, tmp_path)


def _lr_before(lr, epochs, warmup, schedule, epoch, step, steps):
    """lr_at as it was before the schedule checks (the reference for the 200-epoch recipe)."""
    import math
    t = epoch + step / max(1, steps)
    if warmup and t < warmup:
        return lr * (t + 1 / max(1, steps)) / warmup
    if schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * t / epochs))
    if epoch >= int(round(0.9 * epochs)):
        return lr * 1e-4
    if epoch >= int(round(0.8 * epochs)):
        return lr * 1e-2
    return lr


@pytest.mark.parametrize("schedule", ["step", "cosine"])
@pytest.mark.parametrize("warmup", [None, 5, 0])
def test_the_200_epoch_schedule_is_unchanged(schedule, warmup):
    from ltcache.stage1 import Stage1Options, lr_at, step_milestones
    o = Stage1Options(epochs=200, schedule=schedule, warmup_epochs=warmup)
    o.validate()
    steps = 97                                  # CIFAR-10-LT IR 100 at batch 128 (12,406 images)
    for epoch in range(200):
        for step in (0, 1, 48, 96):
            assert lr_at(o, epoch, step, steps) == _lr_before(0.1, 200, 5 if warmup is None else warmup,
                                                              schedule, epoch, step, steps), (epoch, step)
    if schedule == "step":
        assert step_milestones(200) == (160, 180)
        assert [lr_at(o, e, 0, steps) for e in (159, 160, 179, 180, 199)] == [0.1, 0.1 * 1e-2, 0.1 * 1e-2,
                                                                              0.1 * 1e-4, 0.1 * 1e-4]
