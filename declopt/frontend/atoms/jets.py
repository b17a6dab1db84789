"""Local second derivatives of the atoms: how a second-order Taylor expansion passes through one.

A *jet* of a node is its value ``v`` (the node's shape ``s``) with its first and second derivatives
in the flat variable vector ``u`` (length ``m``): ``grad: (*s, m)`` and ``hess: (*s, m, m)``.
``grad is None`` means the node does not depend on ``u``; ``hess is None`` means it is affine in
``u``. An atom's :attr:`~.base.AtomRule.jet` maps its operands' jets to its own with closed-form
local derivatives (``exp' = exp``, ``huber' = 2 clip(x, -M, M)``, the product rule, ...), so the
objective's value, gradient and Hessian come out of one forward pass with no autograd graph
(docs/design.md, "Derivatives of the declared objective").

A :data:`JetRule` is called at compile time with the CVXPY node and, per operand, whether it
depends on ``u``; it returns the :data:`JetFn` for that node or ``None`` when it has no closed form
for that pattern (e.g. ``huber`` with a variable threshold): the program then keeps the autograd
derivatives. Affine atoms without a rule of their own are *linear* in their operands jointly, and
their derivatives are the atom applied to the operands' derivatives (:func:`linear`).

Derivatives may be *compact*: a node's ``grad`` of shape ``(*c, m)`` with ``c`` broadcastable to
the node's shape ``s`` stands for its broadcast to ``(*s, m)`` (likewise ``hess``). A scalar
variable promoted over ``n`` entries then carries one derivative, not ``n`` copies of it, through
``y - x``, ``2 (y - x)``'s curvature and the sum over the entries (``n`` times the one term): the
jets marked :func:`compact` keep such derivatives compact (elementwise atoms, broadcasting, sums);
every other jet receives them expanded (a view, no copy).

Products may be *deferred*: an elementwise atom of an operand whose derivative is compact returns
its local slope and that derivative unmultiplied (:class:`Scaled`), and a sum over the entries
then reduces the slope alone and multiplies the small derivative once. Pooling's ``sum(phi(y -
x_i))`` never forms ``phi'(z_i)`` times ``y``'s derivative entry by entry: that product, and its
curvature's, were two of the pass's full-size operations, and two more of its backward. Scalar
factors of the local derivatives (``square``'s ``2 x``, :class:`Times`) join the small factor the
same way. Jets marked :func:`takes_scaled` accept deferred derivatives; every other jet receives
them multiplied out (:func:`plain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

Grads = Sequence[Tensor | None]
JetFn = Callable[[Sequence[Tensor], Grads, Grads, Tensor], tuple[Tensor, Tensor | None]]
"""``(values, grads, hesses, out) -> (grad, hess)`` of one node; ``out`` is its value.
``hesses is None`` asks for the first order only (``hess`` then comes back ``None``)."""
JetRule = Callable[[Any, tuple[bool, ...]], JetFn | None]
"""``(node, dependent) -> JetFn | None``; ``dependent[i]``: operand ``i`` depends on ``u``."""
Derivs = Callable[..., tuple[Tensor | float, Tensor | float]]
"""``(out, x, *rest) -> (f', f'')``: elementwise derivatives in ``x`` of ``out = f(x, *rest)``."""


class Times(NamedTuple):
    """A local derivative ``tensor * factor`` (``factor`` a number), returned as such by an
    elementwise atom's derivatives so that the factor multiplies the operand's compact
    derivative, not every entry (``square``: ``f' = Times(x, 2.0)``)."""

    tensor: Tensor
    factor: float


Term = tuple[Tensor | None, Tensor]
"""``(scale, base)``: ``scale`` node-shaped (``None``: one), ``base`` a compact derivative."""


class Scaled(NamedTuple):
    """A derivative ``sum_j scale_j * base_j`` not yet multiplied out: each ``scale_j`` of the
    node's shape (or ``None``: one), each ``base_j`` a compact derivative (``(*c, m)`` or ``(*c,
    m, m)``, ``c`` broadcastable to the node's shape); ``k`` the trailing derivative dims (1 or
    2). A curvature has two terms where an atom's ``f'' g g^T`` meets its ``f' h``."""

    terms: tuple[Term, ...]
    k: int

    def multiplied(self) -> Tensor:
        out = None
        for scale, base in self.terms:
            out = _add_opt(out, base if scale is None else _col(scale, self.k) * base)
        assert out is not None
        return out

    def map(self, fn: Callable[[Term], Term]) -> Scaled:
        return Scaled(tuple(fn(t) for t in self.terms), self.k)


MAX_TERMS = 4
"""Most terms a deferred derivative keeps (each costs one reduction at a sum); beyond, it is
multiplied out."""


Derivative = Tensor | Scaled


def plain(t: Derivative | None) -> Tensor | None:
    """``t`` multiplied out where it is :class:`Scaled`."""
    return t.multiplied() if isinstance(t, Scaled) else t


def terms_of(t: Derivative | None, node_numel: int, k: int) -> tuple[Term, ...] | None:
    """``t`` as terms: a :class:`Scaled`'s, a compact plain derivative as one term of scale one
    (``()`` for ``None``); ``None`` for a full one (``node_numel`` entries: nothing to defer)."""
    if t is None:
        return ()
    if isinstance(t, Scaled):
        return t.terms
    return None if math.prod(t.shape[: t.dim() - k]) >= node_numel else ((None, t),)


def any_terms(t: Derivative | None) -> tuple[Term, ...]:
    """``t`` as terms, a full plain derivative as one term of scale one too (a curvature that
    joins deferred ones: whether the gradient is deferred must not depend on it, or the
    first-order pass would round differently from the second-order one)."""
    if t is None:
        return ()
    return t.terms if isinstance(t, Scaled) else ((None, t),)


def product(*parts: Tensor | None) -> Tensor | None:
    """The product of the non-``None`` parts (``None`` if there are none)."""
    out = None
    for p in parts:
        if p is not None:
            out = p if out is None else out * p
    return out


def _scaled_by(t: Derivative | None, factor: Tensor, k: int) -> Derivative | None:
    """``factor * t`` for a ``factor`` free of ``u`` (``k``: ``t``'s derivative dims): one number
    scales a deferred derivative's bases, a tensor of the node's entries its scales (a term of
    scale one takes it as its scale)."""
    if t is None:
        return None
    if not isinstance(t, Scaled):
        return t * _col(factor, k)
    if factor.numel() == 1:
        number = factor.reshape(())
        return t.map(lambda term: (term[0], term[1] * number))
    return t.map(lambda term: (product(term[0], factor), term[1]))


def takes_scaled(jet: JetFn) -> JetFn:
    """Mark ``jet`` as accepting :class:`Scaled` operand derivatives (it may return them)."""
    jet.scaled = True  # type: ignore[attr-defined]
    return jet


def accepts_scaled(jet: JetFn) -> bool:
    """Whether ``jet`` was marked :func:`takes_scaled`."""
    return getattr(jet, "scaled", False)


def _split(f: Tensor | float | Times) -> tuple[Tensor | None, float]:
    """A local derivative as ``(tensor or None, factor)``."""
    if isinstance(f, Times):
        return f.tensor, float(f.factor)
    if isinstance(f, Tensor):
        return f, 1.0
    return None, float(f)


def _times(t: Tensor | None, factor: float, g: Tensor, k: int) -> Tensor:
    """``t * factor * g`` (``t`` node-shaped or None; ``g`` with ``k`` derivative dims), the
    factor applied to the smaller of the two."""
    if t is None:
        return g if factor == 1.0 else factor * g
    if factor != 1.0:
        if g.numel() <= t.numel():
            g = factor * g
        else:
            t = factor * t
    return _col(t, k) * g


def compact(jet: JetFn) -> JetFn:
    """Mark ``jet`` as taking compact derivatives (see the module docstring) and returning them
    compact where its result is constant along a broadcast dim."""
    jet.compact = True  # type: ignore[attr-defined]
    return jet


def takes_compact(jet: JetFn) -> bool:
    """Whether ``jet`` was marked :func:`compact`."""
    return getattr(jet, "compact", False)


def reads(values: bool | Sequence[bool] = True, out: bool = True) -> Callable[[JetFn], JetFn]:
    """Mark what ``jet`` reads besides its operands' derivatives: the operands' ``values`` (one
    flag for all, or one per operand) and its own value ``out`` (unmarked jets read both). The
    Taylor pass computes a node's value only where a jet reads it or the caller asks for the
    objective's value."""

    def mark(jet: JetFn) -> JetFn:
        jet.reads_values = values  # type: ignore[attr-defined]
        jet.reads_out = out  # type: ignore[attr-defined]
        return jet

    return mark


def reads_of(jet: JetFn, count: int) -> tuple[tuple[bool, ...], bool]:
    """``(per operand, own value)``: what :func:`reads` marked ``jet`` (of ``count`` operands)
    as reading."""
    values = getattr(jet, "reads_values", True)
    per_operand = (values,) * count if isinstance(values, bool) else tuple(values)
    return per_operand, getattr(jet, "reads_out", True)


def free_of_out(derivs: Derivs) -> Derivs:
    """Mark elementwise derivatives ``(out, x, ...) -> (f', f'')`` that do not read ``out``."""
    derivs.reads_out = False  # type: ignore[attr-defined]
    return derivs


def _add_opt(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _first_order(hesses: Grads | None, grads: Grads) -> Grads:
    """``hesses``, or all ``None`` when only the first order is asked for."""
    return [None] * len(grads) if hesses is None else hesses


def outer(a: Tensor, b: Tensor) -> Tensor:
    """``(*s, m) x (*s, m) -> (*s, m, m)``, entrywise outer products (broadcasting ``s``)."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _col(t: Tensor | float, k: int) -> Tensor | float:
    """``t`` with ``k`` trailing singleton dims, to scale a derivative of ``k`` trailing dims."""
    return t.reshape(*t.shape, *([1] * k)) if isinstance(t, Tensor) else t


def chain(
    f1: Tensor | float | Times,
    f2: Tensor | float | Times,
    g: Tensor,
    h: Tensor | None,
    second: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The jet of ``f(x)`` from ``x``'s ``(g, h)`` and ``f', f''`` at ``x`` (elementwise);
    ``second=False``: the gradient only."""
    (t1, c1), (t2, c2) = _split(f1), _split(f2)
    grad = _times(t1, c1, g, 1)
    if not second:
        return grad, None
    hess = _times(t2, c2, outer(g, g), 2)
    if h is not None:
        hess = hess + _times(t1, c1, h, 2)
    return grad, hess


def _deferred_chain(
    f1: Tensor | float | Times,
    f2: Tensor | float | Times,
    g: Derivative,
    h: Derivative | None,
    second: bool,
    node_numel: int,
) -> tuple[Derivative, Derivative | None] | None:
    """:func:`chain` with the products left :class:`Scaled` where the operand's gradient is
    compact or deferred already: ``grad = sum_j (f' s_j) b_j`` and ``hess = sum_{j,l} (f'' s_j
    s_l) b_j b_l^T + sum_i (f' r_i) c_i`` for ``g = sum_j s_j b_j``, ``h = sum_i r_i c_i``; each
    product of scales is one pass, the bases stay small. ``None`` where ``g`` is full (the
    product is one pass either way). The choice reads ``g`` alone, so that the first-order pass
    takes the same products as the second-order one."""
    (t1, c1), (t2, c2) = _split(f1), _split(f2)
    g_terms = terms_of(g, node_numel, 1)
    if not g_terms or len(g_terms) ** 2 > MAX_TERMS:
        return None
    if t1 is None and all(s is None for s, _ in g_terms):
        return None  # a constant slope of a compact derivative: chain keeps it compact

    def small(factor: float, base: Tensor) -> Tensor:
        return base if factor == 1.0 else factor * base

    grad = Scaled(tuple((product(t1, s), small(c1, b)) for s, b in g_terms), 1)
    if not second:
        return grad, None
    terms: list[Term] = []
    if not (t2 is None and c2 == 0.0):
        for s, b in g_terms:
            for r, c in g_terms:
                terms.append((product(t2, s, r), small(c2, outer(b, c))))
    terms += [(product(t1, r), small(c1, c)) for r, c in any_terms(h)]
    if not terms:
        return grad, None
    hess = Scaled(tuple(terms), 2)
    return grad, hess.multiplied() if len(terms) > MAX_TERMS else hess


def _trailing(fn: Callable[..., Tensor], tensors: Sequence[Tensor | None], k: int) -> Tensor:
    """``fn`` (a map of node-shaped tensors, linear in the non-``None`` ones) applied along the
    ``k`` trailing derivative dims of ``tensors``; ``None`` entries are passed as ``None``-free
    zeros by the caller's closure. Size-1 trailing dims (one variable) skip ``vmap``."""
    batched = [t for t in tensors if t is not None]
    lead = batched[0].shape[batched[0].dim() - k :]
    width = math.prod(lead)
    flat = [None if t is None else t.reshape(*t.shape[: t.dim() - k], width) for t in tensors]
    if width == 1:
        out = fn(*[None if t is None else t[..., 0] for t in flat]).unsqueeze(-1)
    else:
        dims = tuple(None if t is None else -1 for t in flat)
        out = vmap(fn, in_dims=dims, out_dims=-1)(*flat)
    return out.reshape(*out.shape[:-1], *lead)


def linear(evaluate: Callable[..., Tensor]) -> JetFn:
    """The jet of an atom linear in its operands jointly: the atom applied to the operands'
    derivatives (zeros for the operands that do not depend on ``u``)."""

    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        def apply(*ts: Tensor | None) -> Tensor:
            return evaluate(*[torch.zeros_like(v) if t is None else t for v, t in zip(values, ts)])

        grad = _trailing(apply, grads, 1)
        if hesses is None or all(h is None for h in hesses):
            return grad, None
        hess = _trailing(apply, hesses, 2)
        return grad, hess

    return jet


def expand(t: Tensor | None, shape: Sequence[int], k: int) -> Tensor | None:
    """A compact derivative ``t`` (``k`` trailing derivative dims) as a full one of the node
    shape ``shape``: a broadcast view."""
    if t is None or tuple(t.shape[: t.dim() - k]) == tuple(shape):
        return t
    return torch.broadcast_to(t, (*shape, *t.shape[t.dim() - k :]))


def expanded(
    values: Sequence[Tensor], grads: Grads, hesses: Grads | None
) -> tuple[list[Tensor | None], list[Tensor | None] | None]:
    """Every operand's derivatives expanded to its value's shape (views): what a jet that is
    not :func:`compact` receives."""
    full_grads = [expand(g, v.shape, 1) for g, v in zip(grads, values)]
    if hesses is None:
        return full_grads, None
    return full_grads, [expand(h, v.shape, 2) for h, v in zip(hesses, values)]


def _constant(t: Tensor | None, ndim: int, k: int) -> Tensor | None:
    """A derivative constant over a node's entries as one compact entry of ``ndim`` dims."""
    return None if t is None else t.reshape(*(1,) * ndim, *t.shape[t.dim() - k :])


def add(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """``a + b + ...`` with numpy broadcasting: the sum of the derivatives (the subtracted
    operands' negated, :func:`~.base.subtracted`)."""
    from declopt.frontend.atoms.base import subtracted  # base imports this module

    signs = subtracted(node)
    single = sum(dependent) == 1  # a shift by u-free terms: the derivatives pass through

    @reads(values=False, out=False)
    @takes_scaled
    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        grad = hess = None
        for g, h, minus in zip(grads, _first_order(hesses, grads), signs):
            if minus:
                g, h = _negated(g), _negated(h)
            if not single:
                g, h = plain(g), plain(h)
            grad = _add_opt(grad, g)  # broadcasting: the derivative dims trail the node's
            hess = _add_opt(hess, h)
        return grad, hess

    return jet


def rearranged(evaluator: Callable[[Any], Callable[..., Tensor]]) -> JetRule:
    """An atom that only moves entries (reshape, transpose, indexing; ``evaluator(node)`` is
    its evaluation): a derivative constant over every entry (a promoted scalar's) stays one
    compact entry; any other goes through the atom itself (:func:`linear`)."""

    def rule(node: Any, dependent: tuple[bool, ...]) -> JetFn:
        through = linear(evaluator(node))
        ndim = len(node.shape)

        def constant(t: Tensor | None, k: int) -> bool:
            return t is None or all(d == 1 for d in t.shape[: t.dim() - k])

        @compact
        def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
            g, h = grads[0], None if hesses is None else hesses[0]
            if g is not None and constant(g, 1) and constant(h, 2):
                return _constant(g, ndim, 1), _constant(h, ndim, 2)
            return through(values, *expanded(values, grads, hesses), out)

        return jet

    return rule


def broadcast(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """``Promote`` / ``broadcast_to``: the operand's derivatives, left-padded to the node's
    number of dims (a size-1 operand to all ones): compact, nothing is copied."""
    ndim = len(node.shape)
    scalar = math.prod(int(d) for d in node.args[0].shape) == 1

    def padded(t: Tensor | None, k: int) -> Tensor | None:
        if t is None or scalar:
            return _constant(t, ndim, k)
        lead = t.shape[: t.dim() - k]
        return t.reshape(*(1,) * (ndim - len(lead)), *t.shape)

    @reads(values=False, out=False)
    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        h = None if hesses is None else padded(hesses[0], 2)
        return padded(grads[0], 1), h

    return jet


def _negated(t: Derivative | None) -> Derivative | None:
    if t is None:
        return None
    return t.map(lambda term: (term[0], -term[1])) if isinstance(t, Scaled) else -t


def negate(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """``-a``: the negated derivatives (compact as they come)."""

    @reads(values=False, out=False)
    @takes_scaled
    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        h = None if hesses is None else _negated(hesses[0])
        return _negated(grads[0]), h

    return jet


def summed(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """``Sum`` over ``node.axis`` (all axes when ``None``): a compact derivative is summed over
    the reduced dims it has and multiplied by the sizes of those it is constant along."""
    shape = tuple(int(d) for d in node.args[0].shape)
    axis, keepdims = node.axis, bool(getattr(node, "keepdims", False))
    axes = range(len(shape)) if axis is None else (axis,) if isinstance(axis, int) else axis
    reduced = sorted({int(a) % len(shape) for a in axes}) if shape else []

    def reduce(t: Derivative | None, k: int, summed: Sequence[int] = ()) -> Tensor | None:
        if t is None:
            return None
        if isinstance(t, Scaled):
            out = None
            for term in t.terms:
                product, done = reduce_term(term, k)
                out = _add_opt(out, reduce(product, k, done))
            return out
        trail = t.shape[t.dim() - k :]
        t = t.reshape(*(1,) * (len(shape) + k - t.dim()), *t.shape)
        rest = [d for d in reduced if d not in summed]
        present = [d for d in rest if t.shape[d] != 1]
        count = math.prod([shape[d] for d in rest if t.shape[d] == 1])
        if present:
            t = t.sum(dim=present, keepdim=True)
        if count != 1:
            t = t * count
        if keepdims:
            return t
        kept = [t.shape[d] for d in range(len(shape)) if d not in reduced]
        return t.reshape(*kept, *trail)

    def reduce_term(term: Term, k: int) -> tuple[Tensor, list[int]]:
        # Sum the scale over the reduced dims along which the base is constant (before the
        # product: those entries share one base), then multiply; the dims summed so.
        scale, base = term
        if scale is None:
            return base, []
        base = base.reshape(*(1,) * (len(shape) + k - base.dim()), *base.shape)
        scale = scale.reshape(*(1,) * (len(shape) - scale.dim()), *scale.shape)
        shared = [d for d in reduced if base.shape[d] == 1 and scale.shape[d] != 1]
        if shared:
            scale = scale.sum(dim=shared, keepdim=True)
        return _col(scale, k) * base, shared

    @reads(values=False, out=False)
    @takes_scaled
    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        return reduce(grads[0], 1), None if hesses is None else reduce(hesses[0], 2)

    return jet


def fused(jet: Callable[..., tuple]) -> Callable[..., tuple]:
    """Mark a jet that computes its node's value itself, from the terms its derivatives share:
    called as ``jet(values, grads, hesses, want_value)``, it returns ``(grad, hess, out)`` with
    ``out`` None unless ``want_value`` (the Taylor pass then skips the node's own evaluation)."""
    jet.fused = True  # type: ignore[attr-defined]
    return jet


def is_fused(jet: Callable[..., tuple]) -> bool:
    """Whether ``jet`` was marked :func:`fused`."""
    return getattr(jet, "fused", False)


FusedDerivs = Callable[..., tuple[Tensor | None, Tensor | float | Times, Tensor | float | Times]]
"""``(x, *rest, want_value) -> (f(x) or None, f', f'')``: an elementwise atom's value and local
derivatives from shared terms (the value only when asked for)."""


def elementwise(
    derivs: Callable[[Any], Derivs],
    with_value: Callable[[Any], FusedDerivs | None] | None = None,
) -> JetRule:
    """An elementwise atom of its first operand (the others, e.g. ``huber``'s threshold or a
    parameter exponent, must not depend on ``u``), from its closed-form ``f'`` and ``f''``.
    ``with_value(node)``, where it gives a function for the node, computes the value with the
    derivatives (:func:`fused`)."""

    def rule(node: Any, dependent: tuple[bool, ...]) -> JetFn | None:
        if any(dependent[1:]):
            return None
        both = None if with_value is None else with_value(node)

        numel = math.prod(int(d) for d in node.shape)

        def combined(f1: Any, f2: Any, grads: Grads, hesses: Grads | None) -> tuple:
            g, h, second = grads[0], None if hesses is None else hesses[0], hesses is not None
            deferred = _deferred_chain(f1, f2, g, h, second, numel)  # type: ignore[arg-type]
            if deferred is not None:
                return deferred
            return chain(f1, f2, plain(g), plain(h), second)  # type: ignore[arg-type]

        if both is not None:

            @fused
            @reads(values=True, out=False)
            @takes_scaled
            @compact
            def fused_jet(
                values: Sequence[Tensor], grads: Grads, hesses: Grads, want_value: bool
            ) -> tuple:
                out, f1, f2 = both(*values, want_value)
                return (*combined(f1, f2, grads, hesses), out)

            return fused_jet  # type: ignore[return-value]
        d = derivs(node)

        @reads(values=True, out=getattr(d, "reads_out", True))
        @takes_scaled
        @compact
        def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
            f1, f2 = d(out, *values)
            return combined(f1, f2, grads, hesses)

        return jet

    return rule


def multiply(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """Elementwise ``a * b`` (broadcasting): the product rule (a factor's value is read only
    where the other factor depends on ``u``; a factor free of ``u`` scales the other's
    derivatives, deferred or not)."""

    @reads(values=(dependent[1], dependent[0]), out=False)
    @takes_scaled
    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        (a, b), (ga, gb), (ha, hb) = values, grads, _first_order(hesses, grads)
        if ga is None or gb is None:
            factor, g, h = (b, ga, ha) if gb is None else (a, gb, hb)
            hess = None if hesses is None else _scaled_by(h, factor, 2)
            return _scaled_by(g, factor, 1), hess
        ga, gb, ha, hb = plain(ga), plain(gb), plain(ha), plain(hb)
        grad = _add_opt(ga * _col(b, 1), _col(a, 1) * gb)
        if hesses is None:
            return grad, None
        hess = _add_opt(
            None if ha is None else ha * _col(b, 2), None if hb is None else _col(a, 2) * hb
        )
        hess = _add_opt(hess, outer(ga, gb) + outer(gb, ga))
        return grad, hess

    return jet


def bilinear(node: Any, dependent: tuple[bool, ...], evaluate: Callable[..., Tensor]) -> JetFn:
    """``evaluate(a, b)`` linear in each operand separately (``@``, ``kron``, convolutions): the
    product rule with the atom itself as the product."""

    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        (a, b), (ga, gb), (ha, hb) = values, grads, _first_order(hesses, grads)

        def right(t: Tensor) -> Tensor:
            return evaluate(t, b)

        def left(t: Tensor) -> Tensor:
            return evaluate(a, t)

        grad = _add_opt(
            None if ga is None else _trailing(right, [ga], 1),
            None if gb is None else _trailing(left, [gb], 1),
        )
        if hesses is None:
            return grad, None
        hess = _add_opt(
            None if ha is None else _trailing(right, [ha], 2),
            None if hb is None else _trailing(left, [hb], 2),
        )
        if ga is not None and gb is not None:
            inner = vmap(evaluate, in_dims=(None, -1), out_dims=-1)
            cross = vmap(inner, in_dims=(-1, None), out_dims=-2)(ga, gb)
            hess = _add_opt(hess, cross + cross.transpose(-1, -2))
        return grad, hess

    return jet


def divide(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """``a / b`` (elementwise, broadcasting) as ``a * (1 / b)`` (``-a / b`` read as ``a / (-b)``,
    :func:`~.base.quotient_reads`)."""
    from declopt.frontend.atoms.base import quotient_reads  # base imports this module

    times_inverse = multiply(node, dependent)
    negated, _ = quotient_reads(node)

    @reads(values=(dependent[1], True), out=False)
    @takes_scaled
    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        (a, b), (ga, gb), (ha, hb) = values, grads, _first_order(hesses, grads)
        second = hesses is not None
        if negated:  # the operands as read: a / (-b)
            b = -b
        inverse = torch.reciprocal(b)
        if gb is None:  # a divisor free of u scales the numerator's derivatives
            return times_inverse([a, inverse], [ga, None], [ha, None] if second else None, out)
        ga, gb, ha, hb = plain(ga), plain(gb), plain(ha), plain(hb)
        curvature = 2 * inverse * inverse * inverse
        g_inv, h_inv = chain(-inverse * inverse, curvature, gb, hb, second)  # type: ignore[arg-type]
        return times_inverse([a, inverse], [ga, g_inv], [ha, h_inv] if second else None, out)

    return jet


def extremum(node: Any, dependent: tuple[bool, ...]) -> JetFn:
    """Elementwise ``maximum`` / ``minimum``: the jet of the operand that attains the value (the
    first one at a tie, a kink the nonsmooth machinery deals with)."""

    @compact
    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        taken = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
        grad = hess = None
        for v, g, h in zip(values, grads, _first_order(hesses, grads)):
            pick = (v == out) & ~taken
            taken = taken | pick
            if g is not None:
                grad = _add_opt(grad, torch.where(pick.unsqueeze(-1), g, 0.0))
            if h is not None:
                hess = _add_opt(hess, torch.where(pick.unsqueeze(-1).unsqueeze(-1), h, 0.0))
        return grad, hess

    return jet


def root_of_sum(
    out: Tensor, g: Tensor, h: Tensor | None, second: bool = True, positive: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The jet of ``out = sqrt(s)`` (a 2-norm) from ``s``'s ``(g, h)``: slope ``1 / (2 out)``,
    curvature ``-1 / (4 out^3)``; 0 at the origin, the kink, as the evaluators' subgradient.
    ``positive``: ``out`` is known never to vanish (no guard for the origin)."""
    if positive:
        # hess = h / (2 out) - grad grad^T / out, grad = g / (2 out): two passes fewer than
        # the curvature -1 / (4 out^3) times g g^T.
        inverse = torch.reciprocal(out)
        slope = 0.5 * inverse
        grad = _col(slope, 1) * g
        if not second:
            return grad, None
        hess = -_col(inverse, 2) * outer(grad, grad)
        return grad, hess if h is None else hess + _col(slope, 2) * h
    f1, f2, _ = _root_slopes(out)
    return chain(f1, f2, g, h, second)


def root_of_deferred(
    out: Tensor,
    g: Scaled,
    h: Scaled | None,
    second: bool,
    positive: bool,
    size: int,
) -> tuple[Derivative, Derivative | None]:
    """:func:`root_of_sum` for deferred derivatives of the sum ``s`` (``size`` entries): with
    ``q_j = s_j / out``, ``grad = sum_j q_j (b_j / 2)`` and ``hess = -sum_{j,l} (q_j q_l / out)
    (b_j b_l^T / 4) + sum_i (r_i / out) (c_i / 2)`` where ``out`` never vanishes; otherwise the
    chain rule with the origin's guard."""
    if not positive:
        f1, f2, _ = _root_slopes(out)
        deferred = _deferred_chain(f1, f2, g, h, second, size)
        if deferred is not None:
            return deferred
        return chain(f1, f2, plain(g), plain(h), second)  # type: ignore[arg-type]
    inverse = torch.reciprocal(out)
    q = [(product(inverse, s), b) for s, b in g.terms]
    grad = Scaled(tuple((s, 0.5 * b) for s, b in q), 1)
    if not second:
        return grad, None
    terms = [(product(s, r, inverse), -0.25 * outer(b, c)) for s, b in q for r, c in q]
    if h is not None:
        terms += [(product(inverse, r), 0.5 * c) for r, c in h.terms]
    if len(terms) > MAX_TERMS:
        return grad, Scaled(tuple(terms), 2).multiplied()
    return grad, Scaled(tuple(terms), 2)


def _root_slopes(out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(f', f'', out > 0)`` of ``sqrt`` at ``s = out^2``, 0 at the origin (the kink)."""
    positive = out > 0
    r = torch.where(positive, out, 1.0)
    f1 = torch.where(positive, 0.5 / r, 0.0)
    f2 = torch.where(positive, -0.25 / (r * r * r), 0.0)
    return f1, f2, positive


def softmax_weighted(reduce: Callable[[Tensor], Tensor], dims: tuple[int, ...]) -> JetFn:
    """``log_sum_exp`` over ``dims`` (``reduce``: the atom's linear sum over them): with
    ``p = softmax(x)``, ``grad = sum p g`` and ``hess = sum p (g g^T + h) - grad grad^T`` (the
    covariance of the operand's derivatives under ``p``)."""

    def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
        (x,), (g,) = values, grads
        p = torch.exp(x - torch.logsumexp(x, dim=dims, keepdim=True))
        grad = _trailing(reduce, [_col(p, 1) * g], 1)  # type: ignore[operator]
        if hesses is None:
            return grad, None
        square = outer(g, g) if hesses[0] is None else outer(g, g) + hesses[0]  # type: ignore[arg-type]
        hess = _trailing(reduce, [_col(p, 2) * square], 2)  # type: ignore[operator]
        return grad, hess - outer(grad, grad)

    return jet


def summed_squares(reduce: Callable[[Tensor], Tensor], root: bool = False) -> JetRule:
    """``reduce(x * x) / y`` (``quad_over_lin``, hence ``sum_squares``) with ``y`` free of ``u``,
    or with ``root`` the 2-norm ``sqrt(reduce(x * x))``; ``reduce`` is the atom's (linear) sum
    over its axes of a node-shaped tensor."""

    def rule(node: Any, dependent: tuple[bool, ...]) -> JetFn | None:
        if any(dependent[1:]):
            return None

        def jet(values: Sequence[Tensor], grads: Grads, hesses: Grads, out: Tensor) -> tuple:
            x, second = values[0], hesses is not None
            h = None if hesses is None else hesses[0]
            g, h = chain(2 * x, 2.0, grads[0], h, second)  # type: ignore[arg-type]
            g = _trailing(reduce, [g], 1)
            h = None if h is None else _trailing(reduce, [h], 2)
            if root:
                return root_of_sum(out, g, h, second)
            inverse = torch.reciprocal(values[1].reshape(()))
            return g * inverse, None if h is None else h * inverse

        return jet

    return rule
