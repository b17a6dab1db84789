"""Batched unconstrained minimisers: damped Newton and L-BFGS with per-problem masks.

Both work on a whole flat batch ``u: (B, m)`` at once. Every problem has its own line search and its
own convergence flag; a converged problem stops changing, so a problem's result never depends on the
rest of the batch (the only coupling is the shared loop count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.derivatives import BatchedObjective
from declopt.kkt.tolerances import problem_scale
from declopt.linalg import robust_eigh

ARMIJO = 1e-4
MAX_BACKTRACKS = 40


@dataclass
class MinimizeResult:
    u: Tensor  # (B, m)
    objective: Tensor  # (B,)
    gradient: Tensor  # (B, m)
    converged: Tensor  # (B,) bool
    iterations: Tensor  # (B,) int64


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(step_tol, grad_tol)`` for a dtype.

    A Newton step shorter than ``step_tol`` times the problem's scale leaves an error of order
    ``step_tol**2``, i.e. machine precision; L-BFGS stops when ``|grad|_inf * scale <= grad_tol *
    (|f| + |f(u0)|)`` (both sides in the objective's unit).
    """
    eps = torch.finfo(dtype).eps
    return eps**0.5, eps ** (2.0 / 3.0)


def _decrement_floor(f: Tensor, f0: Tensor) -> Tensor:
    """Newton decrements ``g . H^-1 g`` below this are rounding: a few ulps of the objective's
    size (its value here and at the start, so that an optimum at ``f = 0`` has a unit too)."""
    return 16 * torch.finfo(f.dtype).eps * (f.abs() + f0.abs())


def _finite(f: Tensor) -> Tensor:
    """``f`` with every non-finite value (NaN, either infinity) replaced by ``+inf``."""
    inf = float("inf")
    return torch.nan_to_num(f, nan=inf, posinf=inf, neginf=inf)


def backtracking(
    objective: BatchedObjective,
    u: Tensor,
    f: Tensor,
    slope: Tensor,
    d: Tensor,
    active: Tensor,
    first: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-problem Armijo backtracking from ``t = 1``.

    Returns ``(t, ok)``: the accepted step per problem (0 where none was found or the problem is
    inactive) and whether a step was found. A tiny slack of a few ulps of ``|f|`` lets a problem
    that is already at the rounding floor take its last, accuracy-restoring Newton step.
    ``first``: the objective at ``t = 1`` when the caller has it already.
    """
    eps = torch.finfo(u.dtype).eps
    bound = f + 8 * eps * f.abs()  # the slack: a few ulps of |f|
    decrease = ARMIJO * slope
    t = torch.ones_like(f)
    ok = ~active
    for k in range(MAX_BACKTRACKS):
        if k == 0:
            value = objective.value(u + d) if first is None else first
            ok = ok | (_finite(value) <= bound + decrease)
        else:
            value = objective.value(u + t.unsqueeze(-1) * d)
            ok = ok | (_finite(value) <= bound + t * decrease)
        if bool(ok.all()):
            break
        t = torch.where(ok, t, 0.5 * t)
    t = torch.where(ok & active, t, torch.zeros_like(t))
    return t, ok & active


def newton_direction(
    hessian: Tensor, gradient: Tensor, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Newton direction ``-H^-1 g``, shifted to ``-(H + s I)^-1 g`` where ``H`` is not PD.

    Returns ``(d, shifted)``. The shift makes the direction a descent direction on nonconvex
    problems (Levenberg-Marquardt style), sized from the most negative eigenvalue. ``scale:
    (B,)`` is the unit of ``u`` (a step shorter than ``1e-3`` of it counts as vanished).
    """
    m = hessian.shape[-1]
    if m == 1:
        h = hessian[..., 0]
        positive = h > 0
        # Non-positive curvature: a unit step downhill (either way at a stationary maximum);
        # the line search shortens it.
        unit = torch.ones_like(h) if scale is None else scale.unsqueeze(-1)
        downhill = torch.where(gradient > 0, -unit, unit).to(h.dtype)
        newton = -gradient / torch.where(positive, h, 1.0)
        return torch.where(positive, newton, downhill), ~positive[..., 0]
    # One symmetric eigendecomposition gives the PD test, the shift and the solve (Cholesky is
    # several times slower than eigh for the small batched matrices met here). A Hessian that is
    # not finite (a point on the edge of log's or entr's domain) gives way to the identity: a
    # steepest-descent step that the line search sizes.
    sym = 0.5 * (hessian + hessian.transpose(-1, -2))
    finite = torch.isfinite(sym).all(-1).all(-1)
    if not bool(finite.all()):
        eye = torch.eye(m, dtype=sym.dtype, device=sym.device).expand_as(sym)
        sym = torch.where(finite.view(-1, 1, 1), sym, eye)
    eigenvalues, eigenvectors = robust_eigh(sym)
    lowest = eigenvalues[..., 0]
    unit = torch.ones_like(lowest) if scale is None else scale
    size = eigenvalues.abs().amax(-1).clamp_min(torch.finfo(hessian.dtype).tiny)
    shifted = lowest <= m * torch.finfo(hessian.dtype).eps * size
    # The shift's floor keeps a (near-)zero Hessian's step within ~1000 units of u.
    floor = torch.maximum(size, gradient.norm(dim=-1) / unit)
    shift = torch.where(shifted, -lowest + 1e-3 * floor, torch.zeros_like(lowest))
    coefficients = (eigenvectors.transpose(-1, -2) @ gradient.unsqueeze(-1)).squeeze(-1)
    d = -(eigenvectors @ (coefficients / (eigenvalues + shift.unsqueeze(-1))).unsqueeze(-1))
    d = d.squeeze(-1)
    # At (or near) a saddle or maximum the shifted step vanishes with the gradient: add the
    # direction of most negative curvature, pointing downhill, so the problem can leave it.
    curve = eigenvectors[..., 0]
    curve = torch.where(((curve * gradient).sum(-1) > 0).unsqueeze(-1), -curve, curve)
    tiny = d.norm(dim=-1) < 1e-3 * unit
    d = torch.where((shifted & tiny).unsqueeze(-1), d + unit.unsqueeze(-1) * curve, d)
    return d, shifted


def newton(objective: BatchedObjective, u0: Tensor, max_iter: int, scale: Tensor) -> MinimizeResult:
    """Damped Newton with dense Hessians, for small ``m``.

    A problem converges when a full, unshifted step is shorter than ``step_tol * scale``, or
    when the full step was refused while its Newton decrement was at the rounding floor of the
    objective (on piecewise quadratic objectives such as an augmented Lagrangian the iterate can
    sit on a seam where the Hessian's piece flips between iterations and the step never
    shrinks).
    """
    step_tol, _ = tolerances(u0.dtype)
    # With a one-pass Taylor expansion the full step's point is expanded whole: when the step
    # is accepted (the usual case) that is the next iteration's value, gradient and Hessian,
    # one evaluation per iteration. Otherwise the trial costs a value and the next point a
    # gradient and a Hessian.
    one_pass = objective.derivatives.has_taylor
    u = u0
    if one_pass:
        f, g, hess = objective.value_grad_hessian(u)
    else:
        f, g = objective.value_and_grad(u)
        hess = None
    f = _finite(f)
    f0 = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
    batch = u.shape[0]
    converged = torch.zeros(batch, dtype=torch.bool, device=u.device)
    failed = ~torch.isfinite(f) | ~torch.isfinite(g).all(-1)
    active = ~failed
    iterations = torch.zeros(batch, dtype=torch.int64, device=u.device)
    limit = step_tol * scale
    for _ in range(max_iter):
        # One host sync per iteration decides both "anything left" and "everyone left" (then
        # the per-problem selections below are skipped: the common case of the first steps).
        left = int(active.sum())
        if left == 0:
            break
        if hess is None:
            hess = objective.hessian(u)
        d, shifted = newton_direction(hess, g, scale)
        # A full, unshifted step below the tolerance finishes the problem without a trial: in
        # Newton's quadratic regime the gradient after a step of size |d| is O(|d|^2), rounding
        # here, so the step is taken and the quadratic model gives the point's objective and
        # gradient (no evaluation only to confirm convergence).
        settled = active & ~shifted & (d.abs().amax(-1) <= limit)
        curvature = None
        if objective.quadratic:
            # A degree-2 objective's model is exact: the full step's point has the model's
            # objective and gradient, and a problem is finished there (not evaluated) when the
            # step from it is below the tolerance as well (the solve's rounding left nothing
            # to refine). A PD Hessian's full step always passes Armijo's test.
            exact = active & ~shifted & ~settled
            if bool(exact.any()):
                curvature = (hess @ d.unsqueeze(-1)).squeeze(-1)
                after, _ = newton_direction(hess, g + curvature, scale)
                settled = settled | (exact & (after.abs().amax(-1) <= limit))
        done = int(settled.sum())
        if done:
            if curvature is None:
                curvature = (hess @ d.unsqueeze(-1)).squeeze(-1)
            modelled = f + (g * d).sum(-1) + 0.5 * (d * curvature).sum(-1)
            column = settled.unsqueeze(-1)
            u = torch.where(column, u + d, u)
            f = torch.where(settled, modelled, f)
            g = torch.where(column, g + curvature, g)
            iterations = iterations + settled.long()
            converged = converged | settled
            active = active & ~settled
            left -= done
            if left == 0:
                break
        everyone = left == batch
        if not everyone:
            d = torch.where(active.unsqueeze(-1), d, torch.zeros_like(d))
        slope = (g * d).sum(-1)
        full = objective.value_grad_hessian(u + d) if one_pass else None
        t, found = backtracking(
            objective, u, f, slope, d, active, None if full is None else full[0]
        )
        u = u + t.unsqueeze(-1) * d
        iterations = iterations + active.long()
        if full is not None and bool(((t == 1) | ~active).all()):
            f_new, g_new, hess_new = full
        elif one_pass:
            f_new, g_new, hess_new = objective.value_grad_hessian(u)
        else:
            (f_new, g_new), hess_new = objective.value_and_grad(u), None
        if everyone:
            f, g, hess = _finite(f_new), g_new, hess_new
        else:
            f = torch.where(active, _finite(f_new), f)
            g = torch.where(active.unsqueeze(-1), g_new, g)
            hess = (
                None if hess_new is None else torch.where(active.view(-1, 1, 1), hess_new, hess)  # type: ignore[arg-type]
            )
        # (A full unshifted step below the tolerance was settled above, before any trial.)
        # A seam: the full step was refused although it promised no more than rounding.
        seam = active & ~shifted & (t < 1) & (-slope <= _decrement_floor(f, f0))
        converged = converged | seam
        # No descent possible, and not at the rounding floor: the problem has failed.
        failed = failed | (active & ~found & ~seam) | ~torch.isfinite(g).all(-1)
        active = active & ~(seam | failed)
    return MinimizeResult(u, f, g, converged & ~failed, iterations)


def lbfgs(
    objective: BatchedObjective, u0: Tensor, max_iter: int, scale: Tensor, history: int = 10
) -> MinimizeResult:
    """L-BFGS with per-problem history, for large ``m``.

    The history is a ring buffer shared in position but not in content: a problem whose curvature
    pair fails ``s.y > 0`` stores a zero pair (``rho = 0``), which the two-loop recursion ignores.
    """
    _, grad_tol = tolerances(u0.dtype)
    batch, m = u0.shape
    u = u0
    f, g = objective.value_and_grad(u)
    f = _finite(f)
    f0 = torch.where(torch.isfinite(f), f, torch.zeros_like(f)).abs()
    s_hist = u.new_zeros(history, batch, m)
    y_hist = u.new_zeros(history, batch, m)
    rho = u.new_zeros(history, batch)
    gamma = u.new_ones(batch)
    iterations = torch.zeros(batch, dtype=torch.int64, device=u.device)

    def is_converged(f: Tensor, g: Tensor) -> Tensor:
        return g.abs().amax(-1) * scale <= grad_tol * (f.abs() + f0)

    converged = is_converged(f, g)
    failed = ~torch.isfinite(f) | ~torch.isfinite(g).all(-1)
    first_step = True
    for k in range(max_iter):
        active = ~(converged | failed)
        if not bool(active.any()):
            break
        d = _two_loop(g, s_hist, y_hist, rho, gamma, k, history)
        if first_step:
            # No curvature yet: a gradient step of unit length is scale-free.
            d = d / g.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
            first_step = False
        d = torch.where(active.unsqueeze(-1), d, torch.zeros_like(d))
        slope = (g * d).sum(-1)
        not_descent = slope >= 0
        d = torch.where(not_descent.unsqueeze(-1), -g, d)  # restart from steepest descent
        slope = (g * d).sum(-1)
        t, found = backtracking(objective, u, f, slope, d, active)
        step = t.unsqueeze(-1) * d
        u = u + step
        iterations = iterations + active.long()
        f_new, g_new = objective.value_and_grad(u)
        y = torch.where(active.unsqueeze(-1), g_new - g, torch.zeros_like(g))
        f = torch.where(active, _finite(f_new), f)
        g = torch.where(active.unsqueeze(-1), g_new, g)
        sy = (step * y).sum(-1)
        good = active & found & (sy > torch.finfo(u.dtype).eps * step.norm(dim=-1) * y.norm(dim=-1))
        slot = k % history
        s_hist[slot] = torch.where(good.unsqueeze(-1), step, torch.zeros_like(step))
        y_hist[slot] = torch.where(good.unsqueeze(-1), y, torch.zeros_like(y))
        rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), torch.zeros_like(sy))
        gamma = torch.where(good, sy / (y * y).sum(-1).clamp_min(torch.finfo(u.dtype).tiny), gamma)
        converged = converged | (active & is_converged(f, g))
        failed = failed | (active & ~found & ~converged) | ~torch.isfinite(g).all(-1)
    return MinimizeResult(u, f, g, converged & ~failed, iterations)


def _two_loop(
    g: Tensor, s_hist: Tensor, y_hist: Tensor, rho: Tensor, gamma: Tensor, k: int, history: int
) -> Tensor:
    q = g.clone()
    count = min(k, history)
    order = [(k - 1 - i) % history for i in range(count)]  # newest first
    alphas = []
    for slot in order:
        alpha = rho[slot] * (s_hist[slot] * q).sum(-1)
        q = q - alpha.unsqueeze(-1) * y_hist[slot]
        alphas.append(alpha)
    r = gamma.unsqueeze(-1) * q
    for slot, alpha in zip(reversed(order), reversed(alphas)):
        beta = rho[slot] * (y_hist[slot] * r).sum(-1)
        r = r + (alpha - beta).unsqueeze(-1) * s_hist[slot]
    return -r


DEFAULT_MAX_ITER = {"newton": 50, "lbfgs": 1000}
"""Iteration caps per problem when the caller gives none."""


def minimize(
    objective: BatchedObjective,
    u0: Tensor,
    method: str,
    max_iter: int | None = None,
    scale: Tensor | None = None,
) -> MinimizeResult:
    """:func:`newton` (``method="newton"``) or :func:`lbfgs` from ``u0: (B, m)``.

    ``scale: (B,)`` is each problem's unit of ``u`` for the stopping tests (default: the
    largest ``|entry|`` of its parameters and of ``u0``, see
    :func:`~declopt.kkt.tolerances.problem_scale`).
    """
    budget = DEFAULT_MAX_ITER[method] if max_iter is None else max_iter
    if scale is None:
        scale = problem_scale(objective.params, u0)
    return (newton if method == "newton" else lbfgs)(objective, u0, budget, scale)
