"""Every relative link in the README, the docs and the pre-commit hook file points at something.

A link to a file that was renamed or never written sends a reader (or a pre-commit user reading
the hook's comment) nowhere; GitHub shows no error for it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_MENTION = re.compile(r"\b((?:docs|schemas|pipelines|examples|dags|bench|scripts)/[\w./-]+\w)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+\s+(.*)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def _links(doc: Path) -> list[str]:
    return [t for t in _LINK.findall(doc.read_text()) if not re.match(r"^[a-z]+:", t)]


def _broken(doc: Path, target: str) -> bool:
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    if not file.exists():
        return True
    return bool(anchor) and file.suffix == ".md" and anchor not in _anchors(file.read_text())


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_point_at_files_and_headings(doc):
    missing = [target for target in _links(doc) if _broken(doc, target)]
    assert not missing, f"{doc.name}: broken links {missing}"


def test_paths_named_in_the_hook_file_exist():
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    named = [m for m in _MENTION.findall(text) if "*" not in m and "\\" not in m]
    named += re.findall(r"\b([\w-]+\.md)\b", text)
    assert all((ROOT / name).exists() for name in named), named
