"""Nothing lost, ever -- the outputs side: results files, exported models and reports are written
to a temporary name and renamed, never replace an existing output without --force, are checked
before any work, are locked against a second writer, and every failure is one line, exit 2.

Runs use the bundled cache (no --cache) with instant methods: posthoc-la (closed form) or ce for
one epoch."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from cli_result import files_in, one_error, run
from ltcache import outputs
from ltcache.stage2 import api

torch.set_num_threads(1)

RETRAIN = ["retrain", "--method", "posthoc-la", "--quiet", "--device", "cpu"]
BENCH = ["bench", "--methods", "ce", "--epochs", "1", "--quiet", "--device", "cpu", "--jobs", "1"]
RESULT_FILES = {"results.json", "summary.csv", "summary.md"}


class _FullDisk:
    """A file object that takes ``limit`` characters, then fails as a full disk would."""

    def __init__(self, fh, limit):
        self.fh, self.left = fh, limit

    def write(self, data):
        if len(data) > self.left:
            self.fh.write(data[:self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _disk_fills_at(monkeypatch, name: str, limit: int = 200):
    """outputs.atomic_write fails after ``limit`` characters when it writes a file called ``name``."""
    real = outputs.atomic_write

    @contextlib.contextmanager
    def failing(path, mode="w", **kw):
        with real(path, mode, **kw) as fh:
            yield _FullDisk(fh, limit) if Path(path).name == name else fh
    monkeypatch.setattr(outputs, "atomic_write", failing)


@pytest.fixture
def no_sweep(monkeypatch):
    """Any call of the sweep is recorded (and fails): output checks must come before it."""
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("the sweep ran before the output paths were checked")
    monkeypatch.setattr(api, "run_sweep", refuse)
    return calls


# 1. results files ------------------------------------------------------------------------------

def test_results_json_full_disk_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "res"
    code, text, _ = run(*BENCH, "--out", out)
    assert code == 0, text
    assert files_in(out) == RESULT_FILES                     # no lock or temporary file left
    before = (out / "results.json").read_bytes()
    json.loads(before)
    _disk_fills_at(monkeypatch, "results.json")
    line = one_error(*run(*BENCH, "--out", out, "--force"), "no space left on the device while writing",
                     str(out / "results.json"))
    assert "free there" in line
    assert (out / "results.json").read_bytes() == before     # the previous valid file, intact
    assert files_in(out) == RESULT_FILES                     # no temporary file, no lock


def test_summary_md_full_disk_and_retrain_out(tmp_path, monkeypatch):
    out = tmp_path / "res"
    assert run(*BENCH, "--out", out)[0] == 0
    md = (out / "summary.md").read_bytes()
    _disk_fills_at(monkeypatch, "summary.md", 10)
    one_error(*run(*BENCH, "--out", out, "--force"), "no space left", "summary.md")
    assert (out / "summary.md").read_bytes() == md and files_in(out) == RESULT_FILES
    _disk_fills_at(monkeypatch, "r.json")
    one_error(*run(*RETRAIN, "--out", tmp_path / "r.json"), "no space left", "r.json")
    assert not (tmp_path / "r.json").exists() and files_in(tmp_path) == {"res"}


def test_os_error_is_one_line(tmp_path, monkeypatch):
    real = os.replace

    def denied(src, dst, *a, **k):
        if Path(dst).name == "r.json":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", denied)
    one_error(*run(*RETRAIN, "--out", tmp_path / "r.json"), f"cannot write {tmp_path / 'r.json'} (Permission denied)")
    assert files_in(tmp_path) == set()


# 2. exported models ----------------------------------------------------------------------------

def test_export_full_disk_leaves_no_tmp(tmp_path, monkeypatch):
    model = tmp_path / "model.pt"
    code, text, _ = run(*RETRAIN, "--export", model)
    assert code == 0, text
    assert files_in(tmp_path) == {"model.pt"}
    before = model.read_bytes()

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    one_error(*run(*RETRAIN, "--export", model, "--force"), "no space left on the device while writing",
              str(model))
    assert model.read_bytes() == before and files_in(tmp_path) == {"model.pt"}


def test_export_refuses_several_seeds(tmp_path, no_sweep):
    one_error(*run(*RETRAIN, "--seeds", "0,1,2", "--export", tmp_path / "m.pt"), "pass one seed with --export")
    assert not no_sweep and files_in(tmp_path) == set()


# 3. --force ------------------------------------------------------------------------------------

def test_existing_outputs_need_force(tmp_path):
    r, m, out = tmp_path / "r.json", tmp_path / "m.pt", tmp_path / "bench"
    assert run(*RETRAIN, "--out", r, "--export", m)[0] == 0
    old_r, old_m = r.read_bytes(), m.read_bytes()
    one_error(*run(*RETRAIN, "--out", r), f"--out file {r} already exists; pass --force")
    one_error(*run(*RETRAIN, "--export", m), f"--export file {m} already exists; pass --force")
    assert r.read_bytes() == old_r and m.read_bytes() == old_m
    code, text, _ = run(*RETRAIN, "--out", r, "--export", m, "--force")
    assert code == 0, text
    assert json.loads(r.read_text())["created"] and files_in(tmp_path) == {"r.json", "m.pt"}

    assert run(*BENCH, "--out", out)[0] == 0
    one_error(*run(*BENCH, "--out", out), f"--out folder {out} already holds results.json", "--force")
    code, text, _ = run(*BENCH, "--out", out, "--force")
    assert code == 0, text
    assert files_in(out) == RESULT_FILES


def test_report_needs_force_and_writes_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    assert run(*BENCH, "--out", out)[0] == 0
    rep = out / "report"
    code, text, _ = run("report", out / "results.json", "--quiet")
    assert code == 0, text
    assert files_in(rep) == {"report.html", "figures"}
    figs = {p.name: p.read_bytes() for p in (rep / "figures").iterdir()}
    page = (rep / "report.html").read_bytes()
    one_error(*run("report", out / "results.json"), f"report folder {rep} already holds report.html", "--force")
    # a figure write that fails midway: one line, the previous report intact, no temporary file
    from matplotlib.figure import Figure

    def full(self, fname, *a, **k):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full)
    one_error(*run("report", out / "results.json", "--force"), "no space left on the device while writing")
    assert {p.name: p.read_bytes() for p in (rep / "figures").iterdir()} == figs
    assert (rep / "report.html").read_bytes() == page and files_in(rep) == {"report.html", "figures"}
    monkeypatch.undo()
    code, text, _ = run("report", out / "results.json", "--force", "--quiet")
    assert code == 0, text


# 4. output paths checked before the sweep ------------------------------------------------------

@pytest.mark.parametrize("case", ["bench-out-file", "export-dir", "retrain-out-dir", "retrain-out-exists",
                                  "bench-out-has-results", "out-is-export"])
def test_output_paths_checked_before_sweep(tmp_path, no_sweep, case):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    args, needles = {
        "bench-out-file": (BENCH + ["--out", f], [f"--out folder {f} is a file"]),
        "export-dir": (RETRAIN + ["--export", tmp_path], [f"--export {tmp_path} is a folder",
                                                          str(tmp_path / "model.pt")]),
        "retrain-out-dir": (RETRAIN + ["--out", tmp_path], [f"--out {tmp_path} is a folder"]),
        "retrain-out-exists": (RETRAIN + ["--out", f], ["already exists; pass --force"]),
        "bench-out-has-results": (BENCH + ["--out", tmp_path / "old"], ["already holds results.json"]),
        "out-is-export": (RETRAIN + ["--out", tmp_path / "x", "--export", tmp_path / "x"], ["the same file"]),
    }[case]
    one_error(*run(*args), *needles)
    assert not no_sweep                                    # nothing trained
    assert f.read_text() == "keep" and files_in(tmp_path) == {"file.txt", "old"}


# concurrent writers --------------------------------------------------------------------------------

def test_second_writer_is_refused_with_first_pid(tmp_path, no_sweep):
    from ltcache.lock import CacheLock
    out = tmp_path / "bench"
    with CacheLock(out):                                   # "the first run": this process holds the folder
        one_error(*run(*BENCH, "--out", out), f"{out} is being written by another process (pid {os.getpid()}")
    r = tmp_path / "r.json"
    with outputs.output_lock(r, folder=False):
        one_error(*run(*RETRAIN, "--out", r), f"{r} is being written by another process (pid {os.getpid()}")
    assert not no_sweep and files_in(tmp_path) == {"bench"} and files_in(out) == set()


# 5. click's own errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (["bench", "--seeds", "0", "--jobs", "0"], ["Invalid value for '--jobs'", "see 'ltcache bench --help'"]),
    (["retrain"], ["Missing option '--method'", "see 'ltcache retrain --help'"]),
    (["retrain", "--method", "ce", "--epochs", "x"], ["'x' is not a valid integer", "ltcache retrain --help"]),
    (["nosuch"], ["No such command 'nosuch'", "see 'ltcache --help'"]),
])
def test_click_errors_are_one_line(args, needles):
    code, out, err = run(*args)
    one_error(code, out, err, *needles)
    assert out == err                                       # nothing else printed (no usage block)


def test_help_still_works():
    for args in (["--help"], ["bench", "--help"], ["retrain", "-h"], ["report", "--help"]):
        code, text, _ = run(*args)
        assert code == 0 and "Usage:" in text, text
        assert args == ["--help"] or "--force" in text


# 6. which cache ------------------------------------------------------------------------------------

def test_table_and_results_name_the_cache(tmp_path):
    from ltcache.cache import default_cache_path
    path = str(Path(default_cache_path()).resolve())
    code, text, _ = run(*RETRAIN, "--out", tmp_path / "r.json")
    assert code == 0, text
    first = text.splitlines()[0]
    assert first.startswith(f"cache: {path} (") and "classes)" in first, first
    assert " IR " in first
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["cache"]["path"] == path
    assert run(*BENCH, "--out", tmp_path / "b")[0] == 0
    assert (tmp_path / "b" / "summary.md").read_text().startswith(f"cache: {path} (")


def test_kill_9_during_a_results_write_keeps_the_previous_file(tmp_path):
    """A process killed (SIGKILL) in the middle of writing results.json: the previous, valid
    file is still there under its name; at most a hidden temporary file is left beside it."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "results.json"
    good = {"schema": "old", "runs": [1, 2, 3]}
    target.write_text(json.dumps(good))
    started = tmp_path / "started"
    script = f"""
import json, time
from ltcache.stage2 import results
def slow_dump(obj, fh, **kw):
    fh.write('{{"schema": "new", "runs": [')
    fh.flush()
    open({str(started)!r}, "w").close()
    time.sleep(60)                                  # killed here, half-written
results.json.dump = slow_dump
results.write_json({{"schema": "new"}}, {str(target)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if started.exists():
                break
            time.sleep(0.05)
        assert started.exists(), "the writer never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(target.read_text()) == good
    left = [p.name for p in tmp_path.iterdir() if p.name not in ("results.json", "started")]
    assert all(n.startswith(".results.json.") and n.endswith(".tmp") for n in left), left
