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
from ltcache.options import FIGURE_FORMATS
from ltcache.report.load import Report, Series, load_report, read_results

FORMATS = FIGURE_FORMATS
FIGURES = ("per_class_heatmap", "per_class_accuracy", "lm_rsd", "reliability", "logit_margin", "group_accuracy")


def figures_dir(out_dir: Union[str, Path]) -> Path:
    """``out_dir/figures``, made (a folder that cannot be made is the one-line disk/permission error)."""
    from ltcache.errors import os_error
    fig_dir = Path(out_dir) / "figures"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, fig_dir) from None
    return fig_dir


def render_figures(rep: Report, out_dir: Union[str, Path], fmt: str = "png",
                   quiet: bool = True) -> list[dict]:
    """Draw the six figures into ``out_dir/figures``; each entry: stem, path, size (inches), title, caption."""
    from ltcache.report.figstyle import RC, mpl
    matplotlib = mpl()
    from ltcache.report import accuracy, calibration, heatmap, logits
    fig_dir = figures_dir(out_dir)
    makers = (heatmap.per_class_heatmap, accuracy.per_class_accuracy, logits.lm_rsd, calibration.reliability, logits.logit_margin,
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
    from ltcache.outputs import check_output_dir, output_lock
    from ltcache.report.html import write_html
    from ltcache.report.figstyle import mpl
    if fmt not in FORMATS:
        raise LtcacheError(f"unknown figure format '{fmt}'; use png or svg")
    mpl()                                   # fail early, before any file is written
    from ltcache.stage2.multi import is_multi
    doc = _peek(results_path)
    if is_multi(doc):
        return _make_multi_report(doc, results_path, out_dir, methods, fmt, quiet, force)
    rep = load_report(results_path, methods)
    out = Path(out_dir) if out_dir is not None else rep.path.parent / "report"
    check_output_dir(out, force, what="report folder", outputs=REPORT_OUTPUTS)
    with output_lock(out):
        page, figures = _all_or_nothing(out, lambda stage: write_html(rep, render_figures(rep, stage, fmt), stage),
                                        quiet)
    if not quiet:
        print(f"report: {page} ({len(figures)} figures, {len(rep.series)} configurations)")
    return page


def _all_or_nothing(out: Path, draw, quiet: bool) -> tuple[Path, list[Path]]:
    """``draw(stage)`` writes figures/ and report.html into a temporary folder inside ``out``; then
    they are moved in by renames, so a failure (a full disk) leaves the previous report as it was.
    Returns (report.html, the figure paths)."""
    from ltcache.outputs import restore_interrupted_swap
    restore_interrupted_swap(out / "figures")     # a report killed between its renames
    with _staging(out) as stage:
        try:
            draw(stage)
        except LtcacheError as exc:               # name the file it was to become, not the temporary one
            raise LtcacheError(str(exc).replace(str(stage), str(out))) from None
        page = _move_in(stage, out)
    figures = sorted((out / "figures").iterdir())
    if not quiet:
        for f in figures:
            print(f"  {f}")
    return page, figures


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder inside ``out`` for a whole report; removed afterwards (also on failure)."""
    from ltcache.errors import os_error
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
    from ltcache.errors import os_error
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


def _peek(results_path) -> Optional[dict]:
    """The parsed results file when it is readable JSON (else None: :func:`load_report` says why)."""
    import json
    p = Path(results_path)
    p = p / "results.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _make_multi_report(doc: dict, results_path, out_dir, methods, fmt: str, quiet: bool, force: bool) -> Path:
    """The report of a multi-cache run (:mod:`ltcache.report.multi`): paper table and heat maps."""
    from ltcache.outputs import check_output_dir, output_lock
    from ltcache.report.multi import render_multi, write_multi_html
    from ltcache.stage2 import paper_table as pt
    p = Path(results_path)
    p = p / "results.json" if p.is_dir() else p
    if methods:
        known = {r["method"] for r in doc["runs"]}
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise LtcacheError(f"--methods: {', '.join(map(repr, unknown))} not in {p.name}; available: "
                               f"{', '.join(sorted(known))}")
        doc = {**doc, "runs": [r for r in doc["runs"] if r["method"] in set(methods) | {doc.get("against")}]}
    table = pt.compute(doc, doc.get("against") or "ce")
    out = Path(out_dir) if out_dir is not None else p.parent / "report"
    check_output_dir(out, force, what="report folder", outputs=REPORT_OUTPUTS)
    with output_lock(out):
        page, figures = _all_or_nothing(
            out, lambda stage: write_multi_html(doc, table, render_multi(doc, table, stage, fmt), stage, source=p),
            quiet)
    if not quiet:
        print(f"report: {page} ({len(figures)} figures, {len(table['rows'])} methods x "
              f"{len(table['datasets'])} datasets)")
    return page


__all__ = ["make_report", "render_figures", "load_report", "read_results", "Report", "Series", "FIGURES",
           "FORMATS"]
