"""The run-folder convention every command shares: one experiment NAME lives in ``runs/NAME/``.

    runs/NAME/stage1/stage1.pt   ltcache train --name NAME (or --out runs/NAME/stage1)
    runs/NAME/cache/             ltcache extract --name NAME (or --ckpt runs/NAME/stage1/stage1.pt)
    runs/NAME/results/           ltcache run's sweep (ltcache bench --out runs/NAME/results)
    runs/NAME/tune/              ltcache run's [tune] step (ltcache tune --out runs/NAME/tune)

Without ``--name``, NAME comes from the dataset spec: ``<dataset>-ir<IR>-<arch>``.
"""
from __future__ import annotations

from pathlib import Path

RUNS = Path("runs")
STAGE1 = "stage1"


def default_name(dataset: str, imb_ratio: float, arch: str) -> str:
    """The run name of a dataset spec, ratio and backbone, e.g. ``cifar10-jpg-ir100-resnet32``."""
    from ltcache.data.spec import DatasetSpec
    return f"{DatasetSpec(dataset).short_name}-ir{imb_ratio:g}-{arch.replace(':', '-')}"


def stage1_dir(name: str) -> Path:
    """``runs/NAME/stage1``: where ``ltcache train`` writes its checkpoints."""
    return RUNS / name / STAGE1


def run_dir(ckpt: Path) -> Path:
    """The run folder of a checkpoint: ``runs/NAME`` for ``runs/NAME/stage1/X.pt``, else the checkpoint's folder."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == STAGE1 else ckpt.parent


def default_cache_dir(ckpt: Path) -> Path:
    """``<run>/cache`` for ``<run>/stage1/stage1.pt`` (and for ``<run>/stage1.pt``), else ``<run>/cache-<stem>``."""
    ckpt = Path(ckpt)
    return run_dir(ckpt) / ("cache" if ckpt.name == "stage1.pt" else f"cache-{ckpt.stem}")
