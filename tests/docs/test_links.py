"""Every relative link in the docs points at a file that exists, and every anchor at a heading.

External links (``scheme:``) are not checked: the test runs offline.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.docs.markdown import DOCS, REPO, anchors, links, slug


def _problems(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    problems: list[str] = []
    for link in links(text):
        target = link.target
        if ":" in target.split("/", 1)[0] or target.startswith("//"):
            continue  # https:, mailto:
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        where = f"{doc.relative_to(REPO)}:{link.line}: {target}"
        if not path.exists():
            problems.append(f"{where}: no such file")
            continue
        if REPO.resolve() not in path.resolve().parents and path.resolve() != REPO.resolve():
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor:
            if path.is_dir() or path.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif unquote(anchor) not in anchors(path.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    assert _problems(doc) == []


def test_the_docs_are_found() -> None:
    names = {str(p.relative_to(REPO)) for p in DOCS}
    assert {"README.md", "docs/README.md", "docs/reference/cli.md"} <= names


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        pytest.param("Secrets are never shown", "secrets-are-never-shown", id="plain"),
        pytest.param("The admin API's security", "the-admin-apis-security", id="apostrophe"),
        pytest.param(
            "Unknown route key -> 404 (fail closed)",
            "unknown-route-key---404-fail-closed",
            id="arrow",
        ),
        pytest.param(
            "Body limit: 10 MiB by default (`--max-body-bytes`), over it 413",
            "body-limit-10-mib-by-default---max-body-bytes-over-it-413",
            id="code-span",
        ),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md)\n", encoding="utf-8")
    text = page.read_text(encoding="utf-8")
    assert [link.target for link in links(text)] == ["#title", "#nope", "missing.md"]
    assert "title" in anchors(text)
    assert "nope" not in anchors(text)
