"""Shared figure style: lazy matplotlib (Agg canvas, no pyplot state), series styles, outside legends."""
from __future__ import annotations

import math
from pathlib import Path

from ltcache.errors import LtcacheError

DPI = 100
WIDTH = 10.0            # inches: every figure is 1000 px wide at DPI
# Okabe-Ito (colour-blind safe); black is kept for the stage-1 head
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C6D00")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", (0, (1, 1.5)), (0, (5, 1.5, 1, 1.5, 1, 1.5)))
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||")
STAGE1_STYLE = {"color": "black", "marker": "*", "linestyle": (0, (3, 1.5)), "hatch": "", "mfc": "white"}
RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
      "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
      "lines.linewidth": 1.6, "lines.markersize": 5.5, "savefig.dpi": DPI, "figure.dpi": DPI,
      "svg.fonttype": "none", "axes.spines.top": False}


def mpl():
    """matplotlib, imported on first use; a one-line LtcacheError when it is not installed."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise LtcacheError("matplotlib is needed for reports: pip install -e '.[plot]' in the ltcache checkout "
                           "(or pip install matplotlib)") from None
    return matplotlib


def style_of(i: int) -> dict:
    """Style of series ``i`` (0 = stage-1 head): colour, marker, line style and hatch all vary."""
    if i == 0:
        return dict(STAGE1_STYLE)
    j = i - 1
    return {"color": COLOURS[j % len(COLOURS)], "marker": MARKERS[j % len(MARKERS)],
            "linestyle": LINESTYLES[(j // len(COLOURS)) % len(LINESTYLES)],
            "hatch": HATCHES[j % len(HATCHES)], "mfc": None}


def line_kw(i: int, markevery=None, n_series: int = 1) -> dict:
    """plot() keywords of series ``i``; thinner lines and smaller markers when many series share axes."""
    st = style_of(i)
    kw = {"color": st["color"], "marker": st["marker"], "linestyle": st["linestyle"]}
    if n_series > 10:
        kw.update(linewidth=1.1, markersize=4.0)
    if st["mfc"]:
        kw["markerfacecolor"] = st["mfc"]
    if markevery:
        kw["markevery"] = markevery
    return kw


def legend_layout(labels, width: float = WIDTH) -> tuple[int, int, float]:
    """(columns, rows, height in inches) of a legend below the axes that fits ``width``."""
    longest = max((len(s) for s in labels), default=1)
    col_w = 0.62 + 0.07 * longest             # handle + spacing + text at 9 pt
    ncol = max(1, min(len(labels), int((width - 0.3) // col_w)))
    rows = math.ceil(len(labels) / ncol)
    return ncol, rows, round(0.25 + 0.21 * rows, 1)


def new_figure(height: float, width: float = WIDTH):
    """A Figure on an Agg canvas (no pyplot, no global backend switch) with constrained layout."""
    mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, round(height, 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def outside_legend(fig, handles, labels, title=None):
    """One legend for the whole figure, under the axes, in as many columns as fit."""
    ncol, _, _ = legend_layout(labels, fig.get_figwidth())
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False, title=title,
                      handlelength=2.6, columnspacing=1.2)


def save(fig, out_dir: Path, stem: str, fmt: str) -> Path:
    """Write ``stem.fmt`` at a fixed size (figsize x DPI; no tight bbox), atomically, and free the figure."""
    from ltcache.outputs import atomic_save
    path = Path(out_dir) / f"{stem}.{fmt}"
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
    finally:
        fig.clear()
    return path


def pixel_size(fig_inches: tuple) -> tuple[int, int]:
    """Pixel size of a PNG saved from a figure of ``fig_inches``."""
    return int(round(fig_inches[0] * DPI)), int(round(fig_inches[1] * DPI))
