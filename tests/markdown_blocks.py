"""Code blocks and links of the repository's markdown files, for the documentation tests.

A fenced block may be preceded (on the line just before its fence) by a marker:

    <!-- not-run: REASON -->     the tests do not run it (REASON must say why)
    <!-- run-as: server -->      runs as a server process the other blocks talk to

Every other ``python``/``bash``/``sh`` block of README.md is run by
tests/integration/test_readme.py; tests/unit/test_docs.py checks the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*(not-run|run-as):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None = None  # "not-run" or "run-as"
    marker_arg: str = ""

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, in order, with their markers."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: code block never closed")
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        out.append(
            Block(
                path,
                start + 1,
                lang,
                "\n".join(body) + "\n",
                marker.group(1) if marker else None,
                marker.group(2) if marker else "",
            )
        )
        i += 1
    return out


def prose(path: Path) -> str:
    """The text of ``path`` outside fenced code blocks (links in code are not links)."""
    out, inside = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line) or (inside and line.strip() == "```"):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def links(path: Path) -> list[str]:
    """Every markdown link target in ``path`` (outside code blocks and code spans)."""
    return LINK.findall(re.sub(r"`[^`\n]*`", "", prose(path)))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``."""
    out = set()
    for line in prose(path).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[`*_]|<[^>]+>", "", m.group(1)).strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def doc_files() -> list[Path]:
    """The repository's own documentation: README.md, docs/*.md, bench/README.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
