"""Exact batched solver for one-dimensional robust pooling ``min_y sum_i phi(y - x_i)``.

The problem is scalar per pooled row, so an iteration needs only a few sums over the row
(``sum psi``, ``sum psi'``, ...), all computed in one pass over the data. Everything else is
per-row arithmetic. The iterations are pure tensor functions: eagerly they are a handful of
elementwise passes, under ``torch.compile`` one fused kernel each.

* Convex penalties (pseudo-Huber, Huber): Newton, safeguarded by the bracket ``[min x, max x]``
  (``psi = phi'`` is nondecreasing, so the sign of ``sum psi`` tells on which side the root is).
  A Newton step is *final* when the error it leaves is provably below the tolerance, so the last
  iterate is never re-evaluated: for pseudo-Huber ``|psi''| <= 1.5 psi' / alpha`` bounds the
  quadratic term; Huber is piecewise quadratic, and a step shorter than the distance from ``y``
  to the nearest kink ``|y - x_i| = alpha`` lands exactly on the root.
* Welsch (nonconvex): Newton where the curvature is positive, the majorise-minimise step
  (reweighted mean, monotone in the objective) elsewhere. A Newton step is checked in the next
  pass (the same pass that evaluates the next step) and undone for an MM step if it raised the
  objective. Started from the mean and from the exact median, keeping the lower objective (the
  seed paper's rule).
* Truncated quadratic (nonconvex): exact global minimum (see
  :func:`truncated_quadratic_global`): ``max_y sum_i (alpha^2 - (y - x_i)^2)_+`` is attained at
  the mean of a window of the sorted data, and every window's value is a lower bound, so the best
  of the windows a sweep over the ``2n`` breakpoints ``x_i +- alpha`` sees is the global
  optimum: one sort of the breakpoints (as float64, exact for float32 data) and running sums.

Rows that converge leave the batch (the others are compacted) so that a few slow rows do not cost
full passes. On CPU the sorts and medians use NumPy (its SIMD sort and selection are 10-30x
faster than ``torch.sort``/``torch.median`` there).

Only the forward lives here; gradients come from the declaration (:class:`declopt.Layer`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

from declopt.compiling import maybe_compile
from declopt.errors import NonConvergenceWarning

MAX_ITER = 100
"""Largest number of passes over the data per start."""

SUBSAMPLE = 64
"""The convex penalties start from the median of about this many evenly spaced entries."""

_COMPACT_BELOW = 0.5
"""Active rows are compacted when fewer than this fraction of the current batch remain."""


def solve_pool(penalty: str, x: Tensor, alpha: Tensor | None, compile: bool = False) -> Tensor:
    """The minimiser of ``sum_i phi(y - x[..., i]; alpha)`` for every row of ``x``: ``(...)``.

    ``alpha`` is a positive scalar tensor (unused for ``"quadratic"``). With ``compile=True`` the
    iterations run under ``torch.compile`` (one fused pass over ``x`` per iteration instead of
    several; falls back to eager if compilation fails).
    """
    if penalty == "quadratic":
        return x.mean(-1)
    if alpha is None:
        raise ValueError(f"penalty {penalty!r} needs alpha")
    alpha = alpha.detach().to(dtype=x.dtype, device=x.device).reshape(())
    batch, n = x.shape[:-1], x.shape[-1]
    with torch.no_grad():
        rows = x.detach().reshape(-1, n)
        if rows.shape[0] == 0 or n == 0:
            return x.new_full(batch, math.nan) if n == 0 else x.new_zeros(batch)
        if n == 1:  # every penalty is minimised at z = 0 only
            return rows[:, 0].clone().reshape(batch)
        if compile and rows.shape[0] == 1:
            # Compiled kernels specialise on size-1 dims: keep one set of kernels for all sizes.
            two = rows.expand(2, n).contiguous()
            return solve_pool(penalty, two, alpha, compile)[:1].reshape(batch)
        if penalty != "truncated_quadratic":
            kernels = _kernels(penalty, compile)
        if penalty in ("pseudo_huber", "huber"):
            y, converged = _newton(kernels, rows, alpha, subsample_median(rows))
        elif penalty == "welsch":
            y, converged = _welsch_pool(kernels, rows, alpha)
        elif penalty == "truncated_quadratic":
            if rows.dtype not in (torch.float32, torch.float64):
                rows = rows.float()
            y = truncated_quadratic_global(rows, alpha.to(rows.dtype), compile).to(x.dtype)
            converged = None
        else:
            raise ValueError(f"unknown penalty {penalty!r}")
    if converged is not None and not bool(converged.all()):
        count = int((~converged).sum())
        warnings.warn(
            f"robust pooling ({penalty}): {count} of {converged.numel()} rows did not converge in "
            f"{MAX_ITER} iterations; their result is the last iterate",
            NonConvergenceWarning,
            stacklevel=4,
        )
    return y.reshape(batch)


# ------------------------------------------------------------------------------------------------
# Medians (exact, ``torch.median``'s lower median for even counts)


def median(x: Tensor) -> Tensor:
    """The lower median of the last dim (as ``torch.median``), via NumPy's selection on CPU."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        k = (x.shape[-1] - 1) // 2
        values = np.partition(x.detach().numpy(), k, axis=-1)[..., k]
        return torch.from_numpy(np.ascontiguousarray(values))
    return x.median(-1).values


def subsample_median(x: Tensor) -> Tensor:
    """The median of about :data:`SUBSAMPLE` evenly spaced entries of each row: a robust start."""
    return median(x[..., :: max(1, x.shape[-1] // SUBSAMPLE)])


# ------------------------------------------------------------------------------------------------
# Per-row sums: the only passes over the data


def _pseudo_huber_sums(x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum psi, sum psi')`` at ``y``: with ``t = z / alpha`` and ``s = (1 + t^2)^(-1/2)``,
    ``psi = alpha t s`` and ``psi' = s^3``.

    ``t`` is clamped where ``t^2`` would overflow (``|t| > 9e18`` in float32): there ``t s``
    is ``+-1`` to rounding and ``s^3`` underflows to 0 either way, where the overflow gave
    ``t s = 0`` (an outlier at ``1e20`` in float32 pulled with no force: the pooled value of
    ``[0.1, -0.2, 0.05, 0.3, 1e20]`` came out 0.063 instead of 0.332).
    """
    bound = 0.5 * math.sqrt(torch.finfo(x.dtype).max)  # t^2 <= max / 4: finite
    t = (y.unsqueeze(-1) - x).div_(alpha).clamp_(-bound, bound)
    s = torch.addcmul(t.new_ones(()), t, t).rsqrt_()
    h = s.pow(3).sum(-1)
    g = t.mul_(s).sum(-1) * alpha
    return g, h


def _huber_sums(x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum psi, sum psi', distance from y to the nearest kink)``; ``psi = clamp(z, +-alpha)``.

    From ``u = |z| - alpha`` (``<= 0`` inside, 0 on a kink) and its positive part ``e``:
    ``psi = z - sign(z) e`` and ``psi' = 1 - sign(e)`` (exact: ``e > 0`` iff ``|z| > alpha``).
    Eager CPU kernels of comparisons, of a bool mask summed as floats and of ``clamp`` /
    ``maximum`` with tensor bounds cost 2.5-10x an arithmetic pass (1M floats: 1.1 ms for
    ``(u <= 0).sum(dtype=float)`` against 0.2 ms for ``sign(e).sum()``), and alpha must stay a
    tensor (a float would recompile per value under ``torch.compile``).
    """
    z = y.unsqueeze(-1) - x
    u = z.abs().sub_(alpha)
    kink = u.abs().amin(-1)
    excess = u.clamp_min_(0)
    outside = torch.sign(excess).sum(-1)
    g = z.sum(-1) - torch.sign(z).mul_(excess).sum(-1)
    h = x.shape[-1] - outside
    return g, h, kink


def _welsch_sums(x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``sum w z^k`` for ``k = 0..3`` at ``y``, with ``z = y - x``, ``w = exp(-z^2 / 2 alpha^2)``.

    ``phi = 1 - w``, so the objective is ``n - S0``; ``psi = w z / a^2`` gives ``g = S1 / a^2``,
    ``h = (S0 - S2 / a^2) / a^2``, ``h' = (S3 / a^2 - 3 S1) / a^4``; the MM step is ``y - S1/S0``.
    """
    z = y.unsqueeze(-1) - x
    w = (z * z).mul_(-0.5 / (alpha * alpha)).exp_()
    s0 = w.sum(-1)
    s1 = w.mul_(z).sum(-1)
    s2 = w.mul_(z).sum(-1)
    s3 = w.mul_(z).sum(-1)
    return s0, s1, s2, s3


def _tolerance(y: Tensor, alpha: Tensor) -> Tensor:
    """The target accuracy of ``y``: a few ulps of ``|y| + alpha``."""
    return 8 * torch.finfo(y.dtype).eps * (y.abs() + alpha)


# ------------------------------------------------------------------------------------------------
# Iterations as pure tensor functions (compiled together when asked)


@dataclass(frozen=True)
class _Kernels:
    """The pure tensor functions of one penalty (compiled or not)."""

    start: Callable[..., tuple[Tensor, ...]]
    block: Callable[..., tuple[Tensor, ...]]
    block_size: int


def _newton_step(penalty, alpha, y, g, h, kink, lo, hi, done):
    """One safeguarded Newton step from ``y`` (whose sums are ``g, h``) inside ``[lo, hi]``.

    Returns the next point and ``done``. A row is done when its step is *final* (the point it
    lands on is within the tolerance, so it is not evaluated again) or its bracket has collapsed.
    """
    tol = _tolerance(y, alpha)
    usable = h > 0
    step = -g / torch.where(usable, h, torch.ones_like(h))
    newton = y + step
    # Strictly inside: the bracket's ends are data extremes or points already evaluated with
    # g != 0, never the root; a step onto one (Huber from one kink to the next: [1.3, 1.0] with
    # alpha = 0.3 cycled 1.0 -> 1.3 -> 1.0) bisects instead.
    inside = usable & (newton > lo) & (newton < hi)
    if penalty == "pseudo_huber":
        # |psi''| <= 1.5 psi' / alpha: a step s leaves an error below 1.25 s^2 / alpha.
        exact = (step.abs() <= alpha / 3) & (1.25 * step * step <= 0.5 * tol * alpha)
    else:
        # Piecewise quadratic: no kink crossed means the step lands on the root.
        exact = step.abs() < kink
    final = inside & (exact | (step.abs() <= tol))
    bisect = 0.5 * (lo + hi)
    y_new = torch.where(inside, newton, bisect)
    stop = final | (g == 0) | (hi - lo <= tol)
    y_new = torch.where(done | (g == 0) | (~final & stop), y, y_new)
    return y_new, done | stop


def _make_kernels(penalty: str, compile: bool, block_size: int) -> _Kernels:
    if penalty in ("pseudo_huber", "huber"):

        def sums(x, alpha, y):
            if penalty == "pseudo_huber":
                g, h = _pseudo_huber_sums(x, alpha, y)
                return g, h, h  # the third slot (kink distance) is unused
            return _huber_sums(x, alpha, y)

        def start(x, alpha, y):
            g, h, kink = sums(x, alpha, y)
            lo, hi = x.amin(-1), x.amax(-1)
            lo = torch.where(g < 0, y, lo)
            hi = torch.where(g > 0, y, hi)
            return g, h, kink, lo, hi

        def block(x, alpha, y, g, h, kink, lo, hi, done):
            for _ in range(block_size):
                y, done = _newton_step(penalty, alpha, y, g, h, kink, lo, hi, done)
                g, h, kink = sums(x, alpha, y)
                lo = torch.where(g < 0, y, lo)
                hi = torch.where(g > 0, y, hi)
            return y, g, h, kink, lo, hi, done

    elif penalty == "welsch":

        def start(x, alpha, y):
            return _welsch_sums(x, alpha, y)

        def block(x, alpha, y, s0, s1, s2, s3, y_try, newton, done):
            eps = torch.finfo(x.dtype).eps
            a2 = alpha * alpha
            for _ in range(block_size):
                t0, t1, t2, t3 = _welsch_sums(x, alpha, y_try)
                # A Newton step that lowered sum(w) (raised the objective) is undone; MM steps are
                # monotone. The slack covers the rounding of the sums.
                accept = ~done & (~newton | (t0 >= s0 - 4 * eps * (s0 + 1)))
                y = torch.where(accept, y_try, y)
                s0 = torch.where(accept, t0, s0)
                s1 = torch.where(accept, t1, s1)
                s2 = torch.where(accept, t2, s2)
                s3 = torch.where(accept, t3, s3)
                y, y_try, newton, done = _welsch_step(
                    alpha, a2, eps, y, s0, s1, s2, s3, accept, done
                )
            return y, s0, s1, s2, s3, y_try, newton, done

    else:
        raise ValueError(f"no iterations for penalty {penalty!r}")

    # maybe_compile gives each kernel a TorchDynamo cache of its own (one code object each).
    return _Kernels(
        start=maybe_compile(start, compile),
        block=maybe_compile(block, compile),
        block_size=block_size,
    )


def _welsch_step(alpha, a2, eps, y, s0, s1, s2, s3, accept, done):
    """The next trial point from the accepted ``y`` and its sums; marks converged rows."""
    tol = _tolerance(y, alpha)
    curvature = s0 - s2 / a2  # a^2 h
    use_newton = accept & (curvature > 0)
    step_newton = -s1 / torch.where(use_newton, curvature, torch.ones_like(curvature))
    step_mm = -s1 / torch.where(s0 > 0, s0, torch.ones_like(s0))
    step = torch.where(use_newton, step_newton, step_mm)
    # Newton leaves an error of about |h'| s^2 / (2 h) with a^2 h' = (S3 / a^2 - 3 S1) / a^2.
    third = (s3 / a2 - 3 * s1).abs() / a2
    predicted = third * step * step / (2 * torch.where(use_newton, curvature, torch.ones_like(s0)))
    final = use_newton & (step.abs() <= 0.1 * alpha) & (predicted <= 0.5 * tol)
    # Rounding floor: |sum w z| below the error of the sum itself (|sum w z| <= sqrt(S0 S2)).
    noise = s1.abs() <= 16 * eps * (s0 * s2).clamp_min(0).sqrt()
    small = step.abs() <= tol
    stop = final | small | noise
    y_next = torch.where(~done & (final | (small & ~noise)), y + step, y)
    y_try = torch.where(done | stop, y_next, y + step)
    return torch.where(done | stop, y_next, y), y_try, use_newton, done | stop


@cache
def _kernels(penalty: str, compile: bool) -> _Kernels:
    # A compiled call costs ~50 us on top of its passes: the convex penalties check convergence
    # every 2 iterations. Welsch's passes (exp) cost more than a call, and most rows need one or
    # two: checking after every pass is faster (measured).
    return _make_kernels(penalty, compile, 2 if compile and penalty != "welsch" else 1)


# ------------------------------------------------------------------------------------------------
# Drivers: convergence checks and compaction of the rows still running


class _Active:
    """Rows still iterating: ``index`` into the full batch, and their state tensors."""

    def __init__(self) -> None:
        self.index: Tensor | None = None  # None: all rows, in order

    def scatter(self, out: Tensor, value: Tensor) -> None:
        if self.index is None:
            out.copy_(value)
        else:
            out[self.index] = value

    def compact(self, keep: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Keep the rows where ``keep``; at least two so that compiled kernels never see one."""
        if int(keep.sum()) < 2:
            extra = (~keep).nonzero()[:2].squeeze(-1)
            keep = keep.clone()
            keep[extra] = True
        where = keep.nonzero().squeeze(-1)
        self.index = where if self.index is None else self.index[where]
        return tuple(s[where] for s in state)


def _newton(kernels: _Kernels, x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Convex penalties: safeguarded Newton from ``y``; returns ``(y, converged)``."""
    out = torch.empty_like(y)
    converged = torch.zeros_like(y, dtype=torch.bool)
    active = _Active()
    g, h, kink, lo, hi = kernels.start(x, alpha, y)
    done = torch.zeros_like(converged)
    state = (x, y, g, h, kink, lo, hi, done)
    for _ in range(0, MAX_ITER, kernels.block_size):
        xa, y, g, h, kink, lo, hi, done = state
        y, g, h, kink, lo, hi, done = kernels.block(xa, alpha, y, g, h, kink, lo, hi, done)
        state = (xa, y, g, h, kink, lo, hi, done)
        remaining = int((~done).sum())
        if remaining == 0 or remaining < _COMPACT_BELOW * done.shape[0]:
            _finish(active, out, converged, y, done)
            if remaining == 0:
                return out, converged
            state = active.compact(~done, *state)
    _finish(active, out, converged, state[1], state[-1])
    return out, converged


def _welsch(
    kernels: _Kernels, x: Tensor, alpha: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the start ``y``, a stationary point: ``(y, sum of weights there, alpha^2 times the
    curvature there, converged)``; a local minimiser unless the start was a stationary point
    already (the curvature tells)."""
    out = torch.empty_like(y)
    weight = torch.empty_like(y)
    bend = torch.empty_like(y)
    a2 = alpha * alpha
    converged = torch.zeros_like(y, dtype=torch.bool)
    active = _Active()
    s0, s1, s2, s3 = kernels.start(x, alpha, y)
    eps = torch.finfo(x.dtype).eps
    done = torch.zeros_like(converged)
    accept = ~done
    y, y_try, newton, done = _welsch_step(
        alpha, alpha * alpha, eps, y, s0, s1, s2, s3, accept, done
    )
    state = (x, y, s0, s1, s2, s3, y_try, newton, done)
    for _ in range(0, MAX_ITER, kernels.block_size):
        remaining = int((~state[-1]).sum())
        if remaining == 0 or remaining < _COMPACT_BELOW * state[-1].shape[0]:
            _finish(active, out, converged, state[1], state[-1], weight, state[2])
            active.scatter(bend, state[2] - state[4] / a2)
            if remaining == 0:
                return out, weight, bend, converged
            state = active.compact(~state[-1], *state)
        xa, *rest = state
        state = (xa, *kernels.block(xa, alpha, *rest))
    _finish(active, out, converged, state[1], state[-1], weight, state[2])
    active.scatter(bend, state[2] - state[4] / a2)
    return out, weight, bend, converged


def _welsch_pool(kernels: _Kernels, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """The better of the local minima from the mean and from the median (the lower objective
    ``n - sum(w)``; a tie keeps the mean's, the seed's order); ``(y, converged)``.

    A start that is itself a stationary point but not a minimum (symmetric data: the mean and
    the median at the centre of two clusters, a local maximum) stops there at once; such rows
    continue from ``alpha`` either side and keep the better minimum."""
    y, s0, bend, converged = _welsch(kernels, x, alpha, x.mean(-1))
    y2, s02, bend2, converged2 = _welsch(kernels, x, alpha, median(x))
    second = s02 > s0
    y, s0 = torch.where(second, y2, y), torch.where(second, s02, s0)
    bend = torch.where(second, bend2, bend)
    converged = torch.where(second, converged2, converged)
    stuck = (bend <= 0).nonzero().squeeze(-1)
    if stuck.numel():
        xs, ys, best = x[stuck], y[stuck], s0[stuck]
        y_best, ok = ys, converged[stuck]
        for side in (-1.0, 1.0):
            y_new, s_new, _, ok_new = _welsch(kernels, xs, alpha, ys + side * alpha)
            better = s_new > best
            y_best = torch.where(better, y_new, y_best)
            ok = torch.where(better, ok_new, ok)
            best = torch.where(better, s_new, best)
        y, converged = y.index_copy(0, stuck, y_best), converged.index_copy(0, stuck, ok)
    return y, converged


def _finish(active, out, converged, y, done, extra_out=None, extra=None) -> None:
    """Write the rows of the active set back into the full-batch outputs."""
    active.scatter(out, y)
    active.scatter(converged, done)
    if extra_out is not None:
        active.scatter(extra_out, extra)


# ------------------------------------------------------------------------------------------------
# Truncated quadratic: exact global minimiser


def truncated_quadratic_global(x: Tensor, alpha: Tensor, compile: bool = False) -> Tensor:
    """Global minimiser of ``sum_i min((y - x_i)^2, alpha^2) / 2`` for every row of ``x: (B, n)``.

    Minimising is maximising ``G(y) = sum_i (alpha^2 - (y - x_i)^2)_+``. For any set ``W`` of
    entries, ``G(y) >= sum_{i in W} (alpha^2 - (y - x_i)^2)`` (dropping ``(.)_+`` and entries
    only lowers the sum), so ``Q(W) = |W| alpha^2 - sum_W (x_i - mean_W)^2 <= max G``, with
    equality for the inlier set of an optimum. The inlier set is constant between consecutive
    breakpoints ``x_i +- alpha``; so the best of the windows seen by a sweep over the breakpoints
    has a mean that is a global minimiser (ties: any of them).

    The sweep (shifted by ``-alpha``): ``x_i`` enters the inlier set at ``q_i = x_i - 2 alpha``
    and leaves at ``x_i``. One sort of the ``2n`` event coordinates orders the events; running
    sums over the sorted events give the count, sum and sum of squares of the inlier set after
    every event, hence every window's ``Q``. The order of events at the *same* coordinate does not
    matter: the set after all of them is the same, and the sets in between are still lower bounds.
    The chosen mean is polished by one reweighting step on the original data (exact inlier mean).
    """
    kernels = _tq_kernels(compile)
    keys, shift = kernels.keys(x, alpha)
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=-1)  # NumPy's SIMD sort, in place: ~30x torch.sort on CPU
    else:
        keys = keys.sort(-1).values
    y, found = kernels.select(keys, shift, x, alpha)
    if not bool(found.all()):
        # alpha below the rounding of the window mean (an optimum always has an inlier): snap to
        # the nearest entry, which is in the best window, and take the mean of its inliers.
        rows = (~found).nonzero().squeeze(-1)
        xr = x[rows]
        near = xr.gather(-1, (y[rows].unsqueeze(-1) - xr).abs().argmin(-1, keepdim=True))
        y[rows] = _inlier_mean(xr, alpha, near.squeeze(-1))[0]
    return y


def _tq_keys(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """The ``2n`` events of each row as float64 whose lowest bit tells the kind (1: enter).

    ``x`` leaves at ``x`` (float32 data is exact in float64, and so is ``x - shift``) and enters
    at ``q = x - shift``, with ``shift = 2 alpha``, or ``3 (max x - min x)`` when smaller (the same
    order of events: every ``q`` below every ``x``; it keeps ``q + shift`` exact for huge
    ``alpha``), and ``q`` strictly below ``x`` (``alpha`` below the resolution of ``x``). Setting
    or clearing the lowest bit moves a value by at most one float64 ulp; that reorders only events
    at (float64-) equal coordinates, which does not matter. Returns the events and ``shift``.
    """
    wide = x.to(torch.float64)
    if x.dtype == torch.float64:  # float32 values already end in zero bits
        wide = wide.view(torch.int64).bitwise_and(-2).view(torch.float64)
    span = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).to(torch.float64)
    shift = torch.minimum(2 * alpha.to(torch.float64), 3 * span)
    below = torch.nextafter(wide, torch.tensor(-math.inf, dtype=torch.float64, device=x.device))
    q = torch.minimum(wide - shift, below).clamp_min_(-torch.finfo(torch.float64).max)
    q = q.view(torch.int64).bitwise_or_(1).view(torch.float64)
    return torch.cat([wide, q], -1), shift


def _tq_select(keys: Tensor, shift: Tensor, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """The best window's polished mean from the sorted events, and whether it has inliers."""
    n = x.shape[-1]
    enter = (keys.view(torch.int64) & 1).bool()
    center = keys[:, n : n + 1]  # an event coordinate: within the data's range
    # +-(entry - center): + when the entry enters the inlier set, - when it leaves
    signed = torch.where(enter, keys + (shift - center), center - keys)
    square = signed * signed
    square = torch.where(enter, square, -square)
    count = torch.where(enter, 1, -1).to(torch.int32).cumsum(-1, dtype=torch.int32)
    s1 = signed.cumsum(-1)
    s2 = square.cumsum_(-1)
    size = count.to(torch.float64)
    safe = size.clamp_min(1)
    # Q = |W| alpha^2 - (sum_W d^2 - (sum_W d)^2 / |W|), in place (eager: fewer passes)
    q = (s1 * s1).div_(safe).add_(size * alpha.to(torch.float64) ** 2).sub_(s2)
    best = q.masked_fill_(count <= 0, 0).argmax(-1, keepdim=True)
    y = (s1.gather(-1, best) / safe.gather(-1, best) + center).squeeze(-1).to(x.dtype)
    return _inlier_mean(x, alpha, y)


def _inlier_mean(x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of the entries within ``alpha`` of ``y`` (the MM step), and whether there are any."""
    z = x - y.unsqueeze(-1)  # summing offsets from y keeps the mean accurate far from 0
    inside = z.abs() < alpha
    count = inside.sum(-1, dtype=x.dtype)
    total = torch.where(inside, z, torch.zeros_like(z)).sum(-1)
    return y + total / count.clamp_min(1), count > 0


@dataclass(frozen=True)
class _TQKernels:
    keys: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    select: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@cache
def _tq_kernels(compile: bool) -> _TQKernels:
    return _TQKernels(maybe_compile(_tq_keys, compile), maybe_compile(_tq_select, compile))
