"""CVXPY front end: turn a problem declaration into torch functions (a :class:`Program`)."""

from declopt.frontend.compile import (
    DeclarationError,
    UnsupportedAtomError,
    compile_expression,
    compile_layer,
    compile_problem,
    source_program,
)

__all__ = [
    "DeclarationError",
    "UnsupportedAtomError",
    "compile_expression",
    "compile_layer",
    "compile_problem",
    "source_program",
]
