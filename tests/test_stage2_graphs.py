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
