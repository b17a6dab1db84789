"""The implicit backward: one formula for every declared problem (DESIGN.md §3).

At a solution ``y`` of ``min_u f(x, u)`` (subject to the active constraints ``h~(x, u) = 0``), with
Lagrangian ``L = f - lambda^T h~``, the vector-Jacobian product of ``y(x)`` with an upstream
gradient ``v`` is obtained without ever forming ``Dy``: solve the KKT system

    [ H  A^T ] [w]   [v]          H = D2_uu L,  A = D_u h~
    [ A   0  ] [z] = [0]

and then ``dL/dx = - d/dx [ w . D_u L(x, y) + z . h~(x, y) ]`` at fixed ``y, lambda, w, z``: one
reverse pass. The invariant is ``D_u L(x, y(x)) = 0, h~(x, y(x)) = 0`` for all ``x``;
differentiating it gives the system above. Unconstrained problems have ``k = 0``: ``H w = v``.

How the forward was solved never enters here; only the declaration (the :class:`Program`) does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from declopt.backends.base import BatchedParams
from declopt.derivatives import BatchedObjective
from declopt.linalg import LinearSolveReport, conjugate_gradient, solve_symmetric
from declopt.program import Program

DENSE_MAX_VARIABLES = 256
"""Above this many variables the Hessian is not formed; CG runs on Hessian-vector products."""


def implicit_vjp(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    v: Tensor,
    *,
    dense_max: int = DENSE_MAX_VARIABLES,
    compile: bool = False,
) -> tuple[tuple[Tensor, ...], LinearSolveReport]:
    """Gradients of ``sum_b v_b . y_b(x)`` with respect to every parameter tensor.

    Args:
        program: the declaration.
        params: the batch of parameters the solutions ``u`` belong to.
        u: ``(B, m)`` solutions (detached).
        v: ``(B, m)`` upstream gradients.
        dense_max: largest ``m`` for which the KKT matrix is formed densely.
        compile: run the derivative passes under ``torch.compile``.
    Returns:
        One gradient per parameter, shaped like ``params.values[i]`` (shared parameters get the sum
        over the batch), and the per-problem report of the linear solve.
    """
    if program.is_constrained:
        raise NotImplementedError(
            "the implicit backward of constrained problems is not available yet; "
            "declare the problem without constraints"
        )
    objective = BatchedObjective(program.objective, params, compile=compile)
    m = u.shape[-1]
    if m <= dense_max:
        w, report = solve_symmetric(objective.hessian(u), v)
    else:
        w, report = conjugate_gradient(lambda d: objective.hvp(u, d), v)
    return objective.param_vjp(u, w), report


def stationarity_residual(program: Program, params: BatchedParams, u: Tensor) -> Tensor:
    """``max |D_u f|`` per problem, ``(B,)``: the KKT residual of an unconstrained problem."""
    with torch.no_grad():
        return BatchedObjective(program.objective, params).grad(u).abs().amax(dim=-1)
