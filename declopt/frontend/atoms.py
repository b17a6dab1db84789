"""Torch evaluation rules for CVXPY atoms.

``ATOMS`` maps a CVXPY expression class (looked up by exact type, so a subclass with different
numerics is never picked up by accident) to a *rule*. A rule is called once, at compile time, with
the CVXPY node; it reads the node's static data (axis, exponent, index key, shapes) and returns an
*evaluator*: a plain function of the operand tensors, in the order of :func:`operands`, that returns
a tensor of exactly ``node.shape``.

Evaluators follow ``node.numeric`` (what ``expr.value`` computes) exactly, work on unbatched tensors
and stay compatible with ``torch.func.vmap``, ``grad``, ``jvp`` and double backward: no ``.item()``,
no Python control flow on tensor values, no in-place ops, no numpy on tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import cvxpy as cp
import numpy as np
import torch
import torch.nn.functional as F
from cvxpy.atoms.affine import add_expr, binary_operators, unary_operators, wraps
from cvxpy.atoms.affine.broadcast_to import broadcast_to
from cvxpy.atoms.affine.concatenate import Concatenate
from cvxpy.atoms.affine.conj import conj
from cvxpy.atoms.affine.conv import conv, convolve
from cvxpy.atoms.affine.cumsum import cumsum
from cvxpy.atoms.affine.diag import diag_mat, diag_vec
from cvxpy.atoms.affine.hstack import Hstack
from cvxpy.atoms.affine.imag import imag
from cvxpy.atoms.affine.index import index, special_index
from cvxpy.atoms.affine.kron import kron
from cvxpy.atoms.affine.promote import Promote
from cvxpy.atoms.affine.real import real
from cvxpy.atoms.affine.reshape import reshape
from cvxpy.atoms.affine.sum import Sum
from cvxpy.atoms.affine.trace import Trace
from cvxpy.atoms.affine.transpose import transpose
from cvxpy.atoms.affine.upper_tri import upper_tri
from cvxpy.atoms.affine.vstack import Vstack
from cvxpy.atoms.cummax import cummax
from cvxpy.atoms.cumprod import cumprod
from cvxpy.atoms.elementwise.abs import abs as abs_
from cvxpy.atoms.elementwise.entr import entr
from cvxpy.atoms.elementwise.exp import exp
from cvxpy.atoms.elementwise.huber import huber
from cvxpy.atoms.elementwise.hyperbolic import asinh, atanh, sinh, tanh
from cvxpy.atoms.elementwise.kl_div import kl_div
from cvxpy.atoms.elementwise.log import log
from cvxpy.atoms.elementwise.log1p import log1p
from cvxpy.atoms.elementwise.logistic import logistic
from cvxpy.atoms.elementwise.maximum import maximum
from cvxpy.atoms.elementwise.minimum import minimum
from cvxpy.atoms.elementwise.normcdf import normcdf
from cvxpy.atoms.elementwise.power import Power, PowerApprox
from cvxpy.atoms.elementwise.rel_entr import rel_entr
from cvxpy.atoms.elementwise.trig import cos, sin, tan
from cvxpy.atoms.elementwise.xexp import xexp
from cvxpy.atoms.log_sum_exp import log_sum_exp
from cvxpy.atoms.max import max as max_
from cvxpy.atoms.min import min as min_
from cvxpy.atoms.norm1 import norm1
from cvxpy.atoms.norm_inf import norm_inf
from cvxpy.atoms.one_minus_pos import one_minus_pos
from cvxpy.atoms.pnorm import Pnorm, PnormApprox
from cvxpy.atoms.prod import Prod
from cvxpy.atoms.quad_form import QuadForm
from cvxpy.atoms.quad_over_lin import quad_over_lin
from cvxpy.atoms.sum_largest import sum_largest
from torch import Tensor

Evaluator = Callable[..., Tensor]
Rule = Callable[[Any], Evaluator]
Shape = tuple[int, ...]


def operands(expr: cp.Expression) -> list[cp.Expression]:
    """The sub-expressions an atom's evaluator receives, in order.

    Usually ``expr.args``; a few atoms keep a numeric operand as an attribute rather than an
    argument (``power``'s exponent, ``huber``'s threshold) so that it may be a Parameter.
    """
    args = list(expr.args)
    if isinstance(expr, Power) and not isinstance(expr.p, cp.Constant):
        args.append(expr.p)
    elif isinstance(expr, huber):
        args.append(expr.M)
    return args


# ---------------------------------------------------------------------------------------------
# helpers


def _shape(expr: cp.Expression) -> Shape:
    return tuple(int(d) for d in expr.shape)


def _dims(axis: Any, ndim: int) -> tuple[int, ...]:
    """CVXPY/numpy ``axis`` (None, int or tuple) as an explicit tuple of dims."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        return (int(axis),)
    return tuple(int(a) for a in axis)


def _reduction(
    expr: cp.Expression,
    fn: Callable[[Tensor, tuple[int, ...], bool], Tensor],
    flatten_if_no_axis: bool = False,
) -> Evaluator:
    """An evaluator for an axis atom: ``fn(x, dims, keepdim)`` then reshape to ``expr.shape``.

    Atoms whose numeric flattens the argument when ``axis is None`` (pnorm, norm1, norm_inf) give a
    different keepdims shape from numpy's; the final reshape makes them agree with ``expr.shape``.
    """
    arg = expr.args[0]
    shape = _shape(expr)
    keepdims = bool(getattr(expr, "keepdims", False))
    axis = expr.axis
    if flatten_if_no_axis and axis is None:

        def f(x: Tensor) -> Tensor:
            return fn(x.reshape(-1), (0,), keepdims).reshape(shape)

        return f
    dims = _dims(axis, arg.ndim)
    if not dims:  # a scalar argument: reducing it is the identity
        return lambda x: x.reshape(shape)

    def g(x: Tensor) -> Tensor:
        return fn(x, dims, keepdims).reshape(shape)

    return g


class TensorCache:
    """A numpy constant as a torch tensor, converted once per (dtype, device) and reused.

    The tensor must be created outside any ``torch.func`` transform: a tensor created inside
    ``grad``/``jvp`` is a wrapper of that transform's level, and caching it would leak the wrapper
    into later calls (``torch.compile`` then fails with "Cannot access data pointer of Tensor that
    doesn't have storage"). While Dynamo traces, the tensor is made in the graph and not cached.
    """

    def __init__(self, array: np.ndarray) -> None:
        with _no_functorch():
            self.base = torch.from_numpy(np.array(array))  # a private copy, on the CPU
        self.cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        t = self.cache.get(key)
        if t is not None:
            return t
        if torch.compiler.is_compiling():
            return self.base.to(dtype=dtype, device=device)
        with _no_functorch():
            t = self.base.to(dtype=dtype, device=device)
        self.cache[key] = t
        return t


def _no_functorch() -> Any:
    # torch._C._DisableFuncTorch is what torch.func itself uses to step outside its transforms.
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


class _DeviceIndex:
    """A constant int64 index array, converted once per device."""

    def __init__(self, idx: np.ndarray) -> None:
        flat = np.ascontiguousarray(np.asarray(idx, dtype=np.int64).reshape(-1))
        self.tensors = TensorCache(flat)

    def __call__(self, device: torch.device) -> Tensor:
        return self.tensors.get(torch.long, device)


def _flat_gather(index_map: np.ndarray, out_shape: Shape) -> Evaluator:
    """``x.reshape(-1)[index_map]``: any numpy indexing expressed on row-major flat positions."""
    idx = _DeviceIndex(index_map)

    def f(x: Tensor) -> Tensor:
        return torch.index_select(x.reshape(-1), 0, idx(x.device)).reshape(out_shape)

    return f


def _is_int(k: Any) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))


def _basic_key(key: Any) -> tuple | None:
    """``key`` as a torch basic-indexing key, or None if torch cannot express it as a view.

    Torch has no negative slice steps and no boolean/integer-array views; those go through
    :func:`_flat_gather`.
    """
    if not isinstance(key, tuple):
        key = (key,)
    out: list[Any] = []
    for k in key:
        if _is_int(k):
            out.append(int(k))
        elif isinstance(k, slice):
            parts = (k.start, k.stop, k.step)
            if not all(v is None or _is_int(v) for v in parts):
                return None
            if k.step is not None and int(k.step) <= 0:
                return None
            out.append(slice(*(None if v is None else int(v) for v in parts)))
        else:
            return None
    return tuple(out)


def _index_map(in_shape: Shape, key: Any) -> np.ndarray:
    return np.arange(math.prod(in_shape), dtype=np.int64).reshape(in_shape)[key]


# ---------------------------------------------------------------------------------------------
# affine atoms


def _add(expr: Any) -> Evaluator:
    if len(expr.args) == 2:
        return torch.add
    return lambda *xs: functools.reduce(torch.add, xs)


def _neg_expr(expr: Any) -> Evaluator:
    return torch.neg


def _identity(expr: Any) -> Evaluator:
    # conj/real of real data, and the *_wrap atoms that only assert a property.
    return lambda x: x


def _imag(expr: Any) -> Evaluator:
    return torch.zeros_like


def _multiply(expr: Any) -> Evaluator:
    return torch.mul


def _matmul(expr: Any) -> Evaluator:
    a, b = expr.args
    shape = _shape(expr)
    # MulExpression.numeric: ``*`` if either side is a scalar, else numpy matmul (same 1-D rules
    # as torch.matmul). A directly built MulExpression may keep a promoted singleton axis in its
    # shape; the reshape (singletons only, so order does not matter) matches expr.shape.
    if a.shape == () or b.shape == ():
        return lambda x, y: torch.mul(x, y).reshape(shape)
    return lambda x, y: torch.matmul(x, y).reshape(shape)


def _div(expr: Any) -> Evaluator:
    return torch.div


def _promote(expr: Any) -> Evaluator:
    # Promote broadcasts a scalar (size-1) operand to ``promoted_shape``.
    shape = _shape(expr)
    return lambda x: x.reshape(()).expand(shape)


def _broadcast_to(expr: Any) -> Evaluator:
    shape = _shape(expr)
    return lambda x: torch.broadcast_to(x, shape)


def _index(expr: Any) -> Evaluator:
    # ``_orig_key`` is the key as the user wrote it (numpy semantics, negative indices, ints that
    # drop a dim); ``key`` is CVXPY's normalised slice-per-dim form. numeric() uses _orig_key.
    key = getattr(expr, "_orig_key", expr.key)
    in_shape = _shape(expr.args[0])
    out_shape = _shape(expr)
    basic = _basic_key(key)
    if basic is not None:
        return lambda x: x[basic].reshape(out_shape)
    return _flat_gather(_index_map(in_shape, key), out_shape)


def _special_index(expr: Any) -> Evaluator:
    # Integer/boolean array keys (numpy advanced indexing), stored on the atom as ``key``.
    in_shape = _shape(expr.args[0])
    return _flat_gather(_index_map(in_shape, expr.key), _shape(expr))


def _sum(expr: Any) -> Evaluator:
    return _reduction(expr, lambda x, d, k: torch.sum(x, dim=d, keepdim=k))


def _reshape(expr: Any) -> Evaluator:
    in_shape = _shape(expr.args[0])
    shape = _shape(expr)
    order = getattr(expr, "order", "F")
    if order == "C" or (len(in_shape) <= 1 and len(shape) <= 1):
        return lambda x: x.reshape(shape)
    # Column-major (Fortran) reshape == reverse the axes, row-major reshape to the reversed target
    # shape, reverse the axes back. CVXPY's default order is 'F' (vec, reshape, diag of vectors).
    rev_in = tuple(reversed(range(len(in_shape))))
    rev_out = tuple(reversed(range(len(shape))))
    rshape = tuple(reversed(shape))
    return lambda x: x.permute(rev_in).reshape(rshape).permute(rev_out)


def _transpose(expr: Any) -> Evaluator:
    ndim = expr.args[0].ndim
    axes = expr.axes
    perm = tuple(reversed(range(ndim))) if axes is None else tuple(int(a) for a in axes)
    if ndim < 2:
        return lambda x: x
    return lambda x: x.permute(perm)


def _hstack(expr: Any) -> Evaluator:
    # np.hstack: scalars become (1,); 1-D arguments are concatenated along axis 0 (the result is
    # 1-D, not a row), anything else along axis 1.
    shapes = [_shape(a) if a.ndim >= 1 else (1,) for a in expr.args]
    dim = 0 if len(shapes[0]) == 1 else 1

    def f(*xs: Tensor) -> Tensor:
        return torch.cat([x.reshape(s) for x, s in zip(xs, shapes)], dim=dim)

    return f


def _vstack(expr: Any) -> Evaluator:
    # np.vstack: np.atleast_2d first, so a 1-D (n,) argument is one row (1, n) and scalars (1, 1).
    def at_least_2d(s: Shape) -> Shape:
        return (1, 1) if len(s) == 0 else (1, s[0]) if len(s) == 1 else s

    shapes = [at_least_2d(_shape(a)) for a in expr.args]

    def f(*xs: Tensor) -> Tensor:
        return torch.cat([x.reshape(s) for x, s in zip(xs, shapes)], dim=0)

    return f


def _concatenate(expr: Any) -> Evaluator:
    axis = expr.axis
    if axis is None:  # np.concatenate(axis=None) flattens every argument in C order first
        return lambda *xs: torch.cat([x.reshape(-1) for x in xs], dim=0)
    return lambda *xs: torch.cat(xs, dim=int(axis))


def _trace(expr: Any) -> Evaluator:
    return lambda x: torch.diagonal(x, 0, -2, -1).sum(-1)


def _diag_vec(expr: Any) -> Evaluator:
    k = int(expr.k)
    return lambda x: torch.diag_embed(x, offset=k)


def _diag_mat(expr: Any) -> Evaluator:
    k = int(expr.k)
    return lambda x: torch.diagonal(x, offset=k)


def _cumulative(op: Callable[[Tensor, int], Tensor]) -> Rule:
    def rule(expr: Any) -> Evaluator:
        axis = expr.axis
        shape = _shape(expr)
        if axis is None:  # numpy flattens in C order when axis is None
            return lambda x: op(x.reshape(-1), 0).reshape(shape)
        if expr.args[0].ndim == 0:
            return lambda x: x.reshape(shape)
        return lambda x: op(x, int(axis))

    return rule


def _upper_tri(expr: Any) -> Evaluator:
    # numeric returns a 1-D vector of the strictly upper entries in row-major order, but
    # expr.shape is (n(n-1)/2, 1); the evaluator returns expr.shape.
    in_shape = _shape(expr.args[0])
    n = in_shape[-1]
    rows, cols = np.triu_indices(n, k=1)
    return _flat_gather(rows * n + cols, _shape(expr))


def _kron(expr: Any) -> Evaluator:
    return torch.kron


def _convolve(expr: Any) -> Evaluator:
    # Full 1-D convolution out[k] = sum_i a[i] b[k - i], written as a gather from b padded with
    # n - 1 zeros on each side (no data-dependent control flow, works under vmap).
    n = int(expr.args[0].size)
    m = int(expr.args[1].size)
    shape = _shape(expr)
    idx = _DeviceIndex(np.arange(n + m - 1)[:, None] - np.arange(n)[None, :] + n - 1)

    def f(a: Tensor, b: Tensor) -> Tensor:
        bpad = F.pad(b.reshape(-1), (n - 1, n - 1))
        cols = torch.index_select(bpad, 0, idx(b.device)).reshape(n + m - 1, n)
        return (cols * a.reshape(-1)).sum(-1).reshape(shape)

    return f


# ---------------------------------------------------------------------------------------------
# elementwise atoms


def _unary(fn: Callable[[Tensor], Tensor]) -> Rule:
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


def _maximum(expr: Any) -> Evaluator:
    return lambda *xs: functools.reduce(torch.maximum, xs)


def _minimum(expr: Any) -> Evaluator:
    return lambda *xs: functools.reduce(torch.minimum, xs)


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


# ---------------------------------------------------------------------------------------------
# reductions and other nonlinear atoms


def _max(expr: Any) -> Evaluator:
    return _reduction(expr, lambda x, d, k: torch.amax(x, dim=d, keepdim=k))


def _min(expr: Any) -> Evaluator:
    return _reduction(expr, lambda x, d, k: torch.amin(x, dim=d, keepdim=k))


def _log_sum_exp(expr: Any) -> Evaluator:
    return _reduction(expr, lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k))


def _norm1(expr: Any) -> Evaluator:
    return _reduction(
        expr, lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k), flatten_if_no_axis=True
    )


def _norm_inf(expr: Any) -> Evaluator:
    return _reduction(
        expr, lambda x, d, k: torch.amax(torch.abs(x), dim=d, keepdim=k), flatten_if_no_axis=True
    )


def _pnorm(expr: Any) -> Evaluator:
    # PnormApprox.p is the rational approximation CVXPY evaluates with (numeric uses self.p).
    p = float(expr.p)
    if p >= 1:
        return _reduction(
            expr,
            lambda x, d, k: torch.linalg.vector_norm(x, ord=p, dim=d, keepdim=k),
            flatten_if_no_axis=True,
        )
    # p < 1 (concave "norm", axis=None only): -inf if any entry is negative; for p < 0, 0 if any
    # entry is 0; else (sum |x|^p)^(1/p) as np.linalg.norm.
    shape = _shape(expr)

    def f(x: Tensor) -> Tensor:
        v = x.reshape(-1)
        a = torch.abs(v)
        zero = v == 0
        if p < 0:
            a = torch.where(zero, 1.0, a)  # keeps a**p finite where the result is replaced
        val = torch.sum(a**p) ** (1.0 / p)
        if p < 0:
            val = torch.where(torch.any(zero), 0.0, val)
        val = torch.where(torch.any(v < 0), -torch.inf, val)
        return val.reshape(shape)

    return f


def _quad_over_lin(expr: Any) -> Evaluator:
    # sum(x^2, axis) / y with y a scalar (sum_squares(x) is quad_over_lin(x, 1)).
    arg = expr.args[0]
    shape = _shape(expr)
    keepdims = bool(getattr(expr, "keepdims", False))
    dims = _dims(getattr(expr, "axis", None), arg.ndim)

    def f(x: Tensor, y: Tensor) -> Tensor:
        sq = x * x
        s = torch.sum(sq, dim=dims, keepdim=keepdims) if dims else sq
        return (s / y.reshape(())).reshape(shape)

    return f


def _quad_form(expr: Any) -> Evaluator:
    n = int(expr.args[0].size)
    shape = _shape(expr)

    def f(x: Tensor, p: Tensor) -> Tensor:
        v = x.reshape(n)
        return torch.dot(v, torch.mv(p.reshape(n, n), v)).reshape(shape)

    return f


def _prod(expr: Any) -> Evaluator:
    # torch.prod reduces one dim at a time; axis=None is the product of the flattened argument.
    arg = expr.args[0]
    shape = _shape(expr)
    axis = expr.axis
    keepdims = bool(expr.keepdims)
    if axis is None or arg.ndim == 0:
        return lambda x: torch.prod(x.reshape(-1)).reshape(shape)
    dims = sorted(a % arg.ndim for a in _dims(axis, arg.ndim))

    def f(x: Tensor) -> Tensor:
        for d in reversed(dims):
            x = torch.prod(x, dim=d, keepdim=keepdims)
        return x.reshape(shape)

    return f


def _sum_largest(expr: Any) -> Evaluator:
    # Sum of the k largest entries; fractional k adds frac(k) times the next largest entry.
    arg = expr.args[0]
    shape = _shape(expr)
    k = float(expr.k)
    kf = math.floor(k)
    frac = k - kf
    ndim = arg.ndim
    if expr.axis is None:
        perm = None
        keep_shape: Shape = ()
    else:
        axes = [a % ndim for a in _dims(expr.axis, ndim)]
        keep = [i for i in range(ndim) if i not in axes]
        perm = tuple(keep + axes)
        keep_shape = tuple(int(arg.shape[i]) for i in keep)
    n = math.prod(int(arg.shape[i]) for i in range(ndim)) // max(math.prod(keep_shape), 1)
    kk = min(kf, n)
    use_frac = frac > 0 and kf < n
    t = kk + 1 if use_frac else kk

    def f(x: Tensor) -> Tensor:
        v = x.reshape(-1) if perm is None else x.permute(perm).reshape(*keep_shape, n)
        top = torch.topk(v, t, dim=-1).values
        res = torch.sum(top[..., :kk], dim=-1)
        if use_frac:
            res = res + frac * top[..., kk]
        return res.reshape(shape)

    return f


# ---------------------------------------------------------------------------------------------
# the table

ATOMS: dict[type, Rule] = {
    # affine
    add_expr.AddExpression: _add,
    unary_operators.NegExpression: _neg_expr,
    binary_operators.multiply: _multiply,
    binary_operators.MulExpression: _matmul,
    binary_operators.DivExpression: _div,
    Promote: _promote,
    broadcast_to: _broadcast_to,
    index: _index,
    special_index: _special_index,
    Sum: _sum,
    reshape: _reshape,
    transpose: _transpose,
    Hstack: _hstack,
    Vstack: _vstack,
    Concatenate: _concatenate,
    Trace: _trace,
    diag_vec: _diag_vec,
    diag_mat: _diag_mat,
    cumsum: _cumulative(torch.cumsum),
    upper_tri: _upper_tri,
    kron: _kron,
    convolve: _convolve,
    conv: _convolve,
    conj: _identity,
    real: _identity,
    imag: _imag,
    wraps.nonneg_wrap: _identity,
    wraps.nonpos_wrap: _identity,
    wraps.psd_wrap: _identity,
    wraps.nsd_wrap: _identity,
    wraps.symmetric_wrap: _identity,
    wraps.hermitian_wrap: _identity,
    wraps.skew_symmetric_wrap: _identity,
    # elementwise
    abs_: _unary(torch.abs),
    exp: _unary(torch.exp),
    log: _unary(torch.log),
    log1p: _unary(torch.log1p),
    sin: _unary(torch.sin),
    cos: _unary(torch.cos),
    tan: _unary(torch.tan),
    sinh: _unary(torch.sinh),
    tanh: _unary(torch.tanh),
    asinh: _unary(torch.asinh),
    atanh: _unary(torch.atanh),
    normcdf: _unary(torch.special.ndtr),
    Power: _power,
    PowerApprox: _power,
    maximum: _maximum,
    minimum: _minimum,
    huber: _huber,
    entr: _entr,
    kl_div: _kl_div,
    rel_entr: _rel_entr,
    xexp: _xexp,
    logistic: _logistic,
    one_minus_pos: _one_minus_pos,
    # reductions and other nonlinear atoms
    max_: _max,
    min_: _min,
    log_sum_exp: _log_sum_exp,
    norm1: _norm1,
    norm_inf: _norm_inf,
    Pnorm: _pnorm,
    PnormApprox: _pnorm,
    quad_over_lin: _quad_over_lin,
    QuadForm: _quad_form,
    Prod: _prod,
    sum_largest: _sum_largest,
    cummax: _cumulative(lambda x, d: torch.cummax(x, dim=d).values),
    cumprod: _cumulative(torch.cumprod),
}


def supported_atom_names() -> list[str]:
    """Sorted class names of the supported CVXPY atoms (for error messages and docs)."""
    return sorted({cls.__name__ for cls in ATOMS})
