"""Smooth nonlinear atoms: evaluation rules. None has kinks: each is continuously differentiable
on the interior of its domain (``huber`` is C1 only; derivatives may blow up at a domain boundary,
e.g. ``sqrt`` or ``entr`` at 0, which is a domain restriction, not a kink)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cvxpy as cp
import numpy as np
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
from cvxpy.atoms.geo_mean import GeoMean, GeoMeanApprox
from cvxpy.atoms.log_sum_exp import log_sum_exp
from cvxpy.atoms.one_minus_pos import one_minus_pos
from cvxpy.atoms.prod import Prod
from cvxpy.atoms.quad_form import QuadForm
from cvxpy.atoms.quad_over_lin import quad_over_lin
from torch import Tensor

from declopt.frontend.atoms import jets
from declopt.frontend.atoms.base import AtomRule, DegreeRule, Evaluator
from declopt.frontend.atoms.tensors import (
    TensorCache,
    cumulative,
    dims_of,
    reduction,
    shape_of,
)


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


def _huber_threshold(expr: Any) -> float | None:
    """``huber``'s threshold ``M`` where it is one constant number >= 0 (else None)."""
    if isinstance(expr.M, cp.Constant) and np.size(expr.M.value) == 1:
        bound = float(np.asarray(expr.M.value).reshape(()))
        return bound if bound >= 0 else None
    return None


def _huber_parts(x: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """``(w, c)``: what lies beyond the threshold, ``w = softshrink(x, M)``, and the clip ``c = x
    - w = clip(x, -M, M)``. ``w != 0`` exactly where ``|x| > M`` (IEEE: ``x - M`` is exact near
    ``M``)."""
    beyond = torch.nn.functional.softshrink(x, bound)
    return beyond, x - beyond


def _huber(expr: Any) -> Evaluator:
    # CVXPY's huber is 2 * scipy.special.huber(M, x): x^2 for |x| <= M, else 2M|x| - M^2
    # (and +inf for M < 0, as scipy).
    def nonnegative(x: Tensor, m: Tensor) -> Tensor:
        # c (2|x| - c) with c = min(|x|, M): x^2 inside, 2M|x| - M^2 outside, without a where.
        a = torch.abs(x)
        c = torch.minimum(a, m)
        return c * (2 * a - c)

    def f(x: Tensor, m: Tensor) -> Tensor:
        return torch.where(m < 0, torch.inf, nonnegative(x, m))

    bound = _huber_threshold(expr)
    if bound is not None:
        # A constant threshold: c (x + w) = c (2x - c), four passes (softshrink, x - w, x + w,
        # the product) instead of five.
        def constant(x: Tensor, m: Tensor) -> Tensor:
            beyond, clipped = _huber_parts(x, bound)
            return clipped * (x + beyond)

        return constant
    # A constant threshold's sign is known now: no pass over the data for it.
    if isinstance(expr.M, cp.Constant) and float(np.min(expr.M.value)) >= 0:
        return nonnegative
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


def _log_sum_exp_jet(expr: Any, dependent: tuple[bool, ...]) -> jets.JetFn:
    arg = expr.args[0]
    dims = tuple(d % arg.ndim for d in dims_of(expr.axis, arg.ndim)) if arg.ndim else ()
    if not dims:  # of a scalar: the identity
        return jets.linear(lambda x: x.reshape(shape_of(expr)))
    return jets.softmax_weighted(_summed(expr), dims)


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


def _summed(expr: Any) -> Evaluator:
    # The sum of _quad_over_lin over its axes (linear: its jets go through it as they are).
    return reduction(expr, lambda x, d, k: torch.sum(x, dim=d, keepdim=k))


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


def _geo_mean(expr: Any) -> Evaluator:
    # GeoMean.numeric: prod(x_i ** w_i) over the reduced entries, flattened in Fortran order, with
    # the zero-weight entries dropped (they take no part, whatever their value). x ** w is nan
    # for x < 0 and a fractional w, as np.power; 0 at x = 0 (infinite slope there: the domain's
    # edge). GeoMeanApprox evaluates with its rational approximation w, as CVXPY does.
    arg = expr.args[0]
    ndim = arg.ndim
    dims = tuple(d % ndim for d in dims_of(expr.axis, ndim))
    reduced = math.prod(int(arg.shape[d]) for d in dims)
    # The reduced dims first, reversed (a C-order flatten of them is their Fortran order).
    order = (*reversed(dims), *(d for d in range(ndim) if d not in dims))
    keep = np.flatnonzero(np.asarray(expr._keep, dtype=bool))
    weights = TensorCache(np.array([float(w) for w in expr.w], dtype=np.float64)[:, None])
    kept = None if keep.size == reduced else TensorCache(keep.astype(np.int64))
    shape = shape_of(expr)

    def f(x: Tensor) -> Tensor:
        flat = x.permute(order).reshape(reduced, -1)
        if kept is not None:
            flat = flat.index_select(0, kept.get(torch.long, x.device))
        w = weights.get(x.dtype, x.device)
        return torch.prod(torch.pow(flat, w), dim=0).reshape(shape)

    return f


def _elementwise(
    evaluate: Any,
    derivs: Callable[[Any], jets.Derivs] | None = None,
    note: str = "",
    degree: DegreeRule | None = None,
    with_value: Callable[[Any], jets.FusedDerivs | None] | None = None,
) -> AtomRule:
    return AtomRule(
        evaluate,
        elementwise=True,
        note=note,
        jet=None if derivs is None else jets.elementwise(derivs, with_value),
        degree=degree,
    )


def _power_degree(expr: Any, degrees: tuple[int | None, ...]) -> int | None:
    # x^p: a constant if x and p are; p times x's degree for a constant whole p >= 0.
    if all(d == 0 for d in degrees):
        return 0
    p = float(expr.p.value) if isinstance(expr.p, cp.Constant) else -1.0
    whole = p >= 0 and p == int(p)
    return int(p) * degrees[0] if whole and degrees[0] is not None else None


def _squared_degree(expr: Any, degrees: tuple[int | None, ...]) -> int | None:
    # quad_over_lin(x, y) = sum(x^2) / y, quad_form(x, P) = x^T P x: twice x's degree when the
    # second operand is a constant.
    x, other = degrees
    return 2 * x if x is not None and other == 0 else None


def _fixed(fn: jets.Derivs) -> Callable[[Any], jets.Derivs]:
    return lambda expr: fn


# Closed-form (f', f'') of the elementwise atoms, as functions of (out, x, *rest) where
# out = f(x, *rest) is already computed (exp, tan and tanh reuse it).
def _power_derivs(expr: Any) -> jets.Derivs:
    if isinstance(expr.p, cp.Constant):
        p = float(expr.p.value)
        # Constant factors as jets.Times: they multiply the operand's derivative (compact
        # where a promoted variable's is), not every entry.
        if p == 2:
            return jets.free_of_out(lambda out, x: (jets.Times(x, 2.0), 2.0))
        if p == 0.5:
            return lambda out, x: (
                jets.Times(torch.reciprocal(out), 0.5),
                jets.Times(torch.reciprocal(out * x), -0.25),
            )
        if p == 1:
            return jets.free_of_out(lambda out, x: (1.0, 0.0))
        if p == -1:
            return lambda out, x: (-out * out, 2 * out * out * out)
        return jets.free_of_out(
            lambda out, x: (p * torch.pow(x, p - 1), p * (p - 1) * torch.pow(x, p - 2))
        )
    return jets.free_of_out(
        lambda out, x, p: (p * torch.pow(x, p - 1), p * (p - 1) * torch.pow(x, p - 2))
    )


def _huber_derivs(expr: Any) -> jets.Derivs:
    # x^2 inside |x| <= M, 2M|x| - M^2 outside: slope 2 clip(x, -M, M), curvature 2 inside.
    # The CPU kernels of clamp with tensor bounds, of a bool mask cast to the dtype and of the
    # backward of maximum/minimum cost 4-16x a plain elementwise pass: a constant threshold's
    # clip is x - softshrink(x) (two passes forward and back: the implicit backward
    # differentiates the slope). The indicator is exact: |x| > M iff |x| - M > 0 (IEEE).
    bound = _huber_threshold(expr)

    @jets.free_of_out
    def derivs(out: Tensor, x: Tensor, m: Tensor) -> tuple[jets.Times, jets.Times]:
        # The slope clip(x, -M, M) written as x minus what lies beyond M, so that autograd's
        # derivative of it (the implicit backward's D_x D_u f) takes the inside side on the
        # threshold, as the curvature does: hardtanh's backward counts |x| = M as outside and
        # maximum/minimum's splits a tie in half, which mixed with an inside curvature gave
        # gradients of no piece (pooling [0, 5] with M = 1 landing on y = 1: [0, 0], not [1, 0]).
        if bound is not None:
            beyond, clipped = _huber_parts(x, bound)
            outside = torch.sign(torch.abs(beyond))
        else:
            excess = torch.relu(x.abs() - m)
            clipped = x - torch.sign(x) * excess
            outside = torch.sign(excess)
        # The factor 2 of both multiplies the operand's (compact) derivative, not every entry.
        return jets.Times(clipped, 2.0), jets.Times(1 - outside, 2.0)

    return derivs


def _huber_with_value(expr: Any) -> jets.FusedDerivs | None:
    """A constant threshold's value and derivatives from one softshrink: seven passes with the
    value, five without (against the separate value's four and the derivatives' five)."""
    bound = _huber_threshold(expr)
    if bound is None:
        return None

    def both(x: Tensor, m: Tensor, want_value: bool) -> tuple:
        beyond, clipped = _huber_parts(x, bound)
        out = clipped * (x + beyond) if want_value else None
        inside = 1 - torch.sign(torch.abs(beyond))
        return out, jets.Times(clipped, 2.0), jets.Times(inside, 2.0)

    return both


def _sigmoid_pair(out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return s, s * (1 - s)


def _normcdf_pair(out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    density = torch.exp(-0.5 * x * x) * (2 * torch.pi) ** -0.5
    return density, -x * density


def _xexp_pair(out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    e = torch.exp(x)
    return (1 + x) * e, (2 + x) * e


_DOMAIN = "smooth on the open domain; infinite slope at its boundary is a domain limit, not a kink"

SMOOTH: dict[type, AtomRule] = {
    exp: _elementwise(_unary(torch.exp), _fixed(lambda out, x: (out, out))),
    log: _elementwise(
        _unary(torch.log), _fixed(jets.free_of_out(lambda out, x: (1 / x, -1 / (x * x)))), _DOMAIN
    ),
    log1p: _elementwise(
        _unary(torch.log1p),
        _fixed(jets.free_of_out(lambda out, x: (1 / (1 + x), -1 / ((1 + x) * (1 + x))))),
        _DOMAIN,
    ),
    sin: _elementwise(_unary(torch.sin), _fixed(lambda out, x: (torch.cos(x), -out))),
    cos: _elementwise(_unary(torch.cos), _fixed(lambda out, x: (-torch.sin(x), -out))),
    tan: _elementwise(
        _unary(torch.tan),
        _fixed(lambda out, x: (1 + out * out, 2 * out * (1 + out * out))),
        "smooth between its poles",
    ),
    sinh: _elementwise(_unary(torch.sinh), _fixed(lambda out, x: (torch.cosh(x), out))),
    tanh: _elementwise(
        _unary(torch.tanh), _fixed(lambda out, x: (1 - out * out, -2 * out * (1 - out * out)))
    ),
    asinh: _elementwise(
        _unary(torch.asinh),
        _fixed(lambda out, x: (torch.rsqrt(1 + x * x), -x * torch.rsqrt(1 + x * x) ** 3)),
    ),
    atanh: _elementwise(
        _unary(torch.atanh),
        _fixed(lambda out, x: (1 / (1 - x * x), 2 * x / ((1 - x * x) * (1 - x * x)))),
        _DOMAIN,
    ),
    normcdf: _elementwise(_unary(torch.special.ndtr), _fixed(jets.free_of_out(_normcdf_pair))),
    # x^p: smooth for x > 0 (CVXPY's domain for non-integer p); polynomial for integer p.
    Power: _elementwise(_power, _power_derivs, _DOMAIN, _power_degree),
    PowerApprox: _elementwise(_power, _power_derivs, _DOMAIN, _power_degree),
    huber: _elementwise(
        _huber,
        _huber_derivs,
        "C1: x^2 and 2M|x| - M^2 meet with equal slope at |x| = M (curvature jumps)",
        with_value=_huber_with_value,
    ),
    entr: _elementwise(
        _entr, _fixed(jets.free_of_out(lambda out, x: (-(torch.log(x) + 1), -1 / x))), _DOMAIN
    ),
    kl_div: _elementwise(_kl_div, _DOMAIN),
    rel_entr: _elementwise(_rel_entr, _DOMAIN),
    xexp: _elementwise(_xexp, _fixed(jets.free_of_out(_xexp_pair))),
    logistic: _elementwise(_logistic, _fixed(jets.free_of_out(_sigmoid_pair))),
    # CVXPY's one_minus_pos is 1 - x (a GP atom; its domain 0 < x < 1 is not enforced here).
    one_minus_pos: AtomRule(
        _one_minus_pos,
        elementwise=True,
        affine=True,
        jet=jets.elementwise(_fixed(jets.free_of_out(lambda out, x: (-1.0, 0.0)))),
    ),
    log_sum_exp: AtomRule(_log_sum_exp, jet=_log_sum_exp_jet),
    quad_over_lin: AtomRule(
        _quad_over_lin,
        note="smooth where the denominator is positive",
        jet=lambda node, dependent: jets.summed_squares(_summed(node))(node, dependent),
        degree=_squared_degree,
    ),
    QuadForm: AtomRule(_quad_form, degree=_squared_degree),
    Prod: AtomRule(_prod),
    # prod x_i^w_i: smooth for x > 0; at x_i = 0 (w_i < 1) the slope is infinite (the domain's
    # edge, as sqrt at 0), not a kink.
    GeoMean: AtomRule(_geo_mean, note=_DOMAIN),
    GeoMeanApprox: AtomRule(_geo_mean, note=_DOMAIN),
    cumprod: AtomRule(cumulative(torch.cumprod)),
}
