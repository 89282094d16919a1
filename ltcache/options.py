"""What a command option may take, declared once: the ``click.Choice`` lists of the CLI, the
pipeline keys' help and the checks of the functions behind them all read these tuples, and the
upper bounds that stage 1 and stage 2 share. Plain data, so ``ltcache --help`` stays light
(no torch); a module that keys a table by these values (e.g. ``paper_format.FORMATTERS``) is
checked against them by ``tests/test_options.py``."""
from __future__ import annotations

# the long-tailed dataset (stage 1, extraction, pipelines)
PROFILES = ("exp", "step")
SELECTIONS = ("first", "shuffle")

# stage 1
STAGE1_SCHEDULES = ("cosine", "step")
# upper bounds that keep step counts (epochs x steps per epoch) and batch shapes inside the engine's
# 64-bit integers and a run inside a lifetime: a larger value is a typo, refused in one line (stage 1 and 2)
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 2**31 - 1

# extraction and import
PROTOCOLS = ("faithful", "clean")
TRAIN_BN = ("running", "batch")
BN_SHIFTS = ("none", "instance", "class")
DTYPES = ("float16", "float32")
CHECKPOINT_LAYOUTS = ("los", "mislas", "crt", "ldam-drw", "bot", "torchvision", "ltcache")
# a cache's feature sets besides its main features (ltcache.cache.feature_sets): the extraction
# options each fixes; a method's registry entry names the one its source's BatchNorm mode reads
FEATURE_SETS = {"bn-eval": {"train_bn": "running", "bn_shift": "none"},
                "bn-b512": {"train_bn": "batch", "bn_shift": "instance", "batch_size": 512}}

# stage 2
PRESETS = ("cifar", "imagenet")
PRECISIONS = ("fp32", "bf16", "tf32")
TEST_VIEWS = ("all", "center")
SELECTS = ("last", "val")
SEARCHES = ("sobol", "random", "grid")
SELECT_METRICS = ("val-balanced", "val-all", "val-nll")

# reports and tables
FIGURE_FORMATS = ("png", "svg")
TABLE_FORMATS = ("terminal", "markdown", "csv", "latex")


def alternatives(choices: tuple) -> str:
    """``a | b | c``: the choices as the pipeline keys' help writes them."""
    return " | ".join(choices)


def check_feature_set(name: str) -> dict:
    """The extraction options of feature set ``name``; a one-line error for an unknown name."""
    if name not in FEATURE_SETS:
        from ltcache.errors import LtcacheError
        raise LtcacheError(f"unknown feature set '{name}'; use one of {', '.join(FEATURE_SETS)} "
                           "(ltcache extract --set)")
    return FEATURE_SETS[name]
