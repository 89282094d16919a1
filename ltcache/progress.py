"""Progress bars for every long loop, silenced by ``--quiet``."""
from __future__ import annotations

from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Optional[Iterable[T]] = None, *, desc: str = "", total: Optional[int] = None,
             quiet: bool = False, unit: str = "it", leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on stderr that is disabled when ``quiet`` is true."""
    return tqdm(iterable, desc=desc, total=total, disable=quiet, unit=unit, leave=leave,
                dynamic_ncols=True, **kwargs)


def echo(msg: str, quiet: bool = False) -> None:
    """Print a status line unless quiet (tqdm-safe)."""
    if not quiet:
        tqdm.write(msg)
