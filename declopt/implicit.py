"""The implicit backward: one formula for every declared problem (DESIGN.md §3).

At a solution ``y`` of ``min_u f(x, u)`` (subject to the active constraints ``h~(x, u) = 0``), with
Lagrangian ``L = f - lambda^T h~``, the vector-Jacobian product of ``y(x)`` with an upstream
gradient ``v`` is obtained without ever forming ``Dy``: solve the KKT system

    [ H  A^T ] [w]   [v]          H = D2_uu L,  A = D_u h~
    [ A   0  ] [z] = [0]

and then ``dL/dx = - d/dx [ w . D_u L(x, y) + z . h~(x, y) ]`` at fixed ``y, lambda, w, z``: one
reverse pass. The invariant is ``D_u L(x, y(x)) = 0, h~(x, y(x)) = 0`` for all ``x``;
differentiating it gives the system above. Unconstrained problems have ``k = 0``: ``H w = v``.

How the forward was solved never enters here; only the declaration (the :class:`Program`) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vjp, vmap

from declopt.backends.torch.augmented_lagrangian import (
    batched_constraints,
    batched_kink_margins,
    constraint_jacobian,
    example_problem,
)
from declopt.derivatives import BatchedObjective, kink_test_for
from declopt.kkt.functions import (
    equality_fn,
    inequality_fn,
    kink_tolerance,
    lagrangian,
    weighted_constraints,
)
from declopt.linalg import (
    LinearSolveReport,
    bordered_kkt,
    compact_rows,
    conjugate_gradient,
    default_rcond,
    kkt_minres,
    masked_least_squares,
    solve_symmetric,
)
from declopt.program import BatchedParams, Program

DENSE_MAX_VARIABLES = 128
"""Above this many variables the Hessian is not formed: CG (unconstrained) or MINRES on the KKT
system (constrained) runs on Hessian-vector products. (Measured, L2-ball projection m = 256,
B = 128, float64: dense eigh backward 1.42 s, MINRES 0.12 s, gradients equal to 1.5e-13. Only the
dense solve counts the KKT matrix's inertia for ``second_order_ok``.)"""


@dataclass
class ImplicitReport:
    """Per-problem facts of one implicit backward (tensors ``(B, ...)``).

    Attributes:
        linear: the report of the KKT solve.
        active: ``(B, q)`` inequalities counted active (``None`` without inequalities).
        weakly_active: ``(B, q)`` active inequalities with a ~zero multiplier (one-sided points).
        one_sided: ``(B,)`` some inequality is weakly active: the derivative is one-sided.
        sign_violation: ``(B,)`` an active inequality has a multiplier of the wrong sign
            (``lambda_g > 0``): the point is not a KKT point of a minimum.
        multiplier_residual: ``(B,)`` ``max |D_u f - A^T lambda|`` with the multipliers used.
    """

    linear: LinearSolveReport
    active: Tensor | None
    weakly_active: Tensor | None
    one_sided: Tensor
    sign_violation: Tensor
    multiplier_residual: Tensor


DEGENERATE_CHOICES = ("active", "inactive", "warn", "raise")
"""How a weakly active inequality (active, multiplier ~0) enters the backward:

* ``"active"``: kept as an equality. The derivative is the one-sided derivative for perturbations
  that push the solution *into* the constraint (the constraint stays binding).
* ``"inactive"``: dropped. The derivative is the one-sided derivative for perturbations that move
  the solution *away* from the constraint (it becomes strictly inactive).
* ``"warn"`` (default): as ``"active"``, and the layer warns.
* ``"raise"``: the layer raises.
"""


def implicit_vjp(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    v: Tensor,
    *,
    eq_multipliers: Tensor | None = None,
    ineq_multipliers: Tensor | None = None,
    degenerate: str = "warn",
    dense_max: int = DENSE_MAX_VARIABLES,
    compile: bool = False,
    wanted: Sequence[bool] | None = None,
) -> tuple[tuple[Tensor | None, ...], ImplicitReport]:
    """Gradients of ``sum_b v_b . y_b(x)`` with respect to every parameter tensor.

    Args:
        program: the declaration.
        params: the batch of parameters the solutions ``u`` belong to.
        u: ``(B, m)`` solutions (detached).
        v: ``(B, m)`` upstream gradients.
        eq_multipliers, ineq_multipliers: ``(B, p)``, ``(B, q)`` multipliers from the backend in
            the seed convention (``D_u f = lambda^T D_u [h; g]``, ``lambda_g <= 0``); estimated by
            least squares when ``None``.
        degenerate: see :data:`DEGENERATE_CHOICES`.
        dense_max: largest ``m`` for which the KKT matrix is formed densely.
        compile: run the derivative passes under ``torch.compile``.
        wanted: per parameter, whether its gradient is needed (default: all). Unconstrained
            problems skip the others (their gradient is ``None``); constrained ones may still
            return them.
    Returns:
        One gradient per parameter, shaped like ``params.values[i]`` (shared parameters get the sum
        over the batch), and the per-problem report.
    """
    if degenerate not in DEGENERATE_CHOICES:
        raise ValueError(f"degenerate must be one of {DEGENERATE_CHOICES}, got {degenerate!r}")
    batch, m = u.shape
    if not program.is_constrained and not _on_a_kink(program, params, u, compile):
        objective = BatchedObjective(program.objective, params, compile=compile)
        wanted = (True,) * len(params.values) if wanted is None else tuple(wanted)
        if m == 1 and _expandable(params, wanted):
            # One variable: w = v / h, and the gradient is -w D_x D_u f per problem, so the
            # Hessian, the gradient (for the report) and D_x D_u f come from one pass.
            g, h, grads = objective.scalar_vjp(u, v, wanted)
            linear = _scalar_report(h, v)
        else:
            if m <= dense_max:
                g, hess = objective.grad_and_hessian(u)
                w, linear = solve_symmetric(hess, v)
            else:
                g = objective.grad(u)
                w, linear = conjugate_gradient(lambda d: objective.hvp(u, d), v)
            grads = objective.param_vjp(u, w, wanted)
        none = torch.zeros(batch, dtype=torch.bool, device=u.device)
        report = ImplicitReport(linear, None, None, none, none, g.abs().amax(-1))
        return grads, report
    return _constrained_vjp(
        program, params, u, v, eq_multipliers, ineq_multipliers, degenerate, compile, dense_max
    )


_EXPAND_MAX = 64
"""Largest shared parameter (elements) expanded over the batch for the one-pass ``m = 1`` VJP."""


def _expandable(params: BatchedParams, wanted: tuple[bool, ...]) -> bool:
    """Whether every wanted shared parameter is small enough to expand over the batch."""
    return all(
        d == 0 or not want or x.numel() <= _EXPAND_MAX
        for x, d, want in zip(params.values, params.in_dims, wanted)
    )


def _scalar_report(h: Tensor, v: Tensor) -> LinearSolveReport:
    """What :func:`solve_symmetric` reports for the ``1 x 1`` systems ``h w = v``, ``(B, 1)``."""
    h, v = h.squeeze(-1), v.squeeze(-1)
    tiny = torch.finfo(h.dtype).tiny
    singular = h.abs() <= default_rcond(h.dtype, 1) * h.abs().clamp_min(tiny)
    w = torch.where(singular, torch.zeros_like(v), v / torch.where(singular, 1.0, h))
    residual = (h * w - v).abs() / v.abs().clamp_min(tiny)
    return LinearSolveReport("eigh", singular, (h > 0) & ~singular, residual)


def _on_a_kink(program: Program, params: BatchedParams, u: Tensor, compile: bool = False) -> bool:
    """Whether any problem of the batch sits on a kink of a nonsmooth atom."""
    if program.kinks is None:
        return False
    return bool(kink_test_for(program.kinks, params.in_dims, compile)(params.values, u).any())


def _tolerance(u: Tensor) -> Tensor:
    """``sqrt(eps) (1 + |u|_inf)`` per problem, ``(B, 1)``: the dtype-aware activity tolerance."""
    return torch.finfo(u.dtype).eps ** 0.5 * (1 + u.abs().amax(-1, keepdim=True))


def _constrained_vjp(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    v: Tensor,
    lam_h: Tensor | None,
    lam_g: Tensor | None,
    degenerate: str,
    compile: bool,
    dense_max: int = DENSE_MAX_VARIABLES,
) -> tuple[tuple[Tensor, ...], ImplicitReport]:
    batch, m = u.shape
    state = active_set(program, params, u, lam_h, lam_g, compile=compile)
    q = state.active.shape[-1]
    mask = state.mask(degenerate)
    lam = torch.where(mask, state.multipliers, torch.zeros_like(state.multipliers))
    stationarity = (
        (state.grad_f - (lam.unsqueeze(-1) * state.jacobian * mask.unsqueeze(-1)).sum(-2))
        .abs()
        .amax(-1)
    )
    # Only active rows enter the KKT system: gather each problem's active rows to the front and
    # pad to the largest active count of the batch (not to all p + q + K rows).
    rows, row_mask = compact_rows(mask)
    k = rows.shape[-1]
    jac = state.jacobian.gather(1, rows.unsqueeze(-1).expand(-1, -1, m)) * row_mask.unsqueeze(-1)

    # The KKT system of the Lagrangian, padded: inactive rows are zero in A with a one on the
    # diagonal, so one batched solve serves problems with different active sets.
    extended = BatchedParams((*params.values, lam), (*params.in_dims, 0), batch)
    with_kinks = program.kinks is not None
    lagrangian_derivatives = BatchedObjective(
        lagrangian(program, with_kinks), extended, compile=compile
    )
    rhs = torch.cat([v, v.new_zeros(batch, k)], -1)
    if m <= dense_max:
        kkt = bordered_kkt(lagrangian_derivatives.hessian(u), jac, row_mask)
        solution, linear = solve_symmetric(kkt, rhs, num_negative_expected=mask.sum(-1))
    else:
        # Large m: never form the m x m Hessian (m probes) nor factor the bordered matrix;
        # MINRES needs Hessian-vector products of the Lagrangian and products with A, A^T.
        solution, linear = kkt_minres(
            lambda d: lagrangian_derivatives.hvp(u, d), jac, row_mask, rhs
        )
    w = solution[:, :m]
    z = torch.zeros_like(lam).scatter(1, rows, solution[:, m:] * row_mask)

    grads_l = lagrangian_derivatives.param_vjp(u, w)[: len(params.values)]
    weighted = weighted_constraints(program, with_kinks)
    in_dims = (*params.in_dims, 0)
    _, pullback = vjp(
        lambda xs: vmap(weighted, in_dims=(in_dims, 0))((*xs, z), u).sum(), params.values
    )
    grads_c = pullback(torch.ones((), dtype=u.dtype, device=u.device))[0]
    grads = tuple(gl - gc for gl, gc in zip(grads_l, grads_c))
    report = ImplicitReport(
        linear,
        active=state.active if q else None,
        weakly_active=state.weakly if q else None,
        one_sided=state.weakly.any(-1),
        sign_violation=state.sign_violation,
        multiplier_residual=stationarity,
    )
    return grads, report


@dataclass
class ActiveSet:
    """The constraint state of a batch of solutions (see :func:`active_set`).

    Rows are ``[h (p); g (q); kink residuals (K)]``.
    """

    num_eq: int
    constraints: Tensor  # (B, p + q + K)
    jacobian: Tensor  # (B, p + q + K, m)
    grad_f: Tensor  # (B, m)
    multipliers: Tensor  # (B, p + q + K), seed convention
    active: Tensor  # (B, q)
    weakly: Tensor  # (B, q): active with a ~zero multiplier
    kinks_active: Tensor  # (B, K): the solution sits on this kink
    sign_violation: Tensor  # (B,): an active inequality with lambda_g > 0

    def mask(self, degenerate: str = "active") -> Tensor:
        """``(B, p + q + K)`` rows counted active: all equalities, the active inequalities (less
        the weakly active ones for ``degenerate="inactive"``) and the active kinks."""
        inequalities = self.active & ~self.weakly if degenerate == "inactive" else self.active
        equalities = torch.ones_like(self.multipliers[:, : self.num_eq], dtype=torch.bool)
        return torch.cat([equalities, inequalities, self.kinks_active], -1)


def active_set(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    lam_h: Tensor | None,
    lam_g: Tensor | None,
    *,
    compile: bool = False,
) -> ActiveSet:
    """Active inequalities and kinks, multipliers and degeneracy flags at solutions ``u: (B, m)``.

    Tolerances follow the dtype: an inequality is active when ``g >= -sqrt(eps) (1 + |u|)`` or
    its multiplier is clearly nonzero; weakly active when active with ``|lambda| <= sqrt(eps)
    (1 + |D_u f|)``; a kink is active when its margin is within
    :func:`~declopt.kkt.functions.kink_tolerance` (tighter in float32). Missing
    multipliers (all of them, or the kinks', which no backend knows) come from least squares on
    the stationarity ``D_u f = lambda^T A`` over the active rows.
    """
    batch = u.shape[0]
    eps = torch.finfo(u.dtype).eps
    with_kinks = program.kinks is not None
    c = batched_constraints(program, params, u, with_kinks)
    jac = constraint_jacobian(program, params, u, with_kinks)
    example = example_problem(params)
    p = equality_fn(program)(example, u[0]).numel()
    q = inequality_fn(program)(example, u[0]).numel()
    g = c[:, p : p + q]
    grad_f = BatchedObjective(program.objective, params, compile=compile).grad(u)
    tol = _tolerance(u)
    if with_kinks:
        margins = batched_kink_margins(program, params, u)
        kinks_active = margins.abs() <= kink_tolerance(u)
    else:
        kinks_active = torch.zeros(batch, 0, dtype=torch.bool, device=u.device)
    # A block with no rows is known whatever the backend said about it.
    known = (lam_h is not None or p == 0) and (lam_g is not None or q == 0)
    if known:
        lam_h = u.new_zeros(batch, 0) if lam_h is None else lam_h
        lam_g = u.new_zeros(batch, 0) if lam_g is None else lam_g
        lam_known = torch.cat([lam_h.to(u.dtype), lam_g.to(u.dtype)], -1)
        # Only the kinks' multipliers are unknown: fit them to what the others leave over.
        leftover = grad_f - (lam_known.unsqueeze(-1) * jac[:, : p + q]).sum(-2)
        kink_jac = jac[:, p + q :] * kinks_active.unsqueeze(-1)
        lam_kinks = masked_least_squares(kink_jac, leftover, kinks_active)
        lam = torch.cat([lam_known, lam_kinks], -1)
    else:
        rows_active = torch.cat(
            [torch.ones(batch, p, dtype=torch.bool, device=u.device), g >= -tol], -1
        )
        mask = torch.cat([rows_active, kinks_active], -1)
        lam = masked_least_squares(jac * mask.unsqueeze(-1), grad_f, mask)
    lam_g = lam[:, p : p + q]
    active = (g >= -tol) | (lam_g < -tol)
    lam_tol = eps**0.5 * (1 + grad_f.abs().amax(-1, keepdim=True))
    weakly = active & (lam_g.abs() <= lam_tol)
    sign_violation = (active & (lam_g > lam_tol)).any(-1)
    return ActiveSet(p, c, jac, grad_f, lam, active, weakly, kinks_active, sign_violation)
