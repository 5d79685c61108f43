"""Docs that run: every ```python block of README.md and docs/*.md is executed, in order, one
namespace per file (as a reader runs them one after the other), in a temporary folder.

A block that cannot run here says why, in an HTML comment on the line before it (invisible on
GitHub)::

    <!-- docs-test: skip (needs a real SD folder at /models/sd15) -->

The reason is required. A failure names the file, the block, its line in the file and the line
inside the block.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
_MARK = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(?:\((.*?)\))?\s*-->\s*$", re.S)


@dataclass
class Block:
    file: str  #: the path shown in messages, relative to the repository
    index: int  #: 1-based, among the file's python blocks
    line: int  #: the line of the block's first code line in the file
    code: str
    skip: str | None  #: the reason, for a block marked skip

    @property
    def name(self) -> str:
        return f"{self.file}, python block {self.index} (line {self.line})"


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```python blocks of a markdown file, with their skip marks."""
    text = path.read_text()
    file = str(path.relative_to(root))
    out = []
    for i, m in enumerate(_FENCE.finditer(text), 1):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        skip = None
        if mark is not None:
            if mark[1] != "skip" or not (mark[2] or "").strip():
                raise ValueError(
                    f"{file} python block {i}: write the mark as "
                    "<!-- docs-test: skip (the reason it cannot run here) -->"
                )
            skip = mark[2].strip()
        line = text[: m.start()].count("\n") + 2
        out.append(Block(file, i, line, m.group(1), skip))
    return out


def run_block(block: Block, namespace: dict) -> None:
    """Execute one block in ``namespace``; a failure raises AssertionError naming the block."""
    try:
        code = compile(block.code, f"<{block.name}>", "exec")
        exec(code, namespace)
    except Exception as e:
        if isinstance(e, SyntaxError) and e.filename == f"<{block.name}>":
            lineno, text = e.lineno or 1, (e.text or "").rstrip()
        else:
            frames = traceback.extract_tb(e.__traceback__)
            frames = [f for f in frames if f.filename == f"<{block.name}>"] or [None]
            lineno = frames[-1].lineno if frames[-1] else 1
            text = frames[-1].line if frames[-1] else ""
        raise AssertionError(
            f"{block.name}, its line {lineno} (file line {block.line + lineno - 1}) failed: "
            f"{type(e).__name__}: {e}\n    {text}"
        ) from e


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_blocks_run(path, registries):
    """Each file's blocks in order, in one namespace, in a temporary cwd (tests/conftest.py);
    a page may register models: the registries are restored afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    found = blocks(path)
    if not found:
        pytest.skip("no python blocks")
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in found:
        if block.skip is None:
            run_block(block, namespace)
            ran += 1
    if ran == 0:
        pytest.skip(f"every block is marked skip: {[b.skip for b in found]}")


def test_the_collector_names_the_file_and_the_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# x\n\n```python\na = 1\n```\n\ntext\n\n"
        "<!-- docs-test: skip (needs a GPU) -->\n```python\nimport cuda_only\n```\n\n"
        "```python\nb = a + 1\nc = undefined_name\n```\n"
    )
    found = blocks(page, tmp_path)
    assert [b.skip for b in found] == [None, "needs a GPU", None]
    assert [b.line for b in found] == [4, 11, 15]
    namespace: dict = {}
    run_block(found[0], namespace)
    with pytest.raises(AssertionError) as err:
        run_block(found[2], namespace)
    message = str(err.value)
    assert "page.md, python block 3 (line 15), its line 2 (file line 16)" in message
    assert "NameError" in message and "undefined_name" in message
    page.write_text("<!-- docs-test: skip -->\n```python\nx\n```\n")
    with pytest.raises(ValueError, match="the reason it cannot run here"):
        blocks(page, tmp_path)
