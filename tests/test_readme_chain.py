"""The README's own commands chain: the `ltcache` lines of its code blocks that use the example run
(``c10_ir100``) run in the order written, on a generated image folder saved where the README's data
path points (``data/cifar10-jpg.tar.gz``). The test only adds options that make them fast."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from click.testing import CliRunner

import datagen
from ltcache.cli import cli

torch.set_num_threads(1)
README = Path(__file__).resolve().parent.parent / "README.md"
RUN = "c10_ir100"
# Options the test adds (never replaces) per command, for speed on tiny data.
FAST = {"train": "--epochs 1 --schedule cosine --batch-size 16 --val-per-class 3 --device cpu --workers 1 --quiet",
        "extract": "--batch-size 16 --device cpu --workers 1 --quiet",
        "bench": "--epochs 2 --seeds 0 --device cpu --jobs 1 --quiet",
        "retrain": "--epochs 2 --device cpu --quiet",
        "tune": "--budget 2 --tune-seeds 0 --seeds 0 --device cpu --quiet"}


def fast_options(words: list[str]) -> list[str]:
    """FAST's options for this command that the README line does not already give."""
    out, parts = [], FAST.get(words[0], "").split()
    for i, w in enumerate(parts):
        if not w.startswith("--"):
            continue
        value = parts[i + 1:i + 2] if i + 1 < len(parts) and not parts[i + 1].startswith("--") else []
        if w not in words:
            out += [w] + value
    return out


def readme_commands(text: str) -> list[list[str]]:
    """Every ``ltcache ...`` line of the README's bash blocks (continuations joined, comments dropped)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["ltcache"]:
                cmds.append(words[1:])
    return cmds


def test_readme_commands_parse_and_chain():
    cmds = [c for c in readme_commands(README.read_text()) if any(RUN in w for w in c)]
    assert [c[0] for c in cmds][:3] == ["train", "extract", "extract"], cmds
    # the chain's paths are the convention's: train writes what extract and the stage-2 commands read
    text = " ".join(" ".join(c) for c in cmds)
    assert f"runs/{RUN}/stage1/stage1.pt" in text and f"runs/{RUN}/cache" in text


def test_readme_chain_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = datagen.make_imagefolder(tmp_path / "src" / "cifar10-jpg", num_classes=4, per_class_train=110,
                                      per_class_test=6, size=32)
    (tmp_path / "data").mkdir()
    datagen.make_tarball(folder, tmp_path / "data" / "cifar10-jpg.tar.gz")
    cmds = [c for c in readme_commands(README.read_text()) if any(RUN in w for w in c)]
    assert cmds
    for words in cmds:
        res = CliRunner().invoke(cli, words + fast_options(words))
        assert res.exit_code == 0, (words, res.output)
    assert (tmp_path / "runs" / RUN / "stage1" / "stage1.pt").is_file()
    assert (tmp_path / "runs" / RUN / "cache" / "manifest.json").is_file()
    assert (tmp_path / "runs" / RUN / "results" / "results.json").is_file()
