"""Optional ``torch.compile`` for declopt's pure tensor functions, with an eager fallback."""

from __future__ import annotations

import itertools
import types
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

BACKEND: str | Callable = "inductor"
"""The ``torch.compile`` backend (tests swap in a cheap or recording one)."""

_serial = itertools.count()


def maybe_compile(fn: F, enabled: bool) -> F:
    """``fn`` under ``torch.compile(dynamic=True)`` when ``enabled``, else ``fn`` itself.

    Shapes are dynamic so that a new batch size or pooled length does not recompile. If the
    compiler fails (no C++ toolchain, an unsupported op), the call falls back to eager ``fn`` for
    good and warns once: compilation is an optimisation, never a reason to fail.

    Every compiled function gets a code object of its own (:func:`distinct`), hence a TorchDynamo
    cache of its own.
    """
    if not enabled:
        return fn
    compiled = torch.compile(distinct(fn), dynamic=True, backend=BACKEND)
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


def distinct(fn: F, tag: str | None = None) -> F:
    """``fn`` with a code object of its own, named after ``tag`` (default: a serial number).

    TorchDynamo caches compiled graphs per *code object*, with guards on the closure. Functions
    made by one factory (the kernels of every penalty, the derivatives of every declaration) share
    their code objects, hence one cache and its recompilation limit (8): past it, calls silently
    run eagerly. A copy of the code object gives each function a cache of its own. Callables
    without a code object (builtins, partials) are returned as they are.
    """
    code = getattr(fn, "__code__", None)
    if not isinstance(fn, types.FunctionType) or code is None:
        return fn
    tag = str(next(_serial)) if tag is None else tag
    code = code.replace(co_name=f"{fn.__name__}_{tag}")
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = f"{fn.__qualname__}_{tag}"
    return new  # type: ignore[return-value]
