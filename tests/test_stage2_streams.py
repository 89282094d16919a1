"""Groups stepped in turn (ltcache.stage2.streams: on a GPU each on its own CUDA stream) run
on a CPU: bit for bit the groups trained one after another, with the plain step and through
the static buffers of the CUDA-graph path, with last and val selection."""
from __future__ import annotations

import pytest
import torch

from ltcache.errors import LtcacheError
from ltcache.stage2 import streams
from ltcache.stage2.graphs import step_graphs
from ltcache.stage2.group import GroupRun
from ltcache.stage2.grouping import make_groups
from ltcache.stage2.streams import group_streams, train_groups
from ltcache.stage2.sweep import train_sweep
from test_stage2_engine import MIXED, assert_same_heads, configs_for, data_of, fake_cache

torch.set_num_threads(1)

# three head families and two batch sizes: four groups of different lengths
SPECS = MIXED + [("ce", {"lr": 0.05, "batch_size": 16, "epochs": 2}, 1)]


@pytest.mark.parametrize("select,graph_mode", [("last", "off"), ("val", "off"), ("last", "on")])
def test_interleaved_groups_equal_sequential_bit_for_bit(select, graph_mode, monkeypatch):
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, SPECS)
    assert len(make_groups(cfgs)) >= 4
    with step_graphs(graph_mode), group_streams("off"):
        sequential = train_sweep(cfgs, data, select=select, quiet=True, n_jobs=1)
    turns = []                                    # which group stepped, in order
    real = GroupRun.__iter__

    def recording(self):
        for _ in real(self):
            turns.append(self.bar_position)
            yield
    monkeypatch.setattr(GroupRun, "__iter__", recording)
    with step_graphs(graph_mode), group_streams("on"):
        interleaved = train_sweep(cfgs, data, select=select, quiet=True, n_jobs=1)
    assert len(set(turns[:4])) == 4               # the groups really took their steps in turn
    assert_same_heads(sequential, interleaved)


def test_train_groups_gives_each_group_its_heads():
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, SPECS[:3] + SPECS[-3:])
    plan = make_groups(cfgs)
    heads = train_groups([[cfgs[i] for i in members] for members in plan], data, quiet=True)
    assert [len(h) for h in heads] == [len(m) for m in plan]
    for members, hs in zip(plan, heads):
        assert [cfgs[i].name for i in members] == [h.config.name for h in hs]


def test_an_error_in_one_group_ends_every_group(monkeypatch):
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, SPECS)
    plan = make_groups(cfgs)
    from ltcache.stage2.group import GroupTrainer
    real = GroupTrainer.end_epoch
    closed = []

    def failing(self, e):
        if self.family == "cosine":
            raise RuntimeError("boom in the cosine group")
        return real(self, e)
    monkeypatch.setattr(GroupTrainer, "end_epoch", failing)
    real_iter = GroupRun.__iter__

    def tracking(self):
        try:
            yield from real_iter(self)
        finally:
            closed.append(self.bar_position)
    monkeypatch.setattr(GroupRun, "__iter__", tracking)
    with pytest.raises(RuntimeError, match="boom in the cosine group"):
        train_groups([[cfgs[i] for i in members] for members in plan], data, quiet=True)
    assert sorted(closed) == list(range(len(plan)))     # every group's loop (threads, bars) ended


def test_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with group_streams("off"):
        assert not streams.wanted(5, cuda)
    with group_streams("auto"):
        assert streams.wanted(5, cuda) and not streams.wanted(5, cpu) and not streams.wanted(1, cuda)
    with group_streams("on"):
        assert streams.wanted(2, cpu) and not streams.wanted(1, cpu)
    with pytest.raises(ValueError, match="unknown group-stream mode"):
        with group_streams("fast"):
            pass


def test_a_switch_reads_its_environment_and_names_its_modes(monkeypatch):
    from ltcache.stage2.switches import Switch
    monkeypatch.setenv("LTCACHE_TEST_SWITCH", "fast")
    with pytest.raises(LtcacheError, match="LTCACHE_TEST_SWITCH=fast is unknown; use one of on, off"):
        Switch("LTCACHE_TEST_SWITCH", ("on", "off"), "off", "test")
    monkeypatch.setenv("LTCACHE_TEST_SWITCH", "on")
    switch = Switch("LTCACHE_TEST_SWITCH", ("on", "off"), "off", "test")
    assert switch.value == "on"
    with switch.scoped("off"):
        assert switch.value == "off"
    assert switch.value == "on"
    with pytest.raises(ValueError, match="unknown test mode 'auto'; use one of on, off"):
        switch.check("auto")


class _FakeStream:
    """Stands in for torch.cuda.Stream on a CPU: records the waits it is given."""

    def __init__(self, name: str, waits: list) -> None:
        self.name, self.waits = name, waits

    def wait_stream(self, other: "_FakeStream") -> None:
        self.waits.append((self.name, other.name))

    def __repr__(self) -> str:
        return self.name


def test_each_group_steps_prepares_and_initialises_on_its_own_stream(monkeypatch):
    """The CUDA plumbing of train_groups, run on a CPU with stand-in streams: every step, every
    epoch prepared (on the preparing thread) and the initialisation of group i run with stream i
    current; each stream waits for the default stream first, and the default stream waits for
    each stream at the end."""
    import threading
    from contextlib import contextmanager

    from ltcache.stage2.group import GroupTrainer
    waits: list = []
    default = _FakeStream("default", waits)
    local = threading.local()

    def current(*_):
        return getattr(local, "stream", default)

    @contextmanager
    def stream_context(s):
        old, local.stream = current(), s
        try:
            yield
        finally:
            local.stream = old
    monkeypatch.setattr(torch.cuda, "current_stream", current)
    monkeypatch.setattr(torch.cuda, "stream", stream_context)
    monkeypatch.setattr(streams, "_device_streams", lambda dev, n: [_FakeStream(f"s{i}", waits) for i in range(n)])
    seen = {"init": [], "step": [], "prepare": []}
    threads = set()
    real_init, real_step, real_prepare = GroupTrainer.__init__, GroupTrainer.step, GroupTrainer.prepare_epoch

    def init(self, cfgs, *a, **kw):
        real_init(self, cfgs, *a, **kw)
        self.tag = id(cfgs[0])
        seen["init"].append((self.tag, current().name))

    def step(self, ep, s):
        seen["step"].append((self.tag, current().name))
        return real_step(self, ep, s)

    def prepare(self, e):
        seen["prepare"].append((self.tag, current().name))
        threads.add(threading.get_ident())
        return real_prepare(self, e)
    monkeypatch.setattr(GroupTrainer, "__init__", init)
    monkeypatch.setattr(GroupTrainer, "step", step)
    monkeypatch.setattr(GroupTrainer, "prepare_epoch", prepare)

    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, SPECS)
    plan = make_groups(cfgs)
    train_groups([[cfgs[i] for i in members] for members in plan], data, quiet=True)
    stream_of = {id(cfgs[members[0]]): f"s{i}" for i, members in enumerate(plan)}
    for what, calls in seen.items():
        assert calls, what
        assert all(name == stream_of[tag] for tag, name in calls), what
    assert threading.get_ident() not in threads            # epochs prepared ahead, on threads
    n = len(plan)
    assert waits[:n] == [(f"s{i}", "default") for i in range(n)]
    assert waits[n:] == [("default", f"s{i}") for i in range(n)]
