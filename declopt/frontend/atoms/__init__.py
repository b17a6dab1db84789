"""The atoms the CVXPY front end accepts, one :class:`~.base.AtomRule` per CVXPY class.

``RULES`` is looked up by exact type, so a subclass with different numerics is never picked up by
accident. A rule's ``evaluate`` is called once, at compile time, with the CVXPY node; it reads the
node's static data (axis, exponent, index key, shapes) and returns an *evaluator*: a plain function
of the operand tensors, in the order of :func:`operands`, that returns a tensor of exactly
``node.shape``.

Evaluators follow ``node.numeric`` (what ``expr.value`` computes) exactly, work on unbatched tensors
and stay compatible with ``torch.func.vmap``, ``grad``, ``jvp`` and double backward: no ``.item()``,
no Python control flow on tensor values, no in-place ops, no numpy on tensors. The same holds for
kink sites and smoothed forms. The table is checked for completeness at import
(:func:`~.base.check_rules`).
"""

from __future__ import annotations

from declopt.frontend.atoms.affine import AFFINE
from declopt.frontend.atoms.base import AtomRule, AtomRuleError, KinkSite, check_rules, operands
from declopt.frontend.atoms.nonsmooth import NONSMOOTH
from declopt.frontend.atoms.smooth import SMOOTH
from declopt.frontend.atoms.spectral import SPECTRAL
from declopt.frontend.atoms.tensors import TensorCache

RULES: dict[type, AtomRule] = {**AFFINE, **SMOOTH, **NONSMOOTH, **SPECTRAL}
check_rules(RULES)


def supported_atom_names() -> list[str]:
    """Sorted class names of the supported CVXPY atoms (for error messages and docs)."""
    return sorted({cls.__name__ for cls in RULES})


__all__ = [
    "RULES",
    "AtomRule",
    "AtomRuleError",
    "KinkSite",
    "TensorCache",
    "check_rules",
    "operands",
    "supported_atom_names",
]
