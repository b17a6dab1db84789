"""Declarations with kinks (``abs``, ``max``, ``norm1``, ``norm_inf``, ...): smoothing, then a
Newton-KKT finish on the kinks the solution sits on.

Newton and the augmented Lagrangian assume smooth functions; at an L1 or L-inf sphere projection
(or a lasso) the solution sits *on* kinks, where they stall. So:

1. **Continuation.** Solve the declaration's smoothed form (:mod:`declopt.frontend.smoothing`:
   every nonsmooth atom within ``O(mu)`` of the original) for ``mu`` in :data:`WIDTHS`, each solve
   warm-started from the last. The smoothed solutions converge to the true one as ``mu -> 0``
   (measured: within ``2-9 mu`` for L1/L-inf sphere and ball projections).
2. **Kink identification.** A kink site is held when its margin is within a few widths
   (:data:`IDENTIFY`) and shrank with the last cut of ``mu`` (:data:`SHRINK`): smoothed solutions
   approach a kink they sit on in proportion to ``mu``, while one merely near a kink keeps its
   distance. A held kink's residual becomes one more equality, exactly as in the implicit backward
   (DESIGN.md §2); along those pieces the declaration is smooth again.
3. **Finish.** Newton steps on the KKT system of the original declaration with the held kinks and
   the active inequalities as equalities (multipliers by least squares at every step), accepted
   per problem only while the KKT residual falls. Ties keep the representative they have at the
   smoothed solution (at an exact tie ``argmax`` would pick an arbitrary member).
4. **Release check.** The KKT residual cannot see a kink held by mistake (its multiplier absorbs
   anything). So each held kink is left along ``A^+ e_k`` (every other held row fixed) to both
   sides; if that lowers ``f - lambda . [h; g]``, the kink is released and the finish redone.

The result satisfies the nonsmooth KKT conditions to ~1e-15. Everything runs in float64 whatever
the input dtype. Problems that do not settle are reported as not converged, never returned as
solved; a solution coordinate within ~1e-8 (relative) of a kink may be snapped onto it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
from torch import Tensor

from declopt.backends.torch.augmented_lagrangian import (
    ConstrainedResult,
    active_mask,
    batched_constraints,
    batched_kink_margins,
    constraint_jacobian,
    example_problem,
    solve_constrained,
)
from declopt.backends.torch.minimize import minimize
from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import lagrangian, num_constraints
from declopt.linalg import bordered_kkt, masked_least_squares, solve_newton
from declopt.program import BatchedParams, Program

WIDTHS = (1e-1, 1e-2, 1e-3)
"""Smoothing widths of the continuation, relative to each problem's :func:`problem_scale`."""

IDENTIFY = 30.0
"""A kink is identified when its margin is within ``IDENTIFY * mu`` after the last
smoothed solve (width ``mu``): smoothed solutions sit within a few ``mu`` of the kinks they
converge to (``O(mu log n)`` for ties). A genuine solution coordinate that close to a kink without
sitting on it would be snapped onto it."""

SHRINK = 0.25
"""A kink is only held if its margin shrank at least this much over the last tenfold cut of
``mu`` (ideal: 0.1)."""

FINISH_STEPS = 8
RELEASE_ROUNDS = 3
RELEASE_STEP = 1e-6
"""Step (relative to the problem's scale) of the one-sided difference quotients that check a
kink."""
RELEASE_TOLERANCE = 1e-8
"""A held kink is released when moving off it lowers the Lagrangian at a rate above this
(relative to ``|D_u f|_inf``)."""


def solve_nonsmooth(
    program: Program,
    params: BatchedParams,
    u0: Tensor,
    *,
    method: str = "newton",
    max_iter: int | None = None,
    compile: bool = False,
) -> ConstrainedResult:
    """Solve a flat batch of declarations with kinks from ``u0: (B, m)``.

    ``program.smoothed`` must be set (the front end sets it whenever there are kinks). Returns
    multipliers of the declared constraints in the seed convention; those of the kinks are left
    to the backward, which refits them by least squares.
    """
    smoothed = program.smoothed
    if smoothed is None:
        raise ValueError("solve_nonsmooth needs program.smoothed (a declaration with kinks)")
    dtype = u0.dtype
    params = BatchedParams(
        tuple(v.to(torch.float64) for v in params.values), params.in_dims, params.size
    )
    u = u0.to(torch.float64)
    batch = u.shape[0]
    scale = problem_scale(params, u)
    iterations = torch.zeros(batch, dtype=torch.int64, device=u.device)
    lam_g = None
    margins = []
    for width in WIDTHS:
        stage = BatchedParams((*params.values, width * scale), (*params.in_dims, 0), params.size)
        if smoothed.is_constrained:
            result = solve_constrained(
                smoothed, stage, u, method=method, max_iter=max_iter, compile=compile
            )
            u, lam_g = result.u, result.lam_g
        else:
            result = minimize(
                BatchedObjective(smoothed.objective, stage, compile), u, method, max_iter
            )
            u = result.u
        iterations = iterations + result.iterations
        margins.append(batched_kink_margins(program, params, u).abs())
    # A kink the solution sits on pulls the smoothed solutions in proportion to mu (their margin
    # shrinks tenfold per stage); a solution merely near a kink keeps its distance.
    shrinking = margins[-1] <= SHRINK * margins[-2]
    tolerance = IDENTIFY * WIDTHS[-1] * scale
    smoothed_u = u
    u, lam, residual = finish_on_kinks(program, params, u, lam_g, tolerance, scale, shrinking)
    p, q = num_constraints(program, example_problem(params), u[0])
    f = BatchedObjective(program.objective, params).value(u)
    size = 1 + f.abs() + u.abs().amax(-1)
    # A belt to the release check's braces: the finish never moves far from a right smoothing.
    stayed = (u - smoothed_u).abs().amax(-1) <= tolerance
    converged = stayed & (residual <= torch.finfo(torch.float64).eps ** 0.5 * size)
    return ConstrainedResult(
        u=u.to(dtype),
        objective=f.to(dtype),
        converged=converged,
        iterations=iterations,
        lam_h=lam[:, :p].to(dtype),
        lam_g=lam[:, p : p + q].to(dtype),
        kkt_residual=residual.to(dtype),
    )


def _num_kinks(program: Program, params: BatchedParams, u: Tensor) -> int:
    assert program.kinks is not None
    return int(program.kinks(example_problem(params), u[0])[0].numel())


@lru_cache(maxsize=64)
def pinned_ties(program: Program) -> Program:
    """The declaration with one more parameter, a reference point ``(m,)`` at which the kinks'
    tie representatives are chosen (:mod:`declopt.frontend.kinks`)."""
    count = len(program.parameter_shapes)
    kinks = program.kinks
    assert kinks is not None

    def declared(fn: Callable | None) -> Callable | None:
        return None if fn is None else (lambda x, u: fn(x[:count], u))

    return dataclasses.replace(
        program,
        parameter_names=(*program.parameter_names, "reference point"),
        parameter_shapes=(*program.parameter_shapes, (program.num_variables,)),
        parameter_signs=(),
        objective=declared(program.objective),
        equalities=declared(program.equalities),
        inequalities=declared(program.inequalities),
        kinks=lambda x, u: kinks(x[:count], u, x[count]),
        smoothed=None,
        source=None,
    )


def problem_scale(params: BatchedParams, u: Tensor) -> Tensor:
    """``(B,)`` the size of a problem's data: the largest ``|entry|`` of its parameters and of
    ``u`` (1 where all are zero). Smoothing widths and tolerances are relative to it."""
    parts = [u.abs().amax(-1)]
    for value, dim in zip(params.values, params.in_dims):
        flat = value.reshape(value.shape[0], -1) if dim == 0 else value.reshape(1, -1)
        if flat.shape[-1]:
            parts.append(flat.abs().amax(-1).expand(u.shape[0]).to(u.dtype))
    scale = torch.stack(parts).amax(0)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def finish_on_kinks(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    lam_g: Tensor | None,
    tolerance: Tensor,
    scale: Tensor,
    eligible: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Newton-KKT steps with identified kinks and active inequalities as equalities.

    Every held kink is then checked (:func:`_held_by_mistake`): leaving it to either side, with
    the other held rows fixed, must not lower the Lagrangian of the declared constraints. A kink
    that fails was held by mistake (the solution lies just off it); it is released and the finish
    is redone from ``u``, up to :data:`RELEASE_ROUNDS` times.

    Args:
        u: ``(B, m)`` near-solutions (the last smoothed solve).
        lam_g: ``(B, q)`` inequality multipliers of the smoothed solve (seed convention), or
            ``None``; they decide which inequalities are active, as in the constrained polish.
        tolerance: ``(B,)`` kinks whose margin is within it are held.
        scale: ``(B,)`` the problems' scale (:func:`problem_scale`) for the release check.
        eligible: ``(B, K)`` kinks that may be held at all (default: every kink).
    Returns:
        ``(u, lam, residual)``: the finished points, least-squares multipliers ``[h; g; kinks]``
        and the KKT residual per problem (``inf`` where a mistaken kink remained).
    """
    # Ties keep the representative they have at the smoothed solution, where it is the true
    # extremum; at the exact ties the finish creates, argmax would pick an arbitrary member.
    program = pinned_ties(program)
    params = BatchedParams((*params.values, u), (*params.in_dims, 0), params.size)
    p, q = num_constraints(program, example_problem(params), u[0])
    g = batched_constraints(program, params, u)[:, p : p + q]
    g_active = g >= -tolerance.unsqueeze(-1) if lam_g is None else active_mask(g, lam_g, u)
    if eligible is None:
        eligible = torch.ones(
            u.shape[0], _num_kinks(program, params, u), dtype=torch.bool, device=u.device
        )
    released = ~eligible
    pending = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
    out_u, out_lam, out_residual = u, None, None
    for _ in range(RELEASE_ROUNDS):
        rows = _Rows(program, params, p, g_active, tolerance, released)
        point = _newton_kkt(program, params, u, rows)
        wrong = _held_by_mistake(program, params, point, p + q, scale)
        if out_lam is None:
            out_lam, out_residual = torch.zeros_like(point.lam), torch.zeros_like(point.residual)
        take = pending.unsqueeze(-1)
        out_u = torch.where(take, point.u, out_u)
        out_lam = torch.where(take, point.lam, out_lam)
        out_residual = torch.where(pending, point.residual, out_residual)
        pending = pending & wrong.any(-1)
        released = released | (wrong & pending.unsqueeze(-1))
        if not bool(pending.any()):
            break
    out_residual = torch.where(pending, torch.full_like(out_residual, float("inf")), out_residual)
    return out_u, out_lam, out_residual


def _newton_kkt(program: Program, params: BatchedParams, u: Tensor, rows: _Rows) -> _KKTPoint:
    """:data:`FINISH_STEPS` Newton steps on the KKT equations of the rows held, each kept per
    problem only if it lowers the KKT residual. The state evaluated to judge a step is the one
    the next step starts from."""
    point = _kkt_point(program, params, u, rows)
    for _ in range(FINISH_STEPS):
        extended = BatchedParams((*params.values, point.lam), (*params.in_dims, 0), params.size)
        hess = BatchedObjective(lagrangian(program, True), extended).hessian(point.u)
        kkt = bordered_kkt(hess, point.jac, point.mask)
        step = solve_newton(kkt, torch.cat([-point.grad_l, -(point.c * point.mask)], -1))
        trial = _kkt_point(program, params, point.u + step[:, : u.shape[-1]], rows)
        better = torch.isfinite(trial.residual) & (trial.residual < point.residual)
        point = trial.where(better, point)
        if not bool(better.any()):
            break
    return point


def _held_by_mistake(
    program: Program, params: BatchedParams, point: _KKTPoint, k0: int, scale: Tensor
) -> Tensor:
    """``(B, K)``: held kinks that the solution can leave, to either side, and lower
    ``L0 = f - lambda . [h; g]`` (first order, by one-sided difference quotients).

    Leaving kink ``k`` means moving along ``d_k = A^+ e_k``: the shortest step that changes its
    residual and (to first order) no other held row, so that the other kinks, the equalities and
    the active inequalities stay put. The first ``k0`` rows are ``[h; g]``.
    """
    u, lam = point.u, point.lam
    batch, m = u.shape
    held = point.mask[:, k0:]
    kinks = held.shape[-1]
    if kinks == 0 or not bool(held.any()):
        return held
    directions = torch.linalg.pinv(point.jac)[..., k0:].transpose(1, 2)  # (B, K, m)
    norms = directions.norm(dim=-1, keepdim=True)
    directions = torch.where(norms > 0, directions / norms.clamp_min(1e-300), 0.0)
    extended = BatchedParams((*params.values, lam[:, :k0]), (*params.in_dims, 0), batch)
    l0 = BatchedObjective(lagrangian(program), extended.expand(kinks))
    step = RELEASE_STEP * scale  # (B,)
    base = u.repeat(kinks, 1)
    moves = (step.view(1, batch, 1) * directions.transpose(0, 1)).reshape(kinks * batch, m)
    centre = l0.value(base)
    # Second-order one-sided differences: (4 L(h) - L(2h) - 3 L(0)) / 2h.
    slopes = [
        (4 * l0.value(base + sign * moves) - l0.value(base + 2 * sign * moves) - 3 * centre)
        / (2 * step.repeat(kinks))
        for sign in (1, -1)
    ]
    slope = torch.minimum(*slopes).reshape(kinks, batch).transpose(0, 1)  # (B, K)
    # Relative to the gradient's size (the problem's own units), plus the rounding floor of the
    # difference quotient.
    rounding = 64 * torch.finfo(u.dtype).eps * centre.abs().reshape(kinks, batch).amax(0) / step
    tol = RELEASE_TOLERANCE * point.grad_f.abs().amax(-1) + rounding
    return held & (slope < -tol.unsqueeze(-1))


class _Rows:
    """Rows ``[h; g; kinks]`` held as equalities at a point: all of ``h``, the active ``g``, and
    the kinks whose margin is within ``tolerance`` (per problem) and that were not released."""

    def __init__(
        self,
        program: Program,
        params: BatchedParams,
        p: int,
        g_active: Tensor,
        tolerance: Tensor,
        released: Tensor,
    ) -> None:
        self.program, self.params, self.p = program, params, p
        self.g_active, self.tolerance, self.released = g_active, tolerance, released

    def __call__(self, u: Tensor) -> Tensor:
        near = batched_kink_margins(self.program, self.params, u).abs()
        near = near <= self.tolerance.unsqueeze(-1)
        every_h = torch.ones(u.shape[0], self.p, dtype=torch.bool, device=u.device)
        return torch.cat([every_h, self.g_active, near & ~self.released], -1)


@dataclass
class _KKTPoint:
    """The rows held at ``u: (B, m)`` and their KKT state (rows ``[h; g; kinks]``, ``k``)."""

    u: Tensor
    mask: Tensor  # (B, k) rows held
    c: Tensor  # (B, k) their residuals
    jac: Tensor  # (B, k, m) their Jacobian, zero on rows not held
    grad_f: Tensor  # (B, m)
    lam: Tensor  # (B, k) least-squares multipliers, zero on rows not held
    grad_l: Tensor  # (B, m) D_u f - A^T lam, the stationarity residual
    residual: Tensor  # (B,) the KKT residual

    def where(self, take: Tensor, other: _KKTPoint) -> _KKTPoint:
        """Per problem, this point where ``take`` (``(B,)``), else ``other``."""

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(take.reshape(-1, *[1] * (a.dim() - 1)), a, b)

        return _KKTPoint(
            *(pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
        )


def _kkt_point(program: Program, params: BatchedParams, u: Tensor, rows: _Rows) -> _KKTPoint:
    """Least-squares multipliers of the rows held at ``u`` and the KKT residual: the max of
    stationarity, held-row infeasibility, ``max(g, 0)`` and wrong-sign inequality multipliers."""
    mask = rows(u)
    p = rows.p
    c = batched_constraints(program, params, u, with_kinks=True)
    jac = constraint_jacobian(program, params, u, with_kinks=True) * mask.unsqueeze(-1)
    grad_f = BatchedObjective(program.objective, params).grad(u)
    lam = masked_least_squares(jac, grad_f, mask)
    grad_l = grad_f - (lam.unsqueeze(-1) * jac).sum(-2)
    q = rows.g_active.shape[-1]
    parts = [grad_l.abs().amax(-1), (c * mask).abs().amax(-1)]
    if q:
        parts.append(c[:, p : p + q].clamp(min=0).amax(-1))
        parts.append(lam[:, p : p + q].clamp(min=0).amax(-1))
    residual = torch.stack(parts).amax(0)
    return _KKTPoint(u, mask, c, jac, grad_f, lam, grad_l, residual)
