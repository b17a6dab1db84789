"""Batched constrained solver: augmented Lagrangian rounds, each finished by an active-set polish.

Outer loop (Nocedal & Wright, Alg. 17.4, per problem): minimise the augmented Lagrangian with the
unconstrained batched Newton/L-BFGS, update the multipliers ``mu_h += rho h``,
``mu_g = max(0, mu_g + rho g)``, and raise a problem's penalty ``rho`` tenfold when its
infeasibility did not fall by a factor four.

Polish (every round, for the problems not yet done): the augmented Lagrangian reaches
``~sqrt(eps)`` accuracy; the implicit backward is only as good as the forward's KKT residual. So
the rows the iterate identifies as active become equalities and Newton steps on their KKT
equations (:mod:`declopt.kkt.newton`) take the point to machine precision; a step that breaks an
inactive constraint or a multiplier sign raises the residual and is not taken. A problem is done
as soon as its polished point is a KKT point of the declaration (relative residual within
``Tolerances.converged``): once the active set is right (for a QP, after the first round or two)
no further rounds are spent.

Multipliers are returned in the seed convention (``lambda = -mu``, ``lambda_g <= 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from declopt.backends.torch.minimize import minimize
from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import augmented_lagrangian, constraint_fn
from declopt.kkt.newton import polish
from declopt.kkt.point import KKTPoint, sizes
from declopt.kkt.tolerances import problem_scale
from declopt.linalg import LinearSolver
from declopt.program import BatchedParams, Program

MAX_OUTER = 40
POLISH_STEPS = 6
"""Newton-KKT steps per polish (quadratic convergence: a few take ~sqrt(eps) to eps)."""
RHO0 = 10.0
RHO_MAX = 1e10


@dataclass
class ConstrainedResult:
    """The solutions of a flat batch and their KKT point (of the declaration without kinks)."""

    point: KKTPoint
    converged: Tensor  # (B,)
    iterations: Tensor  # (B,)
    penalty: Tensor | None = None  # (B,) the final rho: RHO_MAX where the violation persisted

    @property
    def u(self) -> Tensor:
        return self.point.u


def solve_constrained(
    program: Program,
    params: BatchedParams,
    u0: Tensor,
    *,
    method: str = "newton",
    max_iter: int | None = None,
    compile: bool = False,
    linear_solver: LinearSolver = LinearSolver(),
    multipliers: Tensor | None = None,
) -> ConstrainedResult:
    """Solve a flat batch of constrained problems from ``u0: (B, m)``.

    ``multipliers: (B, p + q)`` (seed convention) warm-start the outer loop, e.g. from a nearby
    problem's solution (the smoothing continuation); default zero.
    """
    batch, m = u0.shape
    count = sizes(program, m)
    p, q = count.p, count.q
    scale = problem_scale(params, u0)
    mu_h, mu_g = u0.new_zeros(batch, p), u0.new_zeros(batch, q)
    if multipliers is not None:
        mu_h, mu_g = -multipliers[:, :p].to(u0), (-multipliers[:, p:].to(u0)).clamp_min(0)
    rho = u0.new_full((batch,), RHO0)
    u = u0
    done = torch.zeros(batch, dtype=torch.bool, device=u0.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=u0.device)
    previous = torch.full((batch,), float("inf"), dtype=u0.dtype, device=u0.device)
    inner_iter = max_iter if max_iter is not None else (50 if method == "newton" else 500)
    fn = augmented_lagrangian(program)
    rows = vmap(constraint_fn(program), in_dims=(params.in_dims, 0))
    best: KKTPoint | None = None
    for _ in range(MAX_OUTER):
        extended = BatchedParams(
            (*params.values, mu_h, mu_g, rho), (*params.in_dims, 0, 0, 0), batch
        )
        objective = BatchedObjective(fn, extended, compile)
        result = minimize(objective, u, method, inner_iter, scale=scale)
        active = ~done
        u = torch.where(active.unsqueeze(-1), result.u, u)
        iterations = iterations + torch.where(active, result.iterations, 0)
        c = rows(params.values, u)
        h, g = c[:, :p], c[:, p:]
        # Infeasibility and complementarity in one measure (N&W 17.4): max(g, -mu_g / rho);
        # only its ratio between rounds is used, so its units do not matter.
        violation = torch.cat([h.abs(), torch.maximum(g, -mu_g / rho.unsqueeze(-1))], -1)
        violation = violation.abs().amax(-1) if violation.shape[-1] else torch.zeros_like(rho)
        new_mu_h = mu_h + rho.unsqueeze(-1) * h
        new_mu_g = torch.clamp(mu_g + rho.unsqueeze(-1) * g, min=0)
        mu_h = torch.where(active.unsqueeze(-1), new_mu_h, mu_h)
        mu_g = torch.where(active.unsqueeze(-1), new_mu_g, mu_g)
        slow = active & (violation > 0.25 * previous)
        rho = torch.where(slow, (rho * 10).clamp(max=RHO_MAX), rho)
        previous = torch.where(active, violation, previous)

        lam = -torch.cat([mu_h, mu_g], -1)
        point = polish(program, params, u, lam, scale, POLISH_STEPS, linear_solver=linear_solver)
        best = point if best is None else point.where(active, best)
        done = done | (active & point.converged)
        if bool(done.all()):
            break
    assert best is not None
    return ConstrainedResult(best, best.converged, iterations, rho)
