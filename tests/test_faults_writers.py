"""Every library writer on a full disk: ``torch.save`` (an exported model, a stage-1 checkpoint,
``bn_stats.pt``), matplotlib (report figures) and h5py (shards, the classifier) fail mid-write; each
gives the one-line disk-full error (exit 2 through the CLI), nothing under the final name, and the
old output intact. torch reports a full disk as ``RuntimeError: [enforce fail at
inline_container.cc:...] unexpected pos ...``, not as an OSError."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from cli_result import files_in, one_error, run
from ltcache import outputs
from ltcache.errors import LtcacheError

torch.set_num_threads(1)

RETRAIN = ["retrain", "--method", "posthoc-la", "--quiet", "--device", "cpu"]
BENCH = ["bench", "--methods", "ce", "--epochs", "1", "--quiet", "--device", "cpu", "--jobs", "1"]
TORCH_FULL = ("[enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 3392\n"
              "frame #0: c10::ThrowEnforceNotMet(char const*, int, char const*, std::string const&, void const*)")


def _failing_torch_save(how: str):
    """torch.save that writes part of its file, then fails as on a full disk."""
    def save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        if how == "runtime":
            raise RuntimeError(TORCH_FULL)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


@pytest.mark.parametrize("how", ["runtime", "oserror"])
def test_export_full_disk(tmp_path, monkeypatch, how):
    model = tmp_path / "model.pt"
    code, text, _ = run(*RETRAIN, "--export", model)
    assert code == 0, text
    before = model.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_torch_save(how))
    line = one_error(*run(*RETRAIN, "--export", model, "--force"), "no space left on the device while writing",
                     str(model))
    assert "enforce fail" not in line
    assert model.read_bytes() == before and files_in(tmp_path) == {"model.pt"}
    monkeypatch.undo()
    model.unlink()
    monkeypatch.setattr(torch, "save", _failing_torch_save(how))
    one_error(*run(*RETRAIN, "--export", model), "no space left")
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("how", ["runtime", "oserror"])
@pytest.mark.parametrize("site", ["checkpoint", "bn_stats"])
def test_torch_save_sites_full_disk(tmp_path, monkeypatch, how, site):
    """A stage-1 checkpoint (stage1._save) and bn_stats.pt (CacheWriter.finish's extra files, written by
    atomic_save) go through the same helper: old file kept, nothing else left."""
    import ltcache.stage1 as stage1
    path = tmp_path / ("stage1.pt" if site == "checkpoint" else "bn_stats.pt")
    torch.save({"old": torch.ones(2)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_torch_save(how))
    with pytest.raises(LtcacheError) as err:
        if site == "checkpoint":
            stage1._save({"new": torch.zeros(3)}, path)
        else:
            outputs.atomic_save(path, lambda p: torch.save({"new": 1}, p))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no space left on the device while writing {path}")
    assert path.read_bytes() == before and files_in(tmp_path) == {path.name}


def test_torch_runtime_error_not_about_writing_is_not_a_full_disk(tmp_path):
    def broken(p):
        raise RuntimeError("cannot pickle 'generator' object")
    with pytest.raises(RuntimeError, match="cannot pickle"):
        outputs.atomic_save(tmp_path / "x.pt", broken)
    assert files_in(tmp_path) == set()


def test_h5py_writer_full_disk_keeps_old(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import h5py

    from ltcache.cache import shards
    path = tmp_path / "classifier.h5"
    shards.write_classifier(path, np.ones((3, 4)), np.zeros(3))
    before = path.read_bytes()

    def full_file(name, mode="r", *a, **k):
        raise RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 28, "
                           "error message = 'No space left on device')")
    monkeypatch.setattr(shards, "h5py", SimpleNamespace(File=full_file))
    with pytest.raises(LtcacheError, match="no space left on the device while writing"):
        shards.write_classifier(path, np.zeros((3, 4)), np.ones(3))
    monkeypatch.setattr(shards, "h5py", h5py)
    real = open

    def half(file, mode="r", *a, **k):              # the temporary file's write stops half-way
        fh = real(file, mode, *a, **k)
        if "w" in mode:
            fh.write(b"\x89HDF half")
            fh.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return fh
    monkeypatch.setattr(shards, "open", half, raising=False)
    with pytest.raises(LtcacheError, match="no space left on the device while writing"):
        shards.write_classifier(path, np.zeros((3, 4)), np.ones(3))
    assert path.read_bytes() == before and files_in(tmp_path) == {"classifier.h5"}


def test_report_is_all_or_nothing(tmp_path, monkeypatch):
    """The 4th figure fails: no report.html and no figures folder (a fresh report), or the old
    report exactly as it was (--force), and no temporary folder left either time."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from ltcache.report import FIGURES
    out = tmp_path / "bench"
    assert run(*BENCH, "--out", out)[0] == 0
    rep = out / "report"
    real = Figure.savefig

    def fourth_fails(calls):
        def savefig(self, fname, *a, **k):
            calls.append(fname)
            if len(calls) == 4:
                with open(fname, "wb") as fh:
                    fh.write(b"\x89PNG partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, fname, *a, **k)
        return savefig

    def tree():
        return {str(p.relative_to(rep)): p.read_bytes() for p in rep.rglob("*") if p.is_file()} if rep.exists() else {}

    for old in ({}, "a report"):
        if old:
            assert run("report", out / "results.json", "--quiet")[0] == 0
            old = tree()
            assert len(old) == len(FIGURES) + 1
        calls = []
        monkeypatch.setattr(Figure, "savefig", fourth_fails(calls))
        line = one_error(*run("report", out / "results.json", "--force"), "no space left on the device while writing",
                         str(rep / "figures" / f"{FIGURES[3]}.png"))
        assert ".tmp" not in line
        monkeypatch.undo()
        assert len(calls) == 4 and tree() == old
        assert not rep.exists() or files_in(rep) == {"report.html", "figures"}
    code, text, _ = run("report", out / "results.json", "--force", "--quiet")
    assert code == 0, text
    assert files_in(rep) == {"report.html", "figures"} and len(files_in(rep / "figures")) == len(FIGURES)
