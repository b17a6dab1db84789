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


def kink_fn(program: Program) -> PerProblem:
    """Kink residuals ``r(x, u) -> (K,)`` of the nonsmooth atoms (empty when there are none)."""
    kinks = program.kinks
    return (lambda x, u: kinks(x, u)[0]) if kinks is not None else (lambda x, u: _empty(u))


def kink_margin_fn(program: Program) -> PerProblem:
    """Kink margins ``(x, u) -> (K,)``: ~0 where the solution sits on a kink."""
    kinks = program.kinks
    return (lambda x, u: kinks(x, u)[1]) if kinks is not None else (lambda x, u: _empty(u))


def kink_tolerance(u: Tensor) -> Tensor:
    """``(B, 1)``: a solution ``u: (B, m)`` sits on a kink whose margin is within this.

    ``min(sqrt(eps), max(64 eps, 1.5e-8)) (1 + |u|_inf)``: in float64 the ``~1e-8`` accuracy of
    external solvers (cvxpylayers' SCS/Clarabel) at their kinks; in float32, 64 ulps (7.6e-6).
    Exact forwards (closed forms, declopt's nonsmooth finish) put the solution exactly on its
    kinks; the float32 ``sqrt(eps) = 3.4e-4`` of the inequality test would also count entries
    that merely lie that close to a kink, and change their derivative by O(1).
    """
    eps = torch.finfo(u.dtype).eps
    relative = min(eps**0.5, max(64 * eps, torch.finfo(torch.float64).eps ** 0.5))
    return relative * (1 + u.abs().amax(-1, keepdim=True))


def constraint_fn(program: Program, with_kinks: bool = False) -> PerProblem:
    """``c(x, u) = [h; g] -> (p + q,)``, with the kink residuals appended if ``with_kinks``."""
    h, g = equality_fn(program), inequality_fn(program)
    if not with_kinks:
        return lambda x, u: torch.cat([h(x, u), g(x, u)])
    r = kink_fn(program)
    return lambda x, u: torch.cat([h(x, u), g(x, u), r(x, u)])


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


def num_constraints(program: Program, example_x: Params, example_u: Tensor) -> tuple[int, int]:
    """``(p, q)`` from one evaluation on an unbatched example."""
    with torch.no_grad():
        return (
            equality_fn(program)(example_x, example_u).numel(),
            inequality_fn(program)(example_x, example_u).numel(),
        )
