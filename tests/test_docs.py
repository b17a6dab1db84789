"""The documentation: docs/*.md code blocks run, and the site builds without a warning.

``mkdocs build --strict`` (configuration: ``mkdocs.yml``) renders docs/ and the API reference
from the docstrings (mkdocstrings); any warning (a docstring griffe cannot parse, a broken link
or anchor, a page missing from the navigation) fails the build and so this test. Build the site
locally with ``mkdocs build --strict`` (into ``site/``) or preview it with ``mkdocs serve``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import declopt
from declopt import backends, nn
from declopt import torch as dl_torch
from tests.markdown_blocks import ROOT, CodeBlock, python_blocks, run_block

DOCS = sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = [block for path in DOCS for block in python_blocks(path)]


def _anchor(name: str) -> str:
    """The anchor of a top-level name's entry: errors are documented in their module's section."""
    in_errors = getattr(getattr(declopt, name), "__module__", None) == "declopt.errors"
    return f"declopt.errors.{name}" if in_errors else f"declopt.{name}"


# Every public name, as the anchor mkdocstrings gives its entry in the API reference.
PUBLIC = sorted(
    {_anchor(name) for name in declopt.__all__ if name not in ("backends", "nn", "penalties")}
    | {f"declopt.nn.{name}" for name in nn.__all__}
    | {f"declopt.torch.{name}" for name in dl_torch.__all__}
    | {f"declopt.backends.{name}" for name in backends.__all__}
    | {"declopt.diagnostics.Status", "declopt.penalties", "declopt.errors"}
)


def test_docs_have_python_blocks() -> None:
    assert {block.path for block in BLOCKS} >= {"docs/index.md", "docs/reference/backends.md"}


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_docs_code_block_runs(block: CodeBlock) -> None:
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    run_block(block)


def test_markdown_blocks_are_found_with_their_lines_and_skip_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n"
        "<!-- not-run: needs a GPU -->\n```python\nraise SystemExit\n```\n"
    )
    first, second = python_blocks(page)
    assert (first.line, first.code, first.skip_reason) == (3, "x = 1\n", None)
    assert (second.line, second.skip_reason) == (12, "needs a GPU")
    assert run_block(first)["x"] == 1
    with pytest.raises(ZeroDivisionError) as error:
        run_block(CodeBlock(first.path, first.line, "y = 1\n1 / 0\n"))
    assert error.traceback[-1].lineno + 1 == first.line + 2  # the Markdown file's line


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict`` into a temporary directory."""
    site_dir = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mkdocs.yml: paths: [.]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return site_dir


def test_docs_build_strict(site: Path) -> None:
    for page in ("index.html", "design/index.html", "reference/declopt/index.html"):
        assert (site / page).is_file(), page


def test_api_reference_documents_every_public_name(site: Path) -> None:
    html = "".join(page.read_text() for page in (site / "reference").rglob("*.html"))
    missing = [name for name in PUBLIC if f'id="{name}"' not in html]
    assert not missing, f"public names without an entry in the API reference: {missing}"
