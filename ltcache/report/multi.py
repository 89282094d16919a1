"""The report of a multi-cache ``bench`` / ``tune`` (``ltcache-multi/1``): the paper table, a
methods x datasets heat map of accuracy and one of the gain over the reference method (rows
by average rank), and per dataset a methods x classes heat map with its replicates pooled."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

from ltcache.report import heatmap


def _label(r: dict) -> str:
    return f"{r['method']} ({'-' if r['rank'] is None else format(r['rank'], '.1f')})"


def datasets_heatmap(table: dict, out_dir, fmt: str) -> dict:
    """Methods x datasets: mean test All (%), rows by average rank (best on top)."""
    rows = table["rows"]
    cols = [d["label"] for d in table["datasets"]]
    values = [[(r["cells"].get((c, "all")) or {}).get("mean") for c in cols] for r in rows]
    path, size = heatmap.draw(values, [_label(r) for r in rows], cols,
                              "Test accuracy (All, %) per dataset; rows by average rank (in brackets)",
                              "colour: within the dataset (column)", out_dir, "datasets_heatmap", fmt,
                              cell_fmt="{:.2f}", per_column=True)
    return {"stem": "datasets_heatmap", "path": path, "size": size, "title": "Methods x datasets, accuracy",
            "caption": "Mean top-1 test accuracy (All, %) of each method (rows, sorted by average rank over the "
                       "datasets, rank in brackets) on each dataset (columns), over its backbones x stage-2 seeds. "
                       "Colours are scaled within each column, from its worst to its best method, so that "
                       "datasets of very different accuracy read alike; the numbers are the accuracies."}


def gain_heatmap(table: dict, out_dir, fmt: str) -> dict:
    """Methods x datasets: mean paired difference from the reference on All (points)."""
    rows = table["rows"]
    ref = table["against"]
    cols = [d["label"] for d in table["datasets"]]
    values = [[(0.0 if r["method"] == ref else (r["diff"].get(c) or {}).get("mean")) for c in cols] for r in rows]
    path, size = heatmap.draw(values, [_label(r) for r in rows], cols,
                              f"Gain over {ref} (All, points); rows by average rank", f"gain over {ref} (points)",
                              out_dir, "gain_heatmap", fmt, diverging=True, cell_fmt="{:.2f}")
    return {"stem": "gain_heatmap", "path": path, "size": size, "title": f"Methods x datasets, gain over {ref}",
            "caption": f"Mean paired difference of each method from {ref} on All (percentage points, same backbone "
                       "and stage-2 seed), blue above and red below the reference. The table's 95 % intervals say "
                       "which of these are within the noise."}


def dataset_classes_heatmap(doc: dict, table: dict, i: int, out_dir, fmt: str) -> dict:
    """Methods x classes of dataset ``i``: per-class accuracy pooled over its backbones and seeds."""
    from ltcache.stage2.paper_table import select_runs
    d, ds = table["datasets"][i], doc["datasets"][i]
    sel, _ = select_runs(doc)
    first = doc["caches"][ds["caches"][0]]
    cache = first["results"]["cache"]
    counts, names = cache["class_counts"], cache["class_names"]
    order = sorted(range(len(counts)), key=lambda j: (-counts[j], j))
    cols = heatmap.class_columns(order, names, counts)
    rows = sorted(table["rows"], key=lambda r: r["ranks"].get(d["label"], 1e9))
    values = []
    for r in rows:
        pcs = [run["metrics"]["per_class_acc"] for c in ds["caches"] for run in sel.get((c, r["method"]), [])]
        row = []
        for _, members in cols:
            xs = [pc[j] for pc in pcs for j in members if pc[j] is not None]
            row.append(sum(xs) / len(xs) if xs else None)
        values.append(row)
    stem = f"classes_heatmap_{i + 1}"
    path, size = heatmap.draw(values, [r["method"] for r in rows], [c for c, _ in cols],
                              f"{d['label']}: per-class test accuracy (%), classes by training count",
                              "test accuracy (%)", out_dir, stem, fmt, xlabel="class (training images)")
    return {"stem": stem, "path": path, "size": size, "title": f"{d['label']}: methods x classes",
            "caption": f"Test accuracy (%) of each class of {d['label']} (columns: head left, tail right) for each "
                       f"method (rows, by rank on this dataset), mean over {len(d['backbones'])} backbone(s) x "
                       f"{len(d['seeds'])} stage-2 seed(s)."}


def render_multi(doc: dict, table: dict, out_dir, fmt: str, quiet: bool = True) -> list[dict]:
    """Every figure of a multi-cache report into ``out_dir/figures``."""
    from ltcache.report import figures_dir
    from ltcache.report.figstyle import RC, mpl
    matplotlib = mpl()
    fig_dir = figures_dir(out_dir)
    out = []
    with matplotlib.rc_context(RC):
        out.append(datasets_heatmap(table, fig_dir, fmt))
        out.append(gain_heatmap(table, fig_dir, fmt))
        for i in range(len(table["datasets"])):
            out.append(dataset_classes_heatmap(doc, table, i, fig_dir, fmt))
    if not quiet:
        for f in out:
            print(f"  {f['path']}")
    return out


def table_html(table: dict) -> str:
    """The paper table as an HTML table (best of each column in bold)."""
    from ltcache.stage2.paper_format import _grid
    _, head, body = _grid(table, ("\x01", "\x02"))
    esc = lambda s: html.escape(s).replace("\x01", "<b>").replace("\x02", "</b>")  # noqa: E731
    spans = ['<th colspan="2"></th>'] + [f'<th colspan="{len(d["columns"])}">{esc(d["label"])}</th>'
                                         for d in table["datasets"]]
    spans.append(f'<th colspan="{len(table["datasets"])}">{esc("Δ vs " + table["against"] + " (All)")}</th>')
    head = head[:len(head) - len(table["datasets"])] + [d["label"] for d in table["datasets"]]
    rows = [f"<tr>{''.join(spans)}</tr>",
            "<tr>" + "".join(f'<th class="name">{esc(h)}</th>' if k == 0 else f"<th>{esc(h)}</th>"
                             for k, h in enumerate(head)) + "</tr>"]
    for r in body:
        rows.append("<tr>" + "".join(f'<td class="name">{esc(c)}</td>' if k == 0 else f"<td>{esc(c)}</td>"
                                     for k, c in enumerate(r)) + "</tr>")
    return "<table><thead>" + "".join(rows[:2]) + "</thead><tbody>\n" + "\n".join(rows[2:]) + "\n</tbody></table>"


def write_multi_html(doc: dict, table: dict, figures: list, out_dir, source: Optional[Path] = None) -> Path:
    """report.html of a multi-cache run, atomically (figure paths relative)."""
    from ltcache.report.html import CSS, finish_page
    from ltcache.stage2.paper_format import footer
    out_dir = Path(out_dir)
    caches = "".join(f"<li><code>{html.escape(c['id']['path'])}</code>: {html.escape(c['dataset'])}, "
                     f"{html.escape(c['backbone'])}</li>" for c in doc["caches"])
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>ltcache report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>ltcache report: methods x datasets</h1>",
             f'<p class="meta">Results: <code>{html.escape(str(source or ""))}</code>; {len(doc["caches"])} caches, '
             f'{len(doc["runs"])} runs ({html.escape(doc.get("kind", "bench"))}) in {doc.get("wall_time_s", 0):.1f} s; '
             f'ltcache {html.escape(str(doc.get("ltcache_version", "?")))}, created '
             f'{html.escape(str(doc.get("created", "?")))}.</p>',
             "<h2>Paper table</h2>", table_html(table),
             "<p>" + "<br>".join(html.escape(x) for x in footer(table)) + "</p>",
             "<h2>Caches</h2>", f"<ul>{caches}</ul>", "<h2>Figures</h2>"]
    return finish_page(parts, figures, out_dir)
