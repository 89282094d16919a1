"""ltcache report: every figure renders from a real (tiny) results file; errors are one line, exit 2."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ltcache.cli import cli
from ltcache.errors import LtcacheError
from ltcache.report import FIGURES, make_report
from ltcache.report.figstyle import pixel_size
from ltcache.report.load import load_report

torch.set_num_threads(1)
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

COUNTS = (150, 60, 30, 12, 6)          # Many, Medium x2, Few x2


def _split(counts, views, g, centers):
    ys = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])
    f = centers[ys][:, None, :] + torch.randn(len(ys), len(views), centers.shape[1], generator=g)
    return f, ys, torch.arange(len(ys)), views


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A real results.json: a random-feature cache on disk, then `bench` (2 methods x 2 seeds, 1 epoch)."""
    from ltcache.cache import write_cache
    from ltcache.stage2.api import bench
    root = tmp_path_factory.mktemp("rep")
    g = torch.Generator().manual_seed(0)
    k, d = len(COUNTS), 8
    centers = torch.randn(k, d, generator=g) * 1.5
    splits = {"train": _split(COUNTS, ["clean", "aug1"], g, centers),
              "val": _split([4] * k, ["center"], g, centers),
              "test": _split([12] * k, ["center", "hflip"], g, centers)}
    w = torch.randn(k, d, generator=g) * 0.3 + centers * 0.2
    cache = write_cache(root / "cache", splits, w, torch.zeros(k), {"source": "fake", "name": "fake5"},
                        list(COUNTS))
    bench(str(cache), methods=["ce", "los"], seeds=(0, 1), device="cpu", quiet=True,
          overrides={"epochs": 1, "batch_size": 32}, out_dir=root / "out")
    return root / "out" / "results.json"


def _doc(results):
    return json.loads(Path(results).read_text())


def _write(tmp_path, doc, name="results.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def _png_size(path):
    with PIL.open(path) as im:
        im.verify()
    with PIL.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_every_figure_png_and_html(results, tmp_path):
    page = make_report(results, out_dir=tmp_path / "rep", quiet=True)
    assert page == tmp_path / "rep" / "report.html"
    text = page.read_text()
    rep = load_report(results)
    from ltcache.report import render_figures
    infos = {i["stem"]: i for i in render_figures(rep, tmp_path / "again", "png")}
    assert set(infos) == set(FIGURES)
    for stem in FIGURES:
        png = tmp_path / "rep" / "figures" / f"{stem}.png"
        assert png.is_file(), stem
        w, h = _png_size(png)
        assert (w, h) == pixel_size(infos[stem]["size"]), stem
        assert w == 1000 and 300 <= h <= 3000
        assert f'src="figures/{stem}.png"' in text        # relative path: the folder works offline
    assert "http://" not in text and "https://" not in text
    assert text.count("<figcaption>") == len(FIGURES)
    # the table: stage-1 row + one row per configuration, sorted by All, mean ± std, no NaN
    assert "stage-1 head" in text and "±" in text and "nan" not in text.lower()
    names = [s.name for s in rep.series]
    assert [n for n in re.findall(r'<td class="name">([^<]+)</td>', text)][1:] == names
    alls = [s.all_mean for s in rep.series]
    assert alls == sorted(alls, reverse=True)


def test_default_out_dir_svg_and_methods(results, tmp_path):
    page = make_report(results, fmt="svg", methods=["los"], quiet=True)
    assert page == results.parent / "report" / "report.html"
    for stem in FIGURES:
        svg = results.parent / "report" / "figures" / f"{stem}.svg"
        head = svg.read_text()[:2000]
        assert "<svg" in head and 'width="720pt"' in head, stem
        assert f'src="figures/{stem}.svg"' in page.read_text()
    text = page.read_text()
    assert "los[" in text and "ce[" not in text


def test_empty_group_is_dash_never_nan(results, tmp_path):
    doc = _doc(results)
    for m in [doc["stage1"]] + [r["metrics"] for r in doc["runs"]]:
        m["few"] = None
        m["lm_groups"]["few"] = m["rsd_groups"]["few"] = None
    doc["cache"]["class_counts"] = [500, 300, 150, 60, 25]          # no Few class (CIFAR-10-LT-like)
    doc["cache"]["groups"] = ["many", "many", "many", "medium", "medium"]
    page = make_report(_write(tmp_path, doc), out_dir=tmp_path / "r", quiet=True)
    text = page.read_text()
    assert "nan" not in text.lower()
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr class=[^>]*>(.*?)</tr>", text)]
    few_cells = [cells[6] for cells in rows]              # #, configuration, seeds, All, Many, Medium, Few
    assert few_cells and all(c == "-" for c in few_cells)
    assert _png_size(tmp_path / "r" / "figures" / "group_accuracy.png")[0] == 1000


def test_many_methods_legend_fits(results, tmp_path):
    """25 configurations: legends in columns, figures grow, reliability grid 5 wide."""
    doc = _doc(results)
    base = doc["runs"][0]
    doc["runs"] = [dict(base, name=f"method-{i:02d}[delta=0.9{i % 10},epochs=2]", method=f"m{i}", seed=0)
                   for i in range(25)]
    page = make_report(_write(tmp_path, doc), out_dir=tmp_path / "r", quiet=True)
    make_report(results, out_dir=tmp_path / "small", quiet=True)
    for stem in FIGURES:
        w, h = _png_size(tmp_path / "r" / "figures" / f"{stem}.png")
        w0, h0 = _png_size(tmp_path / "small" / "figures" / f"{stem}.png")
        assert w == w0 == 1000 and h > h0, stem          # the legend / grid grows, never overlaps
    assert page.read_text().count("method-") >= 25


def run_cli(args):
    res = CliRunner().invoke(cli, args)
    return res.exit_code, res.output, res.exception


def _assert_one_error(code, out, exc, needle):
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    assert needle in lines[0], lines[0]


def test_cli_happy_path(results, tmp_path):
    code, out, _ = run_cli(["report", str(results), "--out", str(tmp_path / "c"), "--methods", "ce,los",
                            "--quiet"])
    assert code == 0, out
    assert out.strip() == ""
    assert (tmp_path / "c" / "report.html").is_file()
    # a directory holding results.json is accepted too
    code, out, _ = run_cli(["report", str(results.parent), "--out", str(tmp_path / "d")])
    assert code == 0 and "report.html" in out


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["runs"][1]["metrics"].pop("lm"), "seed 1 has no metrics.lm; re-run `ltcache bench`"),
    (lambda d: d["runs"][0]["metrics"]["reliability"].pop("bin_acc"), "has no metrics.reliability.bin_acc"),
    (lambda d: d["stage1"].pop("rsd"), "stage1 has no metrics.rsd"),
    (lambda d: d["runs"][0]["metrics"].__setitem__("per_class_acc", [1.0]),
     "has 1 values in metrics.per_class_acc, expected 5"),
    (lambda d: d.__setitem__("schema", "other/2"), "schema is 'other/2', expected 'ltcache-results/1'"),
    (lambda d: d["cache"].pop("class_counts"), "has no cache.class_counts"),
    (lambda d: d.__setitem__("runs", []), "has no runs"),
])
def test_missing_field_is_named(results, tmp_path, mutate, needle):
    doc = _doc(results)
    mutate(doc)
    code, out, exc = run_cli(["report", str(_write(tmp_path, doc)), "--out", str(tmp_path / "o")])
    _assert_one_error(code, out, exc, needle)
    if "seed 1 has no metrics.lm" in needle:
        name = doc["runs"][1]["name"]
        assert f"results.json: run '{name}' seed 1 has no metrics.lm" in out


def test_bad_json_missing_file_unknown_method(results, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _assert_one_error(*run_cli(["report", str(bad)]), "not valid JSON")
    _assert_one_error(*run_cli(["report", str(tmp_path / "nope.json")]), "does not exist")
    code, out, exc = run_cli(["report", str(results), "--methods", "los,lso", "--out", str(tmp_path / "o")])
    _assert_one_error(code, out, exc, "'lso' not in results.json; available: ce, los")
    _assert_one_error(*run_cli(["report", str(results), "--methods", ","]), "--methods is empty")


def test_missing_matplotlib_is_one_line(results, tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(LtcacheError, match=r"pip install -e '\.\[plot\]'"):
        make_report(results, out_dir=tmp_path / "x", quiet=True)
    _assert_one_error(*run_cli(["report", str(results), "--out", str(tmp_path / "y")]),
                      "matplotlib is needed for reports")
    assert not (tmp_path / "x").exists()


def test_import_does_not_load_matplotlib():
    import subprocess
    import sys
    code = ("import sys, ltcache.report, ltcache.cli; "
            "print(any(m == 'matplotlib' or m.startswith('matplotlib.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
