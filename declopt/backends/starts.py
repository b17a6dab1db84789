"""Starting points a solver can leave: inside the declaration's domain, and (for SLSQP) where
the equalities' gradients do not vanish. Shared by the torch and scipy backends."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import constraint_fn, equality_fn
from declopt.kkt.point import sizes
from declopt.kkt.tolerances import problem_scale
from declopt.program import BatchedParams, Program

DOMAIN_PROBES = (1.0, 0.1, 10.0)
"""Starts tried, in order, where the given one is outside the declaration's domain: every
entry at this multiple of the problem's scale (positive: log, entr, sqrt, inv_pos live there),
then every square matrix variable at this multiple of the identity (positive definite:
log_det lives there; the other variables' entries as before)."""


def _probe(program: Program, like: Tensor, identity: bool) -> Tensor:
    """``(m,)``: ones, or with ``identity`` the identity for every square matrix variable."""
    parts = []
    for shape in program.variable_shapes:
        if identity and len(shape) >= 2 and shape[-1] == shape[-2]:
            eye = torch.eye(shape[-1], dtype=like.dtype, device=like.device)
            parts.append(eye.expand(*shape).reshape(-1))
        else:
            parts.append(torch.ones(math.prod(shape), dtype=like.dtype, device=like.device))
    return torch.cat(parts) if parts else like.new_zeros(0)


def usable_starts(
    program: Program, params: BatchedParams, u0: Tensor, *, equality_gradients: bool = False
) -> Tensor:
    """``u0 (B, m)`` with every problem whose objective, gradient or constraints are not finite
    there (a start on the edge of a domain, e.g. ``entr`` or ``log`` at 0) moved to the first
    :data:`DOMAIN_PROBES` point where they are; problems with no such point keep ``u0`` (the
    solver then reports them). With ``equality_gradients`` a start where some equality's
    gradient vanishes (``sum_squares(u) == r`` at 0: SLSQP cannot leave it) is moved too."""
    objective = BatchedObjective.of(program, params)
    rows = torch.func.vmap(constraint_fn(program), in_dims=(params.in_dims, 0))
    p = sizes(program, u0.shape[-1]).p
    equality = torch.func.vmap(
        torch.func.jacrev(equality_fn(program), argnums=1), in_dims=(params.in_dims, 0)
    )

    def finite(u: Tensor) -> Tensor:
        f, g = objective.value_and_grad(u)
        ok = torch.isfinite(f) & torch.isfinite(g).all(-1)
        if program.is_constrained:
            ok &= torch.isfinite(rows(params.values, u)).all(-1)
        if equality_gradients and p:
            ok &= (equality(params.values, u).abs().amax(-1) > 0).all(-1)
        return ok

    ok = finite(u0)
    if bool(ok.all()):
        return u0
    scale = problem_scale(params, u0).unsqueeze(-1)
    for identity in (False, True):
        pattern = _probe(program, u0, identity)
        for factor in DOMAIN_PROBES:
            candidate = pattern * factor * scale
            take = ~ok & finite(candidate)
            u0 = torch.where(take.unsqueeze(-1), candidate, u0)
            ok = ok | take
            if bool(ok.all()):
                return u0
    return u0
