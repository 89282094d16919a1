"""The step through static buffers (the CUDA-graph path, ltcache.stage2.graphs) run eagerly
on a CPU: bit for bit the plain step, for every head family, shared-row blocks, members that
pause mid-run and val selection."""
from __future__ import annotations

import pytest
import torch

from ltcache.stage2 import graphs
from ltcache.stage2.graphs import StaticStep, step_graphs
from ltcache.stage2.sweep import train_sweep
from test_stage2_engine import MIXED, assert_same_heads, configs_for, data_of, fake_cache

torch.set_num_threads(1)


@pytest.mark.parametrize("select", ["last", "val"])
def test_buffer_path_equals_the_plain_step_bit_for_bit(select, monkeypatch):
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MIXED)
    with step_graphs("off"):
        plain = train_sweep(cfgs, data, select=select, quiet=True, n_jobs=1)
    calls, variants = [], set()
    real = StaticStep.load

    def counting(self, ep, s):
        v = real(self, ep, s)
        calls.append(1)
        variants.add(v)
        return v
    monkeypatch.setattr(StaticStep, "load", counting)
    with step_graphs("on"):
        static = train_sweep(cfgs, data, select=select, quiet=True, n_jobs=1)
    assert len(calls) > 50                        # the buffer path ran
    assert {v[0] for v in variants} == {False, True}   # fused and masked updates
    assert {v[1] for v in variants} == {False, True}   # shared-row blocks and per-member gathers
    assert_same_heads(plain, static)


def test_auto_mode_steps_plainly_on_a_cpu_and_modes_are_checked():
    cache = fake_cache()
    data = data_of(cache)
    from ltcache.stage2.sweep import GroupTrainer
    group = GroupTrainer(configs_for(cache, MIXED[:1]), data)
    assert not graphs.wanted(group)
    with step_graphs("on"):
        assert graphs.wanted(group)
    with pytest.raises(ValueError, match="unknown step-graph mode"):
        with step_graphs("fast"):
            pass


def test_compile_mode_runs_the_buffer_path_on_a_cpu():
    """``compile`` (torch.compile(mode="reduce-overhead") on CUDA) is the buffer path run
    eagerly on a CPU: the plain step's heads bit for bit."""
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MIXED[:6])
    with step_graphs("off"):
        plain = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    with step_graphs("compile"):
        compiled = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    assert_same_heads(plain, compiled)


class _Recorded:
    """A stand-in CUDA graph: recording keeps the step (it does not run it), a replay runs it."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def replay(self):
        self.log.append("replay")
        self.fn()


@pytest.mark.parametrize("how", ["capture", "failed capture", "compile", "failed compile"])
def test_the_cuda_branch_steps_each_step_exactly_once(how, monkeypatch, capsys):
    """StaticStep's CUDA branch run on a CPU, with the capture (or torch.compile) replaced by a
    stand-in: per variant a warm-up step, one capture and replays, or eager steps after a failed
    capture with one notice -- and the heads are the plain step's bit for bit, so no step is lost
    or taken twice in the hand-overs."""
    from contextlib import nullcontext

    from ltcache.stage2 import graphs as G
    log = []

    class Side:
        def wait_stream(self, other):
            pass

    def record(fn):
        if how == "failed capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        log.append("record")
        return _Recorded(fn, log)

    def compile_(fn, **kw):
        assert kw == {"mode": "reduce-overhead", "dynamic": False}
        log.append("compile")
        if how == "failed compile":
            def broken():
                raise RuntimeError("Inductor failed")
            return broken
        return fn
    real_init = StaticStep.__init__

    def init(self, group):
        real_init(self, group)
        self.cuda, self.side = True, Side()
    monkeypatch.setattr(StaticStep, "__init__", init)
    monkeypatch.setattr(G, "_record", record)
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Side())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MIXED)
    with step_graphs("off"):
        plain = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    failed_before = len(G.STATS["failed"])
    with step_graphs("compile" if "compile" in how else "on"):
        stepped = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    assert_same_heads(plain, stepped)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    if how == "capture":
        assert log.count("record") >= 4 and log.count("replay") > 10 * log.count("record") and not notes
    elif how == "compile":
        assert log.count("compile") >= 4 and not notes
    else:                                             # one notice per group and variant, then eager steps
        assert notes and len(notes) == len(G.STATS["failed"]) - failed_before
        assert all(("capture failed" if how == "failed capture" else "torch.compile") in n for n in notes)
        assert "replay" not in log
