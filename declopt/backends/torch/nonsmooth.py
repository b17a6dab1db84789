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
   (docs/design.md, "The implicit backward"); along those pieces the declaration is smooth again.
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
from functools import lru_cache

import torch
from torch import Tensor

from declopt.backends.torch.augmented_lagrangian import ConstrainedResult, solve_constrained
from declopt.backends.torch.minimize import minimize
from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import lagrangian
from declopt.kkt.newton import newton_kkt
from declopt.kkt.point import KKTPoint, kink_margins, kkt_point, sizes
from declopt.kkt.tolerances import problem_scale, table
from declopt.linalg import LinearSolver
from declopt.program import BatchedParams, Program

WIDTHS = (1e-1, 1e-2, 1e-3)
"""Smoothing widths of the continuation, relative to each problem's
:func:`~declopt.kkt.tolerances.problem_scale`."""

MORE_WIDTHS = (1e-4, 1e-5, 1e-6)
"""Where the finish after :data:`WIDTHS` found no KKT point, the continuation goes on with these
widths for those problems only: kinks closer together than ``1e-3`` of the scale (the README
example of cvxpylayers, ``|A x - b|_1`` with one residual at ``1e-3`` next to two at zero) are not
resolved at width ``1e-3``, and the margins of the kinks the solution sits on do not shrink yet
(measured: 4 of 160 such problems unsolved, KKT residual up to 0.46, before; 0 after)."""

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
    linear_solver: LinearSolver = LinearSolver(),
) -> ConstrainedResult:
    """Solve a flat batch of declarations with kinks from ``u0: (B, m)``.

    ``program.smoothed`` must be set (the front end sets it whenever there are kinks). Returns
    the KKT point of the declaration (kinks included) at the solutions, in ``u0``'s dtype.
    """
    smoothed = program.smoothed
    if smoothed is None:
        raise ValueError("solve_nonsmooth needs program.smoothed (a declaration with kinks)")
    dtype = u0.dtype
    declared_params = params
    params = BatchedParams(
        tuple(v.to(torch.float64) for v in params.values), params.in_dims, params.size
    )
    u = u0.to(torch.float64)
    scale = problem_scale(params, u)
    stages = _continuation(
        program, params, u, None, scale, WIDTHS, method, max_iter, compile, linear_solver
    )
    tolerance = IDENTIFY * WIDTHS[-1] * scale
    point, converged = _finish(program, params, stages, scale, tolerance, linear_solver)
    iterations, penalty = stages.iterations, stages.penalty
    # Kinks closer together than the last width (a residual of 1e-3 next to one of 0) are not
    # resolved yet: the margins of the kinks a solution sits on have not shrunk with mu. The
    # problems the finish left unsolved continue the continuation from their last smoothed
    # solution; the finish then holds the kinks whose margins shrink with these widths, within
    # the same tolerance (a margin shrinks as mu s / sqrt(1 - s^2) for a subgradient s of
    # |.|, so at a vertex with s = 0.9995 it is 32 mu, past IDENTIFY mu at any width).
    retry = ~converged
    if bool(retry.any()):
        index = retry.nonzero().squeeze(-1)
        sub = params.select(index)
        more = _continuation(
            program,
            sub,
            stages.u[index],
            None if stages.lam is None else stages.lam[index],
            scale[index],
            MORE_WIDTHS,
            method,
            max_iter,
            compile,
            linear_solver,
            previous=stages.margins[index],
        )
        again, solved = _finish(program, sub, more, scale[index], tolerance[index], linear_solver)
        # Keep the retry's answer where it is a solution (else the first finish's, as before).
        take = torch.zeros_like(converged).index_copy(0, index, solved)
        point = point.index_copy(index, again).where(take, point)
        converged = converged | take
        iterations = iterations.index_add(0, index, more.iterations)
        if penalty is not None and more.penalty is not None:
            penalty = penalty.index_copy(0, index, more.penalty)
    count = sizes(program, u.shape[-1])
    declared = kkt_point(
        program,
        declared_params,
        point.u.to(dtype),
        eq_multipliers=point.eq_multipliers.to(dtype) if count.p else None,
        ineq_multipliers=point.ineq_multipliers.to(dtype) if count.q else None,
    )
    return ConstrainedResult(declared, converged, iterations, penalty)


@dataclasses.dataclass
class _Stages:
    """The end of a continuation: the last smoothed solutions ``u``, their multipliers ``lam``
    (``[h; g]``) and ``lam_g`` (``g``'s; seed convention, ``None`` without constraints), the kink
    margins after the last two stages ``(B, 2, K)``, the iterations and the final penalty."""

    u: Tensor
    lam: Tensor | None
    lam_g: Tensor | None
    margins: Tensor
    iterations: Tensor
    penalty: Tensor | None


def _continuation(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    lam: Tensor | None,
    scale: Tensor,
    widths: tuple[float, ...],
    method: str,
    max_iter: int | None,
    compile: bool,
    linear_solver: LinearSolver,
    previous: Tensor | None = None,
) -> _Stages:
    """Solve the smoothed declaration for every width of ``widths`` in turn, each stage
    warm-starting the next one's point and multipliers (``previous``: ``(B, 2, K)`` margins of
    an earlier continuation this one extends)."""
    smoothed = program.smoothed
    assert smoothed is not None
    iterations = torch.zeros(u.shape[0], dtype=torch.int64, device=u.device)
    penalty: Tensor | None = None
    lam_g: Tensor | None = None
    margins = [] if previous is None else [previous[:, -1]]
    for width in widths:
        stage = BatchedParams((*params.values, width * scale), (*params.in_dims, 0), params.size)
        if smoothed.is_constrained:
            result = solve_constrained(
                smoothed,
                stage,
                u,
                method=method,
                max_iter=max_iter,
                compile=compile,
                linear_solver=linear_solver,
                multipliers=lam,
            )
            u, lam_g = result.u, result.point.ineq_multipliers
            lam = torch.cat([result.point.eq_multipliers, lam_g], -1)
            penalty = result.penalty
        else:
            objective = BatchedObjective(smoothed.objective, stage, compile)
            result = minimize(objective, u, method, max_iter, scale=scale)
            u = result.u
        iterations = iterations + result.iterations
        margins.append(kink_margins(program, params, u).abs())
    return _Stages(u, lam, lam_g, torch.stack(margins[-2:], 1), iterations, penalty)


def _finish(
    program: Program,
    params: BatchedParams,
    stages: _Stages,
    scale: Tensor,
    tolerance: Tensor,
    linear_solver: LinearSolver,
) -> tuple[KKTPoint, Tensor]:
    """The finish on the kinks identified at the end of a continuation (margins within
    ``tolerance (B,)`` that shrank with the last cut of the width), and ``(B,)`` where it is a
    KKT point within ``tolerance`` of the smoothed solution."""
    # A kink the solution sits on pulls the smoothed solutions in proportion to mu (their margin
    # shrinks tenfold per stage); a solution merely near a kink keeps its distance.
    shrinking = stages.margins[:, 1] <= SHRINK * stages.margins[:, 0]
    point, unresolved = finish_on_kinks(
        program,
        params,
        stages.u,
        stages.lam_g,
        tolerance,
        scale,
        shrinking,
        linear_solver,
    )
    # A belt to the release check's braces: the finish never moves far from a right smoothing.
    stayed = (point.u - stages.u).abs().amax(-1) <= tolerance
    return point, stayed & point.converged & ~unresolved


@lru_cache(maxsize=64)
def pinned_ties(program: Program) -> Program:
    """The declaration with one more parameter, a reference point ``(m,)`` at which the kinks'
    tie representatives are chosen (``Program.kinks``)."""
    count = len(program.parameter_shapes)
    kinks, kink_rows = program.kinks, program.kink_rows
    assert kinks is not None

    def declared(fn: Callable | None) -> Callable | None:
        return None if fn is None else (lambda x, u, *a, **k: fn(x[:count], u, *a, **k))

    return dataclasses.replace(
        program,
        parameter_names=(*program.parameter_names, "reference point"),
        parameter_shapes=(*program.parameter_shapes, (program.num_variables,)),
        parameter_signs=(),
        objective=declared(program.objective),
        objective_taylor=declared(program.objective_taylor),
        equalities=declared(program.equalities),
        inequalities=declared(program.inequalities),
        kinks=lambda x, u: kinks(x[:count], u, x[count]),
        kink_rows=None if kink_rows is None else (lambda x, u: kink_rows(x[:count], u, x[count])),
        smoothed=None,
        source=None,
    )


def finish_on_kinks(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    lam_g: Tensor | None,
    tolerance: Tensor,
    scale: Tensor,
    eligible: Tensor | None = None,
    linear_solver: LinearSolver = LinearSolver(),
) -> tuple[KKTPoint, Tensor]:
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
        scale: ``(B,)`` the problems' scale for the release check.
        eligible: ``(B, K)`` kinks that may be held at all (default: every kink).
    Returns:
        The finished KKT point (of the declaration with its ties pinned at ``u``; least-squares
        multipliers ``[h; g; kinks]``) and ``(B,)`` where a mistaken kink remained.
    """
    # Ties keep the representative they have at the smoothed solution, where it is the true
    # extremum; at the exact ties the finish creates, argmax would pick an arbitrary member.
    program = pinned_ties(program)
    params = BatchedParams((*params.values, u), (*params.in_dims, 0), params.size)
    count = sizes(program, u.shape[-1])
    p, q = count.p, count.q
    identification = table(u.dtype).identification
    released = torch.zeros(u.shape[0], count.kinks, dtype=torch.bool, device=u.device)
    if eligible is not None:
        released = ~eligible
    g_active: Tensor | None = None

    def held(rows: Tensor, margins: Tensor, norms: Tensor) -> Tensor:
        nonlocal g_active
        if g_active is None:  # decided once, at the smoothed solution
            g = rows[:, p : p + q]
            near = g >= -identification * norms[:, p : p + q] * scale.unsqueeze(-1)
            g_active = near if lam_g is None else near | (lam_g < 0)
        on_kink = (margins.abs() <= tolerance.unsqueeze(-1)) & ~released
        every_h = torch.ones_like(rows[:, :p], dtype=torch.bool)
        return torch.cat([every_h, g_active, on_kink], -1)

    def evaluate(u_new: Tensor, lam: Tensor | None = None) -> KKTPoint:
        # Multipliers are refitted by least squares at every point (the held kinks change).
        return kkt_point(program, params, u_new, held=held, with_kinks=True, scale=scale)

    pending = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
    out: KKTPoint | None = None
    for _ in range(RELEASE_ROUNDS):
        point = newton_kkt(
            program, params, evaluate(u), evaluate, FINISH_STEPS, linear_solver=linear_solver
        )
        wrong = _held_by_mistake(program, params, point, p + q, scale)
        out = point if out is None else point.where(pending, out)
        pending = pending & wrong.any(-1)
        released = released | (wrong & pending.unsqueeze(-1))
        if not bool(pending.any()):
            break
    assert out is not None
    return out, pending


def _held_by_mistake(
    program: Program, params: BatchedParams, point: KKTPoint, k0: int, scale: Tensor
) -> Tensor:
    """``(B, K)``: held kinks that the solution can leave, to either side, and lower
    ``L0 = f - lambda . [h; g]`` (first order, by one-sided difference quotients).

    Leaving kink ``k`` means moving along ``d_k = A^+ e_k``: the shortest step that changes its
    residual and (to first order) no other held row, so that the other kinks, the equalities and
    the active inequalities stay put. The first ``k0`` rows are ``[h; g]``.
    """
    u, lam = point.u, point.multipliers
    batch, m = u.shape
    held = point.held[:, k0:]
    kinks = held.shape[-1]
    if kinks == 0 or not bool(held.any()):
        return held
    jac = point.jacobian.masked(point.held).to_dense()
    directions = torch.linalg.pinv(jac)[..., k0:].transpose(1, 2)  # (B, K, m)
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
