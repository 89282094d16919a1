"""Reliability diagrams (MiSLAS style, 15 bins): one small panel per configuration."""
from __future__ import annotations

import math
import re
import textwrap

from ltcache.report.load import N_BINS
from ltcache.report.figstyle import WIDTH, new_figure, save


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the small multiples: at most 4 columns up to 12 panels, then 5."""
    cols = min(n, 4 if n <= 12 else 5)
    return math.ceil(n / cols), cols


def wrap_name(name: str, width: int, max_lines: int = 2) -> list:
    """Split a configuration name after '[' and ',' into at most ``max_lines`` lines of ~``width``."""
    tokens = re.findall(r"[^\[,]+[\[,]?|[\[,]", name) or [name]
    lines = [""]
    for t in tokens:
        if lines[-1] and len(lines[-1]) + len(t) > width:
            lines.append("")
        lines[-1] += t
    lines = [x for part in lines for x in (textwrap.wrap(part, width) or [part])]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [("".join(lines[max_lines - 1:]))[: width - 1] + "…"]
    return lines


def _title(name: str, ece, width: int) -> str:
    lines = wrap_name(name, width)
    return "\n".join(lines + ["ECE " + ("-" if ece is None else f"{ece:.2f} %")])


def reliability(rep, out_dir, fmt):
    """Figure 3: per configuration, accuracy per confidence bin, gap to the diagonal, ECE in the title."""
    series = rep.all_series()
    rows, cols = grid_shape(len(series))
    panel = WIDTH / cols
    h_in = round(rows * (panel + 0.45) + 0.9, 1)
    fig = new_figure(h_in)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    edges = [b / N_BINS for b in range(N_BINS + 1)]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    w = 1.0 / N_BINS
    handles = None
    for idx, s in enumerate(series):
        ax = axes[idx // cols][idx % cols]
        conf, acc, cnt = s.reliability()
        xs = [c for c, n in zip(centres, cnt) if n]
        a = [v for v, n in zip(acc, cnt) if n]
        cf = [v for v, n in zip(conf, cnt) if n]
        h_acc = ax.bar(xs, a, width=w, color="#0072B2", edgecolor="black", linewidth=0.5, zorder=2)
        h_gap = ax.bar(xs, [c - v for c, v in zip(cf, a)], bottom=a, width=w, facecolor="none",
                       edgecolor="#D55E00", hatch="////", linewidth=0.9, zorder=3)
        (h_diag,) = ax.plot([0, 1], [0, 1], linestyle="--", color="0.25", linewidth=1.0, zorder=4)
        handles = (h_acc, h_gap, h_diag)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(_title(s.name, s.ece, int(panel * 13)), fontsize=9)
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        if idx % cols == 0:
            ax.set_ylabel("accuracy")
        if idx // cols == rows - 1 or idx + cols >= len(series):
            ax.set_xlabel("confidence")
            ax.tick_params(labelbottom=True)
    for idx in range(len(series), rows * cols):
        axes[idx // cols][idx % cols].set_visible(False)
    fig.suptitle(f"Reliability diagrams ({N_BINS} bins of max-softmax confidence, seeds pooled)", fontsize=11)
    fig.legend(handles, ["accuracy in bin", "gap to mean confidence (hatched)", "perfect calibration"],
               loc="outside lower center", ncol=3, frameon=False)
    path = save(fig, out_dir, "reliability", fmt)
    return {"stem": "reliability", "path": path, "size": (WIDTH, h_in),
            "title": "Reliability diagrams",
            "caption": f"For each configuration, test samples are binned by confidence (max softmax, "
                       f"{N_BINS} equal bins; seeds pooled). Blue bars: accuracy in the bin; hatched orange: "
                       f"the gap up (over-confidence) or down (under-confidence) to the bin's mean confidence; "
                       f"dashed: perfect calibration. The title gives the expected calibration error "
                       f"(ECE, %, mean over seeds): lower is better calibrated. Empty bins have no bar."}
