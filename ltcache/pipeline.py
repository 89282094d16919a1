"""TOML pipelines: one file names a whole experiment (dataset, stage 1, extraction, sweep).

``ltcache run pipelines/X.toml`` runs the steps in order into one output directory and skips
steps whose outputs are already complete and valid, so an interrupted pipeline resumes.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ltcache.errors import LtcacheError
from ltcache.progress import echo

# Every accepted key per section: (type or tuple of types, description). Unknown keys and wrong
# types are refused with the key's full name, so a typo never silently falls back to a default.
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "pipeline": {
        "name": (str, "experiment name"),
        "out": (str, "output directory (relative to the pipeline file's directory or absolute)"),
        "description": (str, "free text"),
    },
    "dataset": {
        "source": (str, "cifar10 | cifar100 | imagefolder:PATH | splitlist:DIR/NAME"),
        "imb_ratio": (_NUM, "imbalance ratio n_max/n_min (>= 1)"),
        "profile": (str, "exp | step"),
        "selection": (str, "first | shuffle"),
        "seed": (int, "selection / validation seed"),
        "val_per_class": (int, "balanced validation images per class"),
        "data_root": (str, "data root (default ./data or $LTCACHE_DATA)"),
        "download": (bool, "let torchvision download CIFAR (needs a network)"),
    },
    "stage1": {
        "arch": (str, "backbone name (ltcache train --help lists them)"),
        "epochs": (int, "training epochs"),
        "batch_size": (int, "batch size"),
        "lr": (_NUM, "base learning rate"),
        "momentum": (_NUM, "SGD momentum"),
        "wd": (_NUM, "weight decay"),
        "schedule": (str, "cosine | step"),
        "warmup_epochs": (int, "linear warm-up epochs"),
        "label_smoothing": (_NUM, "label smoothing epsilon"),
        "mixup": (_NUM, "mixup alpha (0 = off)"),
        "maxnorm": (_NUM, "MaxNorm threshold (0 = off)"),
        "seed": (int, "training seed"),
    },
    "extract": {
        "splits": (list, "splits to extract"),
        "test_views": (list, "views of val/test: center, hflip"),
        "train_views": (int, "augmented views per training image besides the clean one"),
        "train_bn": (str, "running | batch"),
        "bn_shift": (str, "none | instance | class"),
        "bn_shift_passes": (int, "passes over the training set for the BN shift"),
        "dtype": (str, "float16 | float32"),
        "batch_size": (int, "extraction batch size"),
        "shard_rows": (int, "rows per HDF5 shard"),
    },
    "sweep": {
        "methods": ((str, list), "'all' or a list of method names"),
        "seeds": (list, "seeds, each trained as its own configuration"),
        "grid": (dict, "hyper-parameter grids, e.g. {delta = [0.9, 0.98]}"),
        "select": (str, "last | val"),
        "test_views": (list, "views averaged at evaluation"),
        "preset": (str, "cifar | imagenet (default: from the cache)"),
    },
}
REQUIRED = {"dataset": ("source",), "stage1": ("arch",)}


@dataclass
class Pipeline:
    """A parsed, validated pipeline file."""

    path: Path
    name: str
    out: Path
    dataset: dict = field(default_factory=dict)
    stage1: dict = field(default_factory=dict)
    extract: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t if not (x is int and float in t))
    return {int: "integer", float: "number", str: "string", bool: "true/false", list: "list",
            dict: "table"}.get(t, str(t))


def _check(section: str, key: str, value: Any, where: str) -> None:
    expected = SCHEMA[section][key][0]
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise LtcacheError(f"{where}: [{section}] {key} must be a {_type_name(expected)}, "
                           f"got {type(value).__name__} {value!r}")


def parse_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline TOML file (unknown keys and wrong types are errors)."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"pipeline file {path} not found; the shipped ones are in pipelines/")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LtcacheError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    for section, table in doc.items():
        if section not in SCHEMA:
            raise LtcacheError(f"{path}: unknown section [{section}]; valid sections: "
                               + ", ".join(f"[{s}]" for s in SCHEMA))
        if not isinstance(table, dict):
            raise LtcacheError(f"{path}: '{section}' must be a table ([{section}])")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise LtcacheError(f"{path}: unknown key [{section}] {key}; valid keys: "
                                   + ", ".join(SCHEMA[section]))
            _check(section, key, value, str(path))
    for section, keys in REQUIRED.items():
        for key in keys:
            if key not in doc.get(section, {}):
                raise LtcacheError(f"{path}: missing [{section}] {key}")
    meta = doc.get("pipeline", {})
    name = meta.get("name", path.stem)
    out = Path(meta.get("out", f"runs/{name}"))
    return Pipeline(path=path, name=name, out=out, dataset=dict(doc.get("dataset", {})),
                    stage1=dict(doc.get("stage1", {})), extract=dict(doc.get("extract", {})),
                    sweep=dict(doc.get("sweep", {})))
