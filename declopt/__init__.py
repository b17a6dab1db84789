"""declopt: declarative optimisation layers for PyTorch.

Declare a layer's output as the solution of an optimisation problem in CVXPY syntax; solve it with a
backend chosen by one flag; differentiate it by the implicit function theorem.
"""

from declopt import backends, nn, penalties
from declopt.diagnostics import BackwardInfo, LayerInfo
from declopt.errors import (
    DeclarationError,
    GradientWarning,
    InputError,
    NonConvergenceWarning,
    SolverError,
    UnsupportedAtomError,
)
from declopt.gradcheck import GradcheckReport, gradcheck
from declopt.layer import Layer
from declopt.linalg import LinearSolver
from declopt.policies import Degenerate, Implicit, Native, SolverVJP
from declopt.program import Program

__all__ = [
    "BackwardInfo",
    "DeclarationError",
    "Degenerate",
    "GradcheckReport",
    "GradientWarning",
    "Implicit",
    "InputError",
    "Layer",
    "LayerInfo",
    "LinearSolver",
    "Native",
    "NonConvergenceWarning",
    "Program",
    "SolverError",
    "SolverVJP",
    "UnsupportedAtomError",
    "backends",
    "gradcheck",
    "nn",
    "penalties",
]

__version__ = "0.1.0"
