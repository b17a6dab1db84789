"""Affine atoms (sums, indexing, reshapes, stacking, ...) and the products (elementwise and
matrix multiplication, division): evaluation rules; all are smooth, and none has kinks."""

from __future__ import annotations

import functools
from typing import Any

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
from torch import Tensor

from declopt.frontend.atoms import jets
from declopt.frontend.atoms.base import (
    AtomRule,
    Evaluator,
    product_degree,
    quotient_reads,
    subtracted,
)
from declopt.frontend.atoms.tensors import (
    DeviceIndex,
    Shape,
    basic_key,
    cumulative,
    flat_gather,
    index_map,
    reduction,
    shape_of,
)

# affine atoms


def _add(expr: Any) -> Evaluator:
    signs = subtracted(expr)
    if not any(signs):
        if len(expr.args) == 2:
            return torch.add
        return lambda *xs: functools.reduce(torch.add, xs)

    def signed(*xs: Tensor) -> Tensor:
        # Left to right as CVXPY's sum: (-a) + b is b - a exactly (IEEE addition commutes).
        if signs[0] and not signs[1]:
            out = torch.sub(xs[1], xs[0])
        else:
            first = -xs[0] if signs[0] else xs[0]
            out = torch.sub(first, xs[1]) if signs[1] else torch.add(first, xs[1])
        for x, minus in zip(xs[2:], signs[2:]):
            out = torch.sub(out, x) if minus else torch.add(out, x)
        return out

    return signed


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
    shape = shape_of(expr)
    # MulExpression.numeric: ``*`` if either side is a scalar, else numpy matmul (same 1-D rules
    # as torch.matmul). A directly built MulExpression may keep a promoted singleton axis in its
    # shape; the reshape (singletons only, so order does not matter) matches expr.shape.
    if a.shape == () or b.shape == ():
        return lambda x, y: torch.mul(x, y).reshape(shape)
    return lambda x, y: torch.matmul(x, y).reshape(shape)


def _div(expr: Any) -> Evaluator:
    negated, _ = quotient_reads(expr)
    if negated:  # -a / b read as a / (-b), b one number
        return lambda a, b: torch.div(a, -b)
    return torch.div


def _promote(expr: Any) -> Evaluator:
    # Promote broadcasts a scalar (size-1) operand to ``promoted_shape``.
    shape = shape_of(expr)
    return lambda x: x.reshape(()).expand(shape)


def _broadcast_to(expr: Any) -> Evaluator:
    shape = shape_of(expr)
    return lambda x: torch.broadcast_to(x, shape)


def _index(expr: Any) -> Evaluator:
    # ``_orig_key`` is the key as the user wrote it (numpy semantics, negative indices, ints that
    # drop a dim); ``key`` is CVXPY's normalised slice-per-dim form. numeric() uses _orig_key.
    key = getattr(expr, "_orig_key", expr.key)
    in_shape = shape_of(expr.args[0])
    out_shape = shape_of(expr)
    basic = basic_key(key)
    if basic is not None:
        return lambda x: x[basic].reshape(out_shape)
    return flat_gather(index_map(in_shape, key), out_shape)


def _special_index(expr: Any) -> Evaluator:
    # Integer/boolean array keys (numpy advanced indexing), stored on the atom as ``key``.
    in_shape = shape_of(expr.args[0])
    return flat_gather(index_map(in_shape, expr.key), shape_of(expr))


def _sum(expr: Any) -> Evaluator:
    return reduction(expr, lambda x, d, k: torch.sum(x, dim=d, keepdim=k))


def _reshape(expr: Any) -> Evaluator:
    in_shape = shape_of(expr.args[0])
    shape = shape_of(expr)
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
    shapes = [shape_of(a) if a.ndim >= 1 else (1,) for a in expr.args]
    dim = 0 if len(shapes[0]) == 1 else 1

    def f(*xs: Tensor) -> Tensor:
        return torch.cat([x.reshape(s) for x, s in zip(xs, shapes)], dim=dim)

    return f


def _vstack(expr: Any) -> Evaluator:
    # np.vstack: np.atleast_2d first, so a 1-D (n,) argument is one row (1, n) and scalars (1, 1).
    def at_least_2d(s: Shape) -> Shape:
        return (1, 1) if len(s) == 0 else (1, s[0]) if len(s) == 1 else s

    shapes = [at_least_2d(shape_of(a)) for a in expr.args]

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


def _upper_tri(expr: Any) -> Evaluator:
    # numeric returns a 1-D vector of the strictly upper entries in row-major order, but
    # expr.shape is (n(n-1)/2, 1); the evaluator returns expr.shape.
    in_shape = shape_of(expr.args[0])
    n = in_shape[-1]
    rows, cols = np.triu_indices(n, k=1)
    return flat_gather(rows * n + cols, shape_of(expr))


def _kron(expr: Any) -> Evaluator:
    return torch.kron


def _convolve(expr: Any) -> Evaluator:
    # Full 1-D convolution out[k] = sum_i a[i] b[k - i], written as a gather from b padded with
    # n - 1 zeros on each side (no data-dependent control flow, works under vmap).
    n = int(expr.args[0].size)
    m = int(expr.args[1].size)
    shape = shape_of(expr)
    idx = DeviceIndex(np.arange(n + m - 1)[:, None] - np.arange(n)[None, :] + n - 1)

    def f(a: Tensor, b: Tensor) -> Tensor:
        bpad = F.pad(b.reshape(-1), (n - 1, n - 1))
        cols = torch.index_select(bpad, 0, idx(b.device)).reshape(n + m - 1, n)
        return (cols * a.reshape(-1)).sum(-1).reshape(shape)

    return f


def _affine(evaluate: Any, elementwise: bool = False, jet: jets.JetRule | None = None) -> AtomRule:
    # Linear in the operands jointly: the derivatives are the atom applied to them (or ``jet``,
    # a rule that keeps compact derivatives compact).
    return AtomRule(
        evaluate,
        affine=True,
        elementwise=elementwise,
        jet=jet or (lambda node, dependent: jets.linear(evaluate(node))),
    )


def _product(evaluate: Any, elementwise: bool = False) -> AtomRule:
    return AtomRule(
        evaluate,
        elementwise=elementwise,
        note=_PRODUCT,
        jet=lambda node, dependent: jets.bilinear(node, dependent, evaluate(node)),
        degree=product_degree,
    )


def _quotient_degree(node: Any, degrees: tuple[int | None, ...]) -> int | None:
    # a / b is a polynomial when b is a constant.
    return degrees[0] if degrees[1] == 0 else None


_PRODUCT = "bilinear: smooth, affine in each operand separately"

AFFINE: dict[type, AtomRule] = {
    add_expr.AddExpression: AtomRule(_add, affine=True, elementwise=True, jet=jets.add),
    unary_operators.NegExpression: _affine(_neg_expr, elementwise=True, jet=jets.negate),
    Promote: _affine(_promote, elementwise=True, jet=jets.broadcast),
    broadcast_to: _affine(_broadcast_to, elementwise=True, jet=jets.broadcast),
    index: _affine(_index, jet=jets.rearranged(_index)),
    special_index: _affine(_special_index, jet=jets.rearranged(_special_index)),
    Sum: _affine(_sum, jet=jets.summed),
    reshape: _affine(_reshape, jet=jets.rearranged(_reshape)),
    transpose: _affine(_transpose, jet=jets.rearranged(_transpose)),
    Hstack: _affine(_hstack),
    Vstack: _affine(_vstack),
    Concatenate: _affine(_concatenate),
    Trace: _affine(_trace),
    diag_vec: _affine(_diag_vec),
    diag_mat: _affine(_diag_mat),
    cumsum: _affine(cumulative(torch.cumsum)),
    upper_tri: _affine(_upper_tri),
    kron: _product(_kron),
    convolve: _product(_convolve),
    conv: _product(_convolve),
    conj: _affine(_identity, elementwise=True),
    real: _affine(_identity, elementwise=True),
    imag: _affine(_imag, elementwise=True),
    wraps.nonneg_wrap: _affine(_identity, elementwise=True),
    wraps.nonpos_wrap: _affine(_identity, elementwise=True),
    wraps.psd_wrap: _affine(_identity, elementwise=True),
    wraps.nsd_wrap: _affine(_identity, elementwise=True),
    wraps.symmetric_wrap: _affine(_identity, elementwise=True),
    wraps.hermitian_wrap: _affine(_identity, elementwise=True),
    wraps.skew_symmetric_wrap: _affine(_identity, elementwise=True),
    binary_operators.multiply: AtomRule(
        _multiply, elementwise=True, note=_PRODUCT, jet=jets.multiply, degree=product_degree
    ),
    binary_operators.MulExpression: _product(_matmul),
    binary_operators.DivExpression: AtomRule(
        _div,
        elementwise=True,
        note="smooth where the denominator is nonzero",
        jet=jets.divide,
        degree=_quotient_degree,
    ),
}
