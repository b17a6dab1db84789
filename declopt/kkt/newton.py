"""Newton steps on the KKT equations of a held set of rows: the one loop behind the torch
backend's constrained polish, its nonsmooth finish and the scipy backend's polish.

At a :class:`~declopt.kkt.point.KKTPoint` with multipliers ``lambda`` on the held rows ``A``,
linearising ``D_u L = D_u f - A^T lambda = 0`` and ``c_held = 0`` gives

    [ H  A^T ] [ du]   [ -D_u L  ]        H = D2_uu L
    [ A   D  ] [ dz] = [ -c_held ]        lambda_new = lambda - dz

with ``D = 1`` on the rows not held (they solve to zero), so one batched solve serves problems
with different held sets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from declopt.derivatives import BatchedObjective
from declopt.kkt.point import KKTPoint, kkt_point, lagrangian_derivatives, reassess, sizes
from declopt.kkt.tolerances import table
from declopt.linalg import LinearSolver, solve_held_kkt
from declopt.program import BatchedParams, Program


def newton_kkt_step(
    program: Program,
    params: BatchedParams,
    point: KKTPoint,
    *,
    linear_solver: LinearSolver = LinearSolver(),
) -> tuple[Tensor, Tensor]:
    """``(u_new (B, m), lambda_new (B, k))`` after one Newton step (the Schur complement, LU
    where it does not apply, least squares where singular) or MINRES on Hessian-vector
    products, as ``linear_solver`` says."""
    u, held = point.u, point.held
    m = u.shape[-1]
    derivatives = lagrangian_derivatives(program, params, point)
    rows = torch.where(held, point.rows, torch.zeros_like(point.rows))
    if linear_solver.is_dense(m):  # on the held rows alone
        du, dz, _ = solve_held_kkt(
            derivatives.hessian(u), point.jacobian, held, -point.grad_lagrangian, -rows, step=True
        )
    else:  # m Hessian probes would cost more than a few MINRES products
        rhs = torch.cat([-point.grad_lagrangian, -rows], -1)
        step, _ = derivatives.kkt_krylov(u, point.jacobian, held, rhs)
        du, dz = step[:, :m], step[:, m:]
    lam = torch.where(held, point.multipliers - dz, torch.zeros_like(point.multipliers))
    return u + du, lam


def newton_kkt(
    program: Program,
    params: BatchedParams,
    point: KKTPoint,
    evaluate: Callable[[Tensor, Tensor], KKTPoint],
    steps: int,
    *,
    linear_solver: LinearSolver = LinearSolver(),
) -> KKTPoint:
    """Up to ``steps`` Newton-KKT steps from ``point``, each kept per problem only if it lowers
    the relative KKT residual; problems at the rounding floor stop.

    ``evaluate(u, lambda) -> KKTPoint`` makes the point at a trial step (it decides the held
    rows and whether to keep the Newton multipliers or refit them); the point that judged a
    step is the one the next step starts from.
    """
    floor = table(point.u.dtype).floor
    for _ in range(steps):
        if bool((point.relative_residual <= floor).all()):
            break
        u, lam = newton_kkt_step(program, params, point, linear_solver=linear_solver)
        trial = evaluate(u, lam)
        better = torch.isfinite(trial.relative_residual) & (
            trial.relative_residual < point.relative_residual
        )
        point = trial.where(better, point)
        if not bool(better.any()):
            break
    return point


RELEASE_ROUNDS = 3
"""Rounds of :func:`polish`: the first holds every identified row, each later one releases the
inequalities the previous one held with a wrong-sign multiplier."""


def polish(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    lam: Tensor,
    scale: Tensor,
    steps: int,
    *,
    identification: float | None = None,
    linear_solver: LinearSolver = LinearSolver(),
) -> KKTPoint:
    """:func:`newton_kkt` from a solver's near-solution ``(u, lam)`` (``lam = [lam_h; lam_g]``,
    seed convention) on the rows it identifies as active, then the declaration's KKT point there
    (its own activity rule, the polished multipliers; kinks are not rows here).

    A row is identified as active when it is within ``identification`` (relative to its row
    scale; default ``Tolerances.identification``) of its boundary or has a negative multiplier;
    an inequality that comes out of the polish with a positive multiplier is released and the
    polish redone (up to :data:`RELEASE_ROUNDS` times).
    """
    tol = table(u.dtype).identification if identification is None else identification
    count = sizes(program, u.shape[-1])
    p, q = count.p, count.q

    def identified(rows: Tensor, margins: Tensor, norms: Tensor) -> Tensor:
        # The iterate is ~sqrt(eps) accurate: a row within that distance of its boundary, or
        # with a clearly nonzero multiplier, is taken as active.
        g, lam_g = rows[:, p:], lam[:, p:]
        near = g >= -tol * norms[:, p:] * scale.unsqueeze(-1)
        every_h = torch.ones_like(rows[:, :p], dtype=torch.bool)
        return torch.cat([every_h, near | (lam_g < 0)], -1)

    start = kkt_point(
        program, params, u, multipliers=lam, held=identified, with_kinks=False, scale=scale
    )
    held = start.held
    is_inequality = torch.zeros_like(held)
    is_inequality[:, p:] = True
    pending = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
    out: KKTPoint | None = None
    for _ in range(RELEASE_ROUNDS):

        def evaluate(u_new: Tensor, lam_new: Tensor, held: Tensor = held) -> KKTPoint:
            return kkt_point(
                program,
                params,
                u_new,
                multipliers=lam_new,
                held=held,
                with_kinks=False,
                scale=scale,
            )

        begin = reassess(start, multipliers=lam, held=held)
        polished = newton_kkt(program, params, begin, evaluate, steps, linear_solver=linear_solver)
        final = reassess(
            polished,
            eq_multipliers=polished.eq_multipliers if p else None,
            ineq_multipliers=polished.ineq_multipliers if q else None,
        )
        out = final if out is None else final.where(pending, out)
        # An inequality held with a positive multiplier was identified by mistake (a point just
        # inside its bound): release it and polish again from the solver's point.
        wrong = polished.held & is_inequality & (polished.multipliers > 0)
        pending = pending & wrong.any(-1)
        if not bool(pending.any()):
            break
        held = held & ~(wrong & pending.unsqueeze(-1))
    assert out is not None
    if not bool(out.converged.all()):
        # Where f and D_u f both vanish at the solution (a zero-residual least squares), the
        # residual is measured against the size of the gradient's terms, |D2_uu f u| (as the
        # conic backends' answers are): rounding of 1e-16 is then no failure.
        unit = BatchedObjective(program.objective, params).hvp(out.u, out.u).abs().amax(-1)
        unit = torch.where(torch.isfinite(unit), unit, torch.zeros_like(unit))
        again = reassess(
            out,
            eq_multipliers=out.eq_multipliers if p else None,
            ineq_multipliers=out.ineq_multipliers if q else None,
            gradient_unit=unit,
        )
        out = again.where(~out.converged, out)
    return out
