"""Streamed (path-backed) splits: detection, LTDataset.loader batches and views, seeding that does
not depend on workers or batch split, unreadable images, and in-memory data left as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import datagen
from ltcache.data import DatasetSpec, build_dataset
from ltcache.data.streaming import PathTable
from ltcache.errors import LtcacheError

VIEWS = ["center", "hflip", "train", "train"]


def _spec(folder, **kw) -> DatasetSpec:
    return DatasetSpec(source=f"imagefolder:{folder}", imb_ratio=2, val_per_class=1, **kw)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    folder = datagen.make_large_imagefolder(tmp_path_factory.mktemp("stream") / "large", num_classes=3,
                                            per_class_train=8, per_class_test=3)
    return folder, build_dataset(_spec(folder), quiet=True)


def _reference_center(path) -> torch.Tensor:
    """Resize(256) + CenterCrop(224) of the file, computed here independently."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    return T.PILToTensor()(T.CenterCrop(224)(T.Resize(256)(im)))


def _all(ds, split, rows, bs, views, seeds=None, workers=0, skip_bad=False):
    return list(ds.loader(split, rows, bs, views, seeds, workers, skip_bad))


def test_large_images_are_streamed(large):
    folder, ds = large
    assert ds.streamed and ds.image_size == 224 and not ds.small_images
    assert all(sp.streamed for sp in ds.splits.values())
    assert ds.mean == (0.485, 0.456, 0.406)
    assert ds.splits["train"]._images is None              # nothing decoded up front
    forced = build_dataset(_spec(folder), quiet=True, stream=False)
    assert not forced.streamed and forced.splits["train"].images().shape[1:] == (3, 224, 224)


def test_splitlist_streamed(tmp_path):
    prefix = datagen.make_splitlists(tmp_path, "toy", 3, [5, 3, 2], size=72)
    spec = DatasetSpec(source=f"splitlist:{prefix}")
    ds = build_dataset(spec, data_root=tmp_path, quiet=True)
    assert ds.streamed and len(ds.splits["train"]) == 10 and len(ds.splits["test"]) == 9
    b = _all(ds, "test", torch.arange(9), 5, ["center"])
    assert [tuple(x.images.shape) for x in b] == [(5, 1, 3, 224, 224), (4, 1, 3, 224, 224)]


def test_loader_shapes_labels_pos_and_center_view(large):
    _, ds = large
    sp = ds.splits["train"]
    rows = torch.randperm(len(sp), generator=torch.Generator().manual_seed(0))[:10]
    batches = _all(ds, "train", rows, 4, VIEWS, seeds=torch.arange(10))
    assert [b.images.shape[0] for b in batches] == [4, 4, 2]
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (4, 3, 224, 224) and b.skipped == []
    assert torch.equal(torch.cat([b.pos for b in batches]), torch.arange(10))
    assert torch.equal(torch.cat([b.labels for b in batches]), sp.labels[rows])
    imgs = torch.cat([b.images for b in batches])
    for j in (0, 7):
        path = sp.paths[int(sp.index[rows[j]])]
        assert torch.equal(imgs[j, 0], _reference_center(path))
        assert torch.equal(imgs[j, 1], imgs[j, 0].flip(-1))               # hflip: the centre view flipped
    assert not torch.equal(imgs[:, 2], imgs[:, 3])                       # two train views, two draws
    assert not torch.equal(imgs[:, 2], imgs[:, 0])
    assert torch.equal(sp.images(rows[:2]), imgs[:2, 0])                  # Split.images: the centre view


def test_train_views_depend_on_seeds_only(large):
    _, ds = large
    rows = torch.arange(len(ds.splits["train"]))
    seeds = torch.arange(len(rows)) * 1000 + 5
    a = torch.cat([b.images for b in _all(ds, "train", rows, 4, ["train", "train"], seeds, workers=0)])
    b = torch.cat([b.images for b in _all(ds, "train", rows, 3, ["train", "train"], seeds, workers=2)])
    assert torch.equal(a, b)
    c = torch.cat([b.images for b in _all(ds, "train", rows, 4, ["center", "train", "train"], seeds)])
    assert torch.equal(a, c[:, 1:])                 # the k-th train view, whatever the other views
    d = torch.cat([b.images for b in _all(ds, "train", rows, 4, ["train", "train"], seeds + 1)])
    assert not torch.equal(a, d)
    with pytest.raises(ValueError, match="seeds"):
        _all(ds, "train", rows, 4, ["train"])


def test_unreadable_image(tmp_path):
    folder = datagen.make_large_imagefolder(tmp_path / "bad", num_classes=2, per_class_train=4, per_class_test=2)
    bad = datagen.corrupt_image(folder / "train" / "class1" / "0002.jpg")
    ds = build_dataset(_spec(folder), quiet=True)
    sp = ds.splits["train"]
    rows = torch.arange(len(sp))
    where = [i for i in range(len(sp)) if sp.paths[int(sp.index[i])] == str(bad)]
    assert len(where) == 1
    for workers in (0, 2):
        with pytest.raises(LtcacheError) as err:
            _all(ds, "train", rows, 3, ["center"], workers=workers)
        msg = str(err.value)
        assert str(bad) in msg and "--skip-bad-images" in msg and "\n" not in msg
    batches = _all(ds, "train", rows, 3, ["center", "train"], seeds=rows, workers=2, skip_bad=True)
    assert len(batches) == -(-len(rows) // 3)
    assert [p for b in batches for p in b.skipped] == [str(bad)]
    pos = torch.cat([b.pos for b in batches])
    assert where[0] not in pos.tolist() and len(pos) == len(rows) - 1
    assert torch.equal(torch.cat([b.labels for b in batches]), sp.labels[pos])
    with pytest.raises(LtcacheError, match="skip-bad-images"):
        sp.images(torch.tensor(where))


def test_in_memory_unchanged(tmp_path):
    folder = datagen.make_imagefolder(tmp_path / "small", num_classes=3, per_class_train=6, per_class_test=2)
    ds = build_dataset(_spec(folder), quiet=True)
    assert not ds.streamed and ds.image_size == 32 and not ds.splits["train"].streamed
    sp = ds.splits["train"]
    rows = torch.arange(len(sp)).flip(0)
    seeds = torch.arange(len(rows))
    batches = _all(ds, "train", rows, 5, ["center", "hflip", "train"], seeds, workers=2)
    imgs = torch.cat([b.images for b in batches])
    assert imgs.shape[1:] == (3, 3, 32, 32)
    assert torch.equal(imgs[:, 0], sp.images(rows)) and torch.equal(imgs[:, 1], sp.images(rows).flip(-1))
    again = torch.cat([b.images for b in _all(ds, "train", rows, 5, ["train"], seeds)])
    assert torch.equal(again[:, 0], imgs[:, 2])          # seeded per batch from the rows' seeds
    assert torch.equal(torch.cat([b.labels for b in batches]), sp.labels[rows])


def test_path_table_round_trip():
    paths = ["/a/b.jpg", "/dir with space/ü.png", ""]
    t = PathTable(paths)
    assert [t[i] for i in range(len(t))] == paths
    assert [t.subset([2, 0])[i] for i in range(2)] == ["", "/a/b.jpg"]
    assert np.asarray(t.offsets).dtype == np.int64
