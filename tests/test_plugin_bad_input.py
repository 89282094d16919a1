"""Broken plugin entries: one line naming the plugin file, the entry and the fix, exit 2, before
anything trains, and nothing written."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.plugins import isolated_registry
from ltcache.stage2 import api, sweep
from test_stage2_engine import fake_cache

torch.set_num_threads(1)
HEAD = "import torch, torch.nn.functional as F, ltcache\n"
M = "ltcache.register_method('bad-method', {}, presets={{'epochs': 2, 'batch_size': 32}})\n"

CASES = {
    "head-exists": (HEAD + "@ltcache.register_head('cosine')\nclass C:\n    params = ('W',)\n"
                    "    def init(self, w0, b0, g, init): return {'W': w0}, {}\n"
                    "    def forward(self, p, buf, x): return x @ p['W'].transpose(1, 2)\n",
                    "head 'cosine' is already registered (built-in); choose another name"),
    "sampler-exists-other-case": (HEAD + "@ltcache.register_sampler('IB')\ndef s(ci, e, E, g):\n"
                                  "    return torch.zeros(ci.n, dtype=torch.long)\n",
                                  "sampler 'IB' is already registered as 'ib'"),
    "posthoc-exists": (HEAD + "@ltcache.register_posthoc('ncm')\ndef r(inp, params): return inp.w0, inp.b0\n",
                       "post-hoc rule 'ncm' is already registered"),
    "head-no-gradient": (HEAD + "@ltcache.register_head('frozen')\nclass C:\n    params = ('W',)\n"
                         "    def init(self, w0, b0, g, init): return {'W': w0.clone()}, {}\n"
                         "    def forward(self, p, buf, x): return (x @ p['W'].transpose(1, 2)).detach()\n"
                         + M.format("loss='ce', head='frozen'"),
                         "head 'frozen' (plugin {path}): forward is not differentiable in its parameters"),
    "sampler-float": (HEAD + "@ltcache.register_sampler('floaty')\ndef s(ci, e, E, g):\n"
                      "    return torch.rand(ci.n, generator=g) * ci.n\n"
                      + M.format("loss='ce', sampler='floaty'"),
                      "sampler 'floaty' (plugin {path}) returned torch.float32 indices; return a 1-D torch.long tensor"),
    "sampler-out-of-range": (HEAD + "@ltcache.register_sampler('wide')\ndef s(ci, e, E, g):\n"
                             "    return torch.full((ci.n,), ci.n + 5, dtype=torch.long)\n"
                             + M.format("loss='ce', sampler='wide'"),
                             "sampler 'wide' (plugin {path}) returned index 263 outside 0..257"),
    "loss-nan": (HEAD + "@ltcache.register_loss('nan-loss')\ndef f(z, y):\n    return (z * float('nan')).mean()\n"
                 + M.format("loss='nan-loss'"),
                 "plugin {path}: loss 'nan-loss' of method bad-method returned nan at the first step; make it finite"),
    "loss-inf-features": (HEAD + "@ltcache.register_loss('inf-loss')\ndef f(z, y, h=None):\n"
                          "    return F.cross_entropy(z, y) / (h.abs().sum() * 0)\n" + M.format("loss='inf-loss'"),
                          "plugin {path}: loss 'inf-loss' of method bad-method returned inf at the first step"),
}


@pytest.fixture(autouse=True)
def registry():
    with isolated_registry():
        yield


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_plugin_is_one_line_exit_2_before_training(case, tmp_path, monkeypatch):
    source, needle = CASES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(source)
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    trained = []
    real = sweep.train_group
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: trained.append(1) or real(*a, **k))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["bench", "--methods", "bad-method,ce", "--plugin", str(path), "--quiet",
                                   "--device", "cpu", "--jobs", "1", "--out", str(out)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert needle.format(path=path) in lines[0] and str(path) in lines[0], lines[0]
    assert not trained and not out.exists()


def test_posthoc_rule_needing_val_is_refused_on_a_cache_without_val(tmp_path, monkeypatch):
    path = tmp_path / "rule.py"
    path.write_text(HEAD + "@ltcache.register_posthoc('val-rule', needs_val=True)\n"
                    "def r(inp, params): return inp.w0, inp.b0\n"
                    "ltcache.register_method('val-method', head='val-rule', loss='-', closed_form=True, presets={})\n")
    cache = fake_cache()
    del cache.splits["val"]
    monkeypatch.setattr(api, "_load_cache", lambda c, device: cache)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["bench", "--methods", "val-method,ce", "--plugin", str(path), "--quiet",
                                   "--device", "cpu", "--jobs", "1", "--out", str(out)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "val-method" in lines[0] and "val-rule" in lines[0] and str(path) in lines[0], lines[0]
    assert not out.exists()


def test_check_plugin_names_the_file_entry_and_fix(tmp_path):
    path = tmp_path / "wrong_grad.py"
    path.write_text(HEAD + "@ltcache.register_loss('half-ce')\nclass HalfCE:\n"
                    "    def forward(self, z, y, params, counts): return F.cross_entropy(z, y)\n"
                    "    def grad(self, z, y, params, counts):\n"
                    "        return (torch.softmax(z, 1) - F.one_hot(y, z.shape[1])) / z.shape[0] / 2\n"
                    + M.format("loss='half-ce'"))
    res = CliRunner().invoke(cli, ["check-plugin", str(path)])
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("ok ")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert str(path) in lines[0] and "loss 'half-ce'" in lines[0] and "grad disagrees with autograd" in lines[0]
    good = CliRunner().invoke(cli, ["check-plugin", "--quiet", str(path.parent / "none.py")])
    assert good.exit_code == 2 and "not found" in good.output


def test_export_of_a_plugin_head_is_refused_before_training(tmp_path, monkeypatch):
    from pathlib import Path
    example = Path(__file__).resolve().parent.parent / "examples" / "cosine_temperature.py"
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    res = CliRunner().invoke(cli, ["retrain", "--method", "cosine-t", "--plugin", str(example), "--export",
                                   str(tmp_path / "m.pt"), "--seeds", "0", "--quiet", "--device", "cpu"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "cosine-t" in lines[0] and str(example) in lines[0], res.output
    assert not (tmp_path / "m.pt").exists()
