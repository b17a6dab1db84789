"""The batched torch backend: any smooth declaration, CPU or GPU, float32 or float64.

Solves all problems of a batch, and all starting points of every problem, in one batched run of
damped Newton (small ``m``) or L-BFGS (large ``m``), then keeps each problem's lowest objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from declopt.backends.base import BatchedParams, Solution
from declopt.backends.unconstrained import MinimizeResult, lbfgs, newton
from declopt.derivatives import BatchedObjective
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
    """

    name = "torch"

    def supports(self, program: Program) -> str | None:
        if program.is_constrained:
            return "the torch backend does not solve constrained problems yet"
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
    ) -> Solution:
        if method == "auto":
            method = "newton" if program.num_variables <= NEWTON_MAX_VARIABLES else "lbfgs"
        if method not in ("newton", "lbfgs"):
            raise ValueError(f"unknown method {method!r}; use 'auto', 'newton' or 'lbfgs'")
        num_starts = len(starts)
        all_params = params if num_starts == 1 else params.expand(num_starts)
        u0 = torch.cat(list(starts), dim=0)
        objective = BatchedObjective(program.objective, all_params, compile)
        with torch.no_grad():
            if method == "newton":
                result = newton(objective, u0, 50 if max_iter is None else max_iter)
            else:
                result = lbfgs(objective, u0, 1000 if max_iter is None else max_iter)
        best = _best_start(result, num_starts, params.size)
        return Solution(
            u=best.u,
            converged=best.converged,
            iterations=best.iterations,
            objective=best.objective,
        )


def _best_start(result: MinimizeResult, num_starts: int, batch: int) -> MinimizeResult:
    """Per problem, the start with the lowest objective, preferring converged runs."""
    if num_starts == 1:
        return result
    f = result.objective.reshape(num_starts, batch)
    converged = result.converged.reshape(num_starts, batch)
    # Rank converged runs first; ties in objective keep the earlier start (argmin is stable).
    score = torch.where(converged, f, torch.full_like(f, float("inf")))
    none_converged = ~converged.any(0)
    score = torch.where(none_converged.unsqueeze(0), f, score)
    pick = score.argmin(0)  # (B,)
    flat = pick * batch + torch.arange(batch, device=pick.device)
    return MinimizeResult(
        u=result.u[flat],
        objective=result.objective[flat],
        gradient=result.gradient[flat],
        converged=result.converged[flat],
        iterations=result.iterations.reshape(num_starts, batch).sum(0),
    )
