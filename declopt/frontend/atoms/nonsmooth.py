"""Nonsmooth atoms: each rule carries its evaluation, its kink sites and its smoothing together.

Kink sites (:mod:`declopt.frontend.kinks`), per atom-output entry:

* ``abs``, ``norm1``: every entry at zero;
* ``maximum``/``minimum`` (any number of broadcast arguments), ``max``/``min``: every argument
  (entry) tied with the winning one;
* ``norm_inf``: entries tied with the largest ``|x_j|`` (residuals with unit slope at zero), and
  the origin (the largest ``|x_j|`` itself at zero);
* ``sum_largest`` (``sum_smallest`` is ``-sum_largest(-x)``): ties straddling each boundary where
  the weights of the sorted entries drop (after the ``floor(k)``-th and, for fractional ``k``,
  the ``ceil(k)``-th);
* ``cummax``: ties inside every prefix;
* ``Pnorm`` with ``p > 1``: the origin (all entries at zero; ``p = 1``/``inf`` are ``norm1``/
  ``norm_inf``). A ``p < 1`` "norm" is smooth on its domain's interior and has no sites.

``pos``/``neg`` are ``maximum(x, 0)``/``-minimum(x, 0)`` in CVXPY and need no rule of their own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import cvxpy as cp
import numpy as np
import torch
from cvxpy.atoms.affine import binary_operators, unary_operators
from cvxpy.atoms.affine.broadcast_to import broadcast_to
from cvxpy.atoms.affine.promote import Promote
from cvxpy.atoms.affine.reshape import reshape
from cvxpy.atoms.cummax import cummax
from cvxpy.atoms.elementwise.abs import abs as abs_
from cvxpy.atoms.elementwise.maximum import maximum
from cvxpy.atoms.elementwise.minimum import minimum
from cvxpy.atoms.max import max as max_
from cvxpy.atoms.min import min as min_
from cvxpy.atoms.norm1 import norm1
from cvxpy.atoms.norm_inf import norm_inf
from cvxpy.atoms.pnorm import Pnorm, PnormApprox
from cvxpy.atoms.sum_largest import sum_largest
from torch import Tensor

from declopt.frontend import kinks as K
from declopt.frontend import smoothing as S
from declopt.frontend.atoms import jets
from declopt.frontend.atoms.base import (
    AtomRule,
    Evaluator,
    KinkSite,
    SmoothEvaluator,
    stacked_column_norm,
)
from declopt.frontend.atoms.tensors import (
    Shape,
    TensorCache,
    cumulative,
    reduction,
    rows_of,
    shape_of,
)


def _size(expr: Any) -> int:
    return math.prod(shape_of(expr))


def _per_row(rows: int, sites: int) -> np.ndarray:
    """Owners of ``sites`` sites per row, rows in output order."""
    return np.repeat(np.arange(rows, dtype=np.int64), sites)


def _chooser(to_rows: Any, x: Tensor, reference: Any) -> Tensor:
    return to_rows(x) if reference is None else to_rows(reference[0])


def _entries(rows: Tensor, positions: Any, to_rows: Any = None) -> tuple[Tensor, ...]:
    """``(residual, margin)`` of sites that are the entries ``rows`` themselves, with their
    :data:`~declopt.frontend.kinks.Rows` when the operand's ``positions`` are given."""
    flat = rows.reshape(-1)
    if positions is None:
        return flat, flat
    at = positions[0] if to_rows is None else to_rows(positions[0])
    return flat, flat, _flat_rows(K.entry_rows(at.reshape(-1), torch.ones_like(flat)))


def _flat_rows(rows: K.Rows) -> K.Rows:
    index, value = rows
    return index.reshape(-1, 2), value.reshape(-1, 2)


def _flat(parts: tuple[Tensor, ...]) -> tuple[Any, ...]:
    """A site builder's ``(residual, margin[, rows])`` flattened to one site per row."""
    flat = tuple(t.reshape(-1) for t in parts[:2])
    return flat if len(parts) == 2 else (*flat, _flat_rows(parts[2]))


# ---------------------------------------------------------------------------------------------
# abs, norm1


def _abs_kinks(expr: Any) -> KinkSite:
    def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
        return _entries(x, positions)

    return KinkSite(fn, np.arange(_size(expr), dtype=np.int64), linear=True)


def _norm1(expr: Any) -> Evaluator:
    return reduction(
        expr, lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k), flatten_if_no_axis=True
    )


def _norm1_kinks(expr: Any) -> KinkSite:
    to_rows, n = rows_of(expr)

    def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
        return _entries(to_rows(x), positions, to_rows)

    return KinkSite(fn, _per_row(_size(expr), n), linear=True)


def _norm1_smoothed(expr: Any) -> SmoothEvaluator:
    to_rows, _ = rows_of(expr)
    shape = shape_of(expr)
    return lambda mu, x: S.smooth_abs(to_rows(x), mu).sum(-1).reshape(shape)


# ---------------------------------------------------------------------------------------------
# maximum, minimum (elementwise, any number of broadcast arguments)


def _stacked(expr: Any) -> Any:
    shape = shape_of(expr)
    return lambda xs: torch.stack([torch.broadcast_to(x, shape).reshape(-1) for x in xs], -1)


def _elementwise_extremum(largest: bool) -> AtomRule:
    op = torch.maximum if largest else torch.minimum
    sign = 1.0 if largest else -1.0

    def evaluate(expr: Any) -> Evaluator:
        return lambda *xs: functools.reduce(op, xs)

    def kinks(expr: Any) -> KinkSite:
        if len(expr.args) == 2:
            # Two arguments: one site per entry, ``a - b``, whichever wins (the same tie row as
            # the loser's ``x_loser - x_winner`` up to sign, without the argmin and gathers).
            shape = shape_of(expr)

            def pair(
                a: Tensor, b: Tensor, reference: Any = None, positions: Any = None
            ) -> tuple[Any, ...]:
                diff = torch.broadcast_to(a - b, shape).reshape(-1)
                if positions is None:
                    return diff, diff
                at_a, at_b = (torch.broadcast_to(p, shape).reshape(-1) for p in positions)
                one = torch.ones_like(diff)
                return diff, diff, (torch.stack([at_a, at_b], -1), torch.stack([one, -one], -1))

            return KinkSite(pair, _per_row(_size(expr), 1), linear=True)
        stack = _stacked(expr)

        def fn(*xs: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
            rows = stack(xs)  # (out_size, number of arguments)
            chooser = rows if reference is None else stack(reference)
            at = None if positions is None else stack(positions)
            return _flat(K.ties(rows, chooser, largest, at))

        return KinkSite(fn, _per_row(_size(expr), len(expr.args)), linear=True)

    def smoothed(expr: Any) -> SmoothEvaluator:
        return lambda mu, *xs: functools.reduce(lambda a, b: S.pair_max(a, b, mu, sign), xs)

    return AtomRule(
        evaluate, smooth=False, kinks=kinks, smoothed=smoothed, elementwise=True, jet=jets.extremum
    )


# ---------------------------------------------------------------------------------------------
# max, min, norm_inf (reductions)


def _reduced_extremum(largest: bool) -> AtomRule:
    op = torch.amax if largest else torch.amin
    sign = 1.0 if largest else -1.0

    def evaluate(expr: Any) -> Evaluator:
        return reduction(expr, lambda x, d, k: op(x, dim=d, keepdim=k))

    def kinks(expr: Any) -> KinkSite:
        to_rows, n = rows_of(expr)

        def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
            at = None if positions is None else to_rows(positions[0])
            return _flat(K.ties(to_rows(x), _chooser(to_rows, x, reference), largest, at))

        return KinkSite(fn, _per_row(_size(expr), n), linear=True)

    def smoothed(expr: Any) -> SmoothEvaluator:
        to_rows, _ = rows_of(expr)
        shape = shape_of(expr)
        return lambda mu, x: S.soft_max(to_rows(x), mu, sign).reshape(shape)

    return AtomRule(evaluate, smooth=False, kinks=kinks, smoothed=smoothed)


def _norm_inf(expr: Any) -> Evaluator:
    return reduction(
        expr, lambda x, d, k: torch.amax(torch.abs(x), dim=d, keepdim=k), flatten_if_no_axis=True
    )


def _norm_inf_kinks(expr: Any) -> KinkSite:
    to_rows, n = rows_of(expr)

    def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
        rows = to_rows(x)
        chooser = _chooser(to_rows, x, reference)
        # |x_j| as s_j x_j with the sign s at the chooser (+1 at zero): the same value, and a
        # unit slope where x_j = 0, so that the rows still pin the entries at the origin.
        sign = K.unit_sign(chooser)
        signed = sign * rows
        at = None if positions is None else to_rows(positions[0])
        parts = K.ties(signed, chooser.abs(), True, at, sign)
        pick = chooser.abs().argmax(-1, keepdim=True)
        origin = signed.gather(-1, pick)  # the largest |x_j|: zero only at the origin
        reach = rows.abs().amax(-1, keepdim=True)
        residual = torch.cat([parts[0], origin], -1).reshape(-1)
        margin = torch.cat([parts[1], reach], -1).reshape(-1)
        if at is None:
            return residual, margin
        origin_rows = K.entry_rows(at.gather(-1, pick), sign.gather(-1, pick))
        (index, value), (index0, value0) = parts[2], origin_rows
        rows_ = (torch.cat([index, index0], -2), torch.cat([value, value0], -2))
        return residual, margin, _flat_rows(rows_)

    return KinkSite(fn, _per_row(_size(expr), n + 1), linear=True)


def _norm_inf_smoothed(expr: Any) -> SmoothEvaluator:
    to_rows, _ = rows_of(expr)
    shape = shape_of(expr)
    return lambda mu, x: S.soft_max(S.smooth_abs(to_rows(x), mu), mu).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Pnorm


def _pnorm(expr: Any) -> Evaluator:
    if stacked_column_norm(expr) is not None:
        return _column_norm(expr)
    return _pnorm_of_argument(expr)


def _pnorm_of_argument(expr: Any) -> Evaluator:
    # PnormApprox.p is the rational approximation CVXPY evaluates with (numeric uses self.p).
    p = float(expr.p)
    if p == 2:
        # sqrt(sum x^2) by elementwise ops: torch's vector_norm reduces a short strided axis
        # (a column norm of a 2-row stack, as DCP writes pseudo-Huber) ~20x slower, and its
        # derivatives are vector_norms again. At the origin the gradient is 0 (a subgradient, as
        # vector_norm's); the kink itself is a site of its own.
        return reduction(expr, _two_norm, flatten_if_no_axis=True)
    if p >= 1:
        return reduction(
            expr,
            lambda x, d, k: torch.linalg.vector_norm(x, ord=p, dim=d, keepdim=k),
            flatten_if_no_axis=True,
        )
    # p < 1 (concave "norm", axis=None only): -inf if any entry is negative; for p < 0, 0 if any
    # entry is 0; else (sum |x|^p)^(1/p) as np.linalg.norm.
    shape = shape_of(expr)

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


def _column_rows(expr: Any) -> list[tuple[int, int]]:
    # np.vstack's view of each part of a stacked column norm: (rows, columns).
    columns = int(expr.args[0].shape[1])
    return [(math.prod(int(d) for d in a.shape) // columns, columns) for a in expr.args[0].args]


def _restacked(expr: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` of the stacked argument as a function of the parts (the cold paths: kink sites
    and the smoothed form)."""
    shapes = _column_rows(expr)

    def stack(parts: Any) -> Tensor:
        return torch.cat([x.reshape(r) for x, r in zip(parts, shapes)], 0)

    def f(*parts: Tensor, **kwargs: Any) -> Any:
        for key in ("reference", "positions"):
            if kwargs.get(key) is not None:
                kwargs[key] = [stack(kwargs[key])]
        return fn(stack(parts), **kwargs)

    return f


def _column_norm(expr: Any) -> Evaluator:
    shapes = _column_rows(expr)
    shape = shape_of(expr)
    squares = _column_squares(expr, shapes)
    if _never_vanishes(expr):  # no origin to guard (two wheres cost 10x a pass on CPU)
        return lambda *parts: torch.sqrt(squares(parts)).reshape(shape)

    def f(*parts: Tensor) -> Tensor:
        squares_ = squares(parts)
        positive = squares_ > 0
        root = torch.sqrt(torch.where(positive, squares_, 1.0))
        return torch.where(positive, root, 0.0).reshape(shape)

    return f


def _column_squares(expr: Any, shapes: list[tuple[int, int]]) -> Callable[..., Tensor]:
    """``parts -> (columns,)``: each column's sum of squares over the stacked parts. The constant
    parts (``pseudo_huber``'s row of ``alpha``) are summed once, here, not at every evaluation."""
    parts = stacked_column_norm(expr)
    constant = [isinstance(p, cp.Constant) for p in parts]
    live = [i for i, c in enumerate(constant) if not c]
    folded = None
    if any(constant):
        values = [np.asarray(p.value, dtype=np.float64) for p, c in zip(parts, constant) if c]
        rows = [r for r, c in zip(shapes, constant) if c]
        folded = TensorCache(sum(np.sum(np.square(v.reshape(r)), 0) for v, r in zip(values, rows)))

    def square(x: Tensor, rows: tuple[int, int]) -> Tensor:
        if rows[0] == 1:  # one row: no sum over it (a copy of every entry)
            return torch.square(x.reshape(rows[1]))
        return torch.sum(torch.square(x.reshape(rows)), 0)

    def squares(tensors: Sequence[Tensor]) -> Tensor:
        total = [square(tensors[i], shapes[i]) for i in live]
        if folded is not None:
            total.append(folded.get(tensors[0].dtype, tensors[0].device))
        return functools.reduce(torch.add, total)

    return squares


def _column_norm_jet(expr: Any, dependent: tuple[bool, ...]) -> jets.JetFn:
    shapes = _column_rows(expr)
    shape = shape_of(expr)
    positive = _never_vanishes(expr)
    columns = shapes[0][1]

    def deferred_parts(values: Any, grads: Any, hesses: Any, second: bool) -> tuple | None:
        # One-row parts with compact (or deferred) derivatives: D s = 2 x g and D2 s = 2 g g^T
        # + 2 x h as terms of the columns' scales, their bases kept small (jets.Scaled).
        g_terms: list[jets.Term] = []
        h_terms: list[jets.Term] = []
        for x, g, h, r in zip(values, grads, hesses if second else [None] * len(grads), shapes):
            if g is None:
                continue
            part_g = jets.terms_of(g, r[1], 1)
            if r[0] != 1 or part_g is None:  # decided by g alone (see jets._deferred_chain)
                return None
            part_h = jets.any_terms(h)
            v = x.reshape(columns)
            bases = [(s_, _columns(b, x.shape, r[1], 1)) for s_, b in part_g]
            g_terms += [(jets.product(v, s_), 2 * b) for s_, b in bases]
            if second:
                h_terms += [
                    (jets.product(s_, r_), 2 * jets.outer(b, c))
                    for s_, b in bases
                    for r_, c in bases
                ]
                h_terms += [
                    (jets.product(v, r_), 2 * _columns(c, x.shape, r[1], 2)) for r_, c in part_h
                ]
        if len(g_terms) ** 2 > jets.MAX_TERMS:
            return None
        grad = jets.Scaled(tuple(g_terms), 1)
        return grad, jets.Scaled(tuple(h_terms), 2) if second and h_terms else None

    def shaped(t: Any, k: int) -> Any:
        # columns (C,) to the node's shape; a deferred derivative's scales alike
        if t is None:
            return None
        if isinstance(t, jets.Scaled):

            def node_shaped(base: Tensor) -> Tensor:  # (1 or columns, *trail)
                lead = (1,) * len(shape) if base.shape[0] == 1 else shape
                return base.reshape(*lead, *base.shape[1:])

            return t.map(
                lambda term: (
                    None if term[0] is None else term[0].reshape(shape),
                    node_shaped(term[1]),
                )
            )
        if k == 2:
            t = jets.expand(t, (columns,), 2)
        return t.reshape(*shape, *t.shape[-k:])

    @jets.takes_scaled
    @jets.compact
    def jet(values: Any, grads: Any, hesses: Any, out: Tensor) -> tuple:
        second = hesses is not None
        column_out = out.reshape(-1)
        parts = deferred_parts(values, grads, hesses, second)
        if parts is not None:
            g_sum, h_sum = parts
            grad, hess = jets.root_of_deferred(column_out, g_sum, h_sum, second, positive, columns)
            return shaped(grad, 1), shaped(hess, 2)
        grads = [jets.plain(g) for g in grads]
        hesses = [jets.plain(h) for h in hesses] if second else None
        # Per column, s = sum over the stacked rows of x^2: D s = sum 2 x g and
        # D2 s = sum (2 g g^T + 2 x h). A one-row part (pseudo-Huber's z) needs no row sum, and
        # its 2 g g^T stays compact when g is (a promoted scalar's derivative).
        g_sum = h_sum = None
        for x, g, h, r in zip(values, grads, hesses if second else [None] * len(grads), shapes):
            if g is None:
                continue
            v = x.reshape(r)
            full = jets.expand(g, x.shape, 1).reshape(*r, -1)
            gg = _row_sum(2 * v.unsqueeze(-1) * full, r)
            g_sum = gg if g_sum is None else g_sum + gg
            if not second:
                continue
            if r[0] == 1:  # compact as it comes: drop the leading dims down to the columns'
                square = 2 * jets.outer(g, g)
                square = square.reshape(*square.shape[max(square.dim() - 3, 0) :])
            else:
                square = _row_sum(2 * jets.outer(full, full), r)
            if h is not None:
                curved = jets.expand(h, x.shape, 2).reshape(*r, *h.shape[-2:])
                square = square + _row_sum(2 * v.unsqueeze(-1).unsqueeze(-1) * curved, r)
            h_sum = square if h_sum is None else h_sum + square
        grad, hess = jets.root_of_sum(column_out, g_sum, h_sum, second, positive)  # type: ignore[arg-type]
        return shaped(grad, 1), shaped(hess, 2)

    return jet


def _columns(base: Tensor, shape: Sequence[int], columns: int, k: int) -> Tensor:
    """A derivative of a one-row part of ``shape`` as ``(1 or columns, *derivative dims)``: one
    entry where it is constant over the part, else broadcast to the part (a view)."""
    trail = base.shape[base.dim() - k :]
    if math.prod(base.shape[: base.dim() - k]) == 1:
        return base.reshape(1, *trail)
    return jets.expand(base, shape, k).reshape(columns, *trail)


def _row_sum(t: Tensor, rows: tuple[int, int]) -> Tensor:
    """``t: (R, C, ...)`` summed over its ``R`` stacked rows (none to sum when ``R = 1``)."""
    return t[0] if rows[0] == 1 else t.sum(0)


def _pnorm_jet(expr: Any, dependent: tuple[bool, ...]) -> jets.JetFn | None:
    if float(expr.p) != 2:
        return None
    if stacked_column_norm(expr) is not None:
        return _column_norm_jet(expr, dependent)
    summed = reduction(
        expr, lambda x, d, k: torch.sum(x, dim=d, keepdim=k), flatten_if_no_axis=True
    )
    return jets.summed_squares(summed, root=True)(expr, dependent)


def _two_norm(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    squares = torch.sum(x * x, dim=dims, keepdim=keepdim)
    positive = squares > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squares, 1.0)), 0.0)


def _never_vanishes(expr: Any) -> bool:
    """A column norm of a stack with a strictly signed part (``[z; alpha]``, ``alpha > 0``, as
    ``pseudo_huber`` writes it) is never zero: smooth, no kink sites."""
    parts = stacked_column_norm(expr)
    return parts is not None and any(_strict_sign(a) != 0 for a in parts)


def _strict_sign(expr: Any) -> int:
    """+1 / -1 where every entry of ``expr`` is known nonzero of that sign for every parameter
    value (positive constants, ``pos=True`` parameters, their products), else 0."""
    if isinstance(expr, cp.Constant):
        value = np.asarray(expr.value, dtype=float)
        return 1 if bool(np.all(value > 0)) else -1 if bool(np.all(value < 0)) else 0
    if isinstance(expr, cp.Parameter):
        return 1 if expr.attributes.get("pos") else -1 if expr.attributes.get("neg") else 0
    if isinstance(expr, unary_operators.NegExpression):
        return -_strict_sign(expr.args[0])
    if isinstance(expr, (binary_operators.multiply, binary_operators.MulExpression)):
        matrix_product = type(expr) is binary_operators.MulExpression  # multiply subclasses it
        if matrix_product and all(a.size > 1 for a in expr.args):
            return 0  # a matrix product can cancel
        return _strict_sign(expr.args[0]) * _strict_sign(expr.args[1])
    if isinstance(expr, (Promote, reshape, broadcast_to)):
        return _strict_sign(expr.args[0])
    return 0


def _pnorm_kinks(expr: Any) -> KinkSite | None:
    site = None if _never_vanishes(expr) else _pnorm_kinks_of_argument(expr)
    if site is None or stacked_column_norm(expr) is None:
        return site
    return KinkSite(_restacked(expr, site.fn), site.owners, linear=True)


def _pnorm_kinks_of_argument(expr: Any) -> KinkSite | None:
    p = float(expr.p)
    if p < 1:
        return None
    to_rows, n = rows_of(expr)

    def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
        rows = to_rows(x)
        reach = (
            _two_norm(rows, (-1,), True)
            if p == 2
            else torch.linalg.vector_norm(rows, ord=p, dim=-1, keepdim=True)
        )
        residual, *structure = _entries(rows, positions, to_rows)
        return residual, reach.expand_as(rows).reshape(-1), *structure[1:]

    return KinkSite(fn, _per_row(_size(expr), n), linear=True)


def _pnorm_smoothed(expr: Any) -> SmoothEvaluator | None:
    p = float(expr.p)
    if p < 1 or _never_vanishes(expr):
        return None
    to_rows, _ = rows_of(expr)
    shape = shape_of(expr)

    def smoothed(mu: Tensor, x: Tensor) -> Tensor:
        return S.smooth_pnorm(to_rows(x), p, mu).reshape(shape)

    if stacked_column_norm(expr) is None:
        return smoothed
    on_parts = _restacked(expr, lambda x, mu: smoothed(mu, x))
    return lambda mu, *parts: on_parts(*parts, mu=mu)


# ---------------------------------------------------------------------------------------------
# sum_largest


def _sum_largest_layout(expr: Any) -> tuple[Any, int, int, float]:
    to_rows, n = rows_of(expr)
    k = float(expr.k)
    kf = math.floor(k)
    return to_rows, n, kf, k - kf


def _sum_largest(expr: Any) -> Evaluator:
    # Sum of the k largest entries; fractional k adds frac(k) times the next largest entry.
    to_rows, n, kf, frac = _sum_largest_layout(expr)
    shape = shape_of(expr)
    kk = min(kf, n)
    use_frac = frac > 0 and kf < n
    t = kk + 1 if use_frac else kk

    def f(x: Tensor) -> Tensor:
        top = torch.topk(to_rows(x), t, dim=-1).values
        res = torch.sum(top[..., :kk], dim=-1)
        if use_frac:
            res = res + frac * top[..., kk]
        return res.reshape(shape)

    return f


def _sum_largest_boundaries(expr: Any) -> tuple[int, ...]:
    """Sorted positions ``b`` (``1 <= b < n``) after which the weights of the sorted entries
    drop: 1 -> frac after ``floor(k)``, frac -> 0 after ``floor(k) + 1``."""
    _, n, kf, frac = _sum_largest_layout(expr)
    drops = [kf] + ([kf + 1] if frac > 0 else [])
    return tuple(b for b in drops if 1 <= b < n)


def _sum_largest_kinks(expr: Any) -> KinkSite | None:
    boundaries = _sum_largest_boundaries(expr)
    if not boundaries:
        return None  # k >= n (a plain sum) or k < 1 with n = 1
    to_rows, n, _, _ = _sum_largest_layout(expr)

    def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
        rows = to_rows(x)
        chooser = _chooser(to_rows, x, reference)
        at = None if positions is None else to_rows(positions[0])
        parts = [K.boundary_ties(rows, chooser, b, at) for b in boundaries]
        residual = torch.cat([part[0] for part in parts], -1).reshape(-1)
        margin = torch.cat([part[1] for part in parts], -1).reshape(-1)
        if at is None:
            return residual, margin
        index = torch.cat([part[2][0] for part in parts], -2)
        value = torch.cat([part[2][1] for part in parts], -2)
        return residual, margin, _flat_rows((index, value))

    return KinkSite(fn, _per_row(_size(expr), n * len(boundaries)), linear=True)


def _sum_largest_smoothed(expr: Any) -> SmoothEvaluator | None:
    if not _sum_largest_boundaries(expr):
        return None
    to_rows, n, kf, frac = _sum_largest_layout(expr)
    shape = shape_of(expr)
    lo, hi = min(kf, n), min(kf + 1, n)

    def f(mu: Tensor, x: Tensor) -> Tensor:
        rows = to_rows(x)
        value = S.soft_sum_largest(rows, lo, mu)
        if frac > 0 and hi > lo:
            value = (1 - frac) * value + frac * S.soft_sum_largest(rows, hi, mu)
        return value.reshape(shape)

    return f


# ---------------------------------------------------------------------------------------------
# cummax


def _cummax_layout(expr: Any) -> tuple[Any, Any, np.ndarray] | None:
    """``(to_rows, from_rows, owners (R, n))`` along the cumulative axis; ``None`` for a scalar."""
    arg = expr.args[0]
    shape: Shape = shape_of(arg)
    out_shape = shape_of(expr)
    size = math.prod(shape)
    if arg.ndim == 0 or size <= 1:
        return None
    flat = np.arange(size, dtype=np.int64)
    if expr.axis is None:  # numpy flattens in C order
        return (lambda x: x.reshape(1, -1)), (lambda r: r.reshape(out_shape)), flat[None, :]
    axis = int(expr.axis) % arg.ndim
    moved = (*(d for i, d in enumerate(shape) if i != axis), shape[axis])
    owners = np.moveaxis(flat.reshape(shape), axis, -1).reshape(-1, shape[axis])

    def to_rows(x: Tensor) -> Tensor:
        return x.movedim(axis, -1).reshape(-1, shape[axis])

    def from_rows(r: Tensor) -> Tensor:
        return r.reshape(moved).movedim(-1, axis)

    return to_rows, from_rows, owners


def _cummax_kinks(expr: Any) -> KinkSite | None:
    layout = _cummax_layout(expr)
    if layout is None:
        return None
    to_rows, _, owners = layout
    n = owners.shape[-1]

    def fn(x: Tensor, reference: Any = None, positions: Any = None) -> tuple[Any, ...]:
        at = None if positions is None else to_rows(positions[0])
        return _flat(K.prefix_ties(to_rows(x), _chooser(to_rows, x, reference), at))

    return KinkSite(fn, np.repeat(owners.reshape(-1), n), linear=True)


def _cummax_smoothed(expr: Any) -> SmoothEvaluator | None:
    layout = _cummax_layout(expr)
    if layout is None:
        return None
    to_rows, from_rows, _ = layout
    return lambda mu, x: from_rows(S.soft_cummax(to_rows(x), mu))


# ---------------------------------------------------------------------------------------------
# the table

NONSMOOTH: dict[type, AtomRule] = {
    abs_: AtomRule(
        lambda expr: torch.abs,
        smooth=False,
        kinks=_abs_kinks,
        smoothed=lambda expr: lambda mu, x: S.smooth_abs(x, mu),
        elementwise=True,
        # Off the kink: slope sign(x), no curvature (torch's abs has slope 0 at 0, so does this).
        jet=jets.elementwise(lambda expr: lambda out, x: (torch.sign(x), 0.0)),
    ),
    norm1: AtomRule(_norm1, smooth=False, kinks=_norm1_kinks, smoothed=_norm1_smoothed),
    maximum: _elementwise_extremum(largest=True),
    minimum: _elementwise_extremum(largest=False),
    max_: _reduced_extremum(largest=True),
    min_: _reduced_extremum(largest=False),
    norm_inf: AtomRule(_norm_inf, smooth=False, kinks=_norm_inf_kinks, smoothed=_norm_inf_smoothed),
    Pnorm: AtomRule(
        _pnorm,
        smooth=False,
        kinks=_pnorm_kinks,
        smoothed=_pnorm_smoothed,
        isolated_kinks=True,
        jet=_pnorm_jet,
        note="p > 1: a kink at the origin only; p < 1: smooth on the interior of its domain",
    ),
    PnormApprox: AtomRule(
        _pnorm,
        smooth=False,
        kinks=_pnorm_kinks,
        smoothed=_pnorm_smoothed,
        isolated_kinks=True,
        jet=_pnorm_jet,
        note="p > 1: a kink at the origin only; p < 1: smooth on the interior of its domain",
    ),
    sum_largest: AtomRule(
        _sum_largest,
        smooth=False,
        kinks=_sum_largest_kinks,
        smoothed=_sum_largest_smoothed,
        note="k >= n: a plain sum, no kinks",
    ),
    cummax: AtomRule(
        cumulative(lambda x, d: torch.cummax(x, dim=d).values),
        smooth=False,
        kinks=_cummax_kinks,
        smoothed=_cummax_smoothed,
    ),
}
