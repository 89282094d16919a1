"""Feature sets: one checkpoint's features under another BatchNorm protocol, inside one cache.

A cache's main features follow one extraction protocol (the faithful one: augmented train views
with BN batch statistics, BN running statistics shifted on instance-sampled batches before val and
test). That is how most sources run stage 2 (BN in train mode). A source that keeps BN in eval mode
(MiSLAS's CIFAR-10 configs) sees other features: running statistics everywhere, no shift. Such a
method reads its own set, a complete cache of the same checkpoint and dataset kept under
``CACHE/sets/NAME/``, when the cache holds one (``ltcache extract --set NAME`` writes it); the
method's registry entry says which set it wants (``feature_sets=``), so the choice is data.
"""
from __future__ import annotations

from pathlib import Path
from ltcache.errors import LtcacheError
from ltcache.options import FEATURE_SETS as SETS, check_feature_set as check_name

SETS_DIR = "sets"


def set_dir(cache_dir, name: str) -> Path:
    """Where set ``name`` of the cache at ``cache_dir`` lives."""
    check_name(name)
    return Path(cache_dir) / SETS_DIR / name


def extraction_options(name: str, given: dict) -> dict:
    """``given`` (extraction options, None where not given) with set ``name``'s fixed options filled
    in; an option given that contradicts the set is refused."""
    out = dict(given)
    for key, want in check_name(name).items():
        flag = "--" + key.replace("_", "-")
        if given.get(key) is not None and given[key] != want:
            raise LtcacheError(f"ltcache extract --set {name} extracts with {flag} {want}; drop {flag} {given[key]}")
        out[key] = want
    return out


def present(cache_dir) -> dict[str, Path]:
    """The sets a cache folder holds ({name: folder}), unchecked."""
    return {name: set_dir(cache_dir, name) for name in SETS if (set_dir(cache_dir, name) / "manifest.json").is_file()}


def available(cache) -> dict[str, Path]:
    """The sets the loaded ``cache`` holds ({name: folder}), each checked to come from the same
    checkpoint and dataset as the main features (a cache built from tensors has none)."""
    from ltcache.cache.manifest import read_manifest

    path = getattr(cache, "path", None)
    if path is None:
        return {}
    found = {}
    main_key = (getattr(cache, "manifest", None) or {}).get("key") or {}
    for name, d in present(path).items():
        key = read_manifest(d).get("key") or {}
        for field in ("checkpoint_sha256", "dataset"):
            if key.get(field) != main_key.get(field):
                raise LtcacheError(f"feature set {d} was extracted from another {field.split('_')[0]} than {path}; "
                                   f"re-make it with `ltcache extract --cache {path} --set {name} --force` and the "
                                   f"cache's checkpoint")
        found[name] = d
    return found
