"""MkDocs hook: Sphinx cross-reference roles in docstrings become links of the API reference.

The docstrings are Google style with Sphinx roles (``:class:`~declopt.program.Program```), which
Markdown renders as ``:class:<code>~declopt.program.Program</code>``. This hook turns each into an
*optional* autorefs reference: a link where the target has an entry in the reference (by its
documented or canonical path), plain code otherwise (no warning). ``~`` shows the last component
only, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+?)(\(\))?</code>")


_ANCHOR = re.compile(r'id="(declopt(?:\.\w+)*)"')


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles of one rendered page (before autorefs resolves references).

    A relative target (``:func:`register```) is looked up, as in Sphinx, in the object whose
    documentation it appears in and then in that object's parent (the nearest ``declopt.*``
    anchor above it on the page).
    """
    anchors = [(m.start(), m[1]) for m in _ANCHOR.finditer(html)]

    def reference(match: re.Match[str]) -> str:
        short, identifier, call = match.groups()
        title = (identifier.rsplit(".", 1)[-1] if short else identifier) + (call or "")
        candidates = [identifier]
        if not identifier.startswith("declopt"):
            owner = next((a for start, a in reversed(anchors) if start < match.start()), None)
            if owner is not None:
                candidates = [f"{owner}.{identifier}", f"{owner.rpartition('.')[0]}.{identifier}"]
        slug = f' slug="{candidates[1]}"' if len(candidates) > 1 else ""
        return (
            f'<autoref optional identifier="{candidates[0]}"{slug}><code>{title}</code></autoref>'
        )

    return _ROLE.sub(reference, html)
