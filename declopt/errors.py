"""Errors and warnings raised by declopt; every message names the culprit and the fix."""

from __future__ import annotations


class DeclarationError(ValueError):
    """The CVXPY declaration cannot be turned into a :class:`~declopt.program.Program`."""


class UnsupportedAtomError(DeclarationError):
    """The declaration uses an atom or constraint type the torch front end cannot evaluate."""


class AtomRuleError(RuntimeError):
    """The atom table is inconsistent (raised at import, a programming error)."""


class InputError(ValueError):
    """A tensor handed to a layer does not fit the declaration (shape, batch, values)."""


class SolverError(RuntimeError):
    """A forward solve failed and the layer was asked to raise (``on_failure="raise"``)."""


class NonConvergenceWarning(UserWarning):
    """Some problems of a batch did not converge; ``layer.info`` says which."""


class GradientWarning(UserWarning):
    """The implicit backward met a singular or indefinite system for some problems."""
