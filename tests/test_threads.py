"""Threads that behave: the free cores by default, --threads to override."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ltcache import threads as T
from ltcache.cli import cli
from ltcache.errors import LtcacheError


def test_free_cores_subtract_the_load_of_other_processes(monkeypatch):
    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    assert T.free_cores(load=0.0) == 4
    assert T.free_cores(load=1.4) == 3
    assert T.free_cores(load=2.6) == 1
    assert T.free_cores(load=9.0) == 1                     # never below one
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert T.choose_threads(load=0.0) == 2                 # never above torch's default
    assert T.choose_threads(load=3.0) == 1
    assert T.choose_threads(3, load=9.0) == 3              # --threads overrides
    with pytest.raises(LtcacheError, match="--threads must be >= 1"):
        T.choose_threads(0)


def test_threads_option_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    seen = {}
    from ltcache.stage2 import api

    def fake_bench(*a, **k):
        seen["threads"] = torch.get_num_threads()
        raise LtcacheError("stop here")

    monkeypatch.setattr(api, "bench", fake_bench)
    try:
        res = CliRunner().invoke(cli, ["bench", "--methods", "ce", "--threads", "1", "--quiet"])
        assert res.exit_code == 2 and seen["threads"] == 1
        res = CliRunner().invoke(cli, ["bench", "--methods", "ce", "--threads", "0"])
        assert res.exit_code == 2 and "--threads" in res.output
    finally:
        torch.set_num_threads(before)
