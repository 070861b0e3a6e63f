"""The README and docs/ stay navigable: every relative Markdown link resolves, and every docs page is reachable
from the README (the README is the front door; docs/ holds the details)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

# [text](target) and [text](target "title"); images too (![alt](target)). Reference definitions: [id]: target
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ... and protocol-relative


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def link_targets(text: str) -> list[str]:
    """Link targets outside code blocks and code spans (a link written inside backticks is not a link)."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE.findall(text) + REFERENCE.findall(text)


def broken_links(md: Path) -> list[str]:
    broken = []
    for target in link_targets(md.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:  # "#anchor": this same file
            continue
        resolved = (REPO / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
        if not resolved.exists():
            broken.append(target)
    return broken


def test_docs_folder_has_pages():
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ has no Markdown pages"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(md):
    assert not broken_links(md), f"{md.relative_to(REPO)}: broken relative links: {broken_links(md)}"


def test_every_docs_page_is_linked_from_readme():
    linked = set()
    for target in link_targets(README.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path = target.split("#", 1)[0]
        if path:
            linked.add((README.parent / path).resolve())
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_the_checker_sees_a_broken_link(tmp_path):
    """The checks above can fail: a missing target is reported, an existing one, an anchor, a URL and a link
    inside a code block are not."""
    (tmp_path / "there.md").write_text("x\n")
    md = tmp_path / "page.md"
    md.write_text("[ok](there.md#part) [anchor](#top) [web](https://example.org/x) [mail](mailto:a@b.c)\n"
                  "[gone](missing.md) [gone too](sub/missing/#x)\n"
                  "```\n[in code](not-a-link.md)\n```\n`[span](also-not.md)`\n", encoding="utf-8")
    assert broken_links(md) == ["missing.md", "sub/missing/#x"]
