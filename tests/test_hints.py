"""Every hint points somewhere real: no message names a path of the developers' machines, and every
``--option`` a message names is one the command that emits it has (or one of the command the message
names, e.g. `ltcache import ... --fit-classifier`); `ltcache run` rephrases stage-1 hints as pipeline keys."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import click

from ltcache.cli import cli
from ltcache.pipeline import as_pipeline_hint

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "ltcache"
# which commands' messages a module emits (others: any command's options)
OWNERS = {"stage2/paper_format.py": ["table", "bench", "tune"], "stage2/paper_table.py": ["table", "bench", "tune"],
          "stage1.py": ["train"], "cache/extraction.py": ["extract"], "cache/importer.py": ["import"],
          "report": ["report"], "stage2": ["retrain", "bench", "tune", "methods"], "predict.py": ["predict"],
          "export.py": ["retrain", "predict"], "pipeline.py": ["run"], "through_backbone.py": ["retrain"]}
TORCHRUN = {"--nproc_per_node", "--nnodes", "--node_rank", "--standalone", "--rdzv-backend", "--rdzv-endpoint"}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def command_options() -> dict[str, set]:
    ctx = click.Context(cli)
    out = {}
    for name, cmd in cli.commands.items():
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out[name] = {o for p in cmd.get_params(sub) for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])
                     if o.startswith("--")}
    return out


def message_strings(path: Path):
    """(line, text) of every string literal in ``path`` that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_message_or_doc_names_a_developer_path():
    files = [p for p in PKG.rglob("*.py")] + [ROOT / "README.md", ROOT / "data" / "README.md"]
    files += list((ROOT / "pipelines").glob("*.toml"))
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if "../shared" in line]
    assert not hits, hits


def test_every_option_a_message_names_exists_for_its_command():
    opts = command_options()
    everything = set().union(*opts.values())
    bad = []
    for path in PKG.rglob("*.py"):
        if path.parent.name == "cli":
            continue                                     # help texts: click checks those options exist
        rel = path.relative_to(PKG).as_posix()
        owner = next((cmds for key, cmds in OWNERS.items() if rel.startswith(key)), None)
        allowed = set().union(*(opts[c] for c in owner)) if owner else everything
        for line, text in message_strings(path):
            named = set(re.findall(r"ltcache (\w+)", text)) & set(opts)
            ok = allowed | TORCHRUN | set().union(*(opts[c] for c in named))
            bad += [f"{rel}:{line} {o}" for o in OPTION.findall(text) if o not in ok]
    assert not bad, bad


def test_run_rephrases_stage1_hints_as_pipeline_keys():
    msg = ("--epochs 6 is too short for --schedule step: both lr drops fall after epoch 5; use --schedule cosine "
           "to train that short, or --epochs 8 or more")
    out = as_pipeline_hint(msg, "p.toml")
    assert "--schedule" not in out and 'schedule = "cosine" under [stage1] in p.toml' in out
    assert "--epochs 8 or more" in out                    # run has --epochs itself
    assert "imb_ratio = 1 under [dataset]" in as_pipeline_hint("use --imb-ratio 1", "p.toml")


def test_report_without_matplotlib_names_the_readme_install(monkeypatch):
    import sys

    import pytest

    from ltcache.errors import LtcacheError
    from ltcache.report import figstyle
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    with pytest.raises(LtcacheError) as err:
        figstyle.mpl()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = re.search(r"pip install -e '\.\[plot\]'", str(err.value))
    assert install and install.group(0) in readme
