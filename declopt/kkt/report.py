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
from torch.func import vmap

from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import equality_fn, inequality_fn, lagrangian
from declopt.program import BatchedParams, Program


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
    h = vmap(equality_fn(program), in_dims=(params.in_dims, 0))(params.values, u)
    g = vmap(inequality_fn(program), in_dims=(params.in_dims, 0))(params.values, u)
    return h, g


def kkt_report(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    eq_multipliers: Tensor | None,
    ineq_multipliers: Tensor | None,
    kink_multipliers: Tensor | None = None,
) -> KKTReport:
    """The KKT residual pieces of ``u (B, m)`` with multipliers ``(B, p)`` / ``(B, q)``.

    When the program is constrained but a multiplier block is ``None``, stationarity cannot be
    judged and is reported as zero; primal feasibility is always checked. Dual feasibility
    violations (``lambda_g > 0``) count as complementarity violations. With
    ``kink_multipliers (B, K)``, stationarity is that of the Lagrangian with the kink residuals
    (nonsmooth stationarity on the pieces the solution sits on).
    """
    h, g = constraint_rows(program, params, u)
    infeasible = torch.cat([h.abs(), g.clamp_min(0)], dim=-1)
    lam_h = _or_zeros(eq_multipliers, h)
    lam_g = _or_zeros(ineq_multipliers, g)
    known = (h.shape[-1] == 0 or eq_multipliers is not None) and (
        g.shape[-1] == 0 or ineq_multipliers is not None
    )
    with_kinks = kink_multipliers is not None
    lam = torch.cat([lam_h, lam_g, *((kink_multipliers.to(u),) if with_kinks else ())], -1)
    extended = BatchedParams((*params.values, lam), (*params.in_dims, 0), params.size)
    _, d_lagrangian = BatchedObjective(lagrangian(program, with_kinks), extended).value_and_grad(u)
    objective = BatchedObjective(program.objective, params).value(u)
    stationarity = d_lagrangian.abs().amax(-1) if known else torch.zeros_like(objective)
    complementarity = torch.cat([(lam_g * g).abs(), lam_g.clamp_min(0)], dim=-1)
    return KKTReport(
        objective=objective.detach(),
        stationarity=stationarity.detach(),
        infeasibility=_max_or_zero(infeasible),
        complementarity=_max_or_zero(complementarity),
    )


def _or_zeros(value: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if value is None else value.to(like)


def _max_or_zero(rows: Tensor) -> Tensor:
    """Row-wise max of a ``(B, k)`` tensor of nonnegative entries; zero when ``k == 0``."""
    if rows.shape[-1] == 0:
        return rows.new_zeros(rows.shape[0])
    return rows.amax(-1).detach()
