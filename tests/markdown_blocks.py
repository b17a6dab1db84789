"""The Python code blocks of Markdown files (README.md, docs/*.md), collected to run as tests.

Every fenced block opened with ```` ```python ```` is a test: it must run standalone, as written,
in a fresh namespace (each block imports what it uses). A block that cannot (a fragment, one that
needs data, a GPU or minutes) is marked on the line right before its fence with

    <!-- not-run: why it cannot run standalone -->

and is reported as skipped with that reason (an HTML comment: invisible on GitHub and in the
built docs, and the block keeps its highlighting). Blocks in any other fence (```` ```bash ````,
```` ``` ````) are not Python and are not collected.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(
    r"^(?:<!--\s*not-run:\s*(?P<reason>[^\n]*?)\s*-->[ \t]*\n)?"  # an optional skip marker
    r"(?P<fence>```python)[ \t]*\n(?P<code>.*?)^```[ \t]*$",
    re.S | re.M,
)


@dataclass(frozen=True)
class CodeBlock:
    """One ```` ```python ```` block of a Markdown file.

    Attributes:
        path: the file, relative to the repository root (absolute for a file outside it).
        line: the line of the opening fence (1-based), for the test id and tracebacks.
        code: the block's source.
        skip_reason: the ``<!-- not-run: ... -->`` reason, or ``None`` for a block that runs.
    """

    path: str
    line: int
    code: str
    skip_reason: str | None = None

    @property
    def id(self) -> str:
        """``"<path>:<line>"``, the pytest id of the block's test."""
        return f"{self.path}:{self.line}"


def python_blocks(path: Path) -> list[CodeBlock]:
    """The ```` ```python ```` blocks of the Markdown file ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    path = path.resolve()
    name = (path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).as_posix()
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start("fence")) + 1
        blocks.append(CodeBlock(name, line, match["code"], match["reason"]))
    return blocks


def run_block(block: CodeBlock) -> dict[str, object]:
    """Execute ``block`` as the module ``__markdown_block__`` and return its namespace.

    The module is registered in ``sys.modules`` while it runs (dataclasses, pickling and
    ``inspect`` in a block need that), and the backend registry is restored afterwards, so a
    block that registers a backend leaves no trace in other tests.
    """
    from declopt import backends

    module = types.ModuleType("__markdown_block__")
    module.__file__ = str(ROOT / block.path)  # ROOT / an absolute path is that path
    # Line numbers in tracebacks are those of the Markdown file.
    code = compile("\n" * block.line + block.code, module.__file__, "exec")
    sys.modules[module.__name__] = module
    try:
        with mock.patch.dict(backends._REGISTRY):
            exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__
