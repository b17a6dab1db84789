"""Why a problem was not solved: the evidence a solver leaves, as a
:class:`~declopt.diagnostics.Status` per problem (shared by the torch and scipy backends)."""

from __future__ import annotations

import torch
from torch import Tensor

from declopt.derivatives import BatchedObjective
from declopt.diagnostics import Status
from declopt.kkt.point import KKTPoint
from declopt.kkt.tolerances import problem_scale, table
from declopt.program import BatchedParams, Program

UNBOUNDED_GROWTH = 1e3
"""An unconverged problem is reported unbounded when its objective fell by more than this many
of its own units (``|f(u0)| + |D_u f(u0)| scale``) and its solution left the data's scale by as
much: the signature of an objective decreasing along a recession direction."""


def failure_status(
    program: Program,
    params: BatchedParams,
    u0: Tensor,
    u: Tensor,
    objective: Tensor,
    converged: Tensor,
    penalty: Tensor | None = None,
    point: KKTPoint | None = None,
    *,
    otherwise: Status = Status.ITERATION_LIMIT,
    largest_penalty: float = float("inf"),
) -> Tensor:
    """``(B,)`` :class:`~declopt.diagnostics.Status` codes: why each problem failed (``SOLVED``
    where it converged), from the evidence a solver leaves: non-finite values (``NUMERICAL``);
    with an augmented Lagrangian's final ``penalty`` and ``point``, its ``largest_penalty`` and a
    persistent violation (``INFEASIBLE``); an objective falling by :data:`UNBOUNDED_GROWTH` of
    its units as the solution leaves the data's scale (``UNBOUNDED``); else ``otherwise``."""
    if bool(converged.all()):
        return torch.full_like(converged, int(Status.SOLVED), dtype=torch.int64)
    f0, g0 = BatchedObjective.of(program, params).value_and_grad(u0)
    data = problem_scale(params, torch.zeros_like(u0))
    unit = f0.abs() + g0.abs().amax(-1) * data
    unit = torch.where(torch.isfinite(unit), unit, torch.ones_like(unit))
    numerical = ~torch.isfinite(objective) | ~torch.isfinite(u).all(-1)
    unbounded = (objective < f0 - UNBOUNDED_GROWTH * unit) & (
        u.abs().amax(-1) > UNBOUNDED_GROWTH * data
    )
    infeasible = torch.zeros_like(converged)
    if penalty is not None and point is not None:
        # The largest penalty and still a violation: no feasible point near the iterates.
        tol = table(u.dtype).converged
        infeasible = (penalty >= largest_penalty) & (point.distance > tol)
    status = torch.full_like(u0[:, 0], int(otherwise), dtype=torch.int64)
    status = torch.where(infeasible, int(Status.INFEASIBLE), status)
    status = torch.where(unbounded, int(Status.UNBOUNDED), status)
    status = torch.where(numerical, int(Status.NUMERICAL), status)
    return torch.where(converged, int(Status.SOLVED), status)
