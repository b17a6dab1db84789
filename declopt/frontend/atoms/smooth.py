"""Smooth nonlinear atoms: evaluation rules. None has kinks: each is continuously differentiable
on the interior of its domain (``huber`` is C1 only; derivatives may blow up at a domain boundary,
e.g. ``sqrt`` or ``entr`` at 0, which is a domain restriction, not a kink)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cvxpy as cp
import torch
from cvxpy.atoms.cumprod import cumprod
from cvxpy.atoms.elementwise.entr import entr
from cvxpy.atoms.elementwise.exp import exp
from cvxpy.atoms.elementwise.huber import huber
from cvxpy.atoms.elementwise.hyperbolic import asinh, atanh, sinh, tanh
from cvxpy.atoms.elementwise.kl_div import kl_div
from cvxpy.atoms.elementwise.log import log
from cvxpy.atoms.elementwise.log1p import log1p
from cvxpy.atoms.elementwise.logistic import logistic
from cvxpy.atoms.elementwise.normcdf import normcdf
from cvxpy.atoms.elementwise.power import Power, PowerApprox
from cvxpy.atoms.elementwise.rel_entr import rel_entr
from cvxpy.atoms.elementwise.trig import cos, sin, tan
from cvxpy.atoms.elementwise.xexp import xexp
from cvxpy.atoms.log_sum_exp import log_sum_exp
from cvxpy.atoms.one_minus_pos import one_minus_pos
from cvxpy.atoms.prod import Prod
from cvxpy.atoms.quad_form import QuadForm
from cvxpy.atoms.quad_over_lin import quad_over_lin
from torch import Tensor

from declopt.frontend.atoms.base import AtomRule, Evaluator
from declopt.frontend.atoms.tensors import cumulative, dims_of, reduction, shape_of


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[Any], Evaluator]:
    return lambda expr: fn


def _power(expr: Any) -> Evaluator:
    # Power.numeric is np.power(x, float(p.value)) with the *original* p, not PowerApprox's
    # rational approximation p_used; so is torch.pow (nan for negative x and fractional p).
    if isinstance(expr.p, cp.Constant):
        p = float(expr.p.value)
        # Common exponents as the elementwise op itself: the same values (x * x and 1 / x are
        # correctly rounded, as pow; sqrt is nan below zero, as np.power with p = 0.5), and
        # derivatives of a pass or two each, where pow's derivatives are pows again (square
        # and sqrt are most of the passes of the robust penalties' implicit backward).
        if p == 2:
            return lambda x: x * x
        if p == 0.5:
            return torch.sqrt  # differs from np.power only at -inf (nan, not inf) and -0
        if p == 1:
            return lambda x: x
        if p == -1:
            return torch.reciprocal  # 1 / +-0 = +-inf, as np.power
        return lambda x: torch.pow(x, p)
    return lambda x, p: torch.pow(x, p)


def _huber(expr: Any) -> Evaluator:
    # CVXPY's huber is 2 * scipy.special.huber(M, x): x^2 for |x| <= M, else 2M|x| - M^2
    # (and +inf for M < 0, as scipy).
    def f(x: Tensor, m: Tensor) -> Tensor:
        a = torch.abs(x)
        val = torch.where(a <= m, x * x, 2 * m * a - m * m)
        return torch.where(m < 0, torch.inf, val)

    return f


def _entr(expr: Any) -> Evaluator:
    # -x log x, 0 at x = 0 (xlogy), -inf outside the domain (CVXPY maps nan to -inf).
    def f(x: Tensor) -> Tensor:
        r = -torch.special.xlogy(x, x)
        return torch.where(torch.isnan(r), -torch.inf, r)

    return f


def _rel_entr_parts(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # scipy's convention: x log(x/y) for x, y > 0; 0 for x = 0, y >= 0; +inf otherwise. The safe
    # substitutes keep the unselected branch finite so gradients through torch.where are not nan.
    pos = (x > 0) & (y > 0)
    xs = torch.where(pos, x, 1.0)
    ys = torch.where(pos, y, 1.0)
    return pos, (x == 0) & (y >= 0), xs * torch.log(xs / ys)


def _rel_entr(expr: Any) -> Evaluator:
    def f(x: Tensor, y: Tensor) -> Tensor:
        pos, zero, val = _rel_entr_parts(x, y)
        return torch.where(pos, val, torch.where(zero, 0.0, torch.inf))

    return f


def _kl_div(expr: Any) -> Evaluator:
    # scipy.special.kl_div: x log(x/y) - x + y; y at x = 0, y >= 0; +inf otherwise.
    def f(x: Tensor, y: Tensor) -> Tensor:
        pos, zero, val = _rel_entr_parts(x, y)
        return torch.where(pos, val - x + y, torch.where(zero, y, torch.inf))

    return f


def _xexp(expr: Any) -> Evaluator:
    return lambda x: x * torch.exp(x)


def _logistic(expr: Any) -> Evaluator:
    # np.logaddexp(0, x): stable for large |x| (softplus' linear threshold would cost ~1e-10 rel).
    return lambda x: torch.logaddexp(x, torch.zeros_like(x))


def _one_minus_pos(expr: Any) -> Evaluator:
    return lambda x: 1.0 - x


def _log_sum_exp(expr: Any) -> Evaluator:
    return reduction(expr, lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k))


def _quad_over_lin(expr: Any) -> Evaluator:
    # sum(x^2, axis) / y with y a scalar (sum_squares(x) is quad_over_lin(x, 1)).
    arg = expr.args[0]
    shape = shape_of(expr)
    keepdims = bool(getattr(expr, "keepdims", False))
    dims = dims_of(getattr(expr, "axis", None), arg.ndim)

    def f(x: Tensor, y: Tensor) -> Tensor:
        sq = x * x
        s = torch.sum(sq, dim=dims, keepdim=keepdims) if dims else sq
        return (s / y.reshape(())).reshape(shape)

    return f


def _quad_form(expr: Any) -> Evaluator:
    n = int(expr.args[0].size)
    shape = shape_of(expr)

    def f(x: Tensor, p: Tensor) -> Tensor:
        v = x.reshape(n)
        return torch.dot(v, torch.mv(p.reshape(n, n), v)).reshape(shape)

    return f


def _prod(expr: Any) -> Evaluator:
    # torch.prod reduces one dim at a time; axis=None is the product of the flattened argument.
    arg = expr.args[0]
    shape = shape_of(expr)
    axis = expr.axis
    keepdims = bool(expr.keepdims)
    if axis is None or arg.ndim == 0:
        return lambda x: torch.prod(x.reshape(-1)).reshape(shape)
    dims = sorted(a % arg.ndim for a in dims_of(axis, arg.ndim))

    def f(x: Tensor) -> Tensor:
        for d in reversed(dims):
            x = torch.prod(x, dim=d, keepdim=keepdims)
        return x.reshape(shape)

    return f


def _elementwise(evaluate: Any, note: str = "") -> AtomRule:
    return AtomRule(evaluate, elementwise=True, note=note)


_DOMAIN = "smooth on the open domain; infinite slope at its boundary is a domain limit, not a kink"

SMOOTH: dict[type, AtomRule] = {
    exp: _elementwise(_unary(torch.exp)),
    log: _elementwise(_unary(torch.log), _DOMAIN),
    log1p: _elementwise(_unary(torch.log1p), _DOMAIN),
    sin: _elementwise(_unary(torch.sin)),
    cos: _elementwise(_unary(torch.cos)),
    tan: _elementwise(_unary(torch.tan), "smooth between its poles"),
    sinh: _elementwise(_unary(torch.sinh)),
    tanh: _elementwise(_unary(torch.tanh)),
    asinh: _elementwise(_unary(torch.asinh)),
    atanh: _elementwise(_unary(torch.atanh), _DOMAIN),
    normcdf: _elementwise(_unary(torch.special.ndtr)),
    # x^p: smooth for x > 0 (CVXPY's domain for non-integer p); polynomial for integer p.
    Power: _elementwise(_power, _DOMAIN),
    PowerApprox: _elementwise(_power, _DOMAIN),
    huber: _elementwise(
        _huber, "C1: x^2 and 2M|x| - M^2 meet with equal slope at |x| = M (curvature jumps)"
    ),
    entr: _elementwise(_entr, _DOMAIN),
    kl_div: _elementwise(_kl_div, _DOMAIN),
    rel_entr: _elementwise(_rel_entr, _DOMAIN),
    xexp: _elementwise(_xexp),
    logistic: _elementwise(_logistic),
    # CVXPY's one_minus_pos is 1 - x (a GP atom; its domain 0 < x < 1 is not enforced here).
    one_minus_pos: AtomRule(_one_minus_pos, elementwise=True, affine=True),
    log_sum_exp: AtomRule(_log_sum_exp),
    quad_over_lin: AtomRule(_quad_over_lin, note="smooth where the denominator is positive"),
    QuadForm: AtomRule(_quad_form),
    Prod: AtomRule(_prod),
    cumprod: AtomRule(cumulative(torch.cumprod)),
}
