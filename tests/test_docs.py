"""The README a newcomer reads in five minutes, and docs/ whose links all work (issue 23)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.M)
CODE = re.compile(r"```.*?```", re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*|_", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page.resolve()
        if not dest.exists():
            broken.append(f"{page.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md":
            headings = {_slug(h) for h in HEADING.findall(CODE.sub("", dest.read_text()))}
            if anchor not in headings:
                broken.append(f"{page.name}: {target}: no heading #{anchor}")
    return broken


def test_every_relative_link_in_the_readme_and_docs_reaches_its_file_and_heading() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 5
    assert [b for page in pages for b in _broken_links(page)] == []


def test_the_readme_stays_short_and_keeps_its_two_set_up_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [gone](b.md) [bad](a.md#nowhere)\n")
    assert _broken_links(tmp_path / "a.md") == [
        "a.md: b.md: no such file",
        "a.md: a.md#nowhere: no heading #nowhere",
    ]
