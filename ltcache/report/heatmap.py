"""Heat maps a reader takes in at a glance with many methods: methods x classes (one cache, or a
dataset's replicates pooled) and methods x datasets (a multi-cache run), values in the cells."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ltcache.report.figstyle import WIDTH, new_figure, save

MAX_COLUMNS = 50          # more classes than this: neighbouring classes (by training count) share a column
MAX_LABELLED = 30         # values are written in the cells up to this many columns


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def draw(values: Sequence[Sequence[Optional[float]]], rows: Sequence[str], cols: Sequence[str], title: str,
         cbar: str, out_dir, stem: str, fmt: str, diverging: bool = False, col_groups: Sequence[tuple] = (),
         xlabel: str = "", cell_fmt: str = "{:.1f}", per_column: bool = False) -> tuple[object, tuple]:
    """One heat map (rows top to bottom as given); returns (path, size in inches).

    ``diverging``: a red-blue scale centred on 0 (gains); otherwise a sequential scale.
    ``col_groups``: (label, first column, last column) spans drawn as labelled brackets on top.
    ``per_column``: colours scaled within each column (its worst to its best; e.g. datasets whose
    accuracies lie far apart), the values written in the cells still the raw ones."""
    import numpy as np
    n, k = len(rows), len(cols)
    arr = np.array([[_nan(v) for v in r] for r in values], dtype=float).reshape(n, k)
    longest = max(map(len, cols), default=0)
    rot = 0 if k * max(longest, 3) <= 110 else 60              # labels side by side when they fit the width
    height = round(max(3.0, 1.5 + 0.27 * n) + (0.35 if col_groups else 0) + (0.06 * longest if rot else 0), 1)
    fig = new_figure(height, WIDTH)
    ax = fig.add_subplot(1, 1, 1)
    shown, cmap, kw = _colours(arr, diverging, per_column)
    im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, interpolation="nearest", **kw)
    ax.set_yticks(range(n))
    ax.set_yticklabels([r if len(r) <= 48 else r[:47] + "…" for r in rows], fontsize=8 if n > 20 else 9)
    ax.set_xticks(range(k))
    ax.set_xticklabels(cols, rotation=rot, ha="right" if rot else "center", fontsize=8 if k > 20 else 9)
    ax.grid(False)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if k <= MAX_LABELLED:
        _write_cells(ax, im, arr, shown, diverging, cell_fmt)
    _brackets(ax, col_groups)
    if xlabel:
        ax.set_xlabel(xlabel)
    cb = fig.colorbar(im, ax=ax, label=cbar, fraction=0.03, pad=0.01)
    if per_column:
        cb.set_ticks([0, 1])
        cb.set_ticklabels(["worst", "best"])
    ax.set_title(title, pad=18 if col_groups else 6)
    return save(fig, out_dir, stem, fmt), (WIDTH, height)


def _colours(arr, diverging: bool, per_column: bool):
    """(values as coloured, colour map, imshow's scale keywords): red-blue centred on 0, viridis
    over the finite range, or each column from its worst (0) to its best (1)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    finite = arr[np.isfinite(arr)]
    if diverging:
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        lim = lim or 1.0
        norm, cmap = TwoSlopeNorm(0.0, -lim, lim), "RdBu"
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm, cmap = None, "viridis"
    kw = {"norm": norm} if norm is not None else {"vmin": lo, "vmax": hi if hi > lo else lo + 1}
    if not per_column:
        return arr, cmap, kw
    ok = np.isfinite(arr)
    lo_c, hi_c = np.where(ok, arr, np.inf).min(0), np.where(ok, arr, -np.inf).max(0)
    span = np.where(hi_c > lo_c, hi_c - lo_c, 1.0)
    return (arr - lo_c) / span, cmap, {"vmin": 0.0, "vmax": 1.0}


def _write_cells(ax, im, arr, shown, diverging: bool, cell_fmt: str) -> None:
    """Each cell's raw value written in it ("-" when missing), white on a dark colour."""
    n, k = arr.shape
    size = 7 if k > 16 or n > 24 else 8
    cm = im.cmap
    for i in range(n):
        for j in range(k):
            v = arr[i, j]
            if not math.isfinite(v):
                ax.text(j, i, "-", ha="center", va="center", fontsize=size, color="0.4")
                continue
            r, g, b, _ = cm(im.norm(shown[i, j]))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, (("+" if diverging and v > 0 else "") + cell_fmt.format(v)), ha="center",
                    va="center", fontsize=size, color="white" if dark else "black")


def _brackets(ax, col_groups: Sequence[tuple]) -> None:
    """The labelled column groups on top, separated by white lines."""
    for gi, (label, a, b) in enumerate(col_groups):
        if gi:
            ax.axvline(a - 0.5, color="white", linewidth=3)
        ax.annotate(label, xy=((a + b) / 2, -0.6), xycoords="data", ha="center", va="bottom", fontsize=9,
                    annotation_clip=False, fontweight="bold")


def class_columns(order: Sequence[int], names: Sequence[str], counts: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Columns of a methods x classes map: one per class (sorted by training count) or, with more
    than :data:`MAX_COLUMNS` classes, runs of neighbouring classes ("ranks a-b")."""
    if len(order) <= MAX_COLUMNS:
        return [(f"{names[j][:10]} ({counts[j]})", [j]) for j in order]
    out, n = [], len(order)
    for b in range(MAX_COLUMNS):
        lo, hi = b * n // MAX_COLUMNS, (b + 1) * n // MAX_COLUMNS
        out.append((f"{lo + 1}-{hi}", list(order[lo:hi])))
    return out


def per_class_heatmap(rep, out_dir, fmt):
    """Methods x classes: test accuracy (%) of every class (classes by training count, head left),
    one row per configuration (best All on top), mean over seeds."""
    series = rep.all_series()
    order = rep.order()
    cols = class_columns(order, rep.class_names, rep.class_counts)
    values = []
    for s in series:
        pc = s.per_class("per_class_acc")
        row = []
        for _, members in cols:
            xs = [pc[j] for j in members if pc and not math.isnan(pc[j])]
            row.append(sum(xs) / len(xs) if xs else None)
        values.append(row)
    binned = len(cols) < len(order)
    path, size = draw(values, [s.name for s in series], [c for c, _ in cols],
                      "Per-class test accuracy (%), classes by training count (head left)", "test accuracy (%)",
                      out_dir, "per_class_heatmap", fmt,
                      xlabel=("class rank by training count (classes binned)" if binned
                              else "class (training images)"))
    return {"stem": "per_class_heatmap", "path": path, "size": size, "title": "Per-class accuracy, methods x classes",
            "caption": "Test accuracy (%) of each class (columns, ordered by number of training images: head on "
                       "the left, tail on the right; the count in brackets) for each configuration (rows, best All "
                       "on top; the stage-1 head first), mean over seeds"
                       + ("; with many classes, each column is the mean of a run of neighbouring classes" if binned
                          else "") + ". A method that helps the tail is bright on the right."}
