"""``--precision``: bf16 GEMMs with float32 parameters, tf32 refused off CUDA."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.stage2 import api
from ltcache.stage2 import heads as H
from ltcache.stage2.sweep import train_sweep
from test_stage2_engine import MIXED, configs_for, data_of, fake_cache

torch.set_num_threads(1)


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


@pytest.mark.parametrize("shared", [False, True])
def test_bf16_products_are_float32_products_of_rounded_inputs(shared):
    """The two GEMMs of a step with bf16 features: w (or dz) rounded to bf16, the product back in
    float32 (rounded once to bf16 on the way, as autocast does); the weight gradient accumulates
    into a float32 buffer, and an uninitialised buffer with beta 0 gives no NaN."""
    g = torch.Generator().manual_seed(0)
    m, k, b, d = 6, 5, 7, 16
    w, bias = torch.randn(m, k, d, generator=g), torch.randn(m, k, 1, generator=g)
    x = torch.randn(m, b, d, generator=g)
    xl = x.bfloat16()
    xs = H.SharedRows(xl[:2], 2, xl[4:]) if shared else xl          # blocks of 2 members share rows
    xf = torch.cat([xl[:2].repeat_interleave(2, 0), xl[4:]]).float() if shared else xl.float()
    z = H._wx(w, xs, bias)
    assert z.dtype == torch.float32
    ref = torch.bmm(_bf(w), xf.transpose(1, 2)) + bias
    assert torch.allclose(z, ref, rtol=1e-2, atol=1e-2)
    dz = torch.randn(m, k, b, generator=g)
    into = torch.full((m, k, d), float("nan"))
    got = H._gx(dz, xs, into.clone(), beta=0.0)
    assert not got.isnan().any() and got.dtype == torch.float32
    assert torch.allclose(got, torch.bmm(_bf(dz), xf), rtol=1e-2, atol=1e-2)
    buf = torch.ones(m, k, d)
    H._gx(dz, xs, buf, beta=0.9)
    assert torch.allclose(buf, 0.9 + torch.bmm(_bf(dz), xf), rtol=1e-2, atol=1e-2)


def test_bf16_sweep_trains_float32_heads_close_to_fp32():
    """Every head family in bf16: float32 deployable layers, finite, and within bf16's error of
    the fp32 heads after a few epochs (not an accuracy claim: the same sweep, rounded)."""
    cache = fake_cache()
    cfgs = configs_for(cache, MIXED)
    ref = train_sweep(cfgs, data_of(cache), quiet=True, n_jobs=1)
    low = train_sweep(cfgs, api._train_data(cache, torch.device("cpu"), "all", precision="bf16"),
                      quiet=True, n_jobs=1)
    for a, b in zip(ref, low):
        assert b.config.name == a.config.name
        for key in ("weight", "bias"):
            if key in a.layer:
                assert b.layer[key].dtype == torch.float32 and torch.isfinite(b.layer[key]).all()
                scale = a.layer[key].abs().max().clamp_min(1.0)
                assert (b.layer[key] - a.layer[key]).abs().max() <= 0.05 * scale, (a.config.method, key)


def test_precision_is_checked_and_recorded(tmp_path, monkeypatch):
    with pytest.raises(LtcacheError, match="tf32"):
        api.run_sweep(fake_cache(), api.expand(["ce"], {"epochs": 1}, None, "cifar", 258), (0,), device="cpu",
                      precision="tf32")
    with pytest.raises(LtcacheError, match="unknown --precision"):
        api.run_sweep(fake_cache(), api.expand(["ce"], {"epochs": 1}, None, "cifar", 258), (0,), device="cpu",
                      precision="fp16")
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    runner = CliRunner()
    out = tmp_path / "res"
    res = runner.invoke(cli, ["bench", "--methods", "ce", "--epochs", "1", "--device", "cpu", "--precision", "tf32",
                              "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tf32" in lines[0] and "Traceback" not in res.output
    assert not out.exists()                                   # refused before anything was written
    res = runner.invoke(cli, ["retrain", "--method", "ce", "--epochs", "1", "--device", "cpu", "--quiet",
                              "--precision", "bf16", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["precision"] == "bf16"


def test_tf32_mode_is_scoped():
    """tf32 turns CUDA's TF32 GEMMs on for the sweep only (the flag is settable without a GPU)."""
    from ltcache.stage2.precision import matmul_mode
    before = torch.backends.cuda.matmul.allow_tf32
    with matmul_mode("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
        with matmul_mode("fp32"):
            assert torch.backends.cuda.matmul.allow_tf32          # fp32 leaves the caller's setting alone
    assert torch.backends.cuda.matmul.allow_tf32 == before
