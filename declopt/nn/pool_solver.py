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
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from declopt.compiling import maybe_compile
from declopt.errors import NonConvergenceWarning

MAX_ITER = 100
BLOCK = 4
"""Iterations per (compiled) block; convergence is checked between blocks."""


def solve_pool(penalty: str, x: Tensor, alpha: Tensor | None, compile: bool = False) -> Tensor:
    """The minimiser of ``sum_i phi(y - x[..., i]; alpha)`` for every row of ``x``: ``(...)``.

    With ``compile=True`` each block of iterations runs under ``torch.compile`` (one fused pass
    over ``x`` per iteration instead of about ten).
    """
    if penalty == "quadratic":
        return x.mean(-1)
    assert alpha is not None
    alpha = alpha.to(dtype=x.dtype, device=x.device)
    kernels = _kernels(penalty, compile)
    with torch.no_grad():
        if penalty in ("pseudo_huber", "huber"):
            y, converged = _bracketed_newton(kernels, penalty, x, alpha)
        elif penalty == "truncated_quadratic":
            y = _truncated_quadratic_global(x, alpha)
            converged = torch.ones_like(y, dtype=torch.bool)
        else:
            # From the mean and from the median (the seed paper's starts); keep the lower objective.
            y, f, converged = _mm_newton(kernels, x, alpha, x.mean(-1))
            y2, f2, converged2 = _mm_newton(kernels, x, alpha, x.median(-1).values)
            second = f2 < f
            y = torch.where(second, y2, y)
            converged = torch.where(second, converged2, converged)
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
    """``(phi, psi, psi')`` of ``z`` elementwise (unused outputs are dropped by the compiler)."""
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
        phi = 0.5 * torch.minimum(z * z, alpha * alpha)
        return phi, torch.where(inside, z, torch.zeros_like(z)), inside.to(z.dtype)
    raise ValueError(f"unknown penalty {penalty!r}")


def _step_tol(y: Tensor, alpha: Tensor) -> Tensor:
    return 16 * torch.finfo(y.dtype).eps * (y.abs() + alpha)


@dataclass(frozen=True)
class _Kernels:
    """Blocks of ``BLOCK`` iterations as pure tensor functions (compiled or not)."""

    newton_block: Callable[..., tuple[Tensor, ...]]
    mm_block: Callable[..., tuple[Tensor, ...]]
    evaluate: Callable[..., tuple[Tensor, ...]]


@cache
def _kernels(penalty: str, compile: bool) -> _Kernels:
    def newton_block(x: Tensor, alpha: Tensor, y: Tensor, lo: Tensor, hi: Tensor, done: Tensor):
        for _ in range(BLOCK):
            _, psi, dpsi = _derivatives(penalty, y.unsqueeze(-1) - x, alpha)
            g, h = psi.sum(-1), dpsi.sum(-1)
            lo = torch.where(g < 0, y, lo)
            hi = torch.where(g > 0, y, hi)
            newton = y - g / torch.where(h > 0, h, torch.ones_like(h))
            inside = (h > 0) & (newton > lo) & (newton < hi)
            y_new = torch.where(inside, newton, 0.5 * (lo + hi))
            y_new = torch.where((g == 0) | done, y, y_new)
            tol = _step_tol(y, alpha)
            done = done | ((y_new - y).abs() <= tol) | (hi - lo <= tol)
            y = y_new
        return y, lo, hi, done

    def evaluate(x: Tensor, alpha: Tensor, y: Tensor):
        phi, psi, dpsi = _derivatives(penalty, y.unsqueeze(-1) - x, alpha)
        return phi.sum(-1), psi.sum(-1), dpsi.sum(-1)

    def mm_block(x: Tensor, alpha: Tensor, y, f, g, h, done):
        eps = torch.finfo(y.dtype).eps
        for _ in range(BLOCK):
            mm = _mm_step(penalty, y, x, alpha)
            use_newton = h > 0
            newton = y - g / torch.where(use_newton, h, torch.ones_like(h))
            f_newton, g_newton, h_newton = evaluate(x, alpha, newton)
            f_mm, g_mm, h_mm = evaluate(x, alpha, mm)
            # Near the optimum the decrease is below the resolution of f: allow a few ulps.
            slack = 8 * eps * f.abs()
            # A Newton step that would raise the objective is replaced by the (monotone) MM step.
            take_newton = use_newton & (f_newton <= f + slack)
            y_try = torch.where(take_newton, newton, mm)
            f_try = torch.where(take_newton, f_newton, f_mm)
            step = (y_try - y).abs()
            keep = done | (f_try > f + slack)
            y = torch.where(keep, y, y_try)
            f = torch.where(keep, f, f_try)
            g = torch.where(keep, g, torch.where(take_newton, g_newton, g_mm))
            h = torch.where(keep, h, torch.where(take_newton, h_newton, h_mm))
            # A short accepted Newton step leaves an error of order step**2: machine precision.
            newton_done = take_newton & ~keep & (step <= eps**0.5 * (y.abs() + alpha))
            done = done | newton_done | (step <= _step_tol(y, alpha))
        return y, f, g, h, done

    return _Kernels(
        newton_block=maybe_compile(newton_block, compile),
        mm_block=maybe_compile(mm_block, compile),
        evaluate=maybe_compile(evaluate, compile),
    )


def _bracketed_newton(
    kernels: _Kernels, penalty: str, x: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor]:
    lo, hi = x.amin(-1), x.amax(-1)
    # Convex: the start changes only the speed. The median of a strided subsample is a cheap
    # robust start (the full median costs more than all the Newton iterations together).
    stride = max(1, x.shape[-1] // 64)
    y = x[..., ::stride].median(-1).values
    done = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(0, MAX_ITER, BLOCK):
        y, lo, hi, done = kernels.newton_block(x, alpha, y, lo, hi, done)
        if bool(done.all()):
            break
    return y, done


def _mm_newton(
    kernels: _Kernels, x: Tensor, alpha: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """From the start ``y: (...)``, a local minimiser; returns ``(y, f, converged)``."""
    f, g, h = kernels.evaluate(x, alpha, y)
    done = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(0, MAX_ITER, BLOCK):
        y, f, g, h, done = kernels.mm_block(x, alpha, y, f, g, h, done)
        if bool(done.all()):
            break
    return y, f, done


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
