"""The ``"cone"`` backend: DPP-convex declarations solved as cone programs in batched torch.

CVXPY canonicalises the declaration once (:mod:`.canonical`); each call builds the batch's cone
programs from the parameters in one pass, solves them together with the interior-point method
(:mod:`.ipm`) on the parameters' device, and maps the answers back to the layer's variables and
multipliers. The backward is declopt's implicit backward at that primal-dual point (the same one
formula as for every backend: equality, active and weakly active inequality rows, kinks), so
``degenerate=``, the diagnostics and ``layer.info`` behave as everywhere else.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from declopt.backends.base import BatchedParams, Solution
from declopt.backends.cone.canonical import CanonicalProgram, Unsupported, canonicalise
from declopt.backends.cone.ipm import Settings, solve
from declopt.backends.cvxpy_source import AnswerJudge
from declopt.diagnostics import Status
from declopt.frontend.dpp import dpp_culprit
from declopt.kkt.point import sizes
from declopt.kkt.tolerances import for_accuracy
from declopt.program import Program

__all__ = ["ConeBackend"]

DEFAULT_TOL = {torch.float64: 1e-9, torch.float32: 1e-7}
"""The interior-point method's relative stopping tolerance by the *layer's* dtype (the solve
itself runs in float64 unless ``working_dtype=`` says otherwise): float64 answers get two digits
beyond CVXPY's solvers' 1e-8, which the implicit gradients need (a KKT point accurate to ``t``
gives gradients accurate to about ``t`` times the KKT system's conditioning); float32 answers
only need float32's. Computing *in* float32 (``working_dtype=None`` on float32 inputs) the method
stops at :data:`FLOAT32_WORKING_TOL`."""

FLOAT32_WORKING_TOL = 1e-6
"""The stopping tolerance when the interior point computes in float32: measured on the
50-variable QP at batch 64, 1e-7 left 15 of 16 problems at a failed factorisation (residuals at
float32's rounding), 1e-6 solved 64 of 64 in 8 iterations, solutions within 3e-5 (relative) of
float64's."""


AUTO_MAX_COLUMNS = 100
"""``backend="auto"`` picks this backend for cone programs with at most this many columns after
presolve, or with a block-arrow plan (:mod:`.arrow`) whatever their size. Dense batched
factorisations cost ``O(B n^3)`` per iteration: measured (``benchmarks/backends.py``, one
thread, float64, forward+backward) the dense interior point is 6-50x faster than the torch
backend and 3-7x faster than cvxpylayers on the 50-variable QP and the 2-variable L1 problem,
but was 51-56x slower than the torch backend and slower than cvxpylayers' sparse SCS on Huber
pooling n=64 (129 columns) and the L2-ball projection d=256 (257 columns); with their
block-arrow plans it runs them 2.2x and 3.7x faster than cvxpylayers (and 23x and 3.6x slower
than the torch backend, which ``Auto(prefer="torch")`` keeps them on)."""


class ConeBackend:
    """DPP-convex declarations with zero, nonnegative and second-order cones, solved in batches
    by a primal-dual interior-point method in torch (CPU or GPU).

    Options (``dl.Layer(..., backend="cone", **options)``):
        tol: relative stopping tolerance (default :data:`DEFAULT_TOL` of the layer's dtype).
        max_iter: interior-point iterations per problem (default 100; they typically take
            10-25).
        working_dtype: the dtype the solver computes in (default ``torch.float64``; ``None``: the
            parameters' dtype, e.g. float32 on a GPU where float64 is slow).

    Problems the method proves infeasible or unbounded come back with ``converged=False``, the
    status ``INFEASIBLE`` / ``UNBOUNDED`` (from the certificate) and ``u = 0``; the rest of the
    batch is unaffected.
    """

    name = "cone"
    option_names = ("tol", "max_iter", "working_dtype")

    def __init__(self) -> None:
        self._canonical: weakref.WeakKeyDictionary[Program, CanonicalProgram | str] = (
            weakref.WeakKeyDictionary()
        )

    def supports(self, program: Program) -> str | None:
        if program.source is None:
            return (
                "the cone backend needs the CVXPY declaration; this program was given as "
                "torch functions"
            )
        if not program.has_functions:
            return (
                "declopt's implicit backward needs the torch front end, which cannot compile "
                f"this declaration ({program.frontend_error}); use backend='cvxpylayers'"
            )
        if program.log_log:
            return (
                "log-log (gp=True) programs are not supported (its canonicalisation reads the "
                "declaration, which is not DCP); use backend='torch' or 'cvxpylayers'"
            )
        culprit = dpp_culprit(program.source[0])
        if culprit is not None or not (program.is_convex and program.is_dpp):
            why = culprit or "it is not DPP-convex"
            return f"the cone backend takes DPP-convex problems only ({why}); use backend='torch'"
        canonical = self.canonical(program)
        return canonical if isinstance(canonical, str) else None

    def auto_refusal(self, program: Program) -> str | None:
        """Why ``backend="auto"`` should not pick this backend for ``program`` (see
        :data:`AUTO_MAX_COLUMNS`), or ``None``."""
        refusal = self.supports(program)
        if refusal is not None:
            return refusal
        canonical = self.canonical(program)
        assert not isinstance(canonical, str)
        columns = canonical.elimination.kept_columns.numel()
        if columns > AUTO_MAX_COLUMNS and canonical.arrow is None:
            return (
                f"its cone program has {columns} columns after presolve and no sparsity its "
                f"interior point can exploit (auto uses its dense factorisations up to "
                f"{AUTO_MAX_COLUMNS}; backend='cone' forces it)"
            )
        return None

    def canonical(self, program: Program) -> CanonicalProgram | str:
        """The program's cone program (built once), or why it has none."""
        cached = self._canonical.get(program)
        if cached is None:
            problem, parameters, variables = program.source  # type: ignore[misc]
            count = sizes(program, program.num_variables)
            try:
                cached = canonicalise(problem, parameters, variables, count.p, count.q)
            except Unsupported as error:
                cached = f"the cone backend cannot take it: {error}"
            self._canonical[program] = cached
        return cached

    def solve(
        self,
        program: Program,
        params: BatchedParams,
        *,
        starts: Sequence[Tensor] = (),
        tol: float | None = None,
        max_iter: int = 100,
        working_dtype: torch.dtype | None = torch.float64,
    ) -> Solution:
        canonical = self.canonical(program)
        if isinstance(canonical, str):
            raise ValueError(canonical)
        ref = params.values[0] if params.values else starts[0]
        dtype = ref.dtype
        work = dtype if working_dtype is None else working_dtype
        if tol is None:
            tol = FLOAT32_WORKING_TOL if work == torch.float32 else DEFAULT_TOL.get(dtype, 1e-9)
        tol = float(tol)
        with torch.no_grad():
            detached = BatchedParams(
                tuple(v.detach() for v in params.values), params.in_dims, params.size
            )
            batch = canonical.data(detached, work)
            result = solve(batch.data, Settings(tol=tol, max_iter=max_iter))
            solved = result.status == int(Status.SOLVED)
            u, eq, ineq = canonical.unpack(batch, result.x, result.z)
            keep = solved.unsqueeze(-1)
            u = torch.where(keep, u, torch.zeros_like(u)).to(dtype)
            eq = None if eq is None else torch.where(keep, eq, torch.zeros_like(eq)).to(dtype)
            ineq = (
                None if ineq is None else torch.where(keep, ineq, torch.zeros_like(ineq)).to(dtype)
            )
            if not program.is_constrained:
                eq = ineq = None
            tolerances = for_accuracy(dtype, max(tol, torch.finfo(work).eps ** 0.5 * 1e-1))
            point = AnswerJudge(program, detached, tolerances)(u, eq, ineq)
        return Solution(
            u=u,
            converged=solved,
            iterations=result.iterations,
            objective=point.objective,
            eq_multipliers=eq,
            ineq_multipliers=ineq,
            kkt_residual=point.residual,
            point=point,
            status=result.status,
        )
