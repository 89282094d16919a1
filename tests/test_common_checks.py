"""Generated common checks (scikit-learn's check_estimator idea): every registered method,
loss, head, sampler and post-hoc rule -- built-in, or registered by the examples' plugin files
-- goes through the same checks of ltcache.stage2.checks (the ones `ltcache check-plugin`
runs). A new entry is checked by being registered: there is no hand list here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.plugins import load_plugin
from ltcache.registry import isolated, registries
from ltcache.stage2 import api, checks
from ltcache.stage2.methods import METHODS

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLUGINS = sorted(str(p) for p in EXAMPLES.glob("*.py"))


def _entries() -> list:
    """(plugin file or None, kind, name) of every registered entry and every example's."""
    out = [(None, kind, n) for kind, reg in registries().items() if kind not in ("loss form", "loss term", "backbone")
           for n in reg]
    for path in PLUGINS:
        with isolated():
            load_plugin(path)
            out += [(path, kind, n) for kind, names in checks.plugin_entries(path).items() for n in names]
    return out


ENTRIES = _entries()


def _id(e) -> str:
    return f"{e[1]}:{e[2]}" + (f"@{Path(e[0]).name}" if e[0] else "")


@pytest.fixture(autouse=True)
def registry():
    with isolated():
        yield


@pytest.fixture(scope="module")
def mixed():
    """Every trained method (the examples' included) in one sweep: one configuration each."""
    with isolated():
        for path in PLUGINS:
            load_plugin(path)
        data = checks.tiny_data()
        return checks.mixed_sweep([n for n, m in METHODS.items() if not m.closed_form], data)


def _load(entry):
    if entry[0]:
        load_plugin(entry[0])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e[1] == "method"], ids=_id)
def test_method(entry, mixed, monkeypatch):
    _load(entry)
    name = entry[2]
    checks.check_presets(name)
    refused = checks.check_refuses_out_of_range(name)
    assert all("\n" not in r.strip() for r in refused)
    checks.check_space(name)
    if not METHODS[name].closed_form:
        checks.check_mixed_equals_alone(name, checks.tiny_data(), mixed)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e[1] == "loss"], ids=_id)
def test_loss(entry):
    _load(entry)
    checks.check_loss_gradient(entry[2])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e[1] == "head"], ids=_id)
def test_head(entry):
    _load(entry)
    checks.check_head(entry[2])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e[1] == "sampler"], ids=_id)
def test_sampler(entry):
    _load(entry)
    checks.check_sampler(entry[2])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e[1] == "post-hoc rule"], ids=_id)
def test_posthoc(entry):
    _load(entry)
    checks.check_posthoc(entry[2])


def test_out_of_range_values_exit_2_in_one_line_and_space_is_shown(monkeypatch):
    """On the CLI: every method's out-of-range value is refused (exit 2, one line, before the
    cache is read) and `ltcache methods --space` shows every method's space."""
    def no_cache(*a, **k):
        raise AssertionError("the cache was read before the refusal")
    monkeypatch.setattr(api, "_load_cache", no_cache)
    runner = CliRunner()
    plugins = [a for p in PLUGINS for a in ("--plugin", p)]
    for path in PLUGINS:
        load_plugin(path)
    from ltcache.stage2.methods import method_params, method_space
    tried = 0
    for m in METHODS.values():
        decl = method_params(m)
        for key in m.tunables:
            bad = checks.out_of_range(decl[key])
            if bad is None:
                continue
            res = runner.invoke(cli, ["retrain", "--method", m.name, f"--{key.replace('_', '-')}", str(bad),
                                      "--quiet", "--device", "cpu", *plugins])
            lines = [ln for ln in res.output.splitlines() if ln.strip()]
            assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (m.name, key, res.output)
            tried += 1
            break                                     # one refused value per method keeps this fast
    assert tried >= 20
    res = runner.invoke(cli, ["methods", "--space", *plugins])
    assert res.exit_code == 0, res.output
    blocks = {b.splitlines()[0]: b for b in ("\n" + res.output).split("\n") if b and not b.startswith(" ")}
    for m in METHODS.values():
        assert m.name in blocks, m.name
        for d in method_space(m, "cifar").dims:
            assert f"  {d.name} " in res.output, (m.name, d.name)
