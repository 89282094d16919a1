"""Options declared once: the CLI's choice lists are the tuples of ``ltcache.options``; the tables
that core modules key by those values hold exactly them; the pipeline's [dataset] / [stage1] /
[extract] keys agree with the options of `ltcache train` / `ltcache extract` (type, and the
choices their help lists); and every option of the stage-2 commands (and [sweep] / [tune] key) that
is not a hyper-parameter is reserved, so no hyper-parameter can take its name."""
from __future__ import annotations

import click
import pytest

from ltcache import options, pipeline
from ltcache.cli import cli

_NUM = pipeline._NUM


def _params(name: str) -> dict:
    cmd = cli.commands[name]
    ctx = click.Context(cmd, info_name=name, parent=click.Context(cli))
    out = {}
    for p in cmd.get_params(ctx):
        longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if longs:
            out[longs[0][2:].replace("-", "_")] = p
    return out


def test_core_tables_hold_the_declared_choices():
    from ltcache.cache.build import DTYPES
    from ltcache.cache.extraction import PROTOCOLS
    from ltcache.models.layouts import LAYOUTS
    from ltcache.stage2.methods import PRESETS
    from ltcache.stage2.paper_format import FORMATTERS
    from ltcache.stage2.tune import SELECT_METRICS
    assert tuple(FORMATTERS) == options.TABLE_FORMATS
    assert set(DTYPES) == set(options.DTYPES)
    assert tuple(PROTOCOLS) == options.PROTOCOLS
    assert tuple(LAYOUTS) == options.CHECKPOINT_LAYOUTS
    assert tuple(PRESETS) == options.PRESETS
    assert tuple(SELECT_METRICS) == options.SELECT_METRICS


@pytest.mark.parametrize("command,sections", [("train", ("dataset", "stage1")), ("extract", ("extract",))])
def test_pipeline_keys_agree_with_the_command_options(command, sections):
    opts = _params(command)
    checked = 0
    for section in sections:
        for key, (typ, help_text) in pipeline.SCHEMA[section].items():
            p = opts.get(key)
            if p is None:
                continue
            checked += 1
            if isinstance(p.type, click.Choice):
                assert typ is str and options.alternatives(tuple(p.type.choices)) in help_text, (section, key)
            elif p.is_flag:
                assert typ is bool, (section, key)
            elif isinstance(p.type, click.types.IntParamType):
                assert typ is int, (section, key)
            elif isinstance(p.type, click.types.FloatParamType):
                assert typ == _NUM, (section, key)
            else:
                assert typ in (str, list), (section, key)
    assert checked >= 8


def test_stage2_options_are_reserved():
    from ltcache.stage2.params import RESERVED
    hyper = set(pipeline.hyper_keys())
    for command in ("retrain", "bench", "tune"):
        taken = {k for k in _params(command) if k not in hyper} - RESERVED
        assert not taken, (command, sorted(taken))
    keys = set(pipeline.SCHEMA["sweep"]) | set(pipeline.SCHEMA["tune"])
    assert not keys - RESERVED, sorted(keys - RESERVED)
