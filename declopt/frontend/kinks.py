"""Kink sites of nonsmooth atoms (DESIGN.md §2).

``KINKS`` maps a CVXPY atom class to a rule that, given the atom, returns a function of the atom's
*input* tensors giving ``(residuals, margins)`` (same length, flattened):

* ``residuals`` are smooth functions that vanish on a kink (``e`` for ``abs(e)`` at ``e = 0``;
  ``e_j - e_{j*}`` for an entry ``j`` tied with the maximiser ``j*`` of ``max(e)``);
* ``margins`` measure the distance to the kink (``inf`` where a site cannot be on one, e.g. the
  maximiser itself).

Every site also takes ``reference=`` (its inputs at a reference point): ties are then represented
by the extremum at the reference point, so that the rows keep their meaning while a solver moves
the point onto an exact tie.

When the solution sits on a kink (``|margin| ~ 0``), the implicit backward adds ``residual = 0`` as
one more active equality, so that a declaration with ``abs``/``max``/``norm1``/``norm_inf`` is
differentiated along the piece it sits on (e.g. L1 and L-inf sphere projections).

Scope: kinks are registered where the atom's value depends on them locally. ``norm_inf`` registers
only ties of the maximum (an ``abs`` kink of an entry that is not a maximiser does not affect the
norm). An explicit ``abs`` nested inside ``max`` registers its own kinks too, which over-constrains
entries that sit at zero without being maximisers: write ``norm(e, "inf")`` instead.
``huber`` is continuously differentiable and registers nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

KinkSite = Callable[..., tuple[Tensor, Tensor]]
KinkFn = Callable[..., tuple[Tensor, Tensor]]


def _abs(expr: Any) -> KinkSite:
    def site(x: Tensor, reference: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return x.reshape(-1), x.reshape(-1)

    return site


def _pairwise(expr: Any) -> KinkSite:
    """``maximum(a, b)`` / ``minimum(a, b)``: the kink is ``a = b`` (broadcast)."""
    shape = tuple(int(d) for d in expr.shape)

    def site(*xs: Tensor, reference: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if len(xs) != 2:
            # More than two arguments: ties between the leading two only (rare in practice).
            xs = xs[:2]
        diff = (xs[0] - xs[1]).expand(shape) if shape else (xs[0] - xs[1]).reshape(())
        return diff.reshape(-1), diff.reshape(-1)

    return site


def _ties(largest: bool, of_abs: bool) -> Callable[[Any], KinkSite]:
    """Ties of ``max``/``min`` (of ``abs`` for ``norm_inf``) along the reduced axis."""

    def rule(expr: Any) -> KinkSite:
        axis = getattr(expr, "axis", None)

        def rows(x: Tensor) -> Tensor:
            values = x.abs() if of_abs else x
            if axis is None:
                return values.reshape(1, -1)
            dim = int(axis) % values.dim()
            return values.movedim(dim, -1).reshape(-1, values.shape[dim])

        def site(x: Tensor, reference: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
            values = rows(x)
            # The representative of a tie is the extremum at the reference point when given:
            # at an exact tie the extremum itself is an arbitrary member of the tied set.
            chooser = values if reference is None else rows(reference[0])
            pick = chooser.argmax(-1, keepdim=True) if largest else chooser.argmin(-1, keepdim=True)
            best = values.gather(-1, pick)
            residual = values - best  # zero for entries tied with the extremum
            chosen = torch.zeros_like(values, dtype=torch.bool).scatter(-1, pick, True)
            margin = torch.where(chosen, torch.full_like(residual, float("inf")), residual)
            return residual.reshape(-1), margin.reshape(-1)

        return site

    return rule


KINKS: dict[type, Callable[[Any], KinkSite]] = {
    abs_: _abs,
    norm1: _abs,
    maximum: _pairwise,
    minimum: _pairwise,
    max_: _ties(largest=True, of_abs=False),
    min_: _ties(largest=False, of_abs=False),
    norm_inf: _ties(largest=True, of_abs=True),
}
