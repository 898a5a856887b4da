"""The Markdown files the docs tests read, and the little parsing they need.

``DOCS`` is every file the tests check: the README, everything under ``docs/`` and the
folder READMEs that are part of the documentation. Under Bazel they are the test's data
(``tests/docs/BUILD.bazel``); under plain pytest they are read from the checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["DOCS", "REPO", "Block", "Link", "anchors", "fenced_blocks", "links", "slug"]

REPO: Final = Path(__file__).resolve().parents[2]
FOLDER_READMES: Final = (
    "builder/README.md",
    "controlplane/README.md",
    "engine/README.md",
    "policies/README.md",
)


def _docs() -> tuple[Path, ...]:
    found = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    found += [REPO / name for name in FOLDER_READMES]
    return tuple(found)


DOCS: Final = _docs()

_FENCE: Final = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
_HEADING: Final = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK: Final = re.compile(
    r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_CODE_SPAN: Final = re.compile(r"(`+)(.+?)\1")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string, text and first line (1-based, the fence)."""

    info: str
    text: str
    line: int


@dataclass(frozen=True)
class Link:
    target: str
    line: int


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)[0] * len(match.group(2))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        out.append((number, line))
    return out


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, info = match.groups()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and not lines[end].strip().strip(fence[0])
        ):
            line = lines[end]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            end += 1
        blocks.append(Block(info=info.strip(), text="\n".join(body) + "\n", line=index + 1))
        index = end + 1
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the file's headings give (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text: str) -> list[Link]:
    """Every Markdown link target outside code blocks and code spans."""
    found: list[Link] = []
    for number, line in _prose_lines(text):
        prose = _CODE_SPAN.sub("", line)
        found.extend(Link(m.group(1), number) for m in _LINK.finditer(prose))
    return found
