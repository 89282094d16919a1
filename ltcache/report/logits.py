"""Logit figures: the LOS paper's Logits Magnitude / RSD per class group and the MARR logit / margin plot."""
from __future__ import annotations

import math

from ltcache.metrics import fmt_pct
from ltcache.report.figstyle import WIDTH, legend_layout, line_kw, new_figure, outside_legend, save


def group_size(k: int) -> int:
    """Classes per group: 10 (the LOS figure) from 100 classes up, else max(1, K // 10)."""
    return 10 if k >= 100 else max(1, k // 10)


def _grouped(values, order, size):
    out = []
    for start in range(0, len(order), size):
        vals = [values[j] for j in order[start:start + size]]
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def _markevery(n: int):
    return None if n <= 25 else max(1, n // 20)


def lm_rsd(rep, out_dir, fmt):
    """Figure 2: Logits Magnitude and RSD averaged over groups of classes sorted by count."""
    order = rep.order()
    k = len(order)
    size = group_size(k)
    n_groups = math.ceil(k / size)
    # legend (and drawing) order: by All accuracy, the stage-1 head placed where its accuracy puts it
    indexed = list(enumerate(rep.all_series()))
    indexed.sort(key=lambda t: (t[1].all_mean is None, -(t[1].all_mean or 0.0)))
    labels = [f"{s.name} (All {fmt_pct(s.all_mean)} %)" for _, s in indexed]
    _, _, leg_h = legend_layout(labels)
    h_in = 4.2 + leg_h
    fig = new_figure(h_in)
    ax_lm, ax_rsd = fig.subplots(1, 2)
    x = list(range(1, n_groups + 1))
    handles = []
    for i, s in indexed:
        kw = line_kw(i, _markevery(n_groups), len(labels))
        (h,) = ax_lm.plot(x, _grouped(s.per_class("lm"), order, size), **kw)
        ax_rsd.plot(x, _grouped(s.per_class("rsd"), order, size), **kw)
        handles.append(h)
    unit = "class" if size == 1 else f"group of {size} classes"
    for ax in (ax_lm, ax_rsd):
        ax.set_xlabel(f"{unit} by training count (1 = head)")
        if n_groups <= 20:
            ax.set_xticks(x)
    ax_lm.set_ylabel("Logits Magnitude (regularised, mean 1 over classes)")
    ax_rsd.set_ylabel("RSD = std of true-class logit / LM (unitless)")
    ax_lm.set_title("Logits Magnitude (LM)")
    ax_rsd.set_title("Regularised Standard Deviation (RSD)")
    fig.suptitle(f"LM and RSD per {unit}, mean over seeds; legend ordered by All accuracy", fontsize=11)
    outside_legend(fig, handles, labels)
    path = save(fig, out_dir, "lm_rsd", fmt)
    return {"stem": "lm_rsd", "path": path, "size": (WIDTH, round(h_in, 1)),
            "title": "Logits Magnitude and RSD (LOS figure)",
            "caption": f"Left: Logits Magnitude (the true-class logit minus its mean on other classes' "
                       f"samples, divided by its mean over classes), right: its Regularised Standard "
                       f"Deviation, each averaged over {'each class' if size == 1 else f'groups of {size} classes'} "
                       f"sorted by training count (head on the left). The LOS paper reads a flatter LM "
                       f"profile and a lower RSD as a more balanced classifier. Legend ordered by All "
                       f"accuracy (best first)."}


def logit_margin(rep, out_dir, fmt):
    """Figure 4: per-class mean true-class logit, margin logit / ||w_j|| and ||w_j|| (MARR)."""
    order = rep.order()
    k = len(order)
    series = rep.all_series()
    labels = [s.name for s in series]
    _, _, leg_h = legend_layout(labels)
    h_in = 7.8 + leg_h
    fig = new_figure(h_in)
    axes = fig.subplots(3, 1, sharex=True)
    x = list(range(1, k + 1))
    handles = []
    for i, s in enumerate(series):
        kw = line_kw(i, _markevery(k), len(labels))
        logit = s.per_class("mean_logit")
        norm = s.per_class("weight_norm")
        y_logit = [logit[j] for j in order]
        (h,) = axes[0].plot(x, y_logit, **kw)
        handles.append(h)
        if norm:
            y_norm = [norm[j] for j in order]
            axes[1].plot(x, [a / b if b and not math.isnan(b) else float("nan")
                             for a, b in zip(y_logit, y_norm)], **kw)
            axes[2].plot(x, y_norm, **kw)
    axes[0].set_ylabel("mean true-class\nlogit z_y (logit units)")
    axes[1].set_ylabel("margin z_y / ||w_y||\n(feature-norm units)")
    axes[2].set_ylabel("weight norm ||w_y||")
    axes[2].set_xlabel("class rank by training count (1 = most images)")
    fig.suptitle("Per-class mean logit, margin and weight norm of every head (test samples, mean over seeds)",
                 fontsize=11)
    if k <= 20:
        axes[2].set_xticks(x)
    outside_legend(fig, handles, labels)
    path = save(fig, out_dir, "logit_margin", fmt)
    return {"stem": "logit_margin", "path": path, "size": (WIDTH, round(h_in, 1)),
            "title": "Per-class logits and margins (MARR figure)",
            "caption": "Top: mean logit of the true class over each class's test samples; middle: the "
                       "margin z_y / ||w_y|| (the logit divided by the class's weight norm, as in MARR); "
                       "bottom: the weight norm ||w_y||. Classes sorted by training count (head on the left). "
                       "A head biased to the head classes has larger logits and weight norms on the left; "
                       "rectified heads flatten these profiles."}
