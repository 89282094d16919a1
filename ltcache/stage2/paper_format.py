"""Renderings of the paper table (:func:`ltcache.stage2.paper_table.compute`): terminal,
GitHub markdown, CSV (every number behind every cell) and LaTeX (booktabs), each with the
footer that says what the error bars and intervals are over."""
from __future__ import annotations

import csv
import io
from typing import Optional

from ltcache.errors import LtcacheError
from ltcache.stage2.paper_table import compute

TITLES = {"all": "All", "many": "Many", "medium": "Medium", "few": "Few"}


def _fmt_cell(cell: Optional[dict]) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")


def _fmt_diff(d: Optional[dict], dash: str = "-") -> str:
    if d is None:
        return dash
    if d["lo"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _grid(table: dict, mark: tuple[str, str]) -> tuple[list[str], list[str], list[list[str]]]:
    """(group row, header row, body rows) with best values wrapped in ``mark``."""
    ref = table["against"]
    groups, head = ["", ""], ["method", "avg rank"]
    for d in table["datasets"]:
        groups += [d["label"]] + [""] * (len(d["columns"]) - 1)
        head += [TITLES[c] for c in d["columns"]]
    for d in table["datasets"]:
        groups.append(f"{d['label']}")
        head.append(f"Δ vs {ref} [95 % CI]")
    body = []
    for r in table["rows"]:
        line = [r["method"] + (" (reference)" if r["method"] == ref else ""),
                "-" if r["rank"] is None else f"{r['rank']:.2f}"]
        for d in table["datasets"]:
            for c in d["columns"]:
                text = _fmt_cell(r["cells"].get((d["label"], c)))
                if r["method"] in table["best"].get((d["label"], c), ()):
                    text = mark[0] + text + mark[1]
                line.append(text)
        for d in table["datasets"]:
            line.append("ref." if r["method"] == ref else _fmt_diff(r["diff"].get(d["label"])))
        body.append(line)
    return groups, head, body


def footer(table: dict) -> list[str]:
    """What the numbers are: the error bars and intervals of each dataset, and the notes."""
    out = [f"Top-1 test accuracy (%), {'tuned on val' if table['kind'] == 'tune' else 'as run'}; "
           f"rows by average rank over datasets (on All); best of each column marked."]
    for d in table["datasets"]:
        b, s = len(d["backbones"]), len(d["seeds"])
        what = (f"{b} backbones ({', '.join(d['backbones'])}) x {s} stage-2 seeds" if b > 1 else
                f"1 backbone x {s} stage-2 seeds (stage-2 seeds only)")
        ci = "over backbones" if b > 1 else "over stage-2 seeds only"
        out.append(f"{d['label']}: mean ± std over {what}; Δ: paired difference from {table['against']} on All, "
                   f"95 % t-interval {ci}.")
    out += table["notes"]
    return out


def format_terminal(table: dict) -> str:
    """Fixed-width table for the terminal (best of each column marked with *)."""
    groups, head, body = _grid(table, ("", "*"))
    widths = [max(len(x) for x in col) for col in zip(groups, head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(groups), line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
                     + footer(table)) + "\n"


def format_markdown(table: dict) -> str:
    """GitHub markdown (best of each column in bold)."""
    groups, head, body = _grid(table, ("**", "**"))
    head = [f"{g} {h}".strip() if g else h for g, h in zip(_spread(groups), head)]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(md) + "\n\n" + "\n".join(footer(table)) + "\n"


def _spread(groups: list[str]) -> list[str]:
    """A group label repeated over every column it spans."""
    out, cur = [], ""
    for i, g in enumerate(groups):
        cur = g if g or i < 2 else cur
        out.append(cur)
    return out


def format_csv(table: dict) -> str:
    """One row per (dataset, method, column): the numbers behind every cell."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["dataset", "method", "column", "mean", "std", "n", "backbones", "std_backbone", "std_seed", "best",
                "rank", "avg_rank", "against", "diff_mean", "diff_lo", "diff_hi", "diff_over"])
    blank = lambda v: "" if v is None else v  # noqa: E731
    for d in table["datasets"]:
        for r in table["rows"]:
            diff = r["diff"].get(d["label"]) or {}
            for c in d["columns"]:
                cell = r["cells"].get((d["label"], c))
                if cell is None:
                    continue
                w.writerow([d["label"], r["method"], c, cell["mean"], blank(cell["std"]), cell["n"], cell["backbones"],
                            blank(cell["std_backbone"]), blank(cell["std_seed"]),
                            int(r["method"] in table["best"].get((d["label"], c), ())),
                            blank(r["ranks"].get(d["label"])), blank(r["rank"]), table["against"],
                            blank(diff.get("mean")) if c == "all" else "", blank(diff.get("lo")) if c == "all" else "",
                            blank(diff.get("hi")) if c == "all" else "", diff.get("over", "") if c == "all" else ""])
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$")):
        s = s.replace(a, b)
    return s


def format_latex(table: dict) -> str:
    """A LaTeX tabular (booktabs): dataset column groups, best of each column in bold."""
    ref = table["against"]
    spec = "l" + "r" + "".join("|" + "r" * len(d["columns"]) for d in table["datasets"]) + "|" + \
        "r" * len(table["datasets"])
    out = [r"% ltcache paper table: " + _tex(" ".join(footer(table)[:1])), r"\begin{tabular}{" + spec + "}",
           r"\toprule"]
    top = [" ", " "] + [rf"\multicolumn{{{len(d['columns'])}}}{{c}}{{{_tex(d['label'])}}}" for d in table["datasets"]]
    top.append(rf"\multicolumn{{{len(table['datasets'])}}}{{c}}{{$\Delta$ vs {_tex(ref)} (All, 95\% CI)}}")
    out.append(" & ".join(top) + r" \\")
    head = ["Method", "Avg.\\ rank"] + [TITLES[c] for d in table["datasets"] for c in d["columns"]] + \
        [_tex(d["label"]) for d in table["datasets"]]
    out += [" & ".join(head) + r" \\", r"\midrule"]
    for r in table["rows"]:
        cells = [_tex(r["method"]), "-" if r["rank"] is None else f"{r['rank']:.2f}"]
        for d in table["datasets"]:
            for c in d["columns"]:
                cell = r["cells"].get((d["label"], c))
                text = "-" if cell is None else (f"{cell['mean']:.2f}" + (
                    rf"$\pm${cell['std']:.2f}" if cell["std"] is not None else ""))
                if r["method"] in table["best"].get((d["label"], c), ()):
                    text = rf"\textbf{{{text}}}"
                cells.append(text)
        for d in table["datasets"]:
            cells.append("ref." if r["method"] == ref else _tex(_fmt_diff(r["diff"].get(d["label"]))))
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += ["% " + _tex(line) for line in footer(table)[1:]]
    return "\n".join(out) + "\n"


FORMATTERS = {"terminal": format_terminal, "markdown": format_markdown, "csv": format_csv, "latex": format_latex}


def render(doc: dict, fmt: str = "terminal", against: Optional[str] = None) -> str:
    """The paper table of a multi-cache results document in one format."""
    if fmt not in FORMATTERS:
        raise LtcacheError(f"unknown --format '{fmt}'; use one of: {', '.join(FORMATTERS)}")
    return FORMATTERS[fmt](compute(doc, against or doc.get("against") or "ce"))
