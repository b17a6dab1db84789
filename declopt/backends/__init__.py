"""Backends: who solves the forward problem. One flag (``backend=``) picks one by name.

A backend is any object with a ``name``, ``supports(program) -> str | None`` (``None`` if it can
solve the program, else why not) and ``solve(program, params, **options) -> Solution`` (see
:mod:`declopt.backends.base`). Third parties add their own with :func:`register`.
"""

from __future__ import annotations

from declopt.backends.base import Backend, BatchedParams, Solution
from declopt.backends.torch_backend import TorchBackend
from declopt.program import Program

__all__ = ["Backend", "BatchedParams", "Solution", "available", "get", "register", "select"]

_REGISTRY: dict[str, Backend] = {}


def register(name: str, backend: Backend, *, overwrite: bool = False) -> None:
    """Make ``backend`` available as ``dl.Layer(..., backend=name)``."""
    if name == "auto":
        raise ValueError("'auto' is reserved for automatic dispatch")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a backend named {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = backend


def available() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; registered backends: {', '.join(available())} (or 'auto')"
        ) from None


def select(name: str, program: Program) -> tuple[Backend, str]:
    """The backend for ``program`` and the reason it was chosen.

    ``"auto"`` sends DPP-convex problems to ``"cvxpylayers"`` when that backend is registered and
    everything else to ``"torch"``. An explicit name that cannot take the program raises.
    """
    if name != "auto":
        backend = get(name)
        problem = backend.supports(program)
        if problem is not None:
            raise ValueError(f"backend {name!r} cannot solve this problem: {problem}")
        return backend, f"requested backend={name!r}"
    if program.is_convex and program.is_dpp and "cvxpylayers" in _REGISTRY:
        backend = _REGISTRY["cvxpylayers"]
        if backend.supports(program) is None:
            return backend, "auto: the problem is DPP-convex"
    torch_backend = get("torch")
    problem = torch_backend.supports(program)
    if problem is not None:
        raise ValueError(f"no registered backend can solve this problem: {problem}")
    kind = "DPP-convex" if program.is_convex and program.is_dpp else "not DPP-convex"
    return torch_backend, f"auto: the problem is {kind}"


register("torch", TorchBackend())
