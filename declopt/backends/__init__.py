"""Backends: who solves the forward problem. One flag (``backend=``) picks one by name.

Registered here: ``"torch"`` (batched Newton / L-BFGS / augmented Lagrangian, any smooth
declaration), ``"cone"`` (DPP-convex declarations as cone programs, a batched interior point in
torch: :mod:`declopt.backends.cone`), ``"cvxpylayers"`` (DPP-convex declarations through
``cvxpylayers``, with its own backward) and ``"scipy"`` (per-problem ``scipy.optimize.minimize``,
the slow reference).

A backend is any object with a ``name``, ``supports(program) -> str | None`` (``None`` if it can
solve the program, else why not) and ``solve(program, params, **options) -> Solution`` (see
:mod:`declopt.backends.base`). Third parties add their own with :func:`register`.

A *source-only* program (``Program.has_functions`` False: the torch front end could not compile
the declaration, see :func:`declopt.frontend.compile_layer`) goes only to a backend with
``takes_source_only = True`` (cvxpylayers); :func:`select` refuses it for the others by raising
the front end's own error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from declopt.backends.base import Backend, BatchedParams, Solution
from declopt.backends.cone import ConeBackend
from declopt.backends.cvxpylayers_backend import CvxpyLayersBackend
from declopt.backends.scipy_backend import ScipyBackend
from declopt.backends.torch import TorchBackend
from declopt.frontend.dpp import dpp_culprit
from declopt.program import Program

__all__ = [
    "Auto",
    "Backend",
    "BatchedParams",
    "Solution",
    "available",
    "get",
    "register",
    "select",
]

_REGISTRY: dict[str, Backend] = {}


def register(name: str, backend: Backend, *, overwrite: bool = False) -> None:
    """Make ``backend`` available as ``dl.Layer(..., backend=name)``."""
    if name == "auto":
        raise ValueError("'auto' is reserved for automatic dispatch")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a backend named {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = backend


_PROTOCOL_ARGUMENTS = ("self", "program", "params", "starts", "differentiable")


def option_names(backend: Backend) -> tuple[str, ...] | None:
    """The options ``backend.solve`` takes (its ``option_names`` attribute, else its keyword
    parameters beyond the protocol's), or ``None`` if it takes any (``**options``)."""
    names = getattr(backend, "option_names", None)
    if names is not None:
        return tuple(names)
    parameters = inspect.signature(backend.solve).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.name not in _PROTOCOL_ARGUMENTS)


def check_options(backend: Backend, options: dict[str, Any]) -> None:
    """``ValueError`` naming every option ``backend`` does not take, and the ones it does."""
    names = option_names(backend)
    if names is None:
        return
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(
            f"backend {backend.name!r} takes no option {', '.join(map(repr, unknown))}; its "
            f"options are {', '.join(names) or '(none)'}"
        )


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


@dataclass(frozen=True)
class Auto:
    """Automatic dispatch (``backend="auto"`` is ``Auto()``).

    DPP-convex problems go first to ``"cone"`` (declopt's batched interior-point method) when
    their cone program is small enough for its dense factorisations (at most
    :data:`~declopt.backends.cone.backend.AUTO_MAX_COLUMNS` columns after presolve: QPs, LPs and
    SOCPs of layer size) or has a block-arrow sparsity it exploits (robust pooling, projections
    onto balls: :mod:`declopt.backends.cone.arrow`; ``benchmarks/backends.py``), else to
    ``"cvxpylayers"``, an exact sparse conic solver that also takes exponential and PSD cones.
    ``prefer="cvxpylayers"`` skips the cone backend; ``prefer="torch"`` sends a DPP-convex
    problem to those two only when the torch backend refuses it, and keeps the rest on torch,
    which is faster on unconstrained ones with few variables (Huber pooling n=64: 23x
    forward+backward).
    Problems that are not DPP-convex always go to torch.
    """

    prefer: str = "cone"

    def __post_init__(self) -> None:
        if self.prefer not in ("cone", "cvxpylayers", "torch"):
            raise ValueError(
                f"Auto(prefer=) must be 'cone', 'cvxpylayers' or 'torch', got {self.prefer!r}"
            )


def select(name: str | Auto, program: Program) -> tuple[Backend, str]:
    """The backend for ``program`` and the reason it was chosen (``layer.info.reason``).

    ``"auto"`` / :class:`Auto` sends DPP-convex problems to ``"cone"`` or ``"cvxpylayers"``
    (all of them, or only those the torch backend cannot solve: see :class:`Auto`) and
    everything else to ``"torch"``; the reason names the test that decided (for a problem that
    is not DPP-convex, the subexpression that breaks the rules). An explicit name that cannot
    take the program raises ``ValueError`` with the backend's own reason.
    """
    if name == "auto":
        name = Auto()
    if not program.has_functions:
        return _select_source_only(name, program)
    if not isinstance(name, Auto):
        backend = get(name)
        problem = backend.supports(program)
        if problem is not None:
            raise ValueError(f"backend {name!r} cannot solve this problem: {problem}")
        return backend, f"requested backend={name!r}"
    torch_backend = get("torch")
    torch_refusal = torch_backend.supports(program)
    dpp_convex = program.is_convex and program.is_dpp
    kind = "log-log convex under DPP (gp=True)" if program.log_log else "DPP-convex"
    if dpp_convex and (name.prefer != "torch" or torch_refusal is not None):
        because = "" if name.prefer != "torch" else f" and torch cannot ({torch_refusal})"
        refusals = []
        for candidate in ("cone", "cvxpylayers"):
            if candidate == "cone" and name.prefer == "cvxpylayers":
                continue
            backend = _REGISTRY.get(candidate)
            refusal = "it is not registered" if backend is None else _auto_refusal(backend, program)
            if refusal is None:
                return backend, (
                    f"auto: the problem is {kind}{because}, so {candidate} solves it"
                    + ("" if not refusals else f" ({'; '.join(refusals)})")
                )
            refusals.append(f"{candidate} cannot take it: {refusal}")
        why = f"the problem is {kind} but {'; '.join(refusals)}"
    elif dpp_convex:
        why = f"the problem is {kind} and the torch backend takes it (faster than cvxpylayers)"
    else:
        why = f"the problem is not DPP-convex{_culprit(program)}"
    if torch_refusal is not None:
        raise ValueError(f"no registered backend can solve this problem: {why}; {torch_refusal}")
    return torch_backend, f"auto: {why}, so torch solves it"


def _auto_refusal(backend: Backend, program: Program) -> str | None:
    """Why ``backend`` is not auto's choice for ``program`` (its ``auto_refusal`` when it has
    one: a backend may take more than it should be chosen for), or ``None``."""
    rule = getattr(backend, "auto_refusal", None)
    return backend.supports(program) if rule is None else rule(program)


def takes(backend: Backend, program: Program) -> str | None:
    """``backend.supports(program)``, refusing a source-only program for a backend that needs
    torch functions."""
    if not program.has_functions and not getattr(backend, "takes_source_only", False):
        return f"the torch front end cannot compile the declaration: {program.frontend_error}"
    return backend.supports(program)


def _select_source_only(name: str | Auto, program: Program) -> tuple[Backend, str]:
    """A source-only program goes to a backend that solves the CVXPY declaration itself; for
    any other the front end's own error is raised (its type and message unchanged)."""
    error = program.frontend_error
    if not isinstance(name, Auto):
        backend = get(name)
        if not getattr(backend, "takes_source_only", False):
            raise error  # type: ignore[misc]
        refusal = backend.supports(program)
        if refusal is not None:
            raise ValueError(f"backend {name!r} cannot solve this problem: {refusal}")
        return backend, f"requested backend={name!r} (the torch front end cannot compile it)"
    cvx = _REGISTRY.get("cvxpylayers")
    refusal = "it is not registered" if cvx is None else cvx.supports(program)
    if refusal is None:
        return cvx, (
            f"auto: the torch front end cannot compile the declaration ({error}), and "
            "cvxpylayers can, so cvxpylayers solves it"
        )
    raise error  # type: ignore[misc]


def _culprit(program: Program) -> str:
    """`` (<why>)`` for a CVXPY declaration that is not DPP-convex, else empty."""
    if program.source is None:
        return " (it was given as torch functions)"
    if program.log_log:
        return " (gp=True: it is not log-log convex under DPP, problem.is_dgp(dpp=True))"
    culprit = dpp_culprit(program.source[0])
    return "" if culprit is None else f" ({culprit})"


register("torch", TorchBackend())
register("cvxpylayers", CvxpyLayersBackend())
register("scipy", ScipyBackend())
register("cone", ConeBackend())
