"""The per-atom record: one :class:`AtomRule` holds everything the front end knows about an atom.

A rule says how to *evaluate* the atom (a torch function of its operand tensors, exactly
``node.numeric``), what a solver may exploit about its derivatives (``elementwise``, ``affine``,
``smooth``), and, for a nonsmooth atom, where its *kinks* are and a *smoothed* stand-in
(see docs/design.md, 'Kinks').

:func:`check_rules` runs when :mod:`declopt.frontend.atoms` is imported: every atom the front end
accepts is either declared smooth (with the reason, when that needs one) or carries both its kink
sites and its smoothing; anything else raises :class:`AtomRuleError`, so that a new nonsmooth atom
cannot be added without the facts the implicit backward and the torch backend rely on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cvxpy as cp
import numpy as np
from cvxpy.atoms.affine.add_expr import AddExpression
from cvxpy.atoms.affine.binary_operators import DivExpression
from cvxpy.atoms.affine.promote import Promote
from cvxpy.atoms.affine.unary_operators import NegExpression
from cvxpy.atoms.affine.vstack import Vstack
from cvxpy.atoms.elementwise.huber import huber
from cvxpy.atoms.elementwise.power import Power
from cvxpy.atoms.pnorm import Pnorm, PnormApprox
from torch import Tensor

from declopt.errors import AtomRuleError
from declopt.frontend.atoms.jets import JetRule

Evaluator = Callable[..., Tensor]
"""``f(*operand_tensors) -> Tensor`` of exactly ``node.shape``."""
SmoothEvaluator = Callable[..., Tensor]
"""``f(mu, *operand_tensors) -> Tensor``: a smoothed atom; ``mu`` is a scalar tensor, ``> 0``."""


@dataclass(frozen=True)
class KinkSite:
    """The kink sites of one atom node.

    ``fn(*operand_tensors, reference=None) -> (residuals (K,), margins (K,))``: smooth residuals
    that vanish on a kink, and margins measuring the distance to it (``inf`` where a site cannot
    be on one). With ``reference`` (the operands at a reference point), ties are represented by
    the extremum there. ``owners[k]`` is the flat (row-major) index of the atom-output entry that
    site ``k`` belongs to: a kink inside an inequality is gated by the rows that depend on it.

    ``linear``: every residual is linear in the operands, at most two entries per residual, with
    piecewise constant coefficients (an entry, an entry less its tie representative). Then
    ``fn(..., positions=...)``, given each operand's flat positions in the concatenated operands
    (long tensors shaped like the operands), also returns the residuals' exact Jacobian as
    :data:`~declopt.frontend.kinks.Rows` ``(index (K, 2), value (K, 2))``: the KKT core then
    keeps kink rows as index sets instead of dense Jacobian rows.
    """

    fn: Callable[..., tuple[Any, ...]]
    owners: np.ndarray
    linear: bool = False


DegreeRule = Callable[[Any, tuple[int | None, ...]], int | None]
"""``(node, operand degrees) -> degree`` (``None``: not a polynomial in the variables)."""
KinkRule = Callable[[Any], KinkSite | None]
"""Given the CVXPY node, its :class:`KinkSite` (``None``: this instance is smooth)."""
SmoothRule = Callable[[Any], SmoothEvaluator | None]
"""Given the CVXPY node, its smoothed form (``None`` exactly where the kink rule gives ``None``)."""


@dataclass(frozen=True)
class AtomRule:
    """Everything known about one CVXPY atom class.

    Attributes:
        evaluate: given the node (static data: axis, exponent, key, shapes), its evaluator.
        smooth: the atom is continuously differentiable on the interior of its domain. A
            nonsmooth atom (``smooth=False``) must give ``kinks`` and ``smoothed``.
        kinks: given the node, its :class:`KinkSite` (nonsmooth atoms only).
        smoothed: given the node, a smooth stand-in within ``O(mu)`` of it (nonsmooth atoms only;
            max-type atoms lie below the original).
        elementwise: output entry ``i`` depends only on entry ``i`` of each operand (operands of
            another shape are broadcast, numpy-style).
        affine: the atom is affine in its operands jointly.
        isolated_kinks: its kinks are isolated points (where its whole argument vanishes, as for
            ``norm(x, 2)``), not surfaces: a smooth solver meets one only if the solution sits
            exactly there, so the torch backend solves such declarations as smooth first and
            takes the nonsmooth path only for the problems that end up on a kink.
        jet: given the node and which operands depend on the variables, the closed-form
            local first and second derivatives (:mod:`.jets`); ``None`` on a nonlinear atom:
            programs using it take their derivatives from autograd. Affine atoms without one
            must be *linear* in their operands jointly (their derivatives are the atom itself).
        degree: given the node and its operands' polynomial degrees in the variables (``None``:
            not a polynomial), its own (``None``: not a polynomial). Default: an affine atom
            has its operands' largest degree; any other atom is a polynomial only of constants
            (degree 0). Products add degrees, ``x^2`` doubles one (see
            :func:`polynomial_degree`: a degree-2 objective has an exact Newton model).
        note: why the declared smoothness holds where it is not obvious (C1 only, domain
            boundaries, instances without kinks).
    """

    evaluate: Callable[[Any], Evaluator]
    smooth: bool = True
    kinks: KinkRule | None = None
    smoothed: SmoothRule | None = None
    elementwise: bool = False
    affine: bool = False
    isolated_kinks: bool = False
    jet: JetRule | None = None
    degree: DegreeRule | None = None
    note: str = ""


def check_rules(rules: Mapping[type, AtomRule]) -> None:
    """Raise :class:`AtomRuleError` unless every rule is declared smooth or has both its kink
    sites and its smoothing (and a smooth rule has neither)."""
    problems = []
    for cls, rule in rules.items():
        name = getattr(cls, "__name__", repr(cls))
        if not isinstance(rule, AtomRule):
            problems.append(f"{name}: not an AtomRule")
        elif rule.smooth and (rule.kinks is not None or rule.smoothed is not None):
            problems.append(f"{name}: declared smooth but has kinks or a smoothing")
        elif not rule.smooth and (rule.kinks is None or rule.smoothed is None):
            problems.append(f"{name}: declared nonsmooth without both kink sites and a smoothing")
        elif rule.affine and not rule.smooth:
            problems.append(f"{name}: declared affine and nonsmooth")
    if problems:
        raise AtomRuleError("inconsistent atom rules: " + "; ".join(problems))


def stacked_column_norm(expr: cp.Expression) -> list[cp.Expression] | None:
    """The parts of ``norm(vstack(parts), 2, axis=0)``, else ``None``.

    DCP writes an elementwise hypot this way (``pseudo_huber``: the column norms of ``[z; alpha]``);
    its evaluator then takes the parts and sums their squares column by column, never building
    the stack (a ``cat`` as large as the data at every evaluation).
    """
    if not isinstance(expr, (Pnorm, PnormApprox)) or float(expr.p) != 2:
        return None
    arg = expr.args[0]
    if not isinstance(arg, Vstack) or arg.ndim != 2 or not isinstance(expr.axis, int):
        return None
    return list(arg.args) if expr.axis % 2 == 0 else None


def subtracted(expr: AddExpression) -> tuple[bool, ...]:
    """Per argument of a sum, whether it is subtracted: CVXPY writes ``a - b`` as ``a + (-b)``,
    and the sum evaluates it as ``a - b`` from ``b`` itself (one pass instead of two: the
    negation was a full pass of its own in every evaluation of a pooling objective, forward
    and backward). Not when every argument is negated (the sum is then a negation anyway)."""
    flags = tuple(isinstance(a, NegExpression) for a in expr.args)
    return (False,) * len(flags) if all(flags) else flags


def quotient_reads(expr: DivExpression) -> tuple[bool, bool]:
    """``(numerator negated, divisor promoted)``: what a quotient ``a / b`` with ``b`` free of the
    variables reads through. A promoted scalar divisor is read as the scalar (broadcasting
    promotes it), and a negated numerator ``-a / b`` as ``a / (-b)`` where ``b`` is then one
    number (exact: negation is). The negation of ``-square(z) / (2 alpha^2)`` (Welsch) was a
    full-size pass of every evaluation."""
    numerator, divisor = expr.args
    if divisor.variables():
        return False, False
    promoted = (
        isinstance(divisor, Promote)
        and divisor.args[0].size == 1
        and tuple(numerator.shape) == tuple(expr.shape)
    )
    scalar = promoted or divisor.size == 1
    return scalar and isinstance(numerator, NegExpression), promoted


def operands(expr: cp.Expression) -> list[cp.Expression]:
    """The sub-expressions an atom's evaluator receives, in order.

    Usually ``expr.args``; a few atoms keep a numeric operand as an attribute rather than an
    argument (``power``'s exponent, ``huber``'s threshold) so that it may be a Parameter; a
    column 2-norm of a ``vstack`` takes the stacked parts (:func:`stacked_column_norm`); a sum
    reads a negated argument's operand and subtracts it (:func:`subtracted`), a quotient by a
    number free of the variables reads its negated numerator and promoted divisor through
    (:func:`quotient_reads`).
    """
    parts = stacked_column_norm(expr)
    if parts is not None:
        return parts
    args = list(expr.args)
    if isinstance(expr, AddExpression):
        return [a.args[0] if minus else a for a, minus in zip(args, subtracted(expr))]
    if isinstance(expr, DivExpression):
        negated, promoted = quotient_reads(expr)
        numerator, divisor = args
        return [
            numerator.args[0] if negated else numerator,
            divisor.args[0] if promoted else divisor,
        ]
    if isinstance(expr, Power) and not isinstance(expr.p, cp.Constant):
        args.append(expr.p)
    elif isinstance(expr, huber):
        args.append(expr.M)
    return args


def product_degree(node: Any, degrees: tuple[int | None, ...]) -> int | None:
    """A product of its operands (``multiply``, ``@``, ``kron``, convolutions): degrees add."""
    return None if None in degrees else sum(degrees)  # type: ignore[arg-type]


def polynomial_degree(expr: cp.Expression, rules: Mapping[type, AtomRule]) -> int | None:
    """The degree of ``expr`` as a polynomial in its variables (parameters and constants count
    as constants), or ``None`` where it is not one (or an atom has no rule)."""
    memo: dict[int, int | None] = {}

    def degree(node: cp.Expression) -> int | None:
        key = id(node)
        if key in memo:
            return memo[key]
        if isinstance(node, cp.Variable):
            result: int | None = 1
        elif isinstance(node, (cp.Constant, cp.Parameter)):
            result = 0
        elif type(node) not in rules:
            result = None
        else:
            rule = rules[type(node)]
            inner = tuple(degree(a) for a in operands(node))
            if rule.degree is not None:
                result = rule.degree(node, inner)
            elif None in inner:
                result = None
            elif rule.affine:
                result = max(inner, default=0)  # type: ignore[type-var]
            else:
                result = 0 if all(d == 0 for d in inner) else None
        memo[key] = result
        return result

    return degree(expr)
