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

Every answer is checked against the declaration (primal feasibility, and stationarity when the
multipliers are known) before it counts as converged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult, minimize
from torch import Tensor
from torch.func import grad, grad_and_value, hessian, jacrev, jvp

from declopt.backends.base import BatchedParams, Solution
from declopt.kkt.report import kkt_report
from declopt.program import Params, Program

DENSE_MAX_VARIABLES = 256
"""``method="auto"`` uses ``trust-exact`` up to this many variables, ``trust-krylov`` above."""

ACTIVE_TOL = 1e-6
"""After SLSQP, inequalities with ``g >= -ACTIVE_TOL`` or ``lambda <= -ACTIVE_TOL`` are taken as
active by the Newton polish (see :meth:`_ScalarProblem.polish`)."""

POLISH_STEPS = 4
"""Newton steps of the polish (quadratic convergence: 4 take ~1e-8 to machine precision)."""

FEASIBILITY_TOL = 1e-7
"""Largest constraint violation of a converged answer (override with ``feasibility_tol=``)."""

STATIONARITY_RTOL = 1e-6
"""A run that SciPy flags as failed still counts as converged when it is feasible and
``max |D_u L| <= STATIONARITY_RTOL * (1 + |f|)`` (SLSQP often stops with "positive directional
derivative" at an exact optimum when asked for full precision)."""

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
        u0s = [s.detach().to(device="cpu", dtype=torch.float64).numpy() for s in starts]
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
        report = kkt_report(program, batch, u, eq, ineq)
        feasible = report.infeasibility <= feasibility_tol
        success = torch.tensor([r.success for r in runs])
        stationary = report.stationarity <= STATIONARITY_RTOL * (1 + report.objective.abs())
        multipliers_known = not program.is_constrained or (eq is not None and ineq is not None)
        converged = feasible & (success | (stationary & multipliers_known))
        return Solution(
            u=u.to(dtype=ref.dtype, device=ref.device),
            converged=converged.to(ref.device),
            iterations=torch.tensor([r.iterations for r in runs], device=ref.device),
            objective=report.objective.to(dtype=ref.dtype, device=ref.device),
            eq_multipliers=None if eq is None else eq.to(dtype=ref.dtype, device=ref.device),
            ineq_multipliers=None if ineq is None else ineq.to(dtype=ref.dtype, device=ref.device),
            kkt_residual=report.residual.to(dtype=ref.dtype, device=ref.device),
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
        if self._known(eq, ineq):
            u, eq, ineq = self.polish(u, eq, ineq)
        objective = float(self._f(_tensor(u)))
        return _Run(u, objective, bool(result.success), int(result.get("nit", 0)), eq, ineq)

    def polish(
        self, u: np.ndarray, eq: np.ndarray | None, ineq: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """A few Newton steps on the KKT system of the constraints active at SciPy's answer.

        SLSQP stops at ~1e-8 (its QP multipliers and the last step limit it), and trust-region
        methods stop when rounding in ``f`` hides the predicted decrease. With the active set right
        (empty when unconstrained), Newton on ``[D_u f - J^T lambda; c] = 0`` (``c`` the
        equalities and active inequalities, ``J = D_u c``) converges quadratically to machine
        precision. The polished point is kept only if its KKT residual (which also counts the
        inactive rows and the sign of the multipliers) is no larger, so a wrong active set costs
        nothing.
        """
        t = _tensor(u)
        lam_h = _tensor(eq) if eq is not None else t.new_zeros(0)
        lam_g = _tensor(ineq) if ineq is not None else t.new_zeros(0)
        g0 = self._rows(t)[lam_h.numel() :]
        active = (g0 >= -ACTIVE_TOL) | (lam_g <= -ACTIVE_TOL)
        p = lam_h.numel()

        def rows(uu: Tensor) -> Tensor:
            r = self._rows(uu)
            return torch.cat([r[:p], r[p:][active]])

        def lagrangian(uu: Tensor, lam: Tensor) -> Tensor:
            return self._f(uu) - (lam * rows(uu)).sum()

        lam = torch.cat([lam_h, lam_g[active]])
        m = t.numel()
        for _ in range(POLISH_STEPS):
            residual = torch.cat([grad(lagrangian)(t, lam), rows(t)])
            if float(residual.abs().max()) <= 1e-15:
                break
            H = hessian(lagrangian)(t, lam)
            J = jacrev(rows)(t)
            k = J.shape[0]
            K = torch.cat([torch.cat([H, -J.T], 1), torch.cat([J, t.new_zeros(k, k)], 1)], 0)
            step = torch.linalg.lstsq(K, -residual.unsqueeze(-1)).solution.squeeze(-1)
            t, lam = t + step[:m], lam + step[m:]
        new_g = torch.zeros_like(lam_g)
        new_g[active] = lam[p:]
        before = self._kkt(_tensor(u), lam_h, lam_g)
        after = self._kkt(t, lam[:p], new_g)
        if not after <= before:  # also rejects NaN
            return u, eq, ineq
        polished_eq = lam[:p].numpy() if eq is not None else None
        polished_ineq = new_g.numpy() if ineq is not None else None
        return t.numpy(), polished_eq, polished_ineq

    def _rows(self, u: Tensor) -> Tensor:
        """``[h; g]`` at ``u`` (empty when unconstrained)."""
        parts = [fn(u).reshape(-1) for fn in (self._h, self._g) if fn is not None]
        return torch.cat(parts) if parts else u.new_zeros(0)

    def _kkt(self, u: Tensor, lam_h: Tensor, lam_g: Tensor) -> float:
        """Max of stationarity, infeasibility and multiplier-sign violation at ``u``."""
        lam = torch.cat([lam_h, lam_g])
        stationarity = grad(lambda uu: self._f(uu) - (lam * self._rows(uu)).sum())(u)
        r = self._rows(u)
        p = lam_h.numel()
        pieces = [stationarity.abs(), r[:p].abs(), r[p:].clamp_min(0), lam_g.clamp_min(0)]
        return float(torch.cat(pieces).max())

    def _known(self, eq: np.ndarray | None, ineq: np.ndarray | None) -> bool:
        return (self._h is None or eq is not None) and (self._g is None or ineq is not None)

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
