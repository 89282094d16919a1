"""The one registry: duplicate rule (any letter case), did-you-mean errors, origins, snapshot."""
from __future__ import annotations

import pytest

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, isolated, loading, registries


def test_every_kind_is_one_registry():
    import ltcache.models  # noqa: F401
    import ltcache.stage2.methods  # noqa: F401
    kinds = set(registries())
    assert {"method", "loss", "loss form", "loss term", "head", "sampler", "post-hoc rule", "backbone"} <= kinds


def test_duplicates_in_any_case_and_did_you_mean():
    with isolated():
        reg = Registry("widget", "add one with @register_widget")
        reg.register("focal-x", object(), "built-in")
        with pytest.raises(LtcacheError, match=r"widget 'Focal-X' is already registered as 'focal-x' \(built-in\)"):
            reg.register("Focal-X", object())
        with pytest.raises(LtcacheError, match="must be a non-empty string without spaces or commas"):
            reg.register("a b", object())
        with pytest.raises(LtcacheError, match=r"unknown widget 'FOCALX'; did you mean focal-x\? .*@register_widget"):
            reg.get("FOCALX")
        assert reg.get("nope", None) is None and reg.names() == ["focal-x"]


def test_origin_records_the_plugin_and_snapshot_undoes_everything():
    from ltcache.stage2.methods import METHODS
    before = set(METHODS)
    with isolated():
        reg = registries()["sampler"]
        with loading("my_file.py"):
            reg.register("my-sampler", lambda *a: None)
        assert reg.origin("my-sampler") == "plugin my_file.py" and reg.from_plugins() == ["my-sampler"]
    assert "my-sampler" not in registries()["sampler"] and set(METHODS) == before
