"""Smooth stand-ins for the nonsmooth atoms, for solving declarations with kinks.

Newton-type solvers stall on kinks: at an L1 or L-inf sphere projection the solution sits *on*
them. The torch backend therefore solves a sequence of smoothed problems with a smoothing width
``mu -> 0`` (warm-started), identifies the kinks the solution converges to, and finishes with
Newton steps on the original declaration with those kinks as equalities
(:mod:`declopt.backends.nonsmooth`; see docs/design.md, 'Kinks'). Each nonsmooth
:class:`~declopt.frontend.atoms.base.AtomRule` builds its ``smoothed`` form from these:

* ``|x|  ~  sqrt(x^2 + mu^2) - mu``;
* ``max`` of ``n`` entries ``~  mu (logsumexp(x / mu) - log n)``, ``min`` likewise;
* ``maximum(a, b)  ~  (a + b)/2 + sqrt((a - b)^2/4 + mu^2) - mu`` (folded over more arguments);
* the sum of the ``k`` largest ``~  mu (log e_k(exp(x / mu)) - log C(n, k))``, ``e_k`` the
  elementary symmetric polynomial (a soft max over all ``k``-subsets; fractional ``k`` is the
  convex combination of the two neighbouring integers);
* ``cummax``: the soft max of every prefix;
* ``p``-norms (``p > 1``) ``~  |[x; mu]|_p - mu``.

Every smoothed max-type atom lies *below* the original by ``O(mu)`` (``mu log n`` for ``max``,
``mu log C(n, k)`` for ``sum_largest``) and is exact where the original's pieces all meet (``|0|``,
all entries tied), so a smoothed constraint ``norm(u, 1) <= r`` is feasible wherever the original
is, however small ``r`` is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def smooth_abs(x: Tensor, mu: Tensor) -> Tensor:
    return torch.sqrt(x * x + mu * mu) - mu


def pair_max(a: Tensor, b: Tensor, mu: Tensor, sign: float = 1.0) -> Tensor:
    """Smoothed ``maximum(a, b)`` (``sign = -1``: ``minimum``), within ``mu`` of it."""
    half = 0.5 * (a - b)
    return 0.5 * (a + b) + sign * (torch.sqrt(half * half + mu * mu) - mu)


def soft_max(rows: Tensor, mu: Tensor, sign: float = 1.0) -> Tensor:
    """``(R,)``: ``sign mu (logsumexp(sign rows / mu) - log n)`` along the last dim."""
    n = rows.shape[-1]
    return sign * mu * (torch.logsumexp(sign * rows / mu, dim=-1) - math.log(n))


def soft_cummax(rows: Tensor, mu: Tensor) -> Tensor:
    """``(R, n)``: the soft max of every prefix, ``mu (logcumsumexp(x / mu) - log(i + 1))``."""
    counts = torch.arange(1, rows.shape[-1] + 1, dtype=rows.dtype, device=rows.device)
    return mu * (torch.logcumsumexp(rows / mu, dim=-1) - torch.log(counts))


def soft_sum_largest(rows: Tensor, k: int, mu: Tensor) -> Tensor:
    """``(R,)``: smoothed sum of the ``k`` largest entries (integer ``0 <= k <= n``).

    ``mu log e_k(exp(x / mu))`` by the recurrence ``e_j(i) = e_j(i-1) + e_{j-1}(i-1) z_i`` over
    prefixes, each ``j`` one ``logcumsumexp`` over the prefixes where ``e_j`` is nonzero (no
    ``-inf`` anywhere), minus ``mu log C(n, k)``.
    """
    n = rows.shape[-1]
    if k == 0:
        return rows.new_zeros(rows.shape[:-1])
    z = rows / mu
    prev = torch.zeros_like(z[..., :1]).expand(*z.shape[:-1], n + 1)  # log e_0 on prefixes 0..n
    for j in range(1, k + 1):
        # log e_j on prefixes j..n: logcumsumexp over i' = j..i of log e_{j-1}(i' - 1) + z_{i'}.
        prev = torch.logcumsumexp(prev[..., :-1] + z[..., j - 1 :], dim=-1)
    log_binom = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return mu * (prev[..., -1] - log_binom)


def smooth_pnorm(rows: Tensor, p: float, mu: Tensor) -> Tensor:
    """``(R,)``: ``|[x; mu]|_p - mu``, within ``mu`` below ``|x|_p``, exact at the origin."""
    padded = torch.cat([rows, mu.expand(*rows.shape[:-1], 1).to(rows.dtype)], dim=-1)
    return torch.linalg.vector_norm(padded, ord=p, dim=-1) - mu
