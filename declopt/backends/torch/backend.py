"""The batched torch backend: any declaration, CPU or GPU, float32 or float64.

Solves all problems of a batch, and all starting points of every problem, in one batched run of
damped Newton (small ``m``) or L-BFGS (large ``m``), then keeps each problem's lowest objective.
Constraints go through an augmented Lagrangian (:mod:`.augmented_lagrangian`); declarations with
kinks (``abs``, ``max``, ``norm1``, ...) through smoothing continuation and a finish on the
identified kinks (:mod:`.nonsmooth`). Constrained and nonsmooth solutions come back with their
KKT point, which the layer's diagnostics and the implicit backward reuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from declopt.backends.base import BatchedParams, Solution
from declopt.backends.starts import usable_starts
from declopt.backends.status import failure_status
from declopt.backends.torch.augmented_lagrangian import RHO_MAX, solve_constrained
from declopt.backends.torch.minimize import MinimizeResult, minimize
from declopt.backends.torch.nonsmooth import solve_nonsmooth
from declopt.derivatives import BatchedObjective
from declopt.kkt.point import kink_margins
from declopt.kkt.point import sizes as program_sizes
from declopt.kkt.tolerances import problem_scale, table
from declopt.linalg import LinearSolver
from declopt.program import Program

NEWTON_MAX_VARIABLES = 128
"""``method="auto"`` uses Newton up to this many variables per problem, L-BFGS above."""


class TorchBackend:
    """Damped Newton / L-BFGS on the whole batch with per-problem masks and line searches.

    Options:
        method: ``"auto"`` (default), ``"newton"`` or ``"lbfgs"``.
        max_iter: iteration cap per problem (default 50 for Newton, 1000 for L-BFGS).
        starts: list of ``(B, m)`` starting points; every problem is solved from each of them and
            keeps the lowest objective among converged runs. The layer fills this in.
        compile: evaluate the objective and its derivatives under ``torch.compile``.
        linear_solver: a :class:`~declopt.linalg.LinearSolver` for the polish and finish steps
            (the layer passes its own).
    """

    name = "torch"
    takes_starts = True  # layer(..., warm_start=True) starts from the last solution
    supports_compile = True
    option_names = ("method", "max_iter", "compile", "linear_solver")

    def supports(self, program: Program) -> str | None:
        return None

    def solve(
        self,
        program: Program,
        params: BatchedParams,
        *,
        starts: Sequence[Tensor],
        method: str = "auto",
        max_iter: int | None = None,
        compile: bool = False,
        linear_solver: LinearSolver = LinearSolver(),
    ) -> Solution:
        if method == "auto":
            method = "newton" if program.num_variables <= NEWTON_MAX_VARIABLES else "lbfgs"
        if method not in ("newton", "lbfgs"):
            raise ValueError(f"unknown method {method!r}; use 'auto', 'newton' or 'lbfgs'")
        num_starts = len(starts)
        all_params = params if num_starts == 1 else params.expand(num_starts)
        with torch.no_grad():
            u0 = usable_starts(program, all_params, torch.cat(list(starts), dim=0))
        options = {"method": method, "max_iter": max_iter, "compile": compile}
        if program.smoothed is not None and program.kinks_isolated:
            with torch.no_grad():
                return _smooth_first(program, all_params, u0, num_starts, linear_solver, options)
        if program.is_constrained or program.smoothed is not None:
            # Declarations with kinks go through smoothing continuation first (nonsmooth.py).
            solve = solve_nonsmooth if program.smoothed is not None else solve_constrained
            with torch.no_grad():
                result = solve(
                    program,
                    all_params,
                    u0,
                    method=method,
                    max_iter=max_iter,
                    compile=compile,
                    linear_solver=linear_solver,
                )
            point = result.point
            status = failure_status(
                program,
                all_params,
                u0,
                point.u,
                point.objective,
                result.converged,
                result.penalty,
                point,
                largest_penalty=RHO_MAX,
            )
            pick = _pick_start(point.objective, result.converged, num_starts, params.size)
            point = point.select(pick) if num_starts > 1 else point
            return Solution(
                status=status[pick],
                u=point.u,
                converged=result.converged[pick],
                iterations=result.iterations.reshape(num_starts, -1).sum(0),
                objective=point.objective,
                eq_multipliers=point.eq_multipliers,
                ineq_multipliers=point.ineq_multipliers,
                kkt_residual=point.residual,
                point=point,
            )
        objective = BatchedObjective.of(program, all_params, compile)
        with torch.no_grad():
            result = minimize(objective, u0, method, max_iter)
            status = failure_status(
                program, all_params, u0, result.u, result.objective, result.converged
            )
        best = _best_start(result, num_starts, params.size)
        pick = _pick_start(result.objective, result.converged, num_starts, params.size)
        return Solution(
            status=status[pick],
            u=best.u,
            converged=best.converged,
            iterations=best.iterations,
            objective=best.objective,
            kkt_residual=best.gradient.abs().amax(-1),
        )


def _smooth_first(
    program: Program,
    params: BatchedParams,
    u0: Tensor,
    num_starts: int,
    linear_solver: LinearSolver,
    options: dict,
) -> Solution:
    """Declarations whose kinks are isolated points (a 2-norm's origin): solve them as smooth,
    then re-solve by smoothing continuation only the problems that end on or near a kink (or did
    not converge). The layer evaluates the declaration's KKT point (kinks included) once."""
    batch = params.size // num_starts
    if program.is_constrained:
        result = solve_constrained(program, params, u0, linear_solver=linear_solver, **options)
        u, converged, f = result.u, result.converged, result.point.objective
        lam = torch.cat([result.point.eq_multipliers, result.point.ineq_multipliers], -1)
    else:
        objective = BatchedObjective.of(program, params, options["compile"])
        result = minimize(objective, u0, options["method"], options["max_iter"])
        u, converged, f = result.u, result.converged, result.objective
        lam = u.new_zeros(u.shape[0], 0)
    iterations = result.iterations
    margins = kink_margins(program, params, u)
    tolerance = table(u.dtype).identification * problem_scale(params, u)
    near = (margins.abs() <= tolerance.unsqueeze(-1)).any(-1) | ~converged
    if bool(near.any()):
        index = near.nonzero().squeeze(-1)
        redo = solve_nonsmooth(
            program, params.select(index), u0[index], linear_solver=linear_solver, **options
        )
        point = redo.point
        u, f, converged, iterations, lam = (
            t.index_copy(0, index, new)
            for t, new in (
                (u, point.u),
                (f, point.objective),
                (converged, redo.converged),
                (iterations, iterations[index] + redo.iterations),
                (lam, torch.cat([point.eq_multipliers, point.ineq_multipliers], -1)),
            )
        )
    status = failure_status(program, params, u0, u, f, converged)
    pick = _pick_start(f, converged, num_starts, batch)
    p = program_sizes(program, u.shape[-1]).p
    constrained = program.is_constrained
    return Solution(
        status=status[pick],
        u=u[pick],
        converged=converged[pick],
        iterations=iterations.reshape(num_starts, -1).sum(0),
        objective=f[pick],
        eq_multipliers=lam[pick, :p] if constrained else None,
        ineq_multipliers=lam[pick, p:] if constrained else None,
    )


def _pick_start(objective: Tensor, converged: Tensor, num_starts: int, batch: int) -> Tensor:
    """Flat indices of each problem's best start: lowest objective among converged runs."""
    f = objective.reshape(num_starts, batch)
    ok = converged.reshape(num_starts, batch)
    score = torch.where(ok, f, torch.full_like(f, float("inf")))
    score = torch.where(~ok.any(0, keepdim=True), f, score)
    score = torch.where(torch.isnan(score), torch.full_like(score, float("inf")), score)
    return score.argmin(0) * batch + torch.arange(batch, device=f.device)


def _best_start(result: MinimizeResult, num_starts: int, batch: int) -> MinimizeResult:
    """Per problem, the start with the lowest objective, preferring converged runs."""
    if num_starts == 1:
        return result
    flat = _pick_start(result.objective, result.converged, num_starts, batch)
    return MinimizeResult(
        u=result.u[flat],
        objective=result.objective[flat],
        gradient=result.gradient[flat],
        converged=result.converged[flat],
        iterations=result.iterations.reshape(num_starts, batch).sum(0),
    )
