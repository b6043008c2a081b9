"""The project's own documentation: every link stays inside the repository and resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and <scheme://…> autolinks; code spans are removed first.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_AUTOLINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", re.IGNORECASE)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the file's headings: lowercased, punctuation dropped, spaces → '-'."""
    found = set()
    for line in _CODE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def _links(path: Path) -> list[str]:
    text = _CODE.sub("", path.read_text(encoding="utf-8"))
    return _LINK.findall(text) + _AUTOLINK.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository_and_resolve(doc: Path) -> None:
    problems = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            problems.append(f"{target}: links outside the repository")
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: no such heading")
    assert not problems, problems


def test_the_checks_notice_a_bad_link(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n[a](https://example.com) [b](missing.md) [c](#nope) [d](#title) "
                   "`[e](https://in.code)` <https://auto.link>\n", encoding="utf-8")
    assert _links(doc) == ["https://example.com", "missing.md", "#nope", "#title",
                           "https://auto.link"]
    assert _anchors(doc) == {"title"}
