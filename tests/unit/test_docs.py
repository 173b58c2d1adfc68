"""The README stays short, every relative link in it and in docs/ resolves, and no sentence
describes "this machine": figures name the machine they were measured on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_reads_in_ten_minutes() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert missing == []


def test_the_docs_index_links_every_page() -> None:
    index = (REPO / "docs" / "README.md").read_text()
    pages = {str(p.relative_to(REPO / "docs")) for p in PAGES if p.parent != REPO}
    assert {p for p in pages if p != "README.md" and p not in index} == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_sentence_describes_the_build_machine(page: Path) -> None:
    text = page.read_text()
    if page.name == "benchmarks.md":
        return  # generated: every figure there is named with the machine it was measured on
    # "This machine" as the place figures came from; a user's own machine is fine.
    build_machine = (
        r"this \d-core|this shared machine|measured (?:here|on this machine)"
        r"|\d(?:\.\d+)?x? [^.\n]{0,40}\bhere\b"
    )
    assert not re.search(build_machine, text, re.I)
