"""The docs hold together: every relative link and ``#anchor`` in README.md and docs/*.md resolves.

A link resolves when its file exists inside the repository and, for ``page.md#anchor`` or
``#anchor``, when the target page has a heading whose GitHub slug is that anchor (or an HTML
``id``/``name``). Links inside code blocks and code spans are text, not links; links with a scheme
(``https:``, ``mailto:``) are not checked (the tests never use the network). Plain Python only.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); one level of brackets inside the text.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:|^//", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
        else:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")  # code spans and emphasis keep their text
    kept = (
        ch
        for ch in text.lower()
        if ch in " -" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers: its headings' slugs (repeats get -1, -2, ...) and HTML ids."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found.update(HTML_ANCHOR.findall(text))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in a page, outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)  # code spans are text
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1) for m in REFERENCE_DEF.finditer(line)]
        targets += HTML_LINK.findall(line)
        found += [(number, t[1:-1] if t.startswith("<") else t) for t in targets]
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link in ``path`` that does not resolve, saying why."""
    problems = []
    for number, target in links(path):
        if SCHEME.match(target):
            continue
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if root.resolve() not in (dest, *dest.parents):
            problems.append(f"{where}: outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {dest.name}")
    return problems


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (README.parent / unquote(target.partition("#")[0])).resolve()
        for _, target in links(README)
        if not SCHEME.match(target)
    }
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert orphans == []


def test_every_image_in_docs_is_shown_somewhere() -> None:
    shown = {
        (page.parent / unquote(target.partition("#")[0])).resolve()
        for page in pages()
        for _, target in links(page)
        if not SCHEME.match(target)
    }
    unused = [p.name for p in sorted(DOCS.glob("*.png")) if p.resolve() not in shown]
    assert unused == []


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Several processes: `train.nproc`", "several-processes-trainnproc"),
        ("The promotion gate: `make promote`", "the-promotion-gate-make-promote"),
        (
            "Measured with the previous (written-out) trainer",
            "measured-with-the-previous-written-out-trainer",
        ),
        ("`cuda_graph` and **amp**", "cuda_graph-and-amp"),
        ("Fréchet distance, 2026-12-04", "fréchet-distance-2026-12-04"),
        ("See [the docs](docs/a.md) now", "see-the-docs-now"),
    ],
)
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_the_checker_catches_broken_links(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other\n\n## Part two\n\n## Part two\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page: `one`\n\n"
        "Good: [other](other.md), [part](other.md#part-two), [again](other.md#part-two-1),\n"
        "[here](#page-one), ![img](img.png), [web](https://example.invalid/missing.md).\n"
        "Bad: [gone](missing.md), [no anchor](other.md#part-three), [self](#nowhere),\n"
        "![no image](missing.png), [third](other.md#part-two-2), [out](../outside.md).\n\n"
        "```\n[in a code block](missing-in-code.md)\n```\n\n"
        "Not a link either: `[span](missing-in-span.md)`.\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "missing.md",
        "other.md#part-three",
        "#nowhere",
        "missing.png",
        "other.md#part-two-2",
        "../outside.md",
    ]
    assert problems[0] == "page.md:5: missing.md: no such file"
    assert "outside the repository" in problems[-1]
