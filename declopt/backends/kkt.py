"""KKT residuals of a batch of candidate solutions, from the declaration alone.

Backends that call external solvers (cvxpylayers, scipy) use this to check every answer against the
:class:`~declopt.program.Program` instead of trusting the solver's status, so a failed member of a
batch is reported by index rather than returned silently.

Conventions (seed paper): with ``L = f - lambda^T [h; g]``, a KKT point satisfies
``D_u f = lambda^T D_u [h; g]`` (stationarity), ``h = 0, g <= 0`` (primal feasibility),
``lambda_g <= 0`` (dual feasibility) and ``lambda_g * g = 0`` (complementarity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from declopt.backends.base import BatchedParams
from declopt.program import Params, Program


@dataclass(frozen=True)
class KKTReport:
    """Per-problem pieces of the KKT residual; every field is ``(B,)``, max-abs, ``>= 0``.

    ``stationarity`` is ``max |D_u L|``; it is zero (not judged) for a constrained problem whose
    multipliers are unknown, see :func:`kkt_report`.
    """

    objective: Tensor
    stationarity: Tensor
    infeasibility: Tensor
    complementarity: Tensor

    @property
    def residual(self) -> Tensor:
        """The largest of the three pieces, ``(B,)``: the backend's ``Solution.kkt_residual``."""
        return torch.maximum(
            torch.maximum(self.stationarity, self.infeasibility), self.complementarity
        )


def constraint_rows(program: Program, params: BatchedParams, u: Tensor) -> tuple[Tensor, Tensor]:
    """``h (B, p)`` and ``g (B, q)`` at ``u (B, m)``; empty ``(B, 0)`` where there are none."""
    batch = u.shape[0]
    empty = u.new_zeros(batch, 0)
    h = empty if program.equalities is None else _batched(program.equalities, params)(u)
    g = empty if program.inequalities is None else _batched(program.inequalities, params)(u)
    return h, g


def kkt_report(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    eq_multipliers: Tensor | None,
    ineq_multipliers: Tensor | None,
) -> KKTReport:
    """The KKT residual pieces of ``u (B, m)`` with multipliers ``(B, p)`` / ``(B, q)``.

    Everything is evaluated without autograd history (callers pass detached tensors). When the
    program is constrained but a multiplier block is ``None``, stationarity cannot be judged and is
    reported as zero; primal feasibility is always checked. ``dual feasibility`` violations
    (``lambda_g > 0``) count as complementarity violations.
    """
    h, g = constraint_rows(program, params, u)
    infeasible = torch.cat([h.abs(), g.clamp_min(0)], dim=-1)
    lam_h = _or_zeros(eq_multipliers, h)
    lam_g = _or_zeros(ineq_multipliers, g)
    known = (program.equalities is None or eq_multipliers is not None) and (
        program.inequalities is None or ineq_multipliers is not None
    )

    def lagrangian(x: Params, uu: Tensor, lh: Tensor, lg: Tensor) -> Tensor:
        value = program.objective(x, uu)
        if program.equalities is not None:
            value = value - (lh * program.equalities(x, uu)).sum()
        if program.inequalities is not None:
            value = value - (lg * program.inequalities(x, uu)).sum()
        return value

    mapped = vmap(lagrangian, in_dims=(params.in_dims, 0, 0, 0))
    with torch.enable_grad():
        d_lagrangian = grad(lambda uu: mapped(params.values, uu, lam_h, lam_g).sum())(u)
    objective = vmap(program.objective, in_dims=(params.in_dims, 0))(params.values, u)
    stationarity = d_lagrangian.abs().amax(-1) if known else torch.zeros_like(objective)
    complementarity = torch.cat([(lam_g * g).abs(), lam_g.clamp_min(0)], dim=-1)
    return KKTReport(
        objective=objective.detach(),
        stationarity=stationarity.detach(),
        infeasibility=_max_or_zero(infeasible),
        complementarity=_max_or_zero(complementarity),
    )


def _batched(fn, params: BatchedParams):
    mapped = vmap(fn, in_dims=(params.in_dims, 0))
    return lambda u: mapped(params.values, u)


def _or_zeros(value: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if value is None else value.to(like)


def _max_or_zero(rows: Tensor) -> Tensor:
    """Row-wise max of a ``(B, k)`` tensor of nonnegative entries; zero when ``k == 0``."""
    if rows.shape[-1] == 0:
        return rows.new_zeros(rows.shape[0])
    return rows.amax(-1).detach()
