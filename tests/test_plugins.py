"""Methods of your own: register_loss / register_method, forward-only losses trained through the
autograd fallback, --plugin files on the CLI and in pipelines, and one-line errors for broken plugins."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import ltcache
from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.plugins import isolated_registry, load_plugin
from ltcache.stage2 import api
from ltcache.stage2 import tune as tune_mod
from ltcache.stage2.methods import CRT_IMNET, LOS_CIFAR, METHODS, get_method, register_method, validate_overrides
from ltcache.stage2.sweep import train_sweep
from test_stage2_engine import configs_for, data_of, fake_cache

torch.set_num_threads(1)
KW = dict(device="cpu", quiet=True, jobs=1)


@pytest.fixture(autouse=True)
def registry():
    """Every test leaves the method and loss registries (and loaded plugins) as it found them."""
    with isolated_registry():
        yield


def register_user_twins():
    """CE, balanced softmax and LOS written as plain forwards, as methods mirroring the built-ins."""

    @ltcache.register_loss("user-ce")
    def user_ce(z, y):
        return F.cross_entropy(z, y)

    @ltcache.register_loss("user-bs")
    def user_bs(z, y, params, counts):
        return F.cross_entropy(z + counts.log(), y)

    @ltcache.register_loss("user-los", params=[ltcache.Param("delta", float, lo=0, hi=1, default=0.98)])
    def user_los(z, y, params):
        return F.cross_entropy(z, y, label_smoothing=params["delta"])

    for name, twin in (("user-ce", "ce"), ("user-bs", "balanced-softmax"), ("user-los", "los")):
        m = get_method(twin)
        ltcache.register_method(name, loss=name, head=m.head, sampler=m.sampler, init=m.init, presets=m.presets,
                                steps=m.steps, no_wd=m.no_wd, source=f"test twin of {twin}")


# ------------------------------------------------------------------------ forward-only == built-in
TWINS = [("ce", "user-ce", {"lr": 0.05, "batch_size": 32, "epochs": 3}),
         ("balanced-softmax", "user-bs", {"lr": 0.05, "batch_size": 32, "epochs": 2}),
         ("los", "user-los", {"delta": 0.9, "lr": 0.02, "batch_size": 24, "epochs": 3})]


def _runs(cache, plans, seeds):
    res, pairs = api.run_sweep(cache, plans, seeds, **KW)
    return {(r["method"], r["seed"]): (r, layer) for r, layer in pairs}


@pytest.mark.parametrize("builtin,user,ov", TWINS)
def test_forward_only_loss_equals_builtin(builtin, user, ov):
    """Same seeds, same hyper-parameters: the trained layers and the metrics agree within 1e-5.
    Eight seeds per method put vmap on the fallback's path; the built-in and the user members
    share their groups (a mixed sweep), and the short last batches exercise the padding."""
    register_user_twins()
    cache = fake_cache()
    n = len(cache.splits["train"].labels)
    plans = api.expand([builtin, user], ov, None, "cifar", n)
    seeds = tuple(range(8))
    runs = _runs(cache, plans, seeds)
    worst = 0.0
    for seed in seeds:
        (rb, lb), (ru, lu) = runs[(builtin, seed)], runs[(user, seed)]
        for key in ("weight", "bias"):
            worst = max(worst, float((lb[key] - lu[key]).abs().max()))
            assert torch.allclose(lb[key], lu[key], atol=1e-5, rtol=0), (builtin, seed, key)
        for metric in ("all", "nll", "ece", "many", "few"):
            assert rb["metrics"][metric] == pytest.approx(ru["metrics"][metric], abs=1e-5), (builtin, metric)
        assert rb["val"]["balanced"] == pytest.approx(ru["val"]["balanced"], abs=1e-5)
    print(f"{builtin}: max |built-in - forward-only| = {worst:.2e}")


def test_mixed_sweep_equals_each_alone():
    """Members of every kind in one sweep (forward-only ones in the built-ins' groups, runs of
    fewer members than vmap pays for, a forward vmap cannot run, different epochs so that some
    members sit out steps): each equals the configuration trained alone within 1e-5."""
    register_user_twins()

    @ltcache.register_loss("user-item")
    def user_item(z, y):                         # .item(): vmap cannot run it -> per-member autograd
        scale = float(z.detach().abs().max().item()) * 0 + 1.0
        return scale * F.cross_entropy(z, y)

    ltcache.register_method("user-item", loss="user-item", presets=LOS_CIFAR)
    cache = fake_cache()
    data = data_of(cache)
    specs = [("ce", {"lr": 0.05, "batch_size": 32, "epochs": 3}, 0),
             ("user-los", {"delta": 0.9, "lr": 0.02, "batch_size": 32, "epochs": 2}, 1),
             ("crt", {"lr": 0.1, "batch_size": 32, "epochs": 3}, 2),
             ("user-ce", {"batch_size": 32, "epochs": 3}, 3),
             ("user-bs", {"batch_size": 32, "epochs": 2}, 0),
             ("seesaw", {"batch_size": 32, "epochs": 2}, 0),
             ("user-los", {"delta": 0.5, "batch_size": 32, "epochs": 3}, 4),
             ("user-item", {"batch_size": 32, "epochs": 2, "lr": 0.05}, 1),
             ("lade", {"batch_size": 32, "epochs": 2}, 0)]
    specs += [("user-ce", {"batch_size": 32, "epochs": 2}, s) for s in range(10, 19)]      # a vmap run
    cfgs = configs_for(cache, specs)
    together = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    for cfg, t in zip(cfgs, together):
        alone = train_sweep([cfg], data, quiet=True, n_jobs=1)[0]
        for key in ("weight", "bias"):
            assert torch.allclose(alone.layer[key], t.layer[key], atol=1e-5, rtol=0), (cfg.method, key)
        assert not torch.allclose(t.layer["weight"], cache.weight), cfg.method


def test_poly1_as_a_plugin_forward_equals_the_builtin(tmp_path):
    """README "Add a method": Poly-1 written as a plugin file with only a forward."""
    plugin = tmp_path / "poly1_plugin.py"
    plugin.write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        import ltcache

        @ltcache.register_loss("my-poly1", params=[ltcache.Param("epsilon", float, lo=-1, default=1.0,
                                                                  help="Poly-1 weight of (1 - p_y)")])
        def my_poly1(z, y, params):
            p_y = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
            return F.cross_entropy(z, y) + params["epsilon"] * (1 - p_y).mean()

        ltcache.register_method("my-poly1", loss="my-poly1", presets={"cifar": ltcache.stage2.methods.LOS_CIFAR,
                                "imagenet": ltcache.stage2.methods.CRT_IMNET}, source="Leng et al., ICLR 2022")
    '''))
    load_plugin(plugin)
    cache = fake_cache()
    ov = {"epsilon": 2.0, "lr": 0.05, "batch_size": 32, "epochs": 2}
    runs = _runs(cache, api.expand(["poly1", "my-poly1"], ov, None, "cifar", 258), (0, 1))
    for seed in (0, 1):
        for key in ("weight", "bias"):
            assert torch.allclose(runs[("poly1", seed)][1][key], runs[("my-poly1", seed)][1][key], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ the CLI and pipelines
@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setattr(api, "_load_cache", lambda cache, device: fake_cache())
    monkeypatch.setattr(tune_mod, "_load_cache", lambda cache, device: fake_cache())
    return CliRunner()


GOOD = '''
import torch
import torch.nn.functional as F
import ltcache

@ltcache.register_loss("smooth-ce", params=[ltcache.Param("my_eps", float, lo=0, hi=1, default=0.1,
                                                           help="my smoothing")])
def smooth_ce(z, y, params, counts):
    return F.cross_entropy(z, y, label_smoothing=params["my_eps"])

ltcache.register_method("my-method", loss="smooth-ce", presets={"epochs": 2, "batch_size": 32},
                        source="a test plugin")
'''


def test_plugin_file_runs_through_retrain_and_bench(runner, tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(GOOD)
    common = ["--quiet", "--device", "cpu", "--jobs", "1", "--plugin", str(plugin)]
    res = runner.invoke(cli, ["retrain", "--method", "my-method", "--my-eps", "0.3", *common])
    assert res.exit_code == 0, res.output
    assert "my-method[my_eps=0.3]" in res.output
    res = runner.invoke(cli, ["bench", "--methods", "my-method,los", "--epochs", "1", *common])
    assert res.exit_code == 0, res.output
    assert "my-method[my_eps=0.1,epochs=1]" in res.output and "los[delta=0.98,epochs=1]" in res.output
    res = runner.invoke(cli, ["retrain", "--help", "--plugin", str(plugin)])
    assert "--my-eps" in res.output and "my smoothing" in res.output            # its option, generated
    res = runner.invoke(cli, ["methods", "--plugin", str(plugin)])
    assert res.exit_code == 0 and "my-method" in res.output and "smooth-ce" in res.output


def _broken(tmp_path, body: str) -> str:
    p = tmp_path / "broken_plugin.py"
    p.write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        import ltcache
    ''') + textwrap.dedent(body))
    return str(p)


LOSS_METHOD = '''
@ltcache.register_loss("bad-loss")
def bad(z, y):
    {body}

ltcache.register_method("bad-method", loss="bad-loss", presets={{"epochs": 1, "batch_size": 32}})
'''


@pytest.mark.parametrize("case,body,needle,names_method", [
    ("missing", None, "not found", False),
    ("import", "import no_such_module_here\n", "failed to import (line 5): ModuleNotFoundError", False),
    ("syntax", "def broken(:\n", "failed to import (line 5): SyntaxError", False),
    ("exists", "ltcache.register_method('ce', loss='ce')\n", "method 'ce' is already registered", False),
    ("loss-exists", "@ltcache.register_loss('los')\ndef f(z, y):\n    return z.sum()\n", "loss 'los' is already registered", False),
    ("reserved", "@ltcache.register_loss('x', params=[ltcache.Param('seeds', int)])\ndef f(z, y):\n    return z.sum()\n",
     "'seeds' is taken", False),
    ("raises", LOSS_METHOD.format(body="raise ValueError('boom')"), "raised ValueError: boom", True),
    ("shape", LOSS_METHOD.format(body="return F.cross_entropy(z, y, reduction='none')"), "not a scalar", True),
    ("nan", LOSS_METHOD.format(body="return F.cross_entropy(z, y) * float('nan')"), "returned nan", True),
    ("inf-grad", LOSS_METHOD.format(body="return (z - z).abs().sqrt().sum() + F.cross_entropy(z, y)"),
     "non-finite gradient", True),
])
def test_broken_plugins_are_one_line_errors(runner, tmp_path, case, body, needle, names_method):
    from ltcache.stage2.losses import LOSSES
    before = (set(METHODS), set(LOSSES))
    path = str(tmp_path / "missing.py") if body is None else _broken(tmp_path, body)
    method = "bad-method" if names_method else "ce"
    for cmd in (["retrain", "--method", method], ["bench", "--methods", method]):
        res = runner.invoke(cli, [*cmd, "--plugin", path, "--quiet", "--device", "cpu", "--jobs", "1"])
        assert res.exit_code == 2, (case, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, res.output)
        assert needle in lines[0] and path in lines[0], (case, lines[0])
        if names_method:
            assert "method bad-method" in lines[0] and "loss 'bad-loss'" in lines[0], lines[0]
    if not names_method:                     # a plugin that fails to import leaves nothing registered
        assert (set(METHODS), set(LOSSES)) == before


def test_tune_takes_plugins(runner, tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(GOOD)
    res = runner.invoke(cli, ["tune", "--methods", "my-method", "--budget", "1", "--tune-seeds", "0", "--seeds", "0",
                              "--plugin", str(plugin), "--quiet", "--device", "cpu", "--jobs", "1"])
    assert res.exit_code == 0, res.output
    assert "my-method" in res.output


def test_pipeline_plugins_key_and_hyper_parameter_keys(tmp_path):
    from ltcache.pipeline import parse_pipeline
    bad = tmp_path / "bad.toml"
    bad.write_text('[dataset]\nsource = "cifar10"\n[stage1]\narch = "resnet32"\n[sweep]\nmy_eps = 0.2\n')
    with pytest.raises(LtcacheError, match=r"unknown key \[sweep\] my_eps"):     # not declared (yet)
        parse_pipeline(bad)
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "p.py").write_text(GOOD)
    pl = tmp_path / "x.toml"
    pl.write_text('[pipeline]\nplugins = ["plug/p.py"]\n[dataset]\nsource = "cifar10"\n[stage1]\narch = "resnet32"\n'
                  '[sweep]\nmethods = ["my-method", "los"]\nmy_eps = 0.2\ndelta = 0.9\nmomentum = 0.5\n'
                  'grid = { my_eps = [0.1, 0.3] }\n')
    p = parse_pipeline(pl)                      # the plugin's hyper-parameter is a [sweep] key
    assert p.sweep["my_eps"] == 0.2 and p.sweep["grid"] == {"my_eps": [0.1, 0.3]}
    bad.write_text('[pipeline]\nplugins = ["nowhere.py"]\n[dataset]\nsource = "cifar10"\n[stage1]\narch = "resnet32"\n')
    with pytest.raises(LtcacheError, match=r"bad.toml: \[pipeline\] plugin .*nowhere.py not found"):
        parse_pipeline(bad)


# ------------------------------------------------------------------------ one source per hyper-parameter
def test_every_option_an_error_message_suggests_exists(runner):
    """validate_overrides lists a method's options; each must be a real retrain option (it once
    listed --momentum, which retrain did not have)."""
    res = runner.invoke(cli, ["retrain", "--help"])
    for m in METHODS.values():
        with pytest.raises(LtcacheError) as exc:
            validate_overrides(m, {"no_such_option": 1})
        listed = exc.value.args[0].split("its options: ")[1].rstrip(")").split(", ")
        for opt in listed:
            assert opt == "none" or opt in res.output, (m.name, opt)
    res = runner.invoke(cli, ["retrain", "--method", "ce", "--momentum", "0.5", "--epochs", "1", "--quiet",
                              "--device", "cpu", "--jobs", "1"])
    assert res.exit_code == 0 and "momentum=0.5" in res.output, res.output


def test_register_method_checks_its_input():
    with pytest.raises(LtcacheError, match="unknown loss 'nope'"):
        register_method("m1", loss="nope")
    with pytest.raises(LtcacheError, match="unknown head 'conv'"):
        register_method("m1", loss="ce", head="conv")
    with pytest.raises(LtcacheError, match="not one of its hyper-parameters"):
        register_method("m1", loss="ce", presets={"delta": 0.5})
    with pytest.raises(LtcacheError, match="must be in"):
        register_method("m1", loss="los", presets={"delta": 2.0})
    m = register_method("m1", loss="los", presets={"cifar": {"delta": 0.5}, "imagenet": CRT_IMNET | {"delta": 0.7}})
    assert m.defaults("cifar")["delta"] == 0.5 and m.defaults("cifar")["lr"] == 0.1      # the stated default budget
    with pytest.raises(LtcacheError, match="already registered"):
        register_method("m1", loss="ce")


SPACED = GOOD.replace('help="my smoothing")])', 'help="my smoothing"),\n    ltcache.Param("my_t", float, lo=0, lo_open=True, default=1.0, space="log:0.5:4")])').replace(
    'label_smoothing=params["my_eps"])', 'label_smoothing=params["my_eps"]) * params["my_t"]')


def test_plugin_params_join_the_tune_space(runner, tmp_path):
    from ltcache.stage2.methods import method_space
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(SPACED)
    res = runner.invoke(cli, ["methods", "--space", "--plugin", str(plugin)])
    assert res.exit_code == 0, res.output
    block = res.output.split("my-method\n", 1)[1]
    assert "my_eps" in block and "linear [0, 1]" in block and "default from its Param" in block
    assert "my_t" in block and "log [0.5, 4]" in block and "declared by its Param" in block
    dims = {d.name: d for d in method_space(get_method("my-method"), "cifar").dims}
    assert {"lr", "wd", "epochs", "my_eps", "my_t"} <= set(dims)
    # the built-ins' spaces are as registered (a plugin's rule does not touch them)
    assert [d.name for d in method_space(get_method("los"), "cifar").dims] == ["lr", "wd", "epochs", "delta"]
