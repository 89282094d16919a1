"""``ltcache report``: figures and one offline HTML page from a stage-2 results JSON.

Figure families live in one module each (``accuracy``, ``logits``, ``calibration``); ``load`` checks
the results file and pools seeds; ``html`` writes ``report.html``. matplotlib is imported on first
use and drawn on an Agg canvas (no pyplot, no global backend change).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ltcache.errors import LtcacheError
from ltcache.report.load import Report, Series, load_report, read_results

FORMATS = ("png", "svg")
FIGURES = ("per_class_accuracy", "lm_rsd", "reliability", "logit_margin", "group_accuracy")


def render_figures(rep: Report, out_dir: Union[str, Path], fmt: str = "png",
                   quiet: bool = True) -> list[dict]:
    """Draw the five figures into ``out_dir/figures``; each entry: stem, path, size (inches), title, caption."""
    from ltcache.report.figstyle import RC, mpl
    matplotlib = mpl()
    from ltcache.report import accuracy, calibration, logits
    from ltcache.outputs import os_error
    fig_dir = Path(out_dir) / "figures"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, fig_dir) from None
    makers = (accuracy.per_class_accuracy, logits.lm_rsd, calibration.reliability, logits.logit_margin,
              accuracy.group_bars)
    out = []
    with matplotlib.rc_context(RC):
        for make in makers:
            info = make(rep, fig_dir, fmt)
            if not quiet:
                print(f"  {info['path']}")
            out.append(info)
    return out


REPORT_OUTPUTS = ("report.html", "figures")


def make_report(results_path: Union[str, Path], out_dir: Optional[Union[str, Path]] = None,
                methods: Optional[Sequence[str]] = None, fmt: str = "png", quiet: bool = False,
                force: bool = False) -> Path:
    """Write the figures and ``report.html`` (default in ``<results dir>/report``); returns report.html.

    A folder that already holds a report is refused unless ``force``; it is checked before anything
    is drawn, locked while this call writes (a second writer is refused with this one's pid), and
    every file is written to a temporary name and renamed."""
    from ltcache.outputs import check_output_dir, output_lock, restore_interrupted_swap
    from ltcache.report.html import write_html
    from ltcache.report.figstyle import mpl
    if fmt not in FORMATS:
        raise LtcacheError(f"unknown figure format '{fmt}'; use png or svg")
    mpl()                                   # fail early, before any file is written
    rep = load_report(results_path, methods)
    out = Path(out_dir) if out_dir is not None else rep.path.parent / "report"
    check_output_dir(out, force, what="report folder", outputs=REPORT_OUTPUTS)
    with output_lock(out):
        restore_interrupted_swap(out / "figures")     # a report killed between its renames
        with _staging(out) as stage:            # drawn beside, moved in whole: all or nothing
            try:
                figures = render_figures(rep, stage, fmt, quiet=True)
                write_html(rep, figures, stage)
            except LtcacheError as exc:         # name the file it was to become, not the temporary one
                raise LtcacheError(str(exc).replace(str(stage), str(out))) from None
            page = _move_in(stage, out)
        for info in figures:
            info["path"] = out / "figures" / Path(info["path"]).name
            if not quiet:
                print(f"  {info['path']}")
    if not quiet:
        print(f"report: {page} ({len(figures)} figures, {len(rep.series)} configurations)")
    return page


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder inside ``out`` for a whole report; removed afterwards (also on failure)."""
    from ltcache.outputs import os_error
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report.", suffix=".tmp", dir=out))
    except OSError as exc:
        raise os_error(exc, out) from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_in(stage: Path, out: Path) -> Path:
    """Renames only (no data written): the old ``figures`` folder aside, the new one and
    ``report.html`` in, the old one removed; a failed rename puts the old folder back."""
    from ltcache.outputs import os_error
    figs, old = out / "figures", out / ".figures.old"
    try:
        if old.exists():
            shutil.rmtree(old)
        if figs.exists():
            os.replace(figs, old)
        try:
            os.replace(stage / "figures", figs)
            os.replace(stage / "report.html", out / "report.html")
        except OSError:
            if old.exists():
                shutil.rmtree(figs, ignore_errors=True)
                os.replace(old, figs)
            raise
    except OSError as exc:
        raise os_error(exc, out / "report.html") from None
    shutil.rmtree(old, ignore_errors=True)
    return out / "report.html"


__all__ = ["make_report", "render_figures", "load_report", "read_results", "Report", "Series", "FIGURES",
           "FORMATS"]
