"""Optional ``torch.compile`` for declopt's pure tensor functions, with an eager fallback."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def maybe_compile(fn: F, enabled: bool) -> F:
    """``fn`` under ``torch.compile(dynamic=True)`` when ``enabled``, else ``fn`` itself.

    Shapes are dynamic so that a new batch size or pooled length does not recompile. If the
    compiler fails (no C++ toolchain, an unsupported op), the call falls back to eager ``fn`` for
    good and warns once: compilation is an optimisation, never a reason to fail.
    """
    if not enabled:
        return fn
    compiled = torch.compile(fn, dynamic=True)
    failed = False

    def run(*args: object) -> object:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args)
            except Exception as error:  # any compiler failure falls back to eager
                failed = True
                warnings.warn(
                    f"torch.compile failed ({type(error).__name__}: {error}); running eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return fn(*args)

    return run  # type: ignore[return-value]
