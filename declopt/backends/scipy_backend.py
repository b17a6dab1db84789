"""The "scipy" backend: one ``scipy.optimize.minimize`` per problem, the slow simple reference.

Every problem of the batch (and every starting point) is solved on its own in float64, with the
objective, gradient, Hessian and constraint Jacobians taken from the declaration's torch functions
by :mod:`torch.func`. The default methods aim at accuracy, not speed, because other backends are
checked against this one:

- unconstrained, ``m <= 256``: ``trust-exact`` (exact Hessians, quadratic convergence);
- unconstrained, larger: ``trust-krylov`` (Hessian-vector products);
- constrained: ``SLSQP``, whose KKT multipliers (SciPy >= 1.15) are returned in the seed
  convention (with ``method="trust-constr"`` too; see :func:`_multipliers`), followed by a few
  Newton steps on the active constraints' KKT system, which take SLSQP's ~1e-8 to ~1e-15.

Every answer is checked against the declaration (primal feasibility, and the KKT conditions when
the multipliers are known: a run SciPy flags as failed still counts when they hold, as SLSQP often
stops with "positive directional derivative" at an exact optimum) before it counts as converged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult, minimize
from torch import Tensor
from torch.func import grad_and_value, hessian, jacrev, jvp

from declopt.backends.base import BatchedParams, Solution
from declopt.backends.starts import usable_starts
from declopt.backends.status import failure_status
from declopt.diagnostics import Status
from declopt.kkt.newton import polish
from declopt.kkt.point import kkt_point
from declopt.kkt.tolerances import problem_scale
from declopt.program import Params, Program

DENSE_MAX_VARIABLES = 256
"""``method="auto"`` uses ``trust-exact`` up to this many variables, ``trust-krylov`` above."""

ACTIVE_TOL = 1e-6
"""After SLSQP, inequalities within ``ACTIVE_TOL`` of their boundary (relative to the row's scale,
see :mod:`declopt.kkt.tolerances`) or with a negative multiplier are taken as active by the Newton
polish (:func:`declopt.kkt.newton.polish`)."""

POLISH_STEPS = 4
"""Newton steps of the polish (quadratic convergence: 4 take ~1e-8 to machine precision)."""

FEASIBILITY_TOL = 1e-7
"""Largest constraint violation of a converged answer (override with ``feasibility_tol=``)."""


_TOLERANCES: dict[str, dict[str, float]] = {
    "SLSQP": {"ftol": 1e-10},  # the Newton polish takes it the rest of the way
    "trust-exact": {"gtol": 1e-12},
    "trust-krylov": {"gtol": 1e-12},
    "trust-ncg": {"gtol": 1e-12},
    "trust-constr": {"gtol": 1e-12, "xtol": 1e-14},
    "L-BFGS-B": {"gtol": 1e-12, "ftol": 1e-15},
    "BFGS": {"gtol": 1e-12},
}


class ScipyBackend:
    """Per-problem ``scipy.optimize.minimize`` with derivatives from the declaration.

    Options (``dl.Layer(..., backend="scipy", **options)``):
        method: ``"auto"`` (see the module docstring) or any ``scipy.optimize.minimize`` method.
        max_iter: iteration cap per run (default: SciPy's, raised to 1000 for SLSQP).
        scipy_options: extra ``options=`` for ``minimize``, merged over declopt's tight defaults.
        feasibility_tol: see :data:`FEASIBILITY_TOL`.
        starts: the layer's starting points; each problem keeps its lowest objective among
            converged runs (all runs if none converged).
    """

    name = "scipy"
    takes_starts = True  # layer(..., warm_start=True) starts from the last solution

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
        scipy_options: dict[str, Any] | None = None,
        feasibility_tol: float = FEASIBILITY_TOL,
    ) -> Solution:
        ref = starts[0]
        size = params.size
        values = tuple(v.detach().to(device="cpu", dtype=torch.float64) for v in params.values)
        if method == "auto":
            method = _default_method(program)
        options = {**_TOLERANCES.get(method, {}), **(scipy_options or {})}
        if max_iter is not None:
            options["maxiter"] = max_iter
        elif method == "SLSQP":
            options["maxiter"] = 1000
        batch = BatchedParams(values, params.in_dims, size)
        u0s = [
            usable_starts(
                program,
                batch,
                s.detach().to(device="cpu", dtype=torch.float64),
                equality_gradients=True,
            ).numpy()
            for s in starts
        ]
        runs = []
        for b in range(size):  # SciPy solves one problem at a time; that is its nature
            x = tuple(v if d is None else v[b] for v, d in zip(values, params.in_dims))
            problem = _ScalarProblem(program, x)
            runs.append(_best([problem.minimize(u0[b], method, options) for u0 in u0s]))
        return self._solution(program, values, params, runs, ref, feasibility_tol)

    def _solution(
        self,
        program: Program,
        values: tuple[Tensor, ...],
        params: BatchedParams,
        runs: list[_Run],
        ref: Tensor,
        feasibility_tol: float,
    ) -> Solution:
        u = torch.as_tensor(np.stack([r.u for r in runs]))
        eq = _stack_multipliers(program, [r.eq for r in runs], program.equalities is not None)
        ineq = _stack_multipliers(program, [r.ineq for r in runs], program.inequalities is not None)
        batch = BatchedParams(values, params.in_dims, params.size)
        multipliers_known = not program.is_constrained or (eq is not None and ineq is not None)
        if multipliers_known:
            # SLSQP stops at ~1e-8 (its QP multipliers and the last step limit it), trust-region
            # methods when rounding in f hides the predicted decrease: with the active set right
            # (empty when unconstrained), Newton on the KKT equations converges quadratically,
            # and a step that raises the KKT residual (a wrong active set) is not taken.
            blocks = [t for t in (eq, ineq) if t is not None]
            lam = torch.cat(blocks, -1) if blocks else u.new_zeros(u.shape[0], 0)
            point = polish(
                program,
                batch,
                u,
                lam,
                problem_scale(batch, u),
                POLISH_STEPS,
                identification=ACTIVE_TOL,
            )
        else:
            point = kkt_point(program, batch, u)
        if program.kinks is not None:  # the declared point carries the kink rows too
            point = kkt_point(
                program,
                batch,
                point.u,
                eq_multipliers=point.eq_multipliers if eq is not None else None,
                ineq_multipliers=point.ineq_multipliers if ineq is not None else None,
            )
        feasible = point.infeasibility <= feasibility_tol
        success = torch.tensor([r.success for r in runs])
        converged = feasible & (success | (point.converged & multipliers_known))
        starts = torch.as_tensor(np.stack([r.start for r in runs]))
        status = failure_status(
            program,
            batch,
            starts,
            point.u,
            point.objective,
            converged,
            otherwise=Status.NOT_CONVERGED,
        )

        def out(t: Tensor) -> Tensor:
            return t.to(dtype=ref.dtype, device=ref.device)

        return Solution(
            u=out(point.u),
            converged=converged.to(ref.device),
            iterations=torch.tensor([r.iterations for r in runs], device=ref.device),
            objective=out(point.objective),
            eq_multipliers=None if eq is None else out(point.eq_multipliers),
            ineq_multipliers=None if ineq is None else out(point.ineq_multipliers),
            kkt_residual=out(point.residual),
            status=status.to(ref.device),
        )


def _default_method(program: Program) -> str:
    if program.is_constrained:
        return "SLSQP"
    return "trust-exact" if program.num_variables <= DENSE_MAX_VARIABLES else "trust-krylov"


@dataclass(frozen=True)
class _Run:
    """One ``minimize`` run: solution, objective, SciPy's verdict, seed-convention multipliers."""

    u: np.ndarray
    objective: float
    success: bool
    iterations: int
    eq: np.ndarray | None
    ineq: np.ndarray | None
    start: np.ndarray


def _best(runs: list[_Run]) -> _Run:
    """The lowest objective among successful runs (among all runs if none succeeded); ties keep
    the earlier start, as the torch backend does."""
    pool = [r for r in runs if r.success] or runs
    return min(pool, key=lambda r: r.objective)


def _stack_multipliers(
    program: Program, rows: list[np.ndarray | None], present: bool
) -> Tensor | None:
    """``(B, k)`` multipliers of one block; ``(B, 0)`` for a constrained program without rows of
    that kind (known and empty, where ``None`` would mean unknown); ``None`` when unconstrained or
    when SciPy did not report them for some problem."""
    if not program.is_constrained:
        return None
    if not present:
        return torch.zeros(len(rows), 0, dtype=torch.float64)
    if any(r is None for r in rows):
        return None
    return torch.as_tensor(np.stack(rows))


class _ScalarProblem:
    """One problem's functions as NumPy callables for SciPy (float64, no batch dim)."""

    def __init__(self, program: Program, x: Params) -> None:
        self.program = program
        self.x = x
        f = lambda u: program.objective(x, u)  # noqa: E731
        self._f = f
        self._grad_and_value = grad_and_value(f)
        self._hessian = hessian(f)
        self._grad = lambda u: self._grad_and_value(u)[0]
        self._h = None if program.equalities is None else (lambda u: program.equalities(x, u))
        self._g = None if program.inequalities is None else (lambda u: program.inequalities(x, u))

    def fun(self, u: np.ndarray) -> tuple[float, np.ndarray]:
        g, f = self._grad_and_value(_tensor(u))
        return float(f), g.numpy()

    def hess(self, u: np.ndarray) -> np.ndarray:
        return self._hessian(_tensor(u)).numpy()

    def hessp(self, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        return jvp(self._grad, (_tensor(u),), (_tensor(p),))[1].numpy()

    def constraints(self) -> list[dict[str, Any]]:
        """SciPy's constraint dicts: equalities ``h = 0``, then inequalities as ``-g >= 0``."""
        out = []
        if self._h is not None:
            out.append({"type": "eq", **_numpy_pair(self._h, 1.0)})
        if self._g is not None:
            out.append({"type": "ineq", **_numpy_pair(self._g, -1.0)})
        return out

    def minimize(self, u0: np.ndarray, method: str, options: dict[str, Any]) -> _Run:
        kwargs: dict[str, Any] = {"method": method, "jac": True, "options": options}
        if method in ("trust-exact", "trust-constr", "Newton-CG", "dogleg", "trust-ncg"):
            kwargs["hess"] = self.hess
        elif method == "trust-krylov":
            kwargs["hessp"] = self.hessp
        if self.program.is_constrained:
            kwargs["constraints"] = self.constraints()
        result = minimize(self.fun, np.array(u0, dtype=np.float64), **kwargs)
        u = np.where(np.isfinite(result.x), result.x, 0.0)  # never hand back NaN
        eq, ineq = _multipliers(result, self.program, self._sizes(u))
        objective = float(self._f(_tensor(u)))
        nit = int(result.get("nit", 0))
        return _Run(u, objective, bool(result.success), nit, eq, ineq, np.asarray(u0))

    def _sizes(self, u: np.ndarray) -> tuple[int, int]:
        t = _tensor(u)
        p = 0 if self._h is None else int(self._h(t).numel())
        q = 0 if self._g is None else int(self._g(t).numel())
        return p, q


def _multipliers(
    result: OptimizeResult, program: Program, sizes: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Seed-convention multipliers ``(lambda_h, lambda_g)`` from a SciPy result, or ``None``.

    SciPy writes ``D_u f = sum_i mu_i D_u c_i`` with ``c_eq = h`` and ``c_ineq = -g >= 0``
    (``mu_ineq >= 0``), so ``lambda_h = mu_eq`` and ``lambda_g = -mu_ineq``. SLSQP reports
    ``multipliers`` (eq block first); trust-constr reports ``v``, one block per constraint dict,
    with the opposite sign (``D_u f + sum_i v_i D_u c_i = 0``).
    """
    if not program.is_constrained:
        return None, None
    p, q = sizes
    if "multipliers" in result and result.multipliers is not None:
        mu = np.asarray(result.multipliers, dtype=np.float64)
    elif "v" in result and result.v is not None:
        mu = -np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in result.v])
    else:
        return None, None
    if mu.shape != (p + q,) or not np.isfinite(mu).all():
        return None, None
    eq = mu[:p] if program.equalities is not None else None
    ineq = -mu[p:] if program.inequalities is not None else None
    return eq, ineq


def _numpy_pair(
    fn: Callable[[Tensor], Tensor], sign: float
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    jac = jacrev(fn)
    return {
        "fun": lambda u: sign * fn(_tensor(u)).detach().numpy(),
        "jac": lambda u: sign * jac(_tensor(u)).detach().numpy(),
    }


def _tensor(u: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(u, dtype=np.float64))
