"""The "cvxpylayers" backend: DPP-convex declarations solved by ``cvxpylayers.torch.CvxpyLayer``.

cvxpylayers canonicalises the problem once into a parametrised cone program and solves a batch of
them with diffcp (SCS by default); its native backward differentiates the cone program. This module
adapts it to declopt's contract:

- **One build per program.** The ``CvxpyLayer`` is built on first use from ``Program.source`` and
  cached for the life of the program.
- **Multipliers.** The layer also returns the dual variable of every constraint, mapped to the
  seed convention ``lambda = -y`` (CVXPY's duals ``y`` enter the Lagrangian as ``f + y^T r``, with
  ``y >= 0`` for ``r <= 0``). Variable attributes (``nonneg=True``, ``bounds=``) are first lowered
  to explicit constraints so that their rows get multipliers too, in the front end's row order.
- **Batches.** The layer already flattens batch dims to one (``B``); shared parameters are passed
  unbatched (cvxpylayers broadcasts them). cvxpylayers computes in float64 on the CPU: inputs are
  converted (differentiably) and the outputs converted back to the inputs' dtype and device.
- **Per-problem failures.** diffcp raises for the whole batch when one member is infeasible or
  unbounded, and only warns when SCS stops at its iteration cap; the batch is then bisected until
  the culprits are isolated. Every answer is also checked for primal feasibility against the
  declaration (Clarabel returns infeasible points without raising). Failed members come back as
  ``u = 0``, zero multipliers and ``converged = False`` (finite, never NaN); with the native
  backward they receive no gradient. ``kkt_residual`` (stationarity with the solver's multipliers,
  feasibility, complementarity) is reported for every member; it does not enter the verdict,
  because at a kink of a nonsmooth objective (``abs``, ``norm1``) the gradient is not defined.
"""

from __future__ import annotations

import traceback
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import cvxpy as cp
import torch
from cvxpy.constraints import SOC
from torch import Tensor

from declopt.backends.base import BatchedParams, Solution
from declopt.backends.cvxpy_source import (
    AnswerJudge,
    constraint_kinds,
    dual_rows,
    lower_domains,
    num_rows,
    symmetry_rows,
)
from declopt.diagnostics import Status
from declopt.frontend.dpp import dpp_culprit
from declopt.kkt.point import KKTPoint
from declopt.kkt.tolerances import for_accuracy
from declopt.program import Program

DEFAULT_SOLVER_ARGS: dict[str, Any] = {"eps": 1e-8, "max_iters": 100_000}
"""SCS settings (diffcp's default cone solver) unless ``solver_args=`` overrides them. SCS's own
default (``eps = 1e-4``) leaves solutions off by ~1e-3 (and gradients by more); ``1e-8`` brings
the forward within ~1e-8 of the other backends on the test problems at about 1.5x the time.
Tighter is not better: on unscaled regression data (diabetes, ridge) ``1e-10`` ran into
``max_iters`` (30 s for 5 problems) while ``1e-8`` converged in 0.15 s. Members that SCS solves
only inaccurately are reported as not converged (loosen ``eps``, rescale the data, or pass
``solve_method="Clarabel"``)."""

DENSE_DERIVATIVE_MAX = 300
"""``derivative_mode="auto"`` uses diffcp's ``"dense"`` derivative (a direct solve with the
residual map) when the cone program has at most this many rows + columns, and ``"lsmr"`` (at
tolerance 1e-10) above. diffcp's default, ``"lsqr"``, stops early: on 9-point Huber pooling its
gradients were off by 1e-4 relative, ``"lsmr"``'s by 8e-7 and ``"dense"``'s by 2e-12. Dense costs
O(size^3) per problem (70 ms at size 640), lsmr ~3x lsqr's backward."""

FEASIBILITY_TOL = 1e-6
"""An answer whose constraint violation ``max(|h|, max(g, 0))`` exceeds this is reported as not
converged (override with ``feasibility_tol=``)."""

ACCURACY_OPTIONS = (
    "eps",
    "eps_abs",
    "eps_rel",
    "tol_feas",
    "tol_gap_abs",
    "tol_gap_rel",
    "feastol",
    "abstol",
    "reltol",
)
"""Stopping tolerances of the cone solvers (SCS; Clarabel; ECOS) in ``solver_args``: the largest
given is the accuracy the answers are judged with (:func:`declopt.kkt.tolerances.for_accuracy`);
``1e-8`` (all three solvers' defaults here, SCS through :data:`DEFAULT_SOLVER_ARGS`) otherwise."""


# ---------------------------------------------------------------------------------------------
# building the CvxpyLayer


@dataclass(frozen=True)
class CompiledCvxpyLayer:
    """A ``CvxpyLayer`` over the variables and, after them, one dual per constraint.

    ``layer(*params)`` returns ``num_variables`` primal tensors followed by the duals;
    ``eq_duals``/``ineq_duals`` index those outputs in the row order of ``Program.equalities`` /
    ``Program.inequalities``, which have ``num_eq`` / ``num_ineq`` rows in all. ``eq_known``
    is False where the program has equality rows CVXPY has no dual for (the symmetry rows of a
    ``symmetric=True`` variable); ``ineq_known`` is False where a ``cp.SOC`` constraint holds
    several cones (cvxpylayers 1.x returns the first entries of its raw cone dual for
    ``dual_variables[0]``, not the duals of the ``t``s, which it is for a single cone). Those
    multipliers are then fitted by least squares. ``ineq_constraints`` are the inequality
    constraints (their duals map onto rows by :func:`~declopt.backends.cvxpy_source.dual_rows`).
    ``has_duals`` False: the layer returns no multipliers of the program's rows (a source
    layer). ``inverse``: the primal outputs are in the program's output space and map to its
    variables ``u`` through this (``Program.output_transform.inverse``: a log-log program's log).
    """

    layer: Any  # cvxpylayers.torch.CvxpyLayer
    num_variables: int
    eq_duals: tuple[int, ...]
    ineq_duals: tuple[int, ...]
    num_eq: int
    num_ineq: int
    ineq_constraints: tuple[Any, ...]
    eq_known: bool = True
    ineq_known: bool = True
    has_duals: bool = True
    inverse: Callable[[Tensor], Tensor] | None = None

    def pack(self, outputs: Sequence[Tensor]) -> Packed:
        """The layer's outputs for ``n`` problems as ``u (n, m)`` and the seed-convention
        multipliers ``(n, p)``, ``(n, q)`` (detached: the native backward is through ``u``)."""
        n = outputs[0].shape[0]
        flat = [o.reshape(n, -1) for o in outputs]
        u = torch.cat(flat[: self.num_variables], dim=-1)
        if self.inverse is not None:
            u = self.inverse(u)
        # CVXPY's duals y enter the Lagrangian as f + y^T r; the seed's is L = f - lambda^T r.
        eq = [-flat[i].detach() for i in self.eq_duals]
        ineq = [
            -dual_rows(c, outputs[i].detach())
            for c, i in zip(self.ineq_constraints, self.ineq_duals)
        ]
        return Packed(u, _cat_rows(eq, n, u), _cat_rows(ineq, n, u))


@dataclass(frozen=True)
class Packed:
    """Solutions of ``n`` problems: ``u (n, m)``, ``eq (n, p)``, ``ineq (n, q)`` (float64)."""

    u: Tensor
    eq: Tensor
    ineq: Tensor

    def where(self, keep: Tensor) -> Packed:
        """Rows where ``keep (n,)`` is False replaced by zeros."""
        k = keep.unsqueeze(-1)
        return Packed(
            torch.where(k, self.u, torch.zeros_like(self.u)),
            torch.where(k, self.eq, torch.zeros_like(self.eq)),
            torch.where(k, self.ineq, torch.zeros_like(self.ineq)),
        )


def _cat_rows(blocks: list[Tensor], n: int, like: Tensor) -> Tensor:
    return torch.cat(blocks, dim=-1) if blocks else like.new_zeros(n, 0).detach()


def build_source_layer(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    outputs: Sequence[cp.Variable],
    **layer_options: Any,
) -> CompiledCvxpyLayer:
    """The ``CvxpyLayer`` of a source-only program: exactly ``outputs`` (primal variables and/or
    dual variables, as cvxpylayers takes them), no multipliers; its construction errors
    (``ValueError("Problem must be DPP.")``, ...) are cvxpylayers' own."""
    from cvxpylayers.torch import CvxpyLayer

    layer = CvxpyLayer(
        problem, parameters=list(parameters), variables=list(outputs), **layer_options
    )
    return CompiledCvxpyLayer(layer, len(outputs), (), (), 0, 0, (), has_duals=False)


def build_cvxpylayer(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    variables: Sequence[cp.Variable],
    **layer_options: Any,
) -> CompiledCvxpyLayer:
    """Build the ``CvxpyLayer`` the backend calls for ``(problem, parameters, variables)``.

    Variable attributes (sign, bounds) are lowered first to explicit constraints, appended after
    the problem's own, which is the order of :func:`declopt.frontend.compile_problem`'s rows.
    ``layer_options`` go to ``CvxpyLayer`` (e.g. ``solver=``).

    Raises:
        ValueError: the problem is not DPP (the message names the subexpression).
    """
    from cvxpylayers.torch import CvxpyLayer  # imported on first use: it is slow to import

    culprit = dpp_culprit(problem)
    if culprit is not None:
        raise ValueError(_not_dpp_message(culprit))
    symmetric = symmetry_rows(variables)
    problem, variables = lower_domains(problem, variables)
    eqs, ineqs = constraint_kinds(problem)
    duals = [c.dual_variables[0] for c in (*eqs, *ineqs)]
    layer = CvxpyLayer(
        problem, parameters=list(parameters), variables=[*variables, *duals], **layer_options
    )
    k = len(variables)
    return CompiledCvxpyLayer(
        layer=layer,
        num_variables=k,
        eq_duals=tuple(range(k, k + len(eqs))),
        ineq_duals=tuple(range(k + len(eqs), k + len(eqs) + len(ineqs))),
        num_eq=sum(num_rows(c) for c in eqs),
        num_ineq=sum(num_rows(c) for c in ineqs),
        ineq_constraints=tuple(ineqs),
        eq_known=symmetric == 0,
        ineq_known=all(c.num_cones() == 1 for c in ineqs if isinstance(c, SOC)),
    )


def _not_dpp_message(culprit: str) -> str:
    return (
        f"cvxpylayers only takes DPP-convex problems, and this one is not: {culprit}. "
        "Use backend='torch' (or 'auto'), which solves any smooth declaration, "
        "or rewrite that part to follow CVXPY's DPP rules."
    )


# ---------------------------------------------------------------------------------------------
# the backend


class CvxpyLayersBackend:
    """DPP-convex problems through cvxpylayers (diffcp + SCS), with its native backward.

    Options (``dl.Layer(..., backend="cvxpylayers", **options)``):
        solver_args: dict for diffcp / the cone solver, merged over :data:`DEFAULT_SOLVER_ARGS`
            (e.g. ``{"solve_method": "Clarabel"}``, ``{"eps": 1e-6}``).
        max_iter: the cone solver's iteration cap (SCS's ``max_iters``, Clarabel's ``max_iter``).
        derivative_mode: diffcp's ``mode`` for the native backward (``"dense"``, ``"lsqr"``,
            ``"lsmr"``, ...); ``"auto"`` (default): see :data:`DENSE_DERIVATIVE_MAX`.
        n_jobs: threads diffcp uses across the batch (``-1``: one per core; its default).
            diffcp's own keys given in ``solver_args`` (``mode``, ``n_jobs_forward``,
            ``n_jobs_backward``; ``eps_abs`` / ``eps_rel``, which then replace the default
            ``eps``) take precedence, as cvxpylayers passes them through.
        feasibility_tol: see :data:`FEASIBILITY_TOL`.
        on_solver_error: ``"isolate"`` (default: bisect a batch diffcp rejects, failed members
            come back as zeros with ``converged=False``) or ``"raise"`` (cvxpylayers' own
            behaviour: diffcp's ``SolverError`` propagates for the whole batch, and answers are
            returned as the solver gave them).
        layer_options: keyword arguments for ``cvxpylayers.torch.CvxpyLayer`` itself
            (``solver=``, ``verbose=``, ``canon_backend=``); one layer is built per distinct set.

    Source-only programs (``Program.has_functions`` False: exponential / power cones, dual
    variables as outputs, ...) are solved as declared, with the native backward
    only; there is no declaration to check answers against, so ``objective`` and
    ``kkt_residual`` are NaN and ``converged`` is the solver's verdict.

    Log-log programs (``gp=True``) are solved as declared too (``CvxpyLayer(..., gp=True)`` on
    ``Program.source``); a compiled one's answers are mapped to its log-space variables
    (``u = log x``) and checked against its torch functions like any other, with multipliers
    fitted by least squares (cvxpylayers' duals are those of the declared rows).

    ``starts`` (initial points) are ignored: conic solvers start from their own point.
    """

    name = "cvxpylayers"
    advice: ClassVar[dict[Status, str]] = {
        Status.ITERATION_LIMIT: "raise max_iter= (SCS's max_iters) or loosen solver_args "
        "(e.g. {'eps': 1e-6}); badly scaled data slows SCS: rescale it, or pass "
        "solver_args={'solve_method': 'Clarabel'}",
        Status.NOT_CONVERGED: "the cone solver failed or was inaccurate: loosen solver_args "
        "(e.g. {'eps': 1e-6}), rescale the data, or pass solver_args={'solve_method': "
        "'Clarabel'}",
    }
    """What to do about a failed member here (:func:`declopt.diagnostics.status_summary`)."""
    native_backward = True
    default_backward = "native"
    takes_source_only = True
    call_options = ("solver_args",)

    def __init__(self) -> None:
        self._compiled: weakref.WeakKeyDictionary[Program, dict[str, CompiledCvxpyLayer]] = (
            weakref.WeakKeyDictionary()
        )

    def supports(self, program: Program) -> str | None:
        if program.source is None:
            return (
                "cvxpylayers needs the CVXPY declaration (Program.source); this program was "
                "given as torch functions. Use backend='torch' or 'scipy'"
            )
        problem, parameters, _ = program.source
        if not parameters:
            return "cvxpylayers needs at least one parameter; use backend='torch'"
        if program.log_log:
            if not program.is_dpp:
                return "cvxpylayers takes log-log programs only when they are DGP under DPP"
        else:
            culprit = dpp_culprit(problem)
            if culprit is not None:
                return _not_dpp_message(culprit)
        try:
            import cvxpylayers.torch  # noqa: F401
        except ImportError:
            return "cvxpylayers is not installed (pip install cvxpylayers)"
        return None

    def compiled(
        self, program: Program, layer_options: dict[str, Any] | None = None
    ) -> CompiledCvxpyLayer:
        """The cached ``CvxpyLayer`` of ``program`` (built on first call per ``layer_options``,
        the keyword arguments of ``cvxpylayers.torch.CvxpyLayer``)."""
        options = dict(layer_options or {})
        key = repr(sorted(options.items()))
        cache = self._compiled.setdefault(program, {})
        compiled = cache.get(key)
        if compiled is None:
            if program.has_functions and not program.log_log:
                reason = self.supports(program)
                if reason is not None:
                    raise ValueError(reason)
                compiled = build_cvxpylayer(*program.source, **options)  # type: ignore[misc]
            else:
                # A log-log program goes to cvxpylayers as declared, with gp=True; compiled,
                # its source lists every variable and the answers enter u through the log.
                if program.log_log:
                    options["gp"] = True
                compiled = build_source_layer(*program.source, **options)  # type: ignore[misc]
                if program.has_functions and program.output_transform is not None:
                    compiled = replace(compiled, inverse=program.output_transform.inverse)
            cache[key] = compiled
        return compiled

    def solve(
        self,
        program: Program,
        params: BatchedParams,
        *,
        starts: Sequence[Tensor] = (),
        differentiable: bool = False,
        solver_args: dict[str, Any] | None = None,
        max_iter: int | None = None,
        derivative_mode: str = "auto",
        n_jobs: int = -1,
        feasibility_tol: float = FEASIBILITY_TOL,
        on_solver_error: str = "isolate",
        layer_options: dict[str, Any] | None = None,
    ) -> Solution:
        if on_solver_error not in ("isolate", "raise"):
            raise ValueError(
                f"on_solver_error must be 'isolate' or 'raise', got {on_solver_error!r}"
            )
        compiled = self.compiled(program, layer_options)
        ref = starts[0] if starts else params.values[0]
        size = params.size
        if _takes_diffcp_args(layer_options):
            args = _solver_args(solver_args or {}, max_iter)
            # diffcp's own keys in solver_args win over declopt's keywords (cvxpylayers passes
            # solver_args through as they are).
            args.setdefault("n_jobs_forward", n_jobs)
            if derivative_mode == "auto" and hasattr(compiled.layer.ctx.solver_ctx, "A_shape"):
                rows, columns = compiled.layer.ctx.solver_ctx.A_shape
                derivative_mode = "dense" if rows + columns <= DENSE_DERIVATIVE_MAX else "lsmr"
            if derivative_mode != "auto":
                args.setdefault("mode", derivative_mode)
        else:  # another cvxpylayers solver (MOREAU, a custom one): its solver_args as given
            args = dict(solver_args or {})
        values = tuple(v.to(device="cpu", dtype=torch.float64) for v in params.values)
        if not differentiable:
            values = tuple(v.detach() for v in values)
        detached = BatchedParams(tuple(v.detach() for v in values), params.in_dims, size)
        judge = AnswerJudge(program, detached, for_accuracy(torch.float64, _accuracy(args)))
        solver = _BatchSolver(compiled, program.num_variables, values, params.in_dims, args)
        grad_mode = torch.enable_grad if differentiable else torch.no_grad
        solver.isolate = on_solver_error == "isolate"
        with grad_mode():
            packed, solved = solver.solve(torch.arange(size))
        if not program.has_functions:
            return _source_solution(packed, solved, ref)
        # Multipliers CVXPY has no dual for are fitted by least squares.
        known_eq = compiled.has_duals and compiled.eq_known
        known_ineq = compiled.has_duals and compiled.ineq_known

        def judge_packed(packed: Packed) -> KKTPoint:
            return judge(
                packed.u,
                packed.eq if known_eq else None,
                packed.ineq if known_ineq else None,
            )

        report = judge_packed(packed)
        converged = solved & torch.isfinite(packed.u.detach()).all(-1)
        # on_solver_error="raise" (cvxpylayers' semantics): answers stay as the solver gave them.
        if solver.isolate:
            converged &= report.infeasibility <= feasibility_tol
            if differentiable and bool((solved & ~converged).any()):
                # A member the solver accepted but the check rejected shares a graph with the good
                # ones, and the native backward of a failed cone program can be NaN: re-solve the
                # good members on their own.
                with grad_mode():
                    packed, _ = solver.solve(converged.nonzero().squeeze(-1), size)
                report = judge_packed(packed)
            elif not bool(converged.all()):
                packed = packed.where(converged)
                report = judge_packed(packed)
        point = None if differentiable else report.to(ref.dtype, ref.device)
        status = torch.full((size,), int(Status.NOT_CONVERGED), dtype=torch.int64)
        for row, cause in solver.causes.items():
            status[row] = int(cause)
        return Solution(
            status=status.to(ref.device),
            u=packed.u.to(dtype=ref.dtype, device=ref.device),
            converged=converged.to(ref.device),
            iterations=torch.zeros(size, dtype=torch.int64, device=ref.device),
            objective=report.objective.to(dtype=ref.dtype, device=ref.device),
            eq_multipliers=_multipliers_or_none(program, packed.eq, ref) if known_eq else None,
            ineq_multipliers=(
                _multipliers_or_none(program, packed.ineq, ref) if known_ineq else None
            ),
            kkt_residual=report.residual.to(dtype=ref.dtype, device=ref.device),
            point=point,
        )


def _source_solution(packed: Packed, solved: Tensor, ref: Tensor) -> Solution:
    """A source-only program's answers as the solver gave them: there is no declaration to
    check them against (``objective`` and ``kkt_residual`` are NaN, no multipliers)."""
    size = packed.u.shape[0]
    nan = torch.full((size,), float("nan"), dtype=ref.dtype, device=ref.device)
    return Solution(
        u=packed.u.to(dtype=ref.dtype, device=ref.device),
        converged=(solved & torch.isfinite(packed.u.detach()).all(-1)).to(ref.device),
        iterations=torch.zeros(size, dtype=torch.int64, device=ref.device),
        objective=nan,
        kkt_residual=nan,
    )


def _takes_diffcp_args(layer_options: dict[str, Any] | None) -> bool:
    """Whether the cvxpylayers layer solves with diffcp (its default solver), whose keywords
    declopt's defaults (:data:`DEFAULT_SOLVER_ARGS`, ``mode``, ``n_jobs_*``) are."""
    solver = (layer_options or {}).get("solver")
    return solver is None or (isinstance(solver, str) and solver.upper() == "DIFFCP")


def _solver_args(given: dict[str, Any], max_iter: int | None) -> dict[str, Any]:
    """diffcp's keyword arguments: SCS gets declopt's tight defaults; other cone solvers
    (``solve_method="Clarabel"``) keep their own, which use different names."""
    scs = str(given.get("solve_method", "SCS")).upper() == "SCS"
    defaults = dict(DEFAULT_SOLVER_ARGS) if scs else {}
    if "eps_abs" in given or "eps_rel" in given:
        # SCS 3's own names: diffcp turns an ``eps`` into both, which would override them.
        defaults.pop("eps", None)
    args = {**defaults, **given}
    if max_iter is not None:
        args["max_iters" if scs else "max_iter"] = max_iter
    return args


def _accuracy(args: dict[str, Any]) -> float:
    """The cone solver's stopping tolerance in ``args`` (see :data:`ACCURACY_OPTIONS`)."""
    given = [
        float(v)
        for k, v in args.items()
        if k in ACCURACY_OPTIONS and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return max(given) if given else 1e-8


def _multipliers_or_none(program: Program, rows: Tensor, ref: Tensor) -> Tensor | None:
    """The ``(B, p)`` / ``(B, q)`` block for a constrained program, ``(B, 0)`` when it has no
    rows of that kind (known, and empty: ``None`` would mean "unknown"); ``None`` when
    unconstrained."""
    if not program.is_constrained:
        return None
    return rows.to(dtype=ref.dtype, device=ref.device)


class _BatchSolver:
    """Calls the ``CvxpyLayer`` on sub-batches, bisecting a batch that the solver rejects.

    diffcp reports per batch, not per problem: it raises ``SolverError`` when any member is
    infeasible or unbounded, and only warns ``"Solved/Inaccurate."`` when SCS stops at its
    iteration cap. Either way the batch is split in halves until the culprits are alone.
    """

    def __init__(
        self,
        compiled: CompiledCvxpyLayer,
        num_variables: int,
        values: tuple[Tensor, ...],
        in_dims: tuple[int | None, ...],
        args: dict[str, Any],
    ) -> None:
        self.compiled = compiled
        self.m = num_variables
        self.values = values
        self.in_dims = in_dims
        self.args = args
        self.isolate = True  # False: diffcp's SolverError propagates (cvxpylayers' behaviour)
        # Per batch row, the cause of an isolated failure (diffcp's status, SCS's inaccuracy).
        self.causes: dict[int, Status] = {}

    def solve(self, rows: Tensor, size: int | None = None) -> tuple[Packed, Tensor]:
        """Solutions of the problems ``rows`` (1-D indices into the batch) and the ``(n,)`` mask
        of those solved accurately (the others are zeros, with no autograd graph).

        With ``size=None`` the ``n = len(rows)`` results are in ``rows`` order; with ``size`` given
        there are ``n = size`` rows, problem ``i`` in row ``i`` (zero where not in ``rows``).
        """
        from diffcp.cone_program import SolverError

        pending, done = [rows], []
        while pending:
            part = pending.pop()
            try:
                packed, accurate = self._call(part)
                cause = Status.ITERATION_LIMIT  # SCS's "Solved/Inaccurate": stopped at its cap
            except SolverError as error:
                if not self.isolate:
                    raise
                packed, accurate, cause = None, False, _cause(error)
            if not accurate and part.numel() == 1:
                self.causes[int(part[0])] = cause
            if not self.isolate:
                return packed, torch.full((part.numel(),), accurate, dtype=torch.bool)
            if accurate:
                done.append((part, packed))
            elif part.numel() > 1:
                half = part.numel() // 2
                pending += [part[half:], part[:half]]
        if size is None and len(done) == 1 and done[0][0].numel() == rows.numel():
            return done[0][1], torch.ones(rows.numel(), dtype=torch.bool)
        n = rows.numel() if size is None else size
        u = torch.zeros(n, self.m, dtype=torch.float64)
        eq = torch.zeros(n, self.compiled.num_eq, dtype=torch.float64)
        ineq = torch.zeros(n, self.compiled.num_ineq, dtype=torch.float64)
        ok = torch.zeros(n, dtype=torch.bool)
        if done:
            solved = torch.cat([part for part, _ in done])
            dest = _rank(rows, solved) if size is None else solved
            # index_put keeps the autograd graph of the solved rows (native backward).
            u = u.index_put((dest,), torch.cat([p.u for _, p in done]))
            eq[dest] = torch.cat([p.eq for _, p in done])
            ineq[dest] = torch.cat([p.ineq for _, p in done])
            ok[dest] = True
        return Packed(u, eq, ineq), ok

    def _call(self, rows: Tensor) -> tuple[Packed, bool]:
        """The layer on the sub-batch ``rows``, and whether no member was solved inaccurately."""
        n = rows.numel()
        args = [v if d is None else v[rows] for v, d in zip(self.values, self.in_dims)]
        if all(d is None for d in self.in_dims):  # give the outputs a batch dim
            args[0] = args[0].unsqueeze(0).expand(n, *args[0].shape)
        solver_args = dict(self.args)
        # cvxpylayers sets up diffcp's derivative only when a gradient is needed, and diffcp's
        # forward-only entry point passes unknown keywords on to SCS, which rejects these two.
        # (Another cvxpylayers solver's arguments, without n_jobs_forward, pass as given.)
        if "n_jobs_forward" in solver_args:
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                solver_args.setdefault("n_jobs_backward", solver_args["n_jobs_forward"])
            else:
                solver_args.pop("mode", None)
        with warnings.catch_warnings(record=True) as caught:
            # Recording also silences diffcp's np.array(tensor) DeprecationWarnings (NumPy 2).
            warnings.simplefilter("always")
            try:
                outputs = self.compiled.layer(*args, solver_args=solver_args)
            except Exception as error:
                _close_pools(error)
                raise
        for w in caught:
            if not _is_noise(w):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        accurate = not any("Inaccurate" in str(w.message) for w in caught)
        return self.compiled.pack(outputs), accurate


def _close_pools(error: BaseException) -> None:
    """Terminate the thread pools that ``error`` left running.

    diffcp solves a batch on a ``multiprocessing.pool.ThreadPool`` of ``n_jobs`` threads and
    closes it only when every member succeeded: when one is infeasible or unbounded its
    ``SolverError`` leaves the pool running, held by a reference cycle through the exception's
    traceback, so its threads lived until the cyclic garbage collector found it (with ``gc``
    disabled, +15 threads per call whose batch had a failing member, on 2 cores). The pool is a
    local of a frame of that traceback: terminating it there (which joins its threads) frees
    them at once, whatever diffcp's internals are called."""
    from multiprocessing.pool import Pool

    for frame, _ in traceback.walk_tb(error.__traceback__):
        for value in tuple(frame.f_locals.values()):
            if isinstance(value, Pool):
                value.terminate()


def _cause(error: Exception) -> Status:
    """The :class:`~declopt.diagnostics.Status` diffcp's ``SolverError`` names ("Solver scs
    returned status infeasible")."""
    text = str(error).lower()
    if "infeasible" in text:
        return Status.INFEASIBLE
    if "unbounded" in text:
        return Status.UNBOUNDED
    return Status.NOT_CONVERGED


def _is_noise(w: warnings.WarningMessage) -> bool:
    """diffcp's per-problem warnings that declopt turns into per-problem status instead."""
    text = str(w.message)
    return "Inaccurate" in text or (
        issubclass(w.category, DeprecationWarning) and "__array__" in text
    )


def _rank(rows: Tensor, subset: Tensor) -> Tensor:
    """Positions of the entries of ``subset`` within ``rows`` (1-D, ``subset`` within ``rows``)."""
    lookup = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)
    lookup[rows] = torch.arange(rows.numel())
    return lookup[subset]
