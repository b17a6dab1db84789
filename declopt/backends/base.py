"""The interface between a layer and the solver that computes its forward pass.

A backend receives a :class:`~declopt.program.Program` and a *flat* batch of ``B`` problems and
returns a :class:`Solution`. Parameters arrive as a :class:`BatchedParams`: each tensor either
carries the batch as its leading dim (``in_dim == 0``) or is shared by every problem
(``in_dim is None``), exactly the convention of :func:`torch.func.vmap`.

Backends never need to be differentiable: the layer differentiates the solution with the implicit
backward (:mod:`declopt.implicit`) from the declaration alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from declopt.kkt.point import KKTPoint
from declopt.program import BatchedParams, Program

__all__ = ["Backend", "BatchedParams", "Solution"]


@dataclass
class Solution:
    """What a backend returns for a flat batch of ``B`` problems with ``m`` variables.

    Attributes:
        u: ``(B, m)`` the solutions, packed as in :meth:`Program.pack`.
        converged: ``(B,)`` bool, the solver's own verdict per problem.
        iterations: ``(B,)`` int64, iterations spent per problem (0 where unknown).
        objective: ``(B,)`` objective value at ``u``.
        eq_multipliers: ``(B, p)`` multipliers of ``h = 0`` (seed convention), or ``None`` when the
            backend does not know them (the backward then estimates them by least squares).
        ineq_multipliers: ``(B, q)`` multipliers of ``g <= 0`` (``<= 0`` by the seed convention),
            or ``None``.
        kkt_residual: ``(B,)`` the backend's own KKT residual (stationarity of the Lagrangian and
            primal feasibility, max-abs); ``None`` lets the layer compute it from the declaration.
        status: ``(B,)`` :class:`~declopt.diagnostics.Status` codes: why unconverged problems failed
            causes (infeasible, unbounded, ...), or ``None`` (then ``NOT_CONVERGED``).
        point: the :class:`~declopt.kkt.point.KKTPoint` of the declaration at ``u`` when the
            backend has it (then ``layer.info`` and the implicit backward reuse it instead of
            evaluating the declaration again); ``None`` otherwise.
    """

    u: Tensor
    converged: Tensor
    iterations: Tensor
    objective: Tensor
    eq_multipliers: Tensor | None = None
    ineq_multipliers: Tensor | None = None
    kkt_residual: Tensor | None = None
    point: KKTPoint | None = None
    status: Tensor | None = None


class Backend(Protocol):
    """A forward solver. Register new ones with :func:`declopt.backends.register`.

    Optional attributes: ``native_backward = True`` if ``solve(..., differentiable=True)`` returns
    a ``u`` that carries its own autograd graph to ``params.values`` (then ``backward="native"`` is
    allowed), and ``default_backward`` (``"implicit"`` unless set).

    ``solve`` receives ``starts`` (a list of ``(B, m)`` starting points, which a backend may
    ignore) and the layer's ``**options``; it returns a :class:`Solution` with multipliers in the
    seed convention when it knows them.
    """

    name: str

    def supports(self, program: Program) -> str | None:
        """``None`` if this backend can solve ``program``, else the reason it cannot."""
        ...

    def solve(self, program: Program, params: BatchedParams, **options: Any) -> Solution:
        """Solve every problem of the batch; never raise for one bad problem, report it."""
        ...
