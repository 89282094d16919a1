"""Packaging a cache inside the package as the default one (what `ltcache bench` uses with no
``--cache``), with a record of exactly how it was made."""
from __future__ import annotations

import shutil
from pathlib import Path

from ltcache.cache.load import BUNDLED, load
from ltcache.cache.manifest import MANIFEST, read_manifest, write_manifest
from ltcache.errors import LtcacheError


def bundle_cache(src, provenance: dict, dest=BUNDLED, with_checkpoint: bool = True) -> Path:
    """Copy a verified cache (and its stage-1 checkpoint, so ``--export`` works) to ``dest`` and
    add ``provenance`` (pipeline file, commands, commit, stage-1 epochs and accuracy) to its manifest.
    The cache's feature sets (``sets/NAME``, :mod:`ltcache.cache.feature_sets`) travel with it."""
    src, dest = Path(src), Path(dest)
    load(src, quiet=True)                                  # verify every shard before shipping it
    man = read_manifest(src)
    tmp = dest.with_name(f".{dest.name}.new")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = [man["classifier"]["file"]] + [r["file"] for b in man["splits"].values() for r in b["shards"]]
    bn = (man.get("extraction") or {}).get("bn_stats_file")
    names += [bn] if bn else []
    for name in names:
        shutil.copy2(src / name, tmp / name)
    sets = src / "sets"
    if sets.is_dir():
        for d in sorted(p for p in sets.iterdir() if (p / MANIFEST).is_file()):
            load(d, quiet=True)                            # each set verified too
            shutil.copytree(d, tmp / "sets" / d.name)
            if with_checkpoint:                            # the set names the bundled checkpoint, not a build path
                set_man = read_manifest(d)
                set_man["checkpoint"] = {**set_man["checkpoint"], "path": "../../stage1.pt"}
                write_manifest(set_man, tmp / "sets" / d.name / MANIFEST)
    ck = Path((man.get("checkpoint") or {}).get("path") or "")
    if with_checkpoint:
        if not ck.is_file():
            raise LtcacheError(f"the stage-1 checkpoint {ck} named by {src / MANIFEST} is missing")
        shutil.copy2(ck, tmp / "stage1.pt")
        man["checkpoint"] = {**man["checkpoint"], "path": "stage1.pt"}
    man["provenance"] = provenance
    write_manifest(man, tmp / MANIFEST)            # re-sealed: its checksum covers the provenance
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
