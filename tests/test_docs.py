"""Every Python snippet in README.md and docs/*.md runs as written (in a scratch folder, with the repository's
recipes beside it), one namespace per document, in order; a snippet that reads what a shell command before it
wrote is marked `<!-- not run by tests/test_docs.py: REASON -->` on the line above."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


SKIP = "<!-- not run by tests/test_docs.py:"  # a snippet that needs what a shell command above it wrote says why


def python_blocks(path: Path) -> list[str]:
    found = re.findall(r"(^<!--[^\n]*-->\n)?^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [code for comment, code in found if not comment.startswith(SKIP)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_python_snippets_run(document, tmp_path, monkeypatch):
    from compress.registry import _PASSES, available_passes

    blocks = python_blocks(document)
    assert blocks, f"{document} has no python snippet"
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    available_passes()  # built-in passes registered first, so the clean-up below removes only the snippet's own
    registered = set(_PASSES)
    namespace: dict = {"__name__": "snippet"}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{document.name}[python block {i + 1}]", "exec"), namespace)
    finally:
        for name in set(_PASSES) - registered:  # a snippet's example pass must not leak into other tests
            del _PASSES[name]
