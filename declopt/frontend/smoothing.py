"""Smooth stand-ins for the nonsmooth atoms, for solving declarations with kinks.

Newton-type solvers stall on the kinks of ``abs``/``max``/``norm1``/``norm_inf``/``maximum``/
``minimum``: at an L1 or L-inf sphere projection the solution sits *on* kinks. The torch backend
therefore solves a sequence of smoothed problems with a smoothing width ``mu -> 0`` (warm-started),
identifies the kinks the solution converges to, and finishes with Newton steps on the original
declaration with those kinks as equalities (:mod:`declopt.backends.nonsmooth`).

``SMOOTHED`` maps an atom class (the same classes as :data:`declopt.frontend.kinks.KINKS`) to a rule
that, given the atom, returns ``f(mu, *inputs)``, a smooth function within ``O(mu)`` of the atom:

* ``|x|  ~  sqrt(x^2 + mu^2) - mu``;
* ``max(x)  ~  mu (logsumexp(x / mu) - log n)`` over ``n`` entries, ``min`` likewise;
* ``norm1``, ``norm_inf``: the same built from the smoothed ``|x|``;
* ``maximum(a, b)  ~  (a + b)/2 + sqrt((a - b)^2/4 + mu^2) - mu``, ``minimum`` likewise.

Each smoothed max-type atom lies *below* the original by at most ``mu`` (``mu log n`` for ``max``)
and is exact where the original's pieces all meet (``|0|``, all entries tied), so a smoothed
constraint ``norm(u, 1) <= r`` is feasible wherever the original is, however small ``r`` is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from cvxpy.atoms.elementwise.abs import abs as abs_
from cvxpy.atoms.elementwise.maximum import maximum
from cvxpy.atoms.elementwise.minimum import minimum
from cvxpy.atoms.max import max as max_
from cvxpy.atoms.min import min as min_
from cvxpy.atoms.norm1 import norm1
from cvxpy.atoms.norm_inf import norm_inf
from torch import Tensor

from declopt.frontend.atoms import _reduction

SmoothEvaluator = Callable[..., Tensor]
"""``f(mu, *inputs) -> Tensor``: a smoothed atom; ``mu`` is a scalar tensor, ``> 0``."""


def smooth_abs(x: Tensor, mu: Tensor) -> Tensor:
    return torch.sqrt(x * x + mu * mu) - mu


def _abs(expr: Any) -> SmoothEvaluator:
    return lambda mu, x: smooth_abs(x, mu)


def _pairwise(sign: float) -> Callable[[Any], SmoothEvaluator]:
    def pair(mu: Tensor, a: Tensor, b: Tensor) -> Tensor:
        half = 0.5 * (a - b)
        return 0.5 * (a + b) + sign * (torch.sqrt(half * half + mu * mu) - mu)

    def rule(expr: Any) -> SmoothEvaluator:
        return lambda mu, *xs: functools.reduce(lambda a, b: pair(mu, a, b), xs)

    return rule


def _soft_extremum(sign: float, of_abs: bool, flatten: bool) -> Callable[[Any], SmoothEvaluator]:
    """``sign mu (logsumexp(sign v / mu) - log n)`` over the atom's axis (``n`` entries per
    reduction), ``v = x`` or the smoothed ``|x|``."""

    def rule(expr: Any) -> SmoothEvaluator:
        arg_size = math.prod(int(d) for d in expr.args[0].shape)
        out_size = math.prod(int(d) for d in expr.shape)
        log_n = math.log(max(arg_size // max(out_size, 1), 1))
        lse = _reduction(
            expr,
            lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
            flatten_if_no_axis=flatten,
        )

        def f(mu: Tensor, x: Tensor) -> Tensor:
            v = smooth_abs(x, mu) if of_abs else x
            return sign * mu * (lse(sign * v / mu) - log_n)

        return f

    return rule


def _norm1(expr: Any) -> SmoothEvaluator:
    total = _reduction(
        expr, lambda x, d, k: torch.sum(x, dim=d, keepdim=k), flatten_if_no_axis=True
    )
    return lambda mu, x: total(smooth_abs(x, mu))


SMOOTHED: dict[type, Callable[[Any], SmoothEvaluator]] = {
    abs_: _abs,
    norm1: _norm1,
    maximum: _pairwise(1.0),
    minimum: _pairwise(-1.0),
    max_: _soft_extremum(1.0, of_abs=False, flatten=False),
    min_: _soft_extremum(-1.0, of_abs=False, flatten=False),
    norm_inf: _soft_extremum(1.0, of_abs=True, flatten=True),
}
