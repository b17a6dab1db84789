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
  of the ``2n`` windows that the segments between the breakpoints ``x_i +- alpha`` see is the
  global optimum; one sort finds all of them.

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
        kernels = _kernels(penalty, compile)
        if penalty in ("pseudo_huber", "huber"):
            y, converged = _newton(kernels, rows, alpha, subsample_median(rows))
        elif penalty == "welsch":
            y, s0, converged = _welsch(kernels, rows, alpha, rows.mean(-1))
            y2, s02, converged2 = _welsch(kernels, rows, alpha, median(rows))
            # The lower objective n - sum(w) wins; a tie keeps the mean's (the seed's order).
            second = s02 > s0
            y = torch.where(second, y2, y)
            converged = torch.where(second, converged2, converged)
        elif penalty == "truncated_quadratic":
            y = truncated_quadratic_global(rows, alpha, kernels.inlier_mean)
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
        values = np.partition(x.numpy(), k, axis=-1)[..., k]
        return torch.from_numpy(np.ascontiguousarray(values))
    return x.median(-1).values


def subsample_median(x: Tensor) -> Tensor:
    """The median of about :data:`SUBSAMPLE` evenly spaced entries of each row: a robust start."""
    return median(x[..., :: max(1, x.shape[-1] // SUBSAMPLE)])


# ------------------------------------------------------------------------------------------------
# Per-row sums: the only passes over the data


def _pseudo_huber_sums(x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum psi, sum psi')`` at ``y``: with ``t = z / alpha`` and ``s = (1 + t^2)^(-1/2)``,
    ``psi = alpha t s`` and ``psi' = s^3``."""
    t = (y.unsqueeze(-1) - x).div_(alpha)
    s = torch.addcmul(t.new_ones(()), t, t).rsqrt_()
    h = s.pow(3).sum(-1)
    g = t.mul_(s).sum(-1) * alpha
    return g, h


def _huber_sums(x: Tensor, alpha: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum psi, sum psi', distance from y to the nearest kink)``; ``psi = clamp(z, +-alpha)``."""
    z = y.unsqueeze(-1) - x
    g = z.clamp(-alpha, alpha).sum(-1)
    u = z.abs_().sub_(alpha)  # |z| - alpha: <= 0 inside, 0 on a kink
    h = (u <= 0).sum(-1, dtype=x.dtype)
    kink = u.abs_().amin(-1)
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
    inlier_mean: Callable[[Tensor, Tensor, Tensor], Tensor]
    block_size: int


def _newton_step(penalty, alpha, y, g, h, kink, lo, hi, done):
    """One safeguarded Newton step from ``y`` (whose sums are ``g, h``) inside ``[lo, hi]``.

    Returns the next point, whether it is final (no further evaluation needed), and ``done``.
    """
    tol = _tolerance(y, alpha)
    usable = h > 0
    step = -g / torch.where(usable, h, torch.ones_like(h))
    newton = y + step
    inside = usable & (newton >= lo) & (newton <= hi)
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
    def inlier_mean(x: Tensor, alpha: Tensor, y: Tensor) -> Tensor:
        """Mean of the entries within ``alpha`` of ``y`` (``y`` where there are none)."""
        inside = (y.unsqueeze(-1) - x).abs() < alpha
        count = inside.sum(-1, dtype=x.dtype)
        total = torch.where(inside, x, torch.zeros_like(x)).sum(-1)
        return torch.where(count > 0, total / count.clamp_min(1), y)

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
                y, y_try, newton, done = _welsch_step(alpha, a2, eps, y, s0, s1, s2, s3, accept, done)
            return y, s0, s1, s2, s3, y_try, newton, done

    else:  # truncated quadratic: no iterations

        def start(x, alpha, y):
            raise NotImplementedError

        def block(*args):
            raise NotImplementedError

    return _Kernels(
        start=maybe_compile(start, compile),
        block=maybe_compile(block, compile),
        inlier_mean=maybe_compile(inlier_mean, compile),
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
    # Compiled blocks cost a fixed overhead per call: check convergence every 2 iterations.
    return _make_kernels(penalty, compile, 2 if compile else 1)


# ------------------------------------------------------------------------------------------------
# Drivers: convergence checks and compaction of the rows still running


class _Active:
    """Rows still iterating: ``index`` into the full batch, and their state tensors."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.index: Tensor | None = None  # None: all rows, in order
        self.size = size
        self.device = device

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
    active = _Active(y.shape[0], y.device)
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
) -> tuple[Tensor, Tensor, Tensor]:
    """From the start ``y``, a local minimiser: ``(y, sum of weights there, converged)``."""
    out = torch.empty_like(y)
    weight = torch.empty_like(y)
    converged = torch.zeros_like(y, dtype=torch.bool)
    active = _Active(y.shape[0], y.device)
    s0, s1, s2, s3 = kernels.start(x, alpha, y)
    eps = torch.finfo(x.dtype).eps
    done = torch.zeros_like(converged)
    accept = ~done
    y, y_try, newton, done = _welsch_step(alpha, alpha * alpha, eps, y, s0, s1, s2, s3, accept, done)
    state = (x, y, s0, s1, s2, s3, y_try, newton, done)
    for _ in range(0, MAX_ITER, kernels.block_size):
        remaining = int((~state[-1]).sum())
        if remaining == 0 or remaining < _COMPACT_BELOW * state[-1].shape[0]:
            _finish(active, out, converged, state[1], state[-1], weight, state[2])
            if remaining == 0:
                return out, weight, converged
            state = active.compact(~state[-1], *state)
        xa, *rest = state
        state = (xa, *kernels.block(xa, alpha, *rest))
    _finish(active, out, converged, state[1], state[-1], weight, state[2])
    return out, weight, converged


def _finish(active, out, converged, y, done, extra_out=None, extra=None) -> None:
    """Write the rows of the active set back into the full-batch outputs."""
    active.scatter(out, y)
    active.scatter(converged, done)
    if extra_out is not None:
        active.scatter(extra_out, extra)


# ------------------------------------------------------------------------------------------------
# Truncated quadratic: exact global minimiser


def truncated_quadratic_global(
    x: Tensor, alpha: Tensor, inlier_mean: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
) -> Tensor:
    """Global minimiser of ``sum_i min((y - x_i)^2, alpha^2) / 2`` for every row of ``x: (B, n)``.

    Minimising is maximising ``G(y) = sum_i (alpha^2 - (y - x_i)^2)_+``. For any set ``W`` of
    entries, ``G(y) >= sum_{i in W} (alpha^2 - (y - x_i)^2)`` (dropping ``(.)_+`` and entries
    only lowers the sum), so ``Q(W) = |W| alpha^2 - sum_W (x_i - mean_W)^2 <= max G``, with
    equality for the inlier set of the optimum. Between consecutive breakpoints ``x_i +- alpha``
    the inlier set is a window of the sorted data: ``(x_j - 2 alpha, x_j]`` after the breakpoint
    ``x_j - alpha`` and ``(x_j, x_j + 2 alpha)`` after ``x_j + alpha``. The optimum's set is one of
    these ``2n`` windows, so the best window's mean is a global minimiser (ties: any of them).

    One sort of the ``2n`` values ``x_j`` and ``x_j - 2 alpha`` gives both kinds of window (their
    ends are ranks in the merged order); prefix sums give every window's ``Q``. The chosen mean is
    polished by one reweighting step on the original data (exact inlier mean).
    """
    b, n = x.shape
    merged_x, left, right = _windows(x, alpha)
    j1 = torch.arange(1, n + 1, device=x.device)
    # Every window holds its own end x_j (alpha below the resolution of x makes x_j - 2 alpha
    # round to x_j); a smaller window is still a valid lower bound.
    left = torch.minimum(left, j1 - 1)
    center = merged_x[:, n // 2 : n // 2 + 1]
    acc = torch.float64
    d = (merged_x - center).to(acc)
    p1 = torch.nn.functional.pad(d.cumsum(-1), (1, 0))
    p2 = torch.nn.functional.pad((d * d).cumsum(-1), (1, 0))
    a2 = alpha.to(acc) ** 2
    # R_j = sorted[left_j : j + 1]; L_j = sorted[j + 1 : right_j] (may be empty)
    count_r = (j1 - left).to(acc)
    s1_r = p1[:, 1:] - p1.gather(-1, left)
    s2_r = p2[:, 1:] - p2.gather(-1, left)
    count_l = (right - j1).to(acc)
    s1_l = p1.gather(-1, right) - p1[:, 1:]
    s2_l = p2.gather(-1, right) - p2[:, 1:]
    q_r = count_r * a2 - (s2_r - s1_r * s1_r / count_r)
    safe_l = count_l.clamp_min(1)
    q_l = torch.where(count_l > 0, count_l * a2 - (s2_l - s1_l * s1_l / safe_l), -math.inf)
    q = torch.cat([q_r, q_l], -1)
    means = torch.cat([s1_r / count_r, s1_l / safe_l], -1)
    best = q.argmax(-1, keepdim=True)
    y = (means.gather(-1, best).squeeze(-1) + center.squeeze(-1).to(acc)).to(x.dtype)
    if inlier_mean is None:
        inside = (y.unsqueeze(-1) - x).abs() < alpha
        count = inside.sum(-1, dtype=x.dtype)
        total = torch.where(inside, x, torch.zeros_like(x)).sum(-1)
        return torch.where(count > 0, total / count.clamp_min(1), y)
    return inlier_mean(x, alpha, y)


_INT_FOR = {torch.float32: torch.int32, torch.float64: torch.int64}


def _windows(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sorted rows and, per sorted index ``j``, ``#{x_i <= x_j - 2a}`` and ``#{x_i < x_j + 2a}``.

    One sort of ``x`` and ``q = x - 2a`` together: order-preserving integer keys of the floats
    with the lowest bit replaced by a flag (0 for ``x``, 1 for ``q``), so that ties order ``x``
    first. The flag costs the last bit of the keys: comparisons at one ulp may go either way, which
    changes a window only by entries that sit on a breakpoint and contribute nothing to it. In the
    merged order, the ``x`` before a ``q_j`` count ``#{x_i <= x_j - 2a}`` and the ``q`` before an
    ``x_j`` count ``#{x_i - 2a < x_j}``.
    """
    b, n = x.shape
    itype = _INT_FOR.get(x.dtype)
    if itype is None:  # other dtypes: through float32
        merged, left, right = _windows(x.float(), alpha.float())
        return merged.to(x.dtype), left, right
    bits = torch.finfo(x.dtype).bits
    sign_mask = (1 << (bits - 1)) - 1
    keys = torch.empty(b, 2 * n, dtype=itype, device=x.device)
    torch.bitwise_and(_order_key(x, sign_mask, bits), -2, out=keys[:, :n])
    torch.bitwise_or(_order_key(x - 2 * alpha, sign_mask, bits), 1, out=keys[:, n:])
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=-1)
    else:
        keys = keys.sort(-1).values
    is_q = (keys & 1).bool()
    count_q = is_q.cumsum(-1)  # q's up to and including each position
    position = torch.arange(1, 2 * n + 1, device=x.device)
    count_x = position - count_q  # x's up to and including each position
    # Scatter each x to its sorted index j (count_x - 1) and each q to its j (count_q - 1).
    slot_x = torch.where(is_q, n, count_x - 1)
    slot_q = torch.where(is_q, count_q - 1, n)
    sorted_keys = keys.new_zeros(b, n + 1).scatter_(-1, slot_x, keys)[:, :n]
    right = count_q.new_zeros(b, n + 1).scatter_(-1, slot_x, count_q)[:, :n]
    left = count_x.new_zeros(b, n + 1).scatter_(-1, slot_q, count_x)[:, :n]
    merged = _from_order_key(sorted_keys & -2, sign_mask, x.dtype)
    return merged, left, right


def _order_key(v: Tensor, sign_mask: int, bits: int) -> Tensor:
    """Integers ordered as the floats ``v`` (``-0.0`` as ``+0.0``)."""
    i = (v + 0.0).view(_INT_FOR[v.dtype])
    return i ^ ((i >> (bits - 1)) & sign_mask)


def _from_order_key(k: Tensor, sign_mask: int, dtype: torch.dtype) -> Tensor:
    bits = torch.finfo(dtype).bits
    return (k ^ ((k >> (bits - 1)) & sign_mask)).view(dtype)
