"""The repository's citations resolve inside it: every "docs/methods.md §n" names a section that
exists, and nothing points at a file a clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg"}
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
# Files that lived beside the repository while it was written and are not part of it.
OUTSIDE = re.compile(r"METHODS\.md|API\.md|shared/notes|ENVIRONMENT\.md|VLLM_GPU\.md")
CITATION = re.compile(r"docs/methods\.md,?\s+§(\d+)(?:[–-](\d+))?")


def _files():
    for path in ROOT.rglob("*"):
        if path.suffix in SUFFIXES and path.is_file() and not SKIP_DIRS & set(path.relative_to(ROOT).parts):
            yield path


def _sections() -> set[int]:
    text = (ROOT / "docs" / "methods.md").read_text()
    return {int(n) for n in re.findall(r"^## §(\d+) ", text, flags=re.M)}


def test_methods_document_numbers_its_sections_one_to_six():
    assert _sections() == {1, 2, 3, 4, 5, 6}


def test_every_methods_citation_names_an_existing_section():
    sections = _sections()
    bad = []
    for path in _files():
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in CITATION.finditer(line):
                first, last = int(match.group(1)), int(match.group(2) or match.group(1))
                if not set(range(first, last + 1)) <= sections:
                    bad.append(f"{path.relative_to(ROOT)}:{line_no}: {match.group(0)}")
    assert not bad, "citations of missing sections:\n" + "\n".join(bad)


def test_nothing_cites_a_file_outside_the_repository():
    this = Path(__file__).resolve()
    hits = []
    for path in _files():
        if path.resolve() == this:
            continue
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{line_no}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
