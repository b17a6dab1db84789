"""Batched constrained solver: augmented Lagrangian, then an active-set Newton-KKT polish.

Outer loop (Nocedal & Wright, Alg. 17.4, per problem): minimise the augmented Lagrangian with the
unconstrained batched Newton/L-BFGS, update the multipliers ``mu_h += rho h``,
``mu_g = max(0, mu_g + rho g)``, and raise a problem's penalty ``rho`` tenfold when its
infeasibility did not fall by a factor four. Problems that are done stop changing.

Polish: the augmented Lagrangian reaches ``~sqrt(eps)`` accuracy; the implicit backward is only as
good as the forward's KKT residual, so a few Newton steps on the KKT equations of the active set
(``D_u f - A^T lambda = 0``, ``c_active = 0``) bring it to machine precision. A polish step that
breaks an inactive constraint or a multiplier sign is not taken.

Multipliers are returned in the seed convention (``lambda = -mu``, ``lambda_g <= 0``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

from declopt.backends.torch.minimize import minimize
from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import (
    augmented_lagrangian,
    constraint_fn,
    inequality_fn,
    kink_margin_fn,
    lagrangian,
    num_constraints,
)
from declopt.kkt.report import kkt_report
from declopt.linalg import bordered_kkt, kkt_minres, solve_newton
from declopt.program import BatchedParams, Program

MAX_OUTER = 40
POLISH_STEPS = 6
DENSE_POLISH_MAX = 128
"""Up to this many variables the polish forms the Lagrangian's Hessian; above, MINRES."""
RHO0 = 10.0
RHO_MAX = 1e10


@dataclass
class ConstrainedResult:
    u: Tensor  # (B, m)
    objective: Tensor  # (B,)
    converged: Tensor  # (B,)
    iterations: Tensor  # (B,)
    lam_h: Tensor  # (B, p), seed convention
    lam_g: Tensor  # (B, q), seed convention (<= 0)
    kkt_residual: Tensor  # (B,)


def example_problem(params: BatchedParams) -> tuple[Tensor, ...]:
    """The parameters of the first problem of a batch, unbatched."""
    return tuple(v if d is None else v[0] for v, d in zip(params.values, params.in_dims))


def batched_constraints(
    program: Program, params: BatchedParams, u: Tensor, with_kinks: bool = False
) -> Tensor:
    """``[h; g]`` (``[h; g; kinks]``) of every problem, ``(B, k)``."""
    fn = constraint_fn(program, with_kinks)
    return vmap(fn, in_dims=(params.in_dims, 0))(params.values, u)


def batched_kink_margins(program: Program, params: BatchedParams, u: Tensor) -> Tensor:
    """The kink margins of every problem, ``(B, K)`` (~0 where a solution sits on a kink)."""
    return vmap(kink_margin_fn(program), in_dims=(params.in_dims, 0))(params.values, u)


def constraint_jacobian(
    program: Program, params: BatchedParams, u: Tensor, with_kinks: bool = False
) -> Tensor:
    """``D_u`` of :func:`batched_constraints`, ``(B, k, m)``: reverse mode (``k`` probes) when
    ``k <= m``, forward mode (``m`` probes) otherwise. (Eager forward mode runs through Python
    decompositions, so reverse mode is also faster per probe.)"""
    fn = constraint_fn(program, with_kinks)
    with torch.no_grad():
        rows = fn(example_problem(params), u[0]).numel()
    jac = (jacrev if rows <= u.shape[-1] else jacfwd)(fn, argnums=1)
    return vmap(jac, in_dims=(params.in_dims, 0))(params.values, u)


def kkt_residual(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    lam: Tensor,
    p: int,
    with_kinks: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(residual, objective)`` per problem for multipliers ``lam = [lam_h; lam_g]`` (with
    ``with_kinks``, followed by the kink residuals' multipliers): :func:`~declopt.kkt.report.
    kkt_report` with the multipliers in one tensor, as the solvers here keep them."""
    q = lam.shape[-1] - p
    if with_kinks:
        q = inequality_fn(program)(example_problem(params), u[0]).numel()
    kinks = lam[:, p + q :] if with_kinks else None
    report = kkt_report(program, params, u, lam[:, :p], lam[:, p : p + q], kinks)
    return report.residual, report.objective


def solve_constrained(
    program: Program,
    params: BatchedParams,
    u0: Tensor,
    *,
    method: str = "newton",
    max_iter: int | None = None,
    compile: bool = False,
) -> ConstrainedResult:
    """Solve a flat batch of constrained problems from ``u0: (B, m)``."""
    batch = u0.shape[0]
    p, q = num_constraints(program, example_problem(params), u0[0])
    eps = torch.finfo(u0.dtype).eps
    feas_tol = eps**0.5
    mu_h = u0.new_zeros(batch, p)
    mu_g = u0.new_zeros(batch, q)
    rho = u0.new_full((batch,), RHO0)
    u = u0
    done = torch.zeros(batch, dtype=torch.bool, device=u0.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=u0.device)
    previous = torch.full((batch,), float("inf"), dtype=u0.dtype, device=u0.device)
    inner_iter = max_iter if max_iter is not None else (50 if method == "newton" else 500)
    fn = augmented_lagrangian(program)
    for _ in range(MAX_OUTER):
        extended = BatchedParams(
            (*params.values, mu_h, mu_g, rho), (*params.in_dims, 0, 0, 0), batch
        )
        result = minimize(BatchedObjective(fn, extended, compile), u, method, inner_iter)
        active = ~done
        u = torch.where(active.unsqueeze(-1), result.u, u)
        iterations = iterations + torch.where(active, result.iterations, 0)
        c = batched_constraints(program, params, u)
        h, g = c[:, :p], c[:, p:]
        # Infeasibility and complementarity in one measure (N&W 17.4): max(g, -mu_g / rho).
        violation = torch.cat([h.abs(), torch.maximum(g, -mu_g / rho.unsqueeze(-1))], -1)
        violation = violation.abs().amax(-1) if violation.shape[-1] else torch.zeros_like(rho)
        new_mu_h = mu_h + rho.unsqueeze(-1) * h
        new_mu_g = torch.clamp(mu_g + rho.unsqueeze(-1) * g, min=0)
        mu_h = torch.where(active.unsqueeze(-1), new_mu_h, mu_h)
        mu_g = torch.where(active.unsqueeze(-1), new_mu_g, mu_g)
        finished = active & (violation <= feas_tol * (1 + u.abs().amax(-1))) & result.converged
        done = done | finished
        slow = active & ~finished & (violation > 0.25 * previous)
        rho = torch.where(slow, (rho * 10).clamp(max=RHO_MAX), rho)
        previous = torch.where(active, violation, previous)
        if bool(done.all()):
            break
    lam = torch.cat([-mu_h, -mu_g], -1)
    u, lam = polish(program, params, u, lam, p)
    residual, f = kkt_residual(program, params, u, lam, p)
    scale = 1 + f.abs() + u.abs().amax(-1)
    converged = residual <= eps**0.5 * scale
    return ConstrainedResult(u, f, converged, iterations, lam[:, :p], lam[:, p:], residual)


def active_mask(g: Tensor, lam_g: Tensor, u: Tensor) -> Tensor:
    """Inequalities treated as active: ``g`` within ``sqrt(eps)`` of zero, or a nonzero multiplier.

    The tolerance follows the dtype (a fixed ``1e-12`` would call nothing active in float32).
    """
    tol = torch.finfo(u.dtype).eps ** 0.5 * (1 + u.abs().amax(-1, keepdim=True))
    return (g >= -tol) | (lam_g < -tol)


def polish(
    program: Program, params: BatchedParams, u: Tensor, lam: Tensor, p: int
) -> tuple[Tensor, Tensor]:
    """Newton steps on the KKT equations of the active set; a step is kept per problem only if it
    lowers the KKT residual and keeps inactive constraints and multiplier signs valid."""
    batch, m = u.shape
    k = lam.shape[-1]
    if k == 0:
        return u, lam
    residual, f = kkt_residual(program, params, u, lam, p)
    # The rounding floor of the residual: problems there gain nothing from another step.
    floor = 64 * torch.finfo(u.dtype).eps * (1 + f.abs() + u.abs().amax(-1))
    c = batched_constraints(program, params, u)
    mask = torch.ones_like(lam, dtype=torch.bool)
    mask[:, p:] = active_mask(c[:, p:], lam[:, p:], u)
    for _ in range(POLISH_STEPS):
        if bool((residual <= floor).all()):
            break
        extended = BatchedParams((*params.values, lam), (*params.in_dims, 0), batch)
        objective = BatchedObjective(lagrangian(program), extended)
        _, grad_l = objective.value_and_grad(u)
        c = batched_constraints(program, params, u)
        jac = constraint_jacobian(program, params, u) * mask.unsqueeze(-1)
        rhs = torch.cat([-grad_l, -(c * mask)], -1)
        if m <= DENSE_POLISH_MAX:
            step = solve_newton(bordered_kkt(objective.hessian(u), jac, mask), rhs)
        else:  # m Hessian probes would cost more than a few MINRES products
            step, _ = kkt_minres(functools.partial(objective.hvp, u), jac, mask, rhs)
        u_new = u + step[:, :m]
        lam_new = torch.where(mask, lam - step[:, m:], torch.zeros_like(lam))
        new_residual, _ = kkt_residual(program, params, u_new, lam_new, p)
        ok = torch.isfinite(new_residual) & (new_residual < residual)
        u = torch.where(ok.unsqueeze(-1), u_new, u)
        lam = torch.where(ok.unsqueeze(-1), lam_new, lam)
        residual = torch.where(ok, new_residual, residual)
        if not bool(ok.any()):
            break
    return u, lam
