"""Long-tailed datasets: profiles, selection rules, val split, every source, augmentation, errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datagen
from ltcache.data import DatasetSpec, build_dataset, draw_validation, lt_counts, select_indices
from ltcache.errors import LtcacheError
from ltcache.groups import shot_groups

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("ir,total", [(10, 20431), (50, 13996), (100, 12406), (200, 11203)])
def test_cifar10_lt_sizes(ir, total):
    counts = lt_counts(5000, 10, ir)
    assert len(counts) == 10 and sum(counts) == total
    assert counts[0] == 5000 and counts[-1] == int(5000 / ir)
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("ir,total", [(10, 19573), (50, 12608), (100, 10847), (200, 9502)])
def test_cifar100_lt_sizes(ir, total):
    counts = lt_counts(500, 100, ir)
    assert len(counts) == 100 and sum(counts) == total
    assert counts[0] == 500 and counts[-1] == int(500 / ir)


def test_exp_profile_formula_and_balanced():
    k, n_max, ir = 7, 300, 30.0
    assert lt_counts(n_max, k, ir) == [int(n_max * (1 / ir) ** (i / (k - 1))) for i in range(k)]
    assert lt_counts(50, 5, 1) == [50] * 5
    assert lt_counts(50, 1, 10) == [50]


def test_step_profile():
    assert lt_counts(100, 10, 10, "step") == [100] * 5 + [10] * 5
    assert lt_counts(500, 100, 100, "step") == [500] * 50 + [5] * 50
    assert lt_counts(100, 4, 1, "step") == [100] * 4
    # odd K: the head gets the extra class
    assert lt_counts(100, 5, 4, "step") == [100, 100, 100, 25, 25]


def test_profile_errors():
    for ir in (0.5, 0, -3):
        with pytest.raises(LtcacheError, match="imbalance ratio must be >= 1"):
            lt_counts(100, 10, ir)
    with pytest.raises(LtcacheError, match="unknown profile 'linear'.*exp, step"):
        lt_counts(100, 10, 10, "linear")


# ------------------------------------------------------------------------------ selection rules
LABELS = np.array([2, 0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 2, 1, 0])   # class 0 at 1,3,6,7,10,13


def test_selection_first_hand_computed():
    sel = select_indices(LABELS, [4, 2, 1], "first")
    assert sel.tolist() == [1, 3, 6, 7, 2, 5, 0]
    assert sel.dtype == np.int64


def test_selection_shuffle_matches_seeded_numpy_stream():
    counts = [4, 2, 1]
    for seed in (0, 1, 7):
        # the LDAM-DRW / MiSLAS recipe: np.random.seed(seed), then shuffle each class's indices
        np.random.seed(seed)
        expected = []
        for c, n in enumerate(counts):
            idx = np.where(LABELS == c)[0]
            np.random.shuffle(idx)
            expected += idx[:n].tolist()
        sel = select_indices(LABELS, counts, "shuffle", seed)
        assert sel.tolist() == expected
        # same seed -> same indices; every kept index has the right class, no duplicates
        assert select_indices(LABELS, counts, "shuffle", seed).tolist() == expected
        assert [int(LABELS[i]) for i in sel] == [0] * 4 + [1] * 2 + [2]
        assert len(set(sel.tolist())) == len(sel)


def test_selection_shuffle_literal_seed0():
    # hand-run of RandomState(0): class 0 [1,3,6,7,10,13] -> permutation, first 4; then class 1, 2
    rs = np.random.RandomState(0)
    c0 = np.array([1, 3, 6, 7, 10, 13]); rs.shuffle(c0)
    c1 = np.array([2, 5, 8, 12]); rs.shuffle(c1)
    c2 = np.array([0, 4, 9, 11]); rs.shuffle(c2)
    expected = c0[:4].tolist() + c1[:2].tolist() + c2[:1].tolist()
    assert select_indices(LABELS, [4, 2, 1], "shuffle", 0).tolist() == expected
    assert expected != select_indices(LABELS, [4, 2, 1], "first").tolist()


def test_selection_errors():
    with pytest.raises(LtcacheError, match="unknown selection rule 'random'"):
        select_indices(LABELS, [1, 1, 1], "random")
    with pytest.raises(LtcacheError, match="class 1 with 0 images.*lower the imbalance ratio"):
        select_indices(LABELS, [2, 0, 1], "first")
    with pytest.raises(LtcacheError, match="class 2 has 4 training images but the profile asks for 5"):
        select_indices(LABELS, [1, 1, 5], "shuffle")


# ------------------------------------------------------------------------------ validation split
def test_draw_validation_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    sel = select_indices(labels, [7, 6, 3], "shuffle", 0)
    val, short = draw_validation(labels, sel, 3, seed=0)
    assert short == []
    assert not set(val.tolist()) & set(sel.tolist())
    assert np.bincount(labels[val], minlength=3).tolist() == [3, 3, 3]
    assert len(set(val.tolist())) == 9
    val2, _ = draw_validation(labels, sel, 3, seed=0)
    assert val.tolist() == val2.tolist()


def test_draw_validation_smaller_share_when_no_spare_images():
    labels = np.repeat(np.arange(3), 10)
    sel = select_indices(labels, [10, 8, 2], "first")           # spare: 0, 2, 8
    val, short = draw_validation(labels, sel, 4, seed=3, class_names=["a", "b", "c"])
    assert np.bincount(labels[val], minlength=3).tolist() == [0, 2, 4]
    assert short == [("a", 0), ("b", 2)]
    assert not set(val.tolist()) & set(sel.tolist())
    assert draw_validation(labels, sel, 0)[0].size == 0
    with pytest.raises(LtcacheError, match="no training image is left over"):
        draw_validation(labels, np.arange(30), 2)
    with pytest.raises(LtcacheError, match="--val-per-class must be >= 0"):
        draw_validation(labels, sel, -1)


# ------------------------------------------------------------------------------ sources
def _read_pickles(base, files, key):
    data, labels = [], []
    for f in files:
        with open(base / f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        data.append(d["data"])
        labels += d[key]
    return np.concatenate(data).reshape(-1, 3, 32, 32), np.array(labels)


def _check_common(ds, k):
    tr, va, te = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    for sp in (tr, va, te):
        x = sp.images()
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[0] == len(sp) and x.shape[1] == 3
        assert sp.labels.dtype == torch.long and sp.index.dtype == torch.long
        assert sp.labels.shape == sp.index.shape == (len(sp),)
        assert int(sp.labels.min()) >= 0 and int(sp.labels.max()) < k
    assert ds.num_classes == k == len(ds.class_counts)
    assert np.bincount(tr.labels.numpy(), minlength=k).tolist() == ds.class_counts
    assert ds.groups == shot_groups(ds.class_counts)
    assert ds.spec.class_names == ds.class_names and ds.spec.class_counts == ds.class_counts
    d = ds.spec.to_dict()
    assert DatasetSpec.from_dict(d) == ds.spec


def test_cifar10_pickles(tmp_path):
    base = datagen.make_cifar_pickles(tmp_path, "cifar10", per_class_train=20, per_class_test=5)
    spec = DatasetSpec("cifar10", imb_ratio=10, selection="shuffle", seed=0, val_per_class=3)
    ds = build_dataset(spec, data_root=tmp_path, quiet=True)
    _check_common(ds, 10)
    assert ds.class_names == [f"class{i}" for i in range(10)]
    # val (3 per class) is held out first: the head class gives up 3 of its 20, the others
    # keep the profile's counts
    assert ds.class_counts == [17] + lt_counts(20, 10, 10)[1:]
    assert ds.class_counts[0] == 17 and ds.class_counts[-1] == 2
    assert ds.spec.val_split == "holdout" and ds.spec.val_counts == [3] * 10
    assert ds.image_size == 32 and ds.small_images
    x, y = _read_pickles(base, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    tr = ds.splits["train"]
    # every class the profile does not take in full keeps exactly the papers' images
    papers = select_indices(y, lt_counts(20, 10, 10), "shuffle", 0)
    assert tr.index.tolist()[17:] == papers.tolist()[20:]
    assert set(tr.index.tolist()[:17]) < set(papers.tolist()[:20])
    assert torch.equal(tr.images(), torch.from_numpy(x[tr.index.numpy()]))
    assert tr.labels.tolist() == y[tr.index.numpy()].tolist()
    # val: held out of the full training set, never the train rows; 3 per class, every class
    va = ds.splits["val"]
    assert not set(va.index.tolist()) & set(tr.index.tolist())
    assert torch.equal(va.images(), torch.from_numpy(x[va.index.numpy()]))
    per = np.bincount(va.labels.numpy(), minlength=10).tolist()
    assert per == [3] * 10
    xt, yt = _read_pickles(base, ["test_batch"], "labels")
    te = ds.splits["test"]
    assert len(te) == 50 and torch.equal(te.images(), torch.from_numpy(xt)) and te.labels.tolist() == yt.tolist()
    assert ds.groups == ["few"] * 10                          # < 20 images: few
    # the `first` rule picks the first n_i of each class in source order
    ds_first = build_dataset(DatasetSpec("cifar10", imb_ratio=10, selection="first", val_per_class=3),
                             data_root=tmp_path, quiet=True)
    first = select_indices(y, lt_counts(20, 10, 10), "first")
    assert ds_first.splits["train"].index.tolist()[17:] == first.tolist()[20:]
    assert ds_first.splits["train"].index.tolist()[:17] == first.tolist()[:17]
    assert ds_first.splits["train"].index.tolist() != tr.index.tolist()


def test_cifar100_pickles(tmp_path):
    base = datagen.make_cifar_pickles(tmp_path, "cifar100", per_class_train=4, per_class_test=1)
    assert base.name == "cifar-100-python"
    ds = build_dataset(DatasetSpec("cifar100", imb_ratio=2, profile="step", val_per_class=1),
                       data_root=tmp_path, quiet=True)
    _check_common(ds, 100)
    assert ds.class_names[:2] == ["class0", "class1"]
    assert ds.class_counts == [3] * 50 + [2] * 50          # the step profile's head classes give up 1 each
    assert len(ds.splits["test"]) == 100
    assert np.bincount(ds.splits["val"].labels.numpy(), minlength=100).tolist() == [1] * 100
    x, y = _read_pickles(base, ["train"], "fine_labels")
    tr = ds.splits["train"]
    assert torch.equal(tr.images(), torch.from_numpy(x[tr.index.numpy()]))


def _folder_images(folder, split, k, n):
    out = []
    for c in range(k):
        files = sorted((folder / split / f"class{c}").glob("*.png"))
        assert len(files) == n
        out += [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    return torch.stack(out)


def test_imagefolder(tmp_path):
    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=4, per_class_train=10, per_class_test=3)
    ds = build_dataset(DatasetSpec(f"imagefolder:{folder}", imb_ratio=2, selection="first", val_per_class=2),
                       data_root=tmp_path / "root", quiet=True, workers=2)
    _check_common(ds, 4)
    assert ds.class_names == ["class0", "class1", "class2", "class3"]
    assert ds.class_counts == [8, 7, 6, 5]
    all_train = _folder_images(folder, "train", 4, 10)
    tr = ds.splits["train"]
    assert tr.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16,
                                 20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34]
    assert torch.equal(tr.images(), all_train[tr.index])
    va = ds.splits["val"]
    assert np.bincount(va.labels.numpy(), minlength=4).tolist() == [2, 2, 2, 2]
    assert va.index.tolist() == [8, 9, 18, 19, 28, 29, 38, 39]      # `first`: the last 2 of each class
    assert not set(va.index.tolist()) & set(tr.index.tolist())
    assert torch.equal(va.images(), all_train[va.index])
    te = ds.splits["test"]
    assert len(te) == 12 and torch.equal(te.images(), _folder_images(folder, "test", 4, 3))
    assert te.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert ds.image_size == 32 and ds.mean == (0.4914, 0.4822, 0.4465)


def test_imagefolder_with_val_folder(tmp_path):
    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=3, per_class_train=6, per_class_test=2,
                                      with_val=True)
    ds = build_dataset(DatasetSpec(f"imagefolder:{folder}", imb_ratio=1, val_per_class=5),
                       data_root=tmp_path, quiet=True, workers=2)
    _check_common(ds, 3)
    assert ds.class_counts == [6, 6, 6]
    va = ds.splits["val"]
    assert va.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3        # the val/ folder, as given
    assert torch.equal(va.images(), _folder_images(folder, "val", 3, 3))


def test_imagefolder_tarball(tmp_path):
    folder = datagen.make_imagefolder(tmp_path / "src" / "tiny", num_classes=3, per_class_train=8,
                                      per_class_test=2)
    tar = datagen.make_tarball(folder, tmp_path / "tiny.tar.gz")
    import tarfile
    with tarfile.open(tar) as tf:
        assert {n.split("/")[0] for n in tf.getnames()} == {"tiny"}
    root = tmp_path / "root"
    spec = dict(imb_ratio=4, selection="shuffle", seed=1, val_per_class=2)
    ds = build_dataset(DatasetSpec(f"imagefolder:{tar}", **spec), data_root=root, quiet=True, workers=2)
    ref = build_dataset(DatasetSpec(f"imagefolder:{folder}", **spec), data_root=root, quiet=True, workers=2)
    _check_common(ds, 3)
    assert (root / "tiny" / "train" / "class0").is_dir()
    assert ds.class_names == ref.class_names and ds.class_counts == ref.class_counts == [6, 4, 2]
    for s in ("train", "val", "test"):
        assert torch.equal(ds.splits[s].images(), ref.splits[s].images())
        assert torch.equal(ds.splits[s].labels, ref.splits[s].labels)
    # unpacked once: a second build reuses the folder
    marker = root / "tiny" / ".unpacked"
    mtime = marker.stat().st_mtime_ns
    build_dataset(DatasetSpec(f"imagefolder:{tar}", **spec), data_root=root, quiet=True, workers=2)
    assert marker.stat().st_mtime_ns == mtime


def _unpack_and_list(args):
    from ltcache.data.sources import unpack_tarball
    tar, root = args
    dest = unpack_tarball(tar, root)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*.png"))


def test_tarball_unpacked_once_by_concurrent_processes(tmp_path):
    """Pipelines started in parallel on a fresh machine all unpack the same tarball: one unpacks,
    the others wait, and every process sees the whole folder (before, a late finisher replaced
    the folder under an early reader)."""
    import multiprocessing as mp
    folder = datagen.make_imagefolder(tmp_path / "src" / "tiny", num_classes=3, per_class_train=30,
                                      per_class_test=10)
    tar = datagen.make_tarball(folder, tmp_path / "tiny.tar.gz")
    expect = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    with mp.get_context("fork").Pool(4) as pool:
        seen = pool.map(_unpack_and_list, [(tar, tmp_path / "root")] * 4)
    assert expect and all(s == expect for s in seen)
    assert [p.name for p in (tmp_path / "root").iterdir() if p.is_dir()] == ["tiny"]   # no temporary left


def test_splitlists(tmp_path):
    prefix = datagen.make_splitlists(tmp_path, "Tiny_LT", 3, [101, 20, 19])
    assert prefix == tmp_path / "Tiny_LT"
    line = (tmp_path / "Tiny_LT_train.txt").read_text().splitlines()[0]
    assert line.split()[1] == "0" and (tmp_path / line.split()[0]).is_file()
    ds = build_dataset(DatasetSpec(f"splitlist:{prefix}", imb_ratio=100, val_per_class=20),
                       data_root=tmp_path, quiet=True, workers=2)
    _check_common(ds, 3)
    assert ds.class_names == ["0", "1", "2"]
    assert ds.class_counts == [101, 20, 19]                   # the train list is already long-tailed
    assert ds.groups == ["many", "medium", "few"]
    assert ds.splits["train"].index.tolist() == list(range(140))
    assert ds.splits["val"].labels.tolist() == [0, 0, 1, 1, 2, 2]   # the given val list
    assert ds.splits["test"].labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_splitlist_without_val_list_holds_val_out_of_train(tmp_path):
    # iNaturalist-2018: no val list (its official val list is given as the test list); val is held
    # out of the train list, never taking a class's last image, and never overlaps train
    prefix = datagen.make_splitlists(tmp_path, "Nat", 3, [12, 4, 1])
    (tmp_path / "Nat_val.txt").unlink()
    ds = build_dataset(DatasetSpec(f"splitlist:{prefix}", val_per_class=3), data_root=tmp_path, quiet=True, workers=2)
    assert torch.bincount(ds.splits["val"].labels, minlength=3).tolist() == [3, 3, 0]
    assert ds.class_counts == [9, 1, 1] and ds.spec.val_counts == [3, 3, 0]
    assert not set(ds.splits["val"].index.tolist()) & set(ds.splits["train"].index.tolist())
    again = build_dataset(DatasetSpec(f"splitlist:{prefix}", val_per_class=3), data_root=tmp_path, quiet=True,
                          workers=2)
    assert torch.equal(again.splits["val"].index, ds.splits["val"].index)          # seeded


# ------------------------------------------------------------------------------ augmentation
def test_augment_cifar_shape_dtype_determinism(tmp_path):
    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=2, per_class_train=8, per_class_test=2)
    ds = build_dataset(DatasetSpec(f"imagefolder:{folder}", imb_ratio=1, val_per_class=0),
                       data_root=tmp_path, quiet=True, workers=2)
    x = ds.splits["train"].images()
    a = ds.augment(x, torch.Generator().manual_seed(0))
    b = ds.augment(x, torch.Generator().manual_seed(0))
    c = ds.augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert torch.equal(x, ds.splits["train"].images())       # the input is left untouched
    n = ds.normalize(x)
    assert n.dtype == torch.float32 and n.shape == x.shape


def test_augment_crop_flip_is_a_shifted_window():
    from ltcache.data.augment import crop_flip, hflip
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    y = crop_flip(x, 2, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], hflip(w)) for w in windows)
    assert torch.equal(hflip(hflip(x)), x)


def test_augment_large_images():
    from ltcache.data import LTDataset
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    ds = LTDataset(spec=DatasetSpec("cifar10"), class_names=["a"], class_counts=[3], splits={},
                   mean=(0.5,) * 3, std=(0.25,) * 3, image_size=96)
    a = ds.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, ds.augment(x, torch.Generator().manual_seed(0))) and not torch.equal(a, x)


# ------------------------------------------------------------------------------ errors
def test_unknown_source():
    with pytest.raises(LtcacheError, match="unknown dataset 'imagenet'.*cifar10, cifar100, imagefolder:PATH"):
        DatasetSpec("imagenet")
    with pytest.raises(LtcacheError, match="give a path after 'imagefolder:'"):
        DatasetSpec("imagefolder:")


def test_imb_ratio_below_one(tmp_path):
    datagen.make_cifar_pickles(tmp_path, "cifar10", per_class_train=2, per_class_test=1)
    with pytest.raises(LtcacheError, match="imbalance ratio must be >= 1 \\(got 0.5\\)"):
        build_dataset(DatasetSpec("cifar10", imb_ratio=0.5), data_root=tmp_path, quiet=True)


def test_missing_cifar_without_download(tmp_path):
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        with pytest.raises(LtcacheError) as ei:
            build_dataset(DatasetSpec(name), data_root=tmp_path, quiet=True)
        msg = str(ei.value)
        assert f"{name} not found" in msg and folder in msg and "--download" in msg and "imagefolder:" in msg
        assert "\n" not in msg


def test_missing_cifar_batch_file(tmp_path):
    base = datagen.make_cifar_pickles(tmp_path, "cifar10", per_class_train=2, per_class_test=1)
    (base / "data_batch_3").unlink()
    with pytest.raises(LtcacheError, match="data_batch_3 is missing"):
        build_dataset(DatasetSpec("cifar10", imb_ratio=1), data_root=tmp_path, quiet=True)


def test_missing_image_folder(tmp_path):
    with pytest.raises(LtcacheError, match="image folder .*nope not found; give PATH with train/<class>/"):
        build_dataset(DatasetSpec(f"imagefolder:{tmp_path / 'nope'}"), data_root=tmp_path, quiet=True)
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(LtcacheError, match="needs train/<class>/ and test/<class>/ folders"):
        build_dataset(DatasetSpec(f"imagefolder:{tmp_path / 'half'}"), data_root=tmp_path, quiet=True)


def test_profile_empties_a_class(tmp_path):
    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=4, per_class_train=10, per_class_test=1)
    with pytest.raises(LtcacheError, match="leaves class 3 with 0 images; lower the imbalance ratio"):
        build_dataset(DatasetSpec(f"imagefolder:{folder}", imb_ratio=20), data_root=tmp_path, quiet=True,
                      workers=2)


def test_splitlist_errors(tmp_path):
    prefix = datagen.make_splitlists(tmp_path, "Holes", 3, [3, 0, 2])
    with pytest.raises(LtcacheError, match="class 1 has no training image in the train list"):
        build_dataset(DatasetSpec(f"splitlist:{prefix}"), data_root=tmp_path, quiet=True, workers=2)
    with pytest.raises(LtcacheError, match="split list\\(s\\) not found: .*Nope_train.txt"):
        build_dataset(DatasetSpec(f"splitlist:{tmp_path / 'Nope'}"), data_root=tmp_path, quiet=True)
    (tmp_path / "Holes_train.txt").write_text("images/x.png zero\n")
    with pytest.raises(LtcacheError, match="Holes_train.txt:1: label 'zero' is not an integer"):
        build_dataset(DatasetSpec(f"splitlist:{prefix}"), data_root=tmp_path, quiet=True)


# ------------------------------------------------------------------- val held out before the profile
def test_holdout_then_select_covers_every_class_and_keeps_the_papers_images():
    from ltcache.data.profiles import holdout_then_select
    labels = np.repeat(np.arange(4), 30)
    counts = lt_counts(30, 4, 10)                                   # [30, 13, 6, 3]
    for rule in ("first", "shuffle"):
        train, val, kept = holdout_then_select(labels, counts, 5, rule, seed=0)
        assert kept == [25, 13, 6, 3]                               # only the full class gives up images
        assert np.bincount(labels[val], minlength=4).tolist() == [5] * 4
        assert not set(train.tolist()) & set(val.tolist())
        assert np.bincount(labels[train], minlength=4).tolist() == kept
        papers = select_indices(labels, counts, rule, 0)
        assert train.tolist()[25:] == papers.tolist()[30:]        # classes 1-3: exactly the papers' picks
        again, val2, _ = holdout_then_select(labels, counts, 5, rule, seed=0)
        assert again.tolist() == train.tolist() and val2.tolist() == val.tolist()
    with pytest.raises(LtcacheError, match="too few to hold out 30 for val.*lower --val-per-class"):
        holdout_then_select(labels, counts, 30, "first")
    with pytest.raises(LtcacheError, match="--val-per-class must be >= 1"):
        holdout_then_select(labels, counts, 0, "first")


def test_default_val_size_and_legacy_specs(tmp_path):
    from ltcache.data.profiles import default_val_per_class
    assert default_val_per_class(10) == 100 and default_val_per_class(100) == 20
    assert default_val_per_class(1000) == 20 and default_val_per_class(10, smallest_class=30) == 3
    folder = datagen.make_imagefolder(tmp_path / "tiny", num_classes=4, per_class_train=20, per_class_test=1)
    ds = build_dataset(DatasetSpec(f"imagefolder:{folder}", imb_ratio=2), data_root=tmp_path / "r",
                       quiet=True, workers=2)
    assert ds.spec.val_per_class == 2 and ds.spec.val_counts == [2] * 4   # auto: a tenth of 20
    # a spec written before the holdout rule (no val_split) rebuilds the rows stage 1 saw
    legacy = DatasetSpec.from_dict({"source": f"imagefolder:{folder}", "imb_ratio": 2, "val_per_class": 2})
    assert legacy.val_split == "leftover"
    old = build_dataset(legacy, data_root=tmp_path / "r", quiet=True, workers=2)
    assert old.class_counts == lt_counts(20, 4, 2) and old.spec.val_counts[0] == 0
    new = DatasetSpec.from_dict(ds.spec.to_dict())
    assert new.val_split == "holdout" and new.val_per_class == 2
