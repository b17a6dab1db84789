"""The implicit backward: one formula on the KKT point of the solutions (docs/design.md,
"The implicit backward").

At a solution ``y`` of ``min_u f(x, u)`` holding the rows ``h~(x, u) = 0`` (equalities, active
inequalities, the kinks it sits on), with Lagrangian ``L = f - lambda^T h~``, the vector-Jacobian
product of ``y(x)`` with an upstream gradient ``v`` is obtained without ever forming ``Dy``:
solve the KKT system

    [ H  A^T ] [w]   [v]          H = D2_uu L,  A = D_u h~
    [ A   0  ] [z] = [0]

and then ``dL/dx = - d/dx [ w . D_u L(x, y) + z . h~(x, y) ]`` at fixed ``y, lambda, w, z``: one
reverse pass. The invariant is ``D_u L(x, y(x)) = 0, h~(x, y(x)) = 0`` for all ``x``;
differentiating it gives the system above. With no rows held the system is ``H w = v`` (and with
one variable, ``w = v / h``: one fused pass gives ``h`` and the parameter VJP together).

How the forward was solved never enters here; only the declaration (the :class:`Program`) and the
:class:`~declopt.kkt.point.KKTPoint` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from declopt.derivatives import BatchedObjective, kink_test_for, substitute
from declopt.kkt.functions import constraint_fn, weighted_constraints
from declopt.kkt.point import KKTPoint, kkt_point, lagrangian_derivatives
from declopt.kkt.tolerances import Tolerances, table
from declopt.linalg import (
    LinearSolver,
    LinearSolveReport,
    conjugate_gradient,
    scalar_solve,
    solve_held_kkt,
    solve_symmetric,
)
from declopt.program import BatchedParams, Params, Program


@dataclass
class ImplicitReport:
    """Per-problem facts of one implicit backward (tensors ``(B, ...)``).

    Attributes:
        linear: the report of the KKT solve.
        point: the KKT point the backward was taken at (``None`` with no constraints and no
            kink held: then nothing but ``D_u f`` was needed).
        one_sided: ``(B,)`` some inequality is weakly active: the derivative is one-sided.
        sign_violation: ``(B,)`` an active inequality has a multiplier of the wrong sign
            (``lambda_g > 0``): the point is not a KKT point of a minimum.
        multiplier_residual: ``(B,)`` ``max |D_u f - A^T lambda|`` with the multipliers used.
    """

    linear: LinearSolveReport
    point: KKTPoint | None
    one_sided: Tensor
    sign_violation: Tensor
    multiplier_residual: Tensor


SIDES = ("active", "inactive")
"""How a weakly active inequality (active, multiplier ~0) enters the backward:

* ``"active"``: kept as an equality. The derivative is the one-sided derivative for perturbations
  that push the solution *into* the constraint (the constraint stays binding).
* ``"inactive"``: dropped. The derivative is the one-sided derivative for perturbations that move
  the solution *away* from the constraint (it becomes strictly inactive).
"""


def implicit_vjp(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    v: Tensor,
    *,
    point: KKTPoint | None = None,
    eq_multipliers: Tensor | None = None,
    ineq_multipliers: Tensor | None = None,
    side: str = "active",
    linear_solver: LinearSolver = LinearSolver(),
    compile: bool = False,
    wanted: Sequence[bool] | None = None,
    tolerances: Tolerances | None = None,
) -> tuple[tuple[Tensor | None, ...], ImplicitReport]:
    """Gradients of ``sum_b v_b . y_b(x)`` with respect to every parameter tensor.

    Args:
        program: the declaration.
        params: the batch of parameters the solutions ``u`` belong to.
        u: ``(B, m)`` solutions (detached).
        v: ``(B, m)`` upstream gradients.
        point: the KKT point at ``u`` (a backend's, or the layer's); computed here when
            ``None`` and the program has constraints or a solution sits on a kink.
        eq_multipliers, ineq_multipliers: a backend's multipliers for that computation.
        side: see :data:`SIDES`.
        linear_solver: dense (eigendecomposition, which also counts the inertia) or Krylov
            (CG / MINRES on Hessian-vector products).
        compile: run the derivative passes under ``torch.compile``.
        wanted: per parameter, whether its gradient is needed (default: all); the others may
            come back as ``None``.
        tolerances: for the KKT point computed here (default the dtype's
            :func:`~declopt.kkt.tolerances.table`;
            :func:`~declopt.kkt.tolerances.exact_tolerances` for answers exact up to rounding).
    Returns:
        One gradient per parameter, shaped like ``params.values[i]`` (shared parameters get the sum
        over the batch), and the per-problem report.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    batch = u.shape[0]
    wanted = (True,) * len(params.values) if wanted is None else tuple(wanted)
    if point is None and (
        program.is_constrained or _on_a_kink(program, params, u, compile, tolerances)
    ):
        point = kkt_point(
            program,
            params,
            u,
            eq_multipliers=eq_multipliers,
            ineq_multipliers=ineq_multipliers,
            tolerances=tolerances,
        )
    held = None if point is None else point.held_rows(side)
    if held is not None and not bool(held.any()):
        held = None  # nothing held anywhere in the batch: the unconstrained formula
    if held is None:
        objective = BatchedObjective.of(program, params, compile=compile)
        grads, g, linear = _unconstrained(objective, params, u, v, wanted, linear_solver)
        if point is None:
            none = torch.zeros(batch, dtype=torch.bool, device=u.device)
            return grads, ImplicitReport(linear, None, none, none, g.abs().amax(-1))
        flags = (point.weakly_active.any(-1), point.sign_violation, point.stationarity)
        return grads, ImplicitReport(linear, point, *flags)

    lam = torch.where(held, point.multipliers, torch.zeros_like(point.multipliers))
    derivatives = lagrangian_derivatives(program, params, point, lam, compile)
    w, z, linear = _kkt_solve(derivatives, point, held, v, linear_solver)
    grads = _constrained_param_vjp(program, params, derivatives, point, w, z, wanted)
    stationarity = (point.grad_f - point.jacobian.rmatvec(lam)).abs().amax(-1)
    report = ImplicitReport(
        linear,
        point,
        one_sided=point.weakly_active.any(-1),
        sign_violation=point.sign_violation,
        multiplier_residual=stationarity,
    )
    return grads, report


def _constrained_param_vjp(
    program: Program,
    params: BatchedParams,
    derivatives: BatchedObjective,
    point: KKTPoint,
    w: Tensor,
    z: Tensor,
    wanted: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """``-d/dx [w . D_u L(x, y) + z . h~(x, y)]`` for the ``wanted`` parameters (``None`` for
    the others, whose passes are skipped; the multipliers are constants of the pass)."""
    u = point.u
    free = [i for i, want in enumerate(wanted) if want]
    if not free:
        return (None,) * len(wanted)
    grads_l = derivatives.param_vjp(u, w, (*wanted, False))
    weighted = vmap(
        weighted_constraints(program, point.sizes.kinks > 0), in_dims=((*params.in_dims, 0), 0)
    )

    def weighted_sum(*xs: Tensor) -> Tensor:
        return weighted((*substitute(params.values, free, xs), z), u).sum()

    _, pullback = vjp(weighted_sum, *(params.values[i] for i in free))
    grads_c = dict(zip(free, pullback(torch.ones((), dtype=u.dtype, device=u.device))))
    return tuple(
        grads_l[i] - grads_c[i] if want else None  # type: ignore[operator]
        for i, want in enumerate(wanted)
    )


def implicit_jvp(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    tangents: Sequence[Tensor | None],
    *,
    point: KKTPoint | None = None,
    side: str = "active",
    linear_solver: LinearSolver = LinearSolver(),
    tolerances: Tolerances | None = None,
) -> Tensor:
    """The tangent ``du (B, m)`` of the solutions along parameter tangents (forward mode).

    ``tangents[i]`` is shaped like ``params.values[i]`` (``None``: zero). Differentiating the
    invariant ``D_u L(x, y(x)) = 0, h~(x, y(x)) = 0`` along ``dx`` gives the same KKT matrix as
    the backward, with right-hand side ``-[D_x(D_u L) dx; D_x h~ dx]``.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    m = u.shape[-1]
    if point is None and (
        program.is_constrained or _on_a_kink(program, params, u, tolerances=tolerances)
    ):
        point = kkt_point(program, params, u, tolerances=tolerances)
    held = None if point is None else point.held_rows(side)
    tangents = tuple(
        torch.zeros_like(x) if t is None else t for x, t in zip(params.values, tangents)
    )
    if held is None or not bool(held.any()):
        objective = BatchedObjective.of(program, params)
        dg = _gradient_jvp(program.objective, params, u, tangents)
        if linear_solver.is_dense(m):
            _, hess = objective.grad_and_hessian(u)
            return solve_symmetric(hess, -dg)[0]
        return conjugate_gradient(objective.hvp_at(u), -dg)[0]
    lam = torch.where(held, point.multipliers, torch.zeros_like(point.multipliers))
    derivatives = lagrangian_derivatives(program, params, point, lam)
    multipliers = derivatives.params.values[-1]
    dg = _gradient_jvp(
        derivatives.fn, derivatives.params, u, (*tangents, torch.zeros_like(multipliers))
    )
    with_kinks = point.sizes.kinks > 0
    constraints = vmap(constraint_fn(program, with_kinks), in_dims=(params.in_dims, 0))
    _, dc = jvp(lambda *xs: constraints(xs, u), tuple(params.values), tangents)
    return _kkt_solve(derivatives, point, held, -dg, linear_solver, -dc)[0]


def _kkt_solve(
    derivatives: BatchedObjective,
    point: KKTPoint,
    held: Tensor,
    top: Tensor,
    linear_solver: LinearSolver,
    bottom: Tensor | None = None,
) -> tuple[Tensor, Tensor, LinearSolveReport]:
    """``(w (B, m), z (B, k), report)`` solving ``[[H, A^T], [A, 0]] [w; z] = [top; bottom]`` on
    the rows ``held`` (``bottom (B, k)``, default zero; read on the held rows only).

    Dense (``m`` small): each problem's held rows gathered to the front, padded to the batch's
    largest count (zero in ``A``, one on the diagonal), and the system solved by its Schur
    complement, or the bordered matrix factored (:func:`~declopt.linalg.solve_held_kkt`).
    Krylov: MINRES on every row, those not held as padding, with ``A`` as the point keeps it
    (kink rows as index sets)."""
    u = point.u
    m = u.shape[-1]
    bottom = torch.zeros_like(held, dtype=top.dtype) if bottom is None else bottom
    bottom = torch.where(held, bottom, torch.zeros_like(bottom))
    if linear_solver.is_dense(m):
        w, z, linear = solve_held_kkt(derivatives.hessian(u), point.jacobian, held, top, bottom)
        assert linear is not None
        return w, z, linear
    rhs = torch.cat([top, bottom], -1)
    solution, linear = derivatives.kkt_krylov(u, point.jacobian, held, rhs)
    return solution[:, :m], solution[:, m:] * held, linear


def _gradient_jvp(
    fn: Callable[[Params, Tensor], Tensor],
    params: BatchedParams,
    u: Tensor,
    tangents: Sequence[Tensor],
) -> Tensor:
    """``D_x(D_u fn)(x, u) . dx`` per problem, ``(B, m)``: forward mode over the gradient map."""
    mapped = vmap(fn, in_dims=(params.in_dims, 0))

    def gradient(*xs: Tensor) -> Tensor:
        return grad(lambda uu: mapped(xs, uu).sum())(u)

    return jvp(gradient, tuple(params.values), tuple(tangents))[1]


def _unconstrained(
    objective: BatchedObjective,
    params: BatchedParams,
    u: Tensor,
    v: Tensor,
    wanted: tuple[bool, ...],
    linear_solver: LinearSolver,
) -> tuple[tuple[Tensor | None, ...], Tensor, LinearSolveReport]:
    """``H w = v``, then ``-D_x (w . D_u f)``: ``(grads, D_u f, report)``."""
    m = u.shape[-1]
    if m == 1 and _expandable(params, wanted):
        # One variable: w = v / h, and the gradient is -w D_x D_u f per problem, so the Hessian,
        # the gradient (for the report) and D_x D_u f come from one pass.
        g, h, grads = objective.scalar_vjp(u, v, wanted)
        return grads, g, scalar_solve(h, v)[1]
    if linear_solver.is_dense(m):
        g, hess = objective.grad_and_hessian(u)
        w, linear = solve_symmetric(hess, v)
    else:
        g = objective.grad(u)
        w, linear = conjugate_gradient(objective.hvp_at(u), v)
    return objective.param_vjp(u, w, wanted), g, linear


_EXPAND_MAX = 64
"""Largest shared parameter (elements) expanded over the batch for the one-pass ``m = 1`` VJP."""


def _expandable(params: BatchedParams, wanted: tuple[bool, ...]) -> bool:
    """Whether every wanted shared parameter is small enough to expand over the batch."""
    return all(
        d == 0 or not want or x.numel() <= _EXPAND_MAX
        for x, d, want in zip(params.values, params.in_dims, wanted)
    )


def _on_a_kink(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    compile: bool = False,
    tolerances: Tolerances | None = None,
) -> bool:
    """Whether any problem of the batch sits on a kink of a nonsmooth atom."""
    if program.kinks is None:
        return False
    tol = table(u.dtype) if tolerances is None else tolerances
    test = kink_test_for(program.kinks, params.in_dims, compile, tol.kinks, tol.resolution)
    return bool(test(params.values, u).any())
