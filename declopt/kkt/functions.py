"""Per-problem functions built from a constrained :class:`Program`, for solvers and the backward.

All are functions of ``(x_extended, u)`` on one problem, where ``x_extended`` is the parameter
tuple followed by per-problem solver state (multipliers, penalty), so that they batch with the same
``vmap``/:class:`~declopt.derivatives.Derivatives` machinery as the objective. They are built once
per program (cached), so compiled derivatives are reused across calls.

Conventions (the seed paper's): ``h(x, u) = 0``, ``g(x, u) <= 0``; the Lagrangian of the backward is
``L = f - lambda_h . h - lambda_g . g`` with ``lambda_g <= 0``; an augmented Lagrangian solver keeps
the usual ``mu = -lambda`` (``mu_g >= 0``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from declopt.program import Params, Program

PerProblem = Callable[[Params, Tensor], Tensor]


def _empty(u: Tensor) -> Tensor:
    return u.new_zeros(0)


def equality_fn(program: Program) -> PerProblem:
    """``h(x, u) -> (p,)`` (empty when there are none)."""
    h = program.equalities
    return (lambda x, u: h(x, u).reshape(-1)) if h is not None else (lambda x, u: _empty(u))


def inequality_fn(program: Program) -> PerProblem:
    """``g(x, u) -> (q,)`` (empty when there are none)."""
    g = program.inequalities
    return (lambda x, u: g(x, u).reshape(-1)) if g is not None else (lambda x, u: _empty(u))


def constraint_fn(program: Program, with_kinks: bool = False) -> PerProblem:
    """``c(x, u) = [h; g] -> (p + q,)``, with the kink residuals appended if ``with_kinks``."""
    h, g = equality_fn(program), inequality_fn(program)
    kinks = program.kinks
    if not with_kinks or kinks is None:
        return lambda x, u: torch.cat([h(x, u), g(x, u)])
    return lambda x, u: torch.cat([h(x, u), g(x, u), kinks(x, u)[0].reshape(-1)])


@lru_cache(maxsize=256)
def augmented_lagrangian(program: Program) -> PerProblem:
    """``L_A((*x, mu_h, mu_g, rho), u)``: the augmented Lagrangian of Nocedal & Wright (17.65).

    ``f + mu_h . h + rho/2 |h|^2 + 1/(2 rho) sum(max(0, mu_g + rho g)^2 - mu_g^2)``; smooth with a
    Lipschitz gradient, so damped Newton and L-BFGS apply unchanged.
    """
    f, h, g = program.objective, equality_fn(program), inequality_fn(program)
    count = len(program.parameter_shapes)

    def fn(extended: Params, u: Tensor) -> Tensor:
        x, mu_h, mu_g, rho = extended[:count], *extended[count:]
        hu, gu = h(x, u), g(x, u)
        shifted = torch.clamp(mu_g + rho * gu, min=0)
        return (
            f(x, u)
            + (mu_h * hu).sum()
            + 0.5 * rho * (hu * hu).sum()
            + ((shifted * shifted).sum() - (mu_g * mu_g).sum()) / (2 * rho)
        )

    return fn


@lru_cache(maxsize=256)
def lagrangian(program: Program, with_kinks: bool = False) -> PerProblem:
    """``L((*x, lambda), u) = f(x, u) - lambda . c(x, u)`` (seed convention; ``c`` as in
    :func:`constraint_fn`)."""
    f, c = program.objective, constraint_fn(program, with_kinks)
    count = len(program.parameter_shapes)

    def fn(extended: Params, u: Tensor) -> Tensor:
        x, lam = extended[:count], extended[count]
        return f(x, u) - (lam * c(x, u)).sum()

    return fn


@lru_cache(maxsize=256)
def weighted_constraints(program: Program, with_kinks: bool = False) -> PerProblem:
    """``((*x, z), u) -> z . c(x, u)``: the constraint term of the implicit gradient."""
    c = constraint_fn(program, with_kinks)
    count = len(program.parameter_shapes)

    def fn(extended: Params, u: Tensor) -> Tensor:
        return (extended[count] * c(extended[:count], u)).sum()

    return fn
