"""Exact batched solver for one-dimensional robust pooling ``min_y sum_i phi(y - x_i)``.

The problem is scalar per pooled row, so each iteration is one pass over the data computing the
objective, its derivative and its curvature together (a pure tensor function that
``torch.compile`` could fuse):

* convex penalties (pseudo-Huber, Huber): Newton safeguarded by a bracket. ``psi = phi'`` is
  nondecreasing, so ``[min x, max x]`` brackets the root of ``sum psi(y - x_i)`` and every iterate
  either takes the Newton step inside the bracket or bisects it. Huber is piecewise quadratic, so
  Newton ends exactly once the inlier set settles.
* truncated quadratic: exact global minimum. The objective is a quadratic on each segment between
  the breakpoints ``x_i +- alpha`` (the inliers of a segment are a window of the sorted data), so
  the minimiser is the best window mean that lies in its own segment: sort + prefix sums.
* Welsch (nonconvex): majorise-minimise (iteratively reweighted mean,
  monotone in the objective) accelerated by Newton steps where the curvature is positive; a Newton
  step that does not lower the objective is undone and replaced by the MM step. Runs from the mean
  and from the median and keeps the lower objective, as in the seed paper.

Only the forward lives here; gradients come from the declaration (:class:`declopt.Layer`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from declopt.errors import NonConvergenceWarning

MAX_ITER = 100


def solve_pool(penalty: str, x: Tensor, alpha: Tensor | None) -> Tensor:
    """The minimiser of ``sum_i phi(y - x[..., i]; alpha)`` for every row of ``x``: ``(...)``."""
    if penalty == "quadratic":
        return x.mean(-1)
    assert alpha is not None
    alpha = alpha.to(dtype=x.dtype, device=x.device)
    with torch.no_grad():
        if penalty in ("pseudo_huber", "huber"):
            y, converged = _bracketed_newton(penalty, x, alpha)
        elif penalty == "truncated_quadratic":
            y = _truncated_quadratic_global(x, alpha)
            converged = torch.ones_like(y, dtype=torch.bool)
        else:
            starts = torch.stack([x.mean(-1), x.median(-1).values])  # (2, ...)
            y, f, converged = _mm_newton(penalty, x.unsqueeze(0), alpha, starts)
            pick = f.argmin(0, keepdim=True)
            y = y.gather(0, pick).squeeze(0)
            converged = converged.gather(0, pick).squeeze(0)
    if not bool(converged.all()):
        count = int((~converged).sum())
        warnings.warn(
            f"robust pooling ({penalty}): {count} of {converged.numel()} rows did not converge in "
            f"{MAX_ITER} iterations; their result is the last iterate",
            NonConvergenceWarning,
            stacklevel=4,
        )
    return y


def _derivatives(penalty: str, z: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(phi, psi, psi')`` of ``z`` elementwise, each one fused expression."""
    if penalty == "pseudo_huber":
        r = 1 + (z / alpha) ** 2
        root = r.sqrt()
        return alpha**2 * (root - 1), z / root, 1 / (r * root)
    if penalty == "huber":
        inside = z.abs() <= alpha
        phi = torch.where(inside, 0.5 * z * z, alpha * (z.abs() - 0.5 * alpha))
        return phi, z.clamp(-alpha, alpha), inside.to(z.dtype)
    if penalty == "welsch":
        a2 = alpha * alpha
        w = torch.exp(-0.5 * z * z / a2)
        return 1 - w, z * w / a2, w * (1 - z * z / a2) / a2
    if penalty == "truncated_quadratic":
        inside = z.abs() < alpha
        return (
            0.5 * torch.minimum(z * z, alpha * alpha),
            torch.where(inside, z, 0),
            inside.to(z.dtype),
        )
    raise ValueError(f"unknown penalty {penalty!r}")


def _step_tol(y: Tensor, alpha: Tensor) -> Tensor:
    return 16 * torch.finfo(y.dtype).eps * (y.abs() + alpha)


def _bracketed_newton(penalty: str, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    lo = x.amin(-1)
    hi = x.amax(-1)
    y = x.median(-1).values if penalty == "huber" else x.mean(-1)
    converged = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(MAX_ITER):
        _, psi, dpsi = _derivatives(penalty, y.unsqueeze(-1) - x, alpha)
        g = psi.sum(-1)
        h = dpsi.sum(-1)
        lo = torch.where(g < 0, y, lo)
        hi = torch.where(g > 0, y, hi)
        newton = y - g / torch.where(h > 0, h, 1)
        inside = (h > 0) & (newton > lo) & (newton < hi)
        y_new = torch.where(inside, newton, 0.5 * (lo + hi))
        y_new = torch.where((g == 0) | converged, y, y_new)
        converged = (
            converged
            | ((y_new - y).abs() <= _step_tol(y, alpha))
            | (hi - lo <= _step_tol(y, alpha))
        )
        y = y_new
        if bool(converged.all()):
            break
    return y, converged


def _mm_newton(penalty: str, x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From each start in ``y: (S, ...)``, a local minimiser; returns ``(y, f, converged)``."""
    phi, psi, dpsi = _derivatives(penalty, y.unsqueeze(-1) - x, alpha)
    f, g, h = phi.sum(-1), psi.sum(-1), dpsi.sum(-1)
    converged = torch.zeros_like(y, dtype=torch.bool)
    eps = torch.finfo(y.dtype).eps
    for _ in range(MAX_ITER):
        mm = _mm_step(penalty, y, x, alpha)
        use_newton = h > 0
        y_try = torch.where(use_newton, y - g / torch.where(use_newton, h, 1), mm)
        phi, psi, dpsi = _derivatives(penalty, y_try.unsqueeze(-1) - x, alpha)
        f_try = phi.sum(-1)
        # Near the optimum the decrease is below the resolution of f: allow a few ulps.
        slack = 8 * eps * f.abs()
        worse = f_try > f + slack
        if bool(worse.any()):
            # A Newton step that raised the objective is replaced by the (monotone) MM step.
            use_newton = use_newton & ~worse
            y_try = torch.where(worse, mm, y_try)
            phi, psi, dpsi = _derivatives(penalty, y_try.unsqueeze(-1) - x, alpha)
            f_try = phi.sum(-1)
        step = (y_try - y).abs()
        keep = converged | (f_try > f + slack)
        y = torch.where(keep, y, y_try)
        f = torch.where(keep, f, f_try)
        g = torch.where(keep, g, psi.sum(-1))
        h = torch.where(keep, h, dpsi.sum(-1))
        # A short accepted Newton step leaves an error of order step**2: machine precision.
        newton_done = use_newton & ~keep & (step <= eps**0.5 * (y.abs() + alpha))
        converged = converged | newton_done | (step <= _step_tol(y, alpha))
        if bool(converged.all()):
            break
    return y, f, converged


def _truncated_quadratic_global(x: Tensor, alpha: Tensor) -> Tensor:
    """Global minimiser of ``sum_i min((y - x_i)^2, alpha^2) / 2`` per row, exactly."""
    n = x.shape[-1]
    center = x.mean(-1, keepdim=True)  # centring keeps the prefix-sum algebra accurate
    xs = (x - center).sort(-1).values
    zero = xs.new_zeros(*xs.shape[:-1], 1)
    s1 = torch.cat([zero, xs.cumsum(-1)], -1)
    s2 = torch.cat([zero, (xs * xs).cumsum(-1)], -1)
    breaks = torch.cat([xs - alpha, xs + alpha], -1).sort(-1).values  # (..., 2n)
    lo_b, hi_b = breaks[..., :-1], breaks[..., 1:]
    mid = 0.5 * (lo_b + hi_b)
    # Inliers of a segment: sorted window xs[lo:hi] with |mid - x| < alpha.
    lo = torch.searchsorted(xs, (mid - alpha).contiguous(), right=True)
    hi = torch.searchsorted(xs, (mid + alpha).contiguous(), right=False)
    count = (hi - lo).to(x.dtype)
    sum1 = s1.gather(-1, hi) - s1.gather(-1, lo)
    sum2 = s2.gather(-1, hi) - s2.gather(-1, lo)
    y = (sum1 / count.clamp_min(1)).clamp(lo_b, hi_b)
    value = 0.5 * (count * y * y - 2 * y * sum1 + sum2) + 0.5 * alpha**2 * (n - count)
    best = value.argmin(-1, keepdim=True)
    y = y.gather(-1, best).squeeze(-1) + center.squeeze(-1)
    # Polish: the exact mean of the inliers of the chosen window (one MM step is a no-op at the
    # optimum, and removes the rounding of the prefix sums).
    return _mm_step("truncated_quadratic", y, x, alpha)


def _mm_step(penalty: str, y: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """The reweighted mean: the minimiser of the quadratic majoriser at ``y``."""
    z = y.unsqueeze(-1) - x
    if penalty == "welsch":
        weights = torch.exp(-0.5 * z * z / (alpha * alpha))
    else:
        weights = (z.abs() < alpha).to(x.dtype)
    total = weights.sum(-1)
    mean = (weights * x).sum(-1) / torch.where(total > 0, total, 1)
    return torch.where(total > 0, mean, y)
