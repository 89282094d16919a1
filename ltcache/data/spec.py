"""The dataset specification: everything needed to rebuild a long-tailed dataset."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ltcache.errors import LtcacheError

SOURCE_FORMS = ("cifar10", "cifar100", "imagefolder:PATH", "splitlist:DIR/NAME")


@dataclass
class DatasetSpec:
    """A dataset source plus its long-tailed profile; travels inside every checkpoint."""

    source: str
    imb_ratio: float = 100.0
    profile: str = "exp"
    selection: str = "shuffle"
    seed: int = 0
    val_per_class: Optional[int] = None     # None: auto (profiles.default_val_per_class)
    class_names: Optional[list] = None
    class_counts: Optional[list] = None
    val_split: str = "holdout"              # holdout (val first, then the profile) | leftover (legacy)
    val_counts: Optional[list] = None

    def __post_init__(self) -> None:
        parse_source(self.source)
        if self.val_split not in ("holdout", "leftover"):
            raise LtcacheError(f"unknown val split rule '{self.val_split}'; use holdout or leftover")
        if self.val_per_class is not None and int(self.val_per_class) < 0:
            raise LtcacheError(f"--val-per-class must be >= 0 (got {self.val_per_class})")

    @property
    def kind(self) -> str:
        return parse_source(self.source)[0]

    @property
    def short_name(self) -> str:
        """A short name for default output folders, e.g. ``cifar10`` or ``cifar10-jpg``."""
        kind, arg = parse_source(self.source)
        if kind in ("cifar10", "cifar100"):
            return kind
        from pathlib import Path
        name = Path(arg).name
        for suffix in (".tar.gz", ".tgz", ".tar"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return name or kind

    def to_dict(self) -> dict:
        d = asdict(self)
        d["imb_ratio"] = float(d["imb_ratio"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetSpec":
        """A spec from a checkpoint or manifest; one written before the holdout rule (no
        ``val_split``) rebuilds its dataset the legacy way, so its rows stay the ones stage 1 saw."""
        known = {f for f in cls.__dataclass_fields__}
        d = dict(d)
        if "val_split" not in d:
            d["val_split"] = "leftover"
            d.setdefault("val_per_class", 20)
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_source(text: str) -> tuple[str, str]:
    """Split a ``--dataset`` value into (kind, argument); unknown forms are a clear error."""
    text = (text or "").strip()
    if text in ("cifar10", "cifar100"):
        return text, ""
    for kind in ("imagefolder", "splitlist"):
        if text.startswith(kind + ":"):
            arg = text[len(kind) + 1:]
            if not arg:
                raise LtcacheError(f"--dataset {text}: give a path after '{kind}:'")
            return kind, arg
    raise LtcacheError(f"unknown dataset '{text}'; valid forms: {', '.join(SOURCE_FORMS)}")
