"""Every relative link in README.md and docs/**/*.md resolves to a file of the repository (and an
``#anchor`` to a heading of that page), and every repository path a page cites in a code span
(``tests/...``, ``src/...``) exists: a moved test or renamed page must take its citations along."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The top-level folders a page may cite by path; anything else in a code span is code or prose.
CITED_ROOTS = ("benchmarks/", "docs/", "examples/", "src/", "tests/")

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped,
    spaces made hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(heading) for heading in HEADING.findall(FENCE.sub("", page.read_text()))}


def _links(text: str) -> list[str]:
    """Link targets outside fenced blocks and code spans."""
    return LINK.findall(CODE_SPAN.sub("", FENCE.sub("", text)))


def _broken(page: Path, text: str) -> list[str]:
    """What in ``text``, read as the page at ``page``, points at nothing."""
    broken = []
    for target in _links(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"link {target}: no {os.path.relpath(resolved, ROOT)}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"link {target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        path = span.split("::")[0]
        if path.startswith(CITED_ROOTS) and not re.search(r"[\s<>*]", path) and not (ROOT / path).exists():
            broken.append(f"cited path {span}: not in the repository")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_and_cited_paths_resolve(page: Path) -> None:
    assert _broken(page, page.read_text()) == []


def test_the_checker_finds_a_broken_link_a_missing_anchor_and_a_missing_path() -> None:
    text = (
        "[a](nowhere.md) [b](design.md#no-such-heading) [c](design.md#tests) [d](https://example.com)\n"
        "`tests/no_such_test.py` `tests/conftest.py` `src/rankwise/adapters/<name>.py`\n"
        "```\n[e](ignored-in-a-fence.md)\n```\n"
    )
    assert _broken(ROOT / "docs" / "probe.md", text) == [
        "link nowhere.md: no docs/nowhere.md",
        "link design.md#no-such-heading: no heading #no-such-heading in docs/design.md",
        "cited path tests/no_such_test.py: not in the repository",
    ]
