"""Stage 1 under torchrun (DistributedDataParallel, 2 CPU ranks, gloo).

On CPU there is no SyncBatchNorm, so two ranks do not train the one-process model: each rank's
BatchNorm normalises over its half of the global batch. The test checks the exact relation instead:
a one-process reference that forwards each half separately, averages the halves' gradients (each
half's loss weighted by its share of the global batch) and keeps rank 0's BatchNorm statistics (as
DDP's broadcast_buffers does) gives the two-rank checkpoint's weights."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import datagen
import ranks
from ltcache import distributed
from ltcache.cli import cli
from ltcache.stage1 import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None or not distributed._dist().is_available(),
                                    reason="torchrun / torch.distributed not available")
BATCH = 8                                    # global batch: 4 rows a rank; the last batch is short and uneven


LARGE = "imagefolder:large"                  # 96x80 px images: streamed, 224 px crops, 6 training images
LARGE_BATCH = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    datagen.make_cifar_pickles(root / "data", "cifar10", per_class_train=10, per_class_test=3, num_classes=4)
    datagen.make_large_imagefolder(root / "large", num_classes=2, per_class_train=5, per_class_test=1)
    return root


def _args(out, *extra, epochs: int = 1, batch: int = BATCH, data="data", dataset="cifar10") -> list:
    return ["train", "--dataset", dataset, "--data-root", str(data), "--imb-ratio", "2", "--val-per-class", "1",
            "--arch", "resnet32", "--epochs", str(epochs), "--batch-size", str(batch), "--lr", "0.05",
            "--warmup-epochs", "0", "--schedule", "cosine", "--eval-every", "0", "--device", "cpu",
            "--workers", "1", "--seed", "0", "--out", str(out), "--quiet", *extra]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "LTCACHE_DIST_TIMEOUT": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra})
    return env


def _torchrun(launch: list, args: list, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, *launch, "-m", "ltcache", *args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _done(p: subprocess.Popen) -> tuple:
    out, err = p.communicate(timeout=180)
    return p.returncode, out, err


@pytest.fixture()
def one_thread():
    """One thread like each rank (OMP_NUM_THREADS=1): the convolutions sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(dataset: str = "cifar10", batch: int = BATCH) -> tuple:
    """What two ranks compute for one epoch, in one process (see the module docstring), run in the
    runs' folder (their relative paths)."""
    from ltcache.data import DatasetSpec, build_dataset
    from ltcache.models import build_model
    from ltcache.stage1 import Stage1Options, lr_at, share
    o = Stage1Options(dataset=dataset, imb_ratio=2, val_per_class=1, epochs=1, batch_size=batch, lr=0.05,
                      warmup_epochs=0, schedule="cosine", device="cpu", seed=0)
    o.validate()
    ds = build_dataset(DatasetSpec(dataset, imb_ratio=2, seed=0, val_per_class=1), "data", quiet=True, workers=1)
    torch.manual_seed(0)
    model = build_model("resnet32", ds.num_classes)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.wd)
    gen = torch.Generator().manual_seed(0)
    train = ds.splits["train"]
    n = len(train)
    steps = -(-n // batch)
    model.train()
    perm = torch.randperm(n, generator=gen)
    seeds = torch.randint(2**31, (n,), generator=gen) if train.streamed else None
    for s in range(steps):
        idx = perm[s * batch:(s + 1) * batch]
        if train.streamed:                                        # each row's augmentation from its own seed
            b = next(ds.loader("train", idx, len(idx), ["train"], seeds=seeds[s * batch:(s + 1) * batch], workers=0))
            x, y = ds.normalize(b.images[:, 0]), b.labels
        else:                                                     # the whole global batch, one generator
            x, y = ds.normalize(ds.augment(train.images(idx), gen)), train.labels[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(o, 0, s, steps)
        grads = []
        for r in (1, 0):                                          # rank 1's statistics are dropped
            lo, hi = share(len(idx), r, 2)
            kept = {k: b.clone() for k, b in model.named_buffers()}
            loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi])
            weight = (hi - lo) * 2 / len(idx)
            grads.append(torch.autograd.grad(loss * weight if weight != 1 else loss, params))
            if r:
                for k, b in model.named_buffers():
                    b.copy_(kept[k])
        for p, g1, g0 in zip(params, *grads):                      # DDP: the mean of the ranks' gradients
            p.grad = g0 / 2 + g1 / 2
        opt.step()
    return model.state_dict(), ds


@needs_torchrun
def test_two_ranks_train_the_two_halves_and_resume_with_one_process(root, one_thread, monkeypatch):
    monkeypatch.chdir(root)
    code, out, err = _done(_torchrun(["--standalone", "--nproc_per_node", "2"], _args("two"), root))
    assert code == 0, err[-3000:]
    assert out.count("stage 1 done: 1/1 epochs") == 1                          # rank 0 alone prints
    assert sorted(p.name for p in (root / "two").iterdir()) == ["best.pt", "stage1.pt"]
    ck = load_checkpoint(root / "two" / "stage1.pt")
    assert ck["world_size"] == 2 and ck["sync_bn"] is False and "world_size" not in ck["train_args"]
    ref, ds = _reference()
    assert len(ds.splits["train"]) % BATCH % 2 == 1                # the short last batch split unevenly: 2 + 1
    assert set(ref) == set(ck["state_dict"])
    for k, v in ref.items():
        torch.testing.assert_close(ck["state_dict"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    # the evaluation split over the ranks reports what one process reports for these weights
    from ltcache.models import build_model
    from ltcache.stage1 import evaluate
    model = build_model("resnet32", ds.num_classes)
    model.load_state_dict(ck["state_dict"])
    for split in ("val", "test"):
        assert ck["history"][-1][split] == evaluate(model, ds, split, torch.device("cpu")), split
    # the checkpoint is world-size independent: one process continues it
    res = CliRunner().invoke(cli, _args(root / "two", "--resume", epochs=2, data=root / "data"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    again = load_checkpoint(root / "two" / "stage1.pt")
    assert again["epoch"] == 2 and again["world_size"] == 1 and again["history"][0] == ck["history"][0]


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line(root, monkeypatch):
    # refused before joining the other ranks (so in-process, with torchrun's environment of rank 0 of 2)
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(ranks.free_port())).items():
        monkeypatch.setenv(key, value)
    res = CliRunner().invoke(cli, _args(root / "odd", data=root / "data", batch=7))
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --batch-size 7") and "2 ranks" in lines[0] and "--batch-size 6 or 8" \
        in lines[0], lines[0]
    assert not (root / "odd").exists() and not distributed.active()


@needs_torchrun
def test_two_nodes_on_localhost_stream_large_images(root, one_thread, monkeypatch):
    """Two torchrun invocations as on two machines (one c10d rendezvous), on a streamed image folder:
    each rank reads only its rows of every global batch, augmented from the rows' own seeds."""
    monkeypatch.chdir(root)
    endpoint = f"127.0.0.1:{ranks.free_port()}"
    args = _args("nodes", dataset=LARGE, batch=LARGE_BATCH)
    nodes = [_torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r), "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", endpoint, "--rdzv-id", "ltcache-test"], args, root)
             for r in range(2)]
    results = [_done(p) for p in nodes]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert sum(out.count("stage 1 done: 1/1 epochs") for _, out, _ in results) == 1
    assert sorted(p.name for p in (root / "nodes").iterdir()) == ["best.pt", "stage1.pt"]
    ck = load_checkpoint(root / "nodes" / "stage1.pt")
    assert ck["world_size"] == 2 and ck["dataset"]["image_size"] == 224
    ref, ds = _reference(LARGE, LARGE_BATCH)
    assert ds.splits["train"].streamed and len(ds.splits["train"]) > LARGE_BATCH
    for k, v in ref.items():
        torch.testing.assert_close(ck["state_dict"][k], v, atol=1e-5, rtol=1e-5, msg=k)


DIE_AT_EPOCH_2 = ("import os, ltcache.stage1 as S; lr = S.lr_at\n"
                  "S.lr_at = lambda o, e, s, n: os._exit(9) if (e, s) == (1, 1) else lr(o, e, s, n)\n"
                  "from ltcache.cli import main; main()")


@needs_torchrun
def test_a_rank_that_dies_is_named_and_the_last_epoch_is_kept(root):
    port = str(ranks.free_port())
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LTCACHE_DIST_TIMEOUT="0.5")
    run = [[sys.executable, "-m", "ltcache"], [sys.executable, "-c", DIE_AT_EPOCH_2]]   # rank 1 dies in epoch 2
    procs = [subprocess.Popen(run[r] + _args("die", epochs=3), cwd=root, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env(RANK=str(r), LOCAL_RANK=str(r), **env))
             for r in range(2)]
    (code, out, err), (code1, _, _) = (_done(p) for p in procs)
    assert code1 == 9 and code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: lost rank 1 during epoch 2") and "--resume" in last, err
    assert load_checkpoint(root / "die" / "stage1.pt")["epoch"] == 1
    assert sorted(p.name for p in (root / "die").iterdir()) == ["stage1.pt"]       # lock released


def test_sync_bn_is_refused_on_cpu(root):
    res = CliRunner().invoke(cli, _args(root / "sync", "--sync-bn", data=root / "data"))
    assert res.exit_code == 2 and res.output.strip().startswith("error: --sync-bn needs GPUs"), res.output
    assert len(res.output.strip().splitlines()) == 1 and not (root / "sync").exists()
