"""Accuracy figures: per-class accuracy along the tail, and Many / Medium / Few bars over seeds."""
from __future__ import annotations

from ltcache.groups import GROUPS
from ltcache.report.figstyle import (WIDTH, legend_layout, line_kw, new_figure, outside_legend, save,
                                  style_of)


def _nan(v):
    return float("nan") if v is None else float(v)


def _markevery(k: int):
    return None if k <= 25 else max(1, k // 20)


def per_class_accuracy(rep, out_dir, fmt):
    """Figure 1: test accuracy (%) of every class, classes sorted by training count."""
    order = rep.order()
    k = len(order)
    labels = [s.name for s in rep.all_series()]
    _, _, leg_h = legend_layout(labels)
    fig = new_figure(4.6 + leg_h)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(1, k + 1))
    handles = []
    for i, s in enumerate(rep.all_series()):
        pc = s.per_class("per_class_acc")
        y = [_nan(pc[j]) for j in order]
        (h,) = ax.plot(x, y, label=s.name, zorder=3, **line_kw(i, _markevery(k), len(labels)))
        handles.append(h)
    ax.set_xlabel("class rank by training count (1 = most images)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_xlim(0.5, k + 0.5)
    ax2 = ax.twinx()
    counts = [rep.class_counts[j] for j in order]
    lo = max(0.5, min(counts) / 2)
    prof = [max(c, lo) for c in counts]
    ax2.fill_between(x, prof, lo, step="mid", color="0.6", alpha=0.25, zorder=1, linewidth=0)
    (hc,) = ax2.step(x, prof, where="mid", color="0.35", linewidth=1.2,
                     label="training images per class (right axis)")
    ax2.set_yscale("log")
    ax2.set_ylim(lo, max(prof) * 1.6)
    ax2.set_ylabel("training images per class (log scale)")
    ax2.grid(False)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    if k <= 20:
        ax.set_xticks(x)
        if any(rep.class_names[j] != str(j) for j in order):      # real names: show them under the rank
            ax.set_xticklabels([f"{r}\n{rep.class_names[j][:12]}" for r, j in zip(x, order)], fontsize=8)
    ax.set_title("Per-class test accuracy, classes sorted by training count (mean over seeds)")
    outside_legend(fig, handles + [hc], labels + [hc.get_label()])
    path = save(fig, out_dir, "per_class_accuracy", fmt)
    return {"stem": "per_class_accuracy", "path": path, "size": (WIDTH, round(4.6 + leg_h, 1)),
            "title": "Per-class accuracy along the tail",
            "caption": "Test accuracy (%) of each class, classes ordered by their number of training images "
                       "(head on the left, tail on the right); one line per configuration, mean over seeds. "
                       "The grey step area is the training-count profile on the right (log) axis. A method "
                       "that helps the tail lifts the right end of its line."}


def group_bars(rep, out_dir, fmt):
    """Figure 5: Many / Medium / Few accuracy, grouped bars with std over seeds; empty group -> '-'."""
    series = rep.all_series()
    labels = [s.name for s in series]
    _, _, leg_h = legend_layout(labels)
    n = len(series)
    h_in = 4.4 + leg_h
    fig = new_figure(h_in)
    ax = fig.add_subplot(1, 1, 1)
    sizes = {g: sum(1 for x in rep.groups if x == g) for g in GROUPS}
    width = 0.84 / n
    handles = []
    for i, s in enumerate(series):
        st = style_of(i)
        xs, ys, es = [], [], []
        for gi, g in enumerate(GROUPS):
            v = s.groups.get(g)
            if v is None:
                continue
            xs.append(gi - 0.42 + width * (i + 0.5))
            ys.append(v[0])
            es.append(v[1] if len(s.runs) > 1 else 0.0)
        h = ax.bar(xs, ys, width=width * 0.92, yerr=es if any(es) else None, color=st["color"],
                   hatch=st["hatch"], edgecolor="white" if i else "0.3", linewidth=0.6,
                   error_kw={"elinewidth": 1.0, "capsize": 2 if n <= 12 else 0, "ecolor": "0.15"},
                   label=s.name, zorder=3)
        if i == 0:                      # the stage-1 head: light grey with a dark edge
            for p in h.patches:
                p.set_facecolor("0.82")
        handles.append(h)
    for gi, g in enumerate(GROUPS):
        if sizes[g] == 0 or all(s.groups.get(g) is None for s in series):
            ax.text(gi, 50, "-", ha="center", va="center", fontsize=22, color="0.3")
            ax.text(gi, 40, "no class in this group", ha="center", va="center", fontsize=9, color="0.3")
    ax.set_xticks(range(len(GROUPS)))
    ax.set_xticklabels([f"{g.capitalize()}\n({sizes[g]} classes, "
                        f"{'>100' if g == 'many' else '20-100' if g == 'medium' else '<20'} images)"
                        for g in GROUPS])
    ax.set_xlim(-0.5, len(GROUPS) - 0.5)
    ax.set_ylim(0, 105)
    ax.set_ylabel("mean per-class test accuracy (%)")
    ax.grid(axis="x", visible=False)
    seeds = max((len(s.runs) for s in rep.series), default=1)
    ax.set_title("Many / Medium / Few accuracy" + (f" (error bars: std over {seeds} seeds)" if seeds > 1 else ""))
    outside_legend(fig, handles, labels)
    path = save(fig, out_dir, "group_accuracy", fmt)
    return {"stem": "group_accuracy", "path": path, "size": (WIDTH, round(h_in, 1)),
            "title": "Many / Medium / Few accuracy",
            "caption": "Mean per-class test accuracy (%) of the Many (>100 training images), Medium (20-100) "
                       "and Few (<20) groups; one bar per configuration, error bars are the standard "
                       "deviation over seeds. A group without classes shows '-' and no bar."}


__all__ = ["per_class_accuracy", "group_bars"]
