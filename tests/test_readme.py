"""README's Python code blocks run as written (the README promises it).

The blocks are collected by :mod:`tests.markdown_blocks` (which also says how to mark a block
that cannot run standalone); docs/*.md blocks are run by ``tests/test_docs.py``.
"""

from __future__ import annotations

import pytest

from tests.markdown_blocks import ROOT, CodeBlock, python_blocks, run_block

BLOCKS = python_blocks(ROOT / "README.md")


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_code_block_runs(block: CodeBlock) -> None:
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    run_block(block)
