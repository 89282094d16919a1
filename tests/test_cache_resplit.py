"""val_from_test: a balanced val split carved out of a cache's test split (for caches whose
stage 1 left no val image of some class)."""
from __future__ import annotations

import pytest
import torch

from ltcache.cache import load
from ltcache.cache.build import write_cache
from ltcache.cache.resplit import val_from_test
from ltcache.errors import LtcacheError


def _cache(path):
    g = torch.Generator().manual_seed(0)
    k, d = 3, 4

    def split(per, v, names):
        y = torch.arange(k).repeat_interleave(per)
        return torch.randn(len(y), v, d, generator=g), y, torch.arange(len(y)), names

    splits = {"train": split(5, 2, ["clean", "aug1"]),
              "val": (torch.randn(2, 2, d, generator=g), torch.tensor([1, 2]), torch.tensor([7, 9]), ["center", "hflip"]),
              "test": split(8, 2, ["center", "hflip"])}
    return write_cache(path, splits, torch.randn(k, d), torch.zeros(k), dataset={"source": "synthetic"},
                       class_counts=[5, 5, 5], arch="toy", shard_rows=5)


def test_val_carved_from_test_is_balanced_disjoint_and_recorded(tmp_path):
    src = _cache(tmp_path / "src")
    before = load(src, quiet=True)
    out = val_from_test(src, tmp_path / "new", per_class=3, seed=0)
    new = load(out, quiet=True)
    val, test = new.splits["val"], new.splits["test"]
    assert torch.bincount(val.labels, minlength=3).tolist() == [3, 3, 3]
    assert torch.bincount(test.labels, minlength=3).tolist() == [5, 5, 5]
    assert not set(val.index.tolist()) & set(test.index.tolist())
    assert sorted(val.index.tolist() + test.index.tolist()) == list(range(24))
    old = before.splits["test"]
    for split in (val, test):                                  # rows are the test rows, unchanged
        assert torch.equal(split.features, old.features[split.index])
        assert torch.equal(split.labels, old.labels[split.index])
    assert torch.equal(new.splits["train"].features, before.splits["train"].features)
    assert new.manifest["val_split"]["rule"] == "from-test" and new.manifest["val_split"]["val_counts"] == [3, 3, 3]
    again = val_from_test(src, tmp_path / "again", per_class=3, seed=0)
    assert load(again, quiet=True).splits["val"].index.tolist() == val.index.tolist()
    with pytest.raises(LtcacheError, match="already exists"):
        val_from_test(src, out, per_class=3)
    with pytest.raises(LtcacheError, match="too few to move 5"):
        val_from_test(src, tmp_path / "x", per_class=5)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.new").exists()
