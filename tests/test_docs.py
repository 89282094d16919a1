"""The documentation stands alone: every citation in the package, the README and docs/ points into
the repository, and docs/methods.md covers every built-in method and loss."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
# notes outside the repository that citations once pointed to; a clone does not have them
FORBIDDEN = ("METHODS §", "METHODS.md", "DESIGN.md", "../shared")
BARE_SECTION = re.compile(r"§\s*\d")            # "(§13)": a section number of a file that is not here
ANCHOR_REF = re.compile(r"docs/methods\.md#([A-Za-z0-9_-]+)")
SUFFIXES = {".py", ".md", ".toml", ".txt", ".json", ".cfg", ".yaml", ".yml"}


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += [p for p in sorted((ROOT / "ltcache").rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return files


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_no_citation_points_outside_the_repository():
    bad = []
    for path in _text_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            hits = [s for s in FORBIDDEN if s in line] + (["§N"] if BARE_SECTION.search(line) else [])
            if hits:
                bad.append(f"{path.relative_to(ROOT)}:{i}: {', '.join(hits)}")
    assert not bad, "citations of files that are not in the repository:\n" + "\n".join(bad)


def test_every_methods_md_anchor_cited_exists():
    anchors = _anchors(METHODS_DOC)
    missing = []
    for path in _text_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            missing += [f"{path.relative_to(ROOT)}:{i}: #{a}" for a in ANCHOR_REF.findall(line) if a not in anchors]
    # links inside docs/methods.md itself: (#anchor)
    for i, line in enumerate(METHODS_DOC.read_text().splitlines(), 1):
        missing += [f"docs/methods.md:{i}: #{a}" for a in re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", line)
                    if a not in anchors]
    assert not missing, "anchors cited but not headings of docs/methods.md:\n" + "\n".join(missing)


def test_slug_rule():
    assert _slug("What \"verified\" means") == "what-verified-means"
    assert _slug("Class-aware sampler (cb)") == "class-aware-sampler-cb"
    assert _slug("`tau-norm`") == "tau-norm"


def _builtin(registry: dict) -> list[str]:
    names = [name for name, entry in registry.items() if entry.origin == "built-in"]
    assert len(names) >= 15, "built-in entries are no longer marked origin='built-in'; update this test"
    return names


def test_every_builtin_method_has_a_section_and_cites_it():
    from ltcache.stage2.methods import METHODS
    anchors = _anchors(METHODS_DOC)
    names = _builtin(METHODS)
    assert not [n for n in names if n not in anchors], "add a section to docs/methods.md for each"
    uncited = [n for n in names if f"docs/methods.md#{n}" not in METHODS[n].source]
    assert not uncited, "each built-in method's source should cite its section (docs/methods.md#NAME)"


def test_every_builtin_loss_is_in_the_losses_table():
    from ltcache.stage2.losses import LOSSES
    text = METHODS_DOC.read_text()
    section = text.split("\n## Losses\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    missing = sorted(set(_builtin(LOSSES)) - listed)
    assert not missing, f"add these losses to the table in docs/methods.md#losses: {missing}"


@pytest.mark.parametrize("doc", ["docs/ARCHITECTURE.md", "docs/methods.md"])
def test_docs_cited_by_path_exist(doc):
    assert (ROOT / doc).is_file()
    cited = any(doc in p.read_text(errors="replace") for p in _text_files() if p != ROOT / doc)
    assert cited, f"{doc} is cited nowhere"
