"""report.html: one self-contained page (inline CSS, images by relative path) with the table and figures."""
from __future__ import annotations

import html
import math
import os
from pathlib import Path

from ltcache.groups import GROUPS
from ltcache.metrics import fmt_pct

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1060px;
margin:24px auto;padding:0 16px;color:#111;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ccc}
.meta{color:#444;font-size:.92em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#eee}td.name,th.name{text-align:left}tr.ref td{font-style:italic}tr.stage1 td{background:#f4f4f4}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.92em;color:#222;margin-top:.4em}
ul.find li{margin:.2em 0}
"""


def _pm(v, std=None, show_std=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt_pct(v, std if show_std else None)


def _num(v, fmt="{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _row(s, rank, cls="") -> str:
    multi = len(s.runs) > 1
    cells = [str(rank), f'<td class="name">{html.escape(s.name)}</td>',
             html.escape(", ".join(str(x) for x in s.seeds) or "-"),
             _pm(s.all_mean, s.all_std, multi)]
    for g in GROUPS:
        v = s.groups.get(g)
        cells.append("-" if v is None else _pm(v[0], v[1], multi))
    cells += [_num(s.ece, "{:.2f}"), _num(s.nll)]
    tds = "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
    return f'<tr class="{cls}">{tds}</tr>'


def results_table(rep) -> str:
    head = ["#", "configuration", "seeds", "All (%)", "Many (%)", "Medium (%)", "Few (%)", "ECE (%)", "NLL"]
    ths = "".join(f'<th class="name">{h}</th>' if h == "configuration" else f"<th>{h}</th>" for h in head)
    rows = [_row(rep.stage1, "-", "stage1")]
    rows += [_row(s, i + 1, "ref" if s.method == "ce" else "") for i, s in enumerate(rep.series)]
    return f"<table><thead><tr>{ths}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def _group_mean(s, key, g):
    vals = [m[key][g] for m in s.runs if m[key].get(g) is not None]
    return sum(vals) / len(vals) if vals else None


def findings(rep) -> list[str]:
    """Data-driven sentences: best accuracy, best calibrated, flattest LM, lowest tail RSD."""
    out = []
    ss = [s for s in rep.series if s.all_mean is not None]
    if not ss:
        return out
    best = ss[0]
    out.append(f"Best All accuracy: <b>{html.escape(best.name)}</b> ({fmt_pct(best.all_mean)} %; "
               f"stage-1 head {fmt_pct(rep.stage1.all_mean)} %).")
    cal = [s for s in rep.all_series() if s.ece is not None]
    if cal:
        c = min(cal, key=lambda s: s.ece)
        w = max(cal, key=lambda s: s.ece)
        out.append(f"Best calibrated: <b>{html.escape(c.name)}</b> (ECE {c.ece:.2f} %); "
                   f"least: {html.escape(w.name)} (ECE {w.ece:.2f} %).")
    tail = "few" if any(g == "few" for g in rep.groups) else "medium"
    flat = []
    for s in rep.all_series():
        hm, tm = _group_mean(s, "lm_groups", "many"), _group_mean(s, "lm_groups", tail)
        if hm is not None and tm:
            flat.append((hm / tm, s))
    if flat:
        r, s = min(flat, key=lambda t: abs(math.log(abs(t[0]) or 1e-9)))
        r1 = next((x for x, t in flat if t is rep.stage1), None)
        out.append(f"Most balanced Logits Magnitude (Many / {tail.capitalize()} LM ratio closest to 1): "
                   f"<b>{html.escape(s.name)}</b> ({r:.2f}" + (f"; stage-1 head {r1:.2f}" if r1 else "") + ").")
    rsd = [(v, s) for s in rep.all_series() if (v := _group_mean(s, "rsd_groups", tail)) is not None]
    if rsd:
        v, s = min(rsd, key=lambda t: t[0])
        out.append(f"Lowest {tail.capitalize()} RSD: <b>{html.escape(s.name)}</b> ({v:.3f}).")
    return out


def write_html(rep, figures: list, out_dir: Path) -> Path:
    """Write report.html next to the figures, atomically (paths relative, so the folder can be moved or zipped)."""
    from ltcache.imbalance import ir_text
    out_dir = Path(out_dir)
    doc = rep.doc
    cache = doc.get("cache", {})
    ds = cache.get("dataset")
    ds_name = ds.get("name") or ds.get("source") if isinstance(ds, dict) else ds
    n_runs = sum(len(s.runs) for s in rep.series)
    sizes = {g: sum(1 for x in rep.groups if x == g) for g in GROUPS}
    meta = (f"Results: <code>{html.escape(str(rep.path))}</code><br>"
            f"Dataset: {html.escape(str(ds_name or 'unknown'))}, {rep.num_classes} classes "
            f"(Many {sizes['many']}, Medium {sizes['medium']}, Few {sizes['few']}), "
            f"{sum(rep.class_counts)} training images, "
            f"{ir_text(ds.get('imb_ratio') if isinstance(ds, dict) else None, rep.class_counts)}; "
            f"{len(rep.series)} configurations, {n_runs} runs on {html.escape(str(doc.get('device', '?')))} "
            f"in {doc.get('wall_time_s', 0.0):.1f} s; ltcache {html.escape(str(doc.get('ltcache_version', '?')))}, "
            f"created {html.escape(str(doc.get('created', '?')))}.")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>ltcache report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>ltcache report</h1>", f'<p class="meta">{meta}</p>', "<h2>Results</h2>",
             "<p>Top-1 test accuracy, mean ± std over seeds, sorted by All; Many / Medium / Few are the mean "
             "per-class accuracy of classes with &gt;100, 20-100 and &lt;20 training images ('-': no class in "
             "the group); ECE in % with 15 bins; NLL in nats. The stage-1 head is the classifier trained with "
             "the backbone; <i>ce</i> rows (italic) are the plain re-trained reference.</p>",
             results_table(rep)]
    fs = findings(rep)
    if fs:
        parts += ["<h2>At a glance</h2>", '<ul class="find">'] + [f"<li>{f}</li>" for f in fs] + ["</ul>"]
    parts.append("<h2>Figures</h2>")
    return finish_page(parts, figures, out_dir)


def finish_page(parts: list, figures: list, out_dir: Path) -> Path:
    """``parts`` (the page so far) + one numbered, captioned ``<figure>`` per figure, written to
    ``out_dir/report.html`` (temporary name, then renamed); shared by the single- and multi-cache reports."""
    from ltcache.outputs import atomic_write
    parts = list(parts)
    for i, f in enumerate(figures, 1):
        rel = os.path.relpath(f["path"], out_dir).replace(os.sep, "/")
        parts.append(f'<figure id="{f["stem"]}"><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" '
                     f'alt="{html.escape(f["title"])}"></a><figcaption><b>Figure {i}. '
                     f'{html.escape(f["title"])}.</b> {html.escape(f["caption"])}</figcaption></figure>')
    parts.append("</body></html>")
    path = Path(out_dir) / "report.html"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts) + "\n")
    return path
