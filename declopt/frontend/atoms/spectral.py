"""Spectral atoms: ``lambda_max``, ``sigma_max`` and ``log_det`` (and through them
``lambda_min`` and PSD constraints), functions of the eigenvalues of a symmetric matrix.

Autograd through an eigendecomposition fails exactly where these atoms matter: eigenvector
derivatives divide by eigenvalue gaps, so at a tie (``lambda_max`` at a multiple eigenvalue, a
PSD constraint whose matrix has a null space of dimension 2; both typical at solutions) its
gradient is an arbitrary subgradient and its Hessian is ``inf``/``nan``. These atoms never
differentiate ``eigh``. Each takes its *value* from the eigenvalues of the detached matrix
``S0`` and adds a second-order *expansion* that is zero at ``S0`` and carries the exact first and
second derivatives there (Daleckii-Krein; degenerate perturbation theory)::

    F(S0 + E) = F(S0) + sum_i w_i D_ii + 1/2 sum_ij Gamma_ij D_ij^2 + O(|E|^3),
    D = V^T E V   (V: eigenvectors of S0),    Gamma_ij = (w_i - w_j) / (lambda_i - lambda_j),

with ``w_i = f'(lambda_i)`` and ``Gamma_ij = f''`` at a tie. For a smooth spectral sum
``sum_i f(lambda_i)`` (``log_det``) that is its Taylor expansion. For the largest eigenvalue of a
cluster of ``k`` tied ones it is the expansion of the cluster's *mean*, the function on the piece
where the cluster stays tied (``w = 1/k`` on the cluster, ``Gamma = 0`` inside it): what the
implicit backward differentiates when a solution sits on the kink.

The kink sites of an extreme eigenvalue ``theta`` are the entries of the cluster's block of
``S - theta I`` after one Schur-complement step, to second order,
``C_ij = (lambda_i - theta) delta_ij + D_ij + sum_{l outside} D_il D_lj / (theta - lambda_l)``:
its off-diagonal entries and the differences of its diagonal ones vanish exactly where the
cluster stays tied (docs/design.md, "Spectral atoms"). Sites are the pairs ``i <= j`` of sorted
eigenvalue indices, with margin ``max(|lambda_i - theta|, |lambda_j - theta|)``.

Eigenvalues closer than :data:`TIE` times the spectral radius count as tied (the expansion then
treats them as one cluster): ``10x`` the kink activity tolerance, so that every tie the KKT point
holds is one here. Inside a held cluster the choice does not change the derivative of ``u``
(the dropped curvature terms lie along rows the backward holds), only the conditioning.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from cvxpy.atoms.lambda_max import lambda_max
from cvxpy.atoms.log_det import log_det
from cvxpy.atoms.norm_nuc import normNuc
from cvxpy.atoms.sigma_max import sigma_max
from torch import Tensor

from declopt.frontend.atoms.base import AtomRule, Evaluator, KinkSite, SmoothEvaluator
from declopt.kkt.tolerances import table

TIE = 10.0
"""Eigenvalues within ``TIE * activity * max|lambda|`` of each other are tied."""


def symmetric_part(x: Tensor) -> Tensor:
    """``(X + X^T) / 2`` over the last two dims (what CVXPY's PSD cone constrains)."""
    return 0.5 * (x + x.transpose(-1, -2))


def dilation(a: Tensor) -> Tensor:
    """``[[0, A], [A^T, 0]]``: symmetric, eigenvalues ``+-sigma_i(A)`` and ``|m - n|`` zeros."""
    m, n = a.shape[-2], a.shape[-1]
    top = torch.cat([a.new_zeros(*a.shape[:-2], m, m), a], -1)
    bottom = torch.cat([a.transpose(-1, -2), a.new_zeros(*a.shape[:-2], n, n)], -1)
    return torch.cat([top, bottom], -2)


class Expansion(NamedTuple):
    """The eigendecomposition of a symmetric ``S (..., n, n)`` at its detached value.

    ``lam (..., n)`` ascending and ``gap[i, j] = lam_i - lam_j`` carry no derivatives; ``d =
    V^T (S - S0) V`` is zero-valued and carries all of them; ``width (..., 1)`` is the tie width
    (:func:`tie_width`) and ``tied (..., n, n)`` the pairs within it.
    """

    lam: Tensor
    d: Tensor
    gap: Tensor
    width: Tensor
    tied: Tensor


def tie_width(values: Tensor) -> Tensor:
    """``(..., 1)``: values (eigenvalues, singular values) closer than this are tied."""
    return TIE * table(values.dtype).activity * values.abs().amax(-1, keepdim=True)


def expand(s: Tensor) -> Expansion:
    s0 = s.detach()
    lam, vectors = torch.linalg.eigh(s0)
    d = vectors.transpose(-1, -2) @ (s - s0) @ vectors
    gap = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    width = tie_width(lam)
    return Expansion(lam, d, gap, width, gap.abs() <= width.unsqueeze(-1))


def second_order(
    e: Expansion, w: Tensor, at_ties: Tensor | float = 0.0, gamma: Tensor | None = None
) -> Tensor:
    """``(...)``: ``sum_i w_i D_ii + 1/2 sum_ij Gamma_ij D_ij^2`` with ``Gamma`` the divided
    differences of ``w`` (``at_ties`` where ``tied``), or ``gamma`` where they have a closed form:
    zero-valued, exact first and second derivatives of the spectral function with eigenvalue
    slopes ``w``."""
    if gamma is None:
        slope = w.unsqueeze(-1) - w.unsqueeze(-2)
        ties = torch.as_tensor(at_ties, dtype=w.dtype, device=w.device)
        gamma = torch.where(e.tied, ties, slope / _safe(e))
    diagonal = torch.diagonal(e.d, dim1=-2, dim2=-1)
    return (w * diagonal).sum(-1) + 0.5 * (gamma * e.d * e.d).sum((-2, -1))


def _safe(e: Expansion) -> Tensor:
    return torch.where(e.tied, torch.ones_like(e.gap), e.gap)


def _top_cluster(e: Expansion) -> Tensor:
    """``(..., n)`` bool: the eigenvalues tied with the largest."""
    return e.tied[..., -1, :]


def largest_eigenvalue(s: Tensor) -> Tensor:
    """``(...)``: ``lambda_max(S)`` with the derivatives of its top cluster's mean."""
    e = expand(s)
    cluster = _top_cluster(e).to(s.dtype)
    w = cluster / cluster.sum(-1, keepdim=True)
    return e.lam[..., -1] + second_order(e, w)


def soft_largest_eigenvalue(s: Tensor, mu: Tensor) -> Tensor:
    """``(...)``: ``mu (log sum_i exp(lambda_i / mu) - log n)``, within ``mu log n`` below
    ``lambda_max`` (the spectral form of :func:`declopt.frontend.smoothing.soft_max`)."""
    e = expand(s)
    n = e.lam.shape[-1]
    top = e.lam[..., -1:]
    phi = torch.exp((e.lam - top) / mu)  # <= 1, the largest is 1: no overflow
    at_ties = 0.5 * (phi.unsqueeze(-1) + phi.unsqueeze(-2)) / (mu * mu)
    total = phi.sum(-1) + second_order(e, phi / mu, at_ties)
    return top.squeeze(-1) + mu * (torch.log(total) - float(np.log(n)))


def largest_eigenvalue_sites(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., K)`` residuals and margins of the top cluster's kink sites: the pairs ``i <= j``
    of eigenvalue indices except the representative ``(n-1, n-1)``.

    Site ``(i, j)`` belongs to the cluster ``{i, ..., n-1}`` (sorted indices: the sites a
    solution holds always form such a cluster, ``i`` its smallest member), so its Schur
    complement sums over ``l < i`` only. A row whose cluster is smaller than the held one also
    sums over held indices ``l``; those terms are products of entries ``D_il`` that held rows fix,
    so they change the Newton and implicit steps' multipliers, never ``u``, and tied ones (the
    backward's exact ties) are left out.
    """
    e = expand(s)
    n = e.lam.shape[-1]
    theta = e.lam[..., -1:]
    outside = ~_top_cluster(e)
    inverse = torch.where(outside, 1.0 / torch.where(outside, theta - e.lam, 1.0), 0.0)
    below = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)  # [i, l]: l < i
    weights = torch.where(below, inverse.unsqueeze(-2), 0.0)  # (..., n, n)
    block = torch.diag_embed(e.lam - theta) + e.d + (e.d * weights) @ e.d
    rep = e.d[..., n - 1, n - 1].unsqueeze(-1) + (
        weights * e.d[..., n - 1, :].unsqueeze(-2) ** 2
    ).sum(-1)
    i, j = _pairs(n, s.device)
    residual = block[..., i, j]
    residual = torch.where(
        torch.as_tensor(i == j, device=s.device), residual - rep[..., i], residual
    )
    distance = (e.lam - theta).abs()
    margin = torch.maximum(distance[..., i], distance[..., j])
    return residual, margin


def _pairs(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    i, j = np.triu_indices(n)
    keep = ~((i == n - 1) & (j == n - 1))
    return (
        torch.as_tensor(i[keep], device=device),
        torch.as_tensor(j[keep], device=device),
    )


def nuclear_norm_value(a: Tensor) -> Tensor:
    """``(...)``: the sum of the singular values, with the derivatives of the piece where the
    zero singular values stay zero: through the dilation, ``sum_i max(lambda_i, 0)`` (slopes 1
    on the positive eigenvalues, 0 on the cluster at zero)."""
    e = expand(dilation(a))
    positive = (e.lam > 0) & ~_tied_with(e, torch.zeros_like(e.lam[..., :1]))
    w = positive.to(a.dtype)
    return torch.where(positive, e.lam, 0.0).sum(-1) + second_order(e, w)


def soft_nuclear_norm(a: Tensor, mu: Tensor) -> Tensor:
    """``(...)``: ``sum_i sqrt(sigma_i^2 + mu^2) - mu``, within ``mu`` per singular value below
    the nuclear norm and exact at ``A = 0`` (the spectral form of ``smooth_abs``, over the
    dilation's eigenvalues, each singular value twice)."""
    e = expand(dilation(a))
    root = torch.sqrt(e.lam * e.lam + mu * mu)
    w = 0.5 * e.lam / root
    curvature = 0.5 * mu * mu / root**3
    at_ties = 0.5 * (curvature.unsqueeze(-1) + curvature.unsqueeze(-2))
    return 0.5 * (root - mu).sum(-1) + second_order(e, w, at_ties)


def nuclear_norm_sites(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., m n)`` residuals and margins of the rank kinks of ``A (..., m, n)``: site
    ``(a, b)`` is entry ``(a, b)`` of the second-order Schur complement of ``U^T A V`` (full
    SVD) after its positive singular values, ``sigma_a delta_ab + F_ab - sum_{k < min(a, b)}
    F_ak F_kb / sigma_k`` with ``F = U^T (A - A0) V``; it vanishes where the rank stays the
    same. Margin ``max(sigma_a, sigma_b)`` (``sigma = 0`` past ``min(m, n)``). Nested clusters
    as in :func:`largest_eigenvalue_sites`."""
    a0 = a.detach()
    u, sigma, vh = torch.linalg.svd(a0, full_matrices=True)
    f = u.transpose(-1, -2) @ (a - a0) @ vh.transpose(-1, -2)
    m, n = a.shape[-2], a.shape[-1]
    r = min(m, n)
    positive = sigma > tie_width(sigma)
    inverse = torch.where(positive, 1.0 / torch.where(positive, sigma, 1.0), 0.0)  # (..., r)
    rows = torch.cat([sigma, sigma.new_zeros(*sigma.shape[:-1], m - r)], -1)  # (..., m)
    cols = torch.cat([sigma, sigma.new_zeros(*sigma.shape[:-1], n - r)], -1)  # (..., n)
    index_a = torch.arange(m, device=a.device).view(m, 1, 1)
    index_b = torch.arange(n, device=a.device).view(1, n, 1)
    k = torch.arange(r, device=a.device).view(1, 1, r)
    nested = (k < torch.minimum(index_a, index_b)).to(a.dtype)  # (m, n, r)
    # sum_k F[a, k] F[k, b] / sigma_k over the nested k: F[..., :, :r] (m, r), F[..., :r, :] (r, n)
    terms = f[..., :, None, :r] * f[..., :r, :].transpose(-1, -2)[..., None, :, :]
    schur = (terms * nested * inverse[..., None, None, :]).sum(-1)
    diagonal = rows.unsqueeze(-1) * torch.eye(m, n, dtype=a.dtype, device=a.device)
    block = diagonal + f - schur
    margin = torch.maximum(rows.unsqueeze(-1), cols.unsqueeze(-2))
    return block.flatten(-2), margin.flatten(-2)


def _tied_with(e: Expansion, value: Tensor) -> Tensor:
    """``(..., n)`` bool: eigenvalues within the tie width of ``value (..., 1)``."""
    return (e.lam - value).abs() <= e.width


def log_det_value(s: Tensor) -> Tensor:
    """``(...)``: ``sum log lambda_i`` of the symmetric part; ``-inf`` unless it is positive
    definite (CVXPY's domain ``X >> 0``)."""
    e = expand(s)
    inside = (e.lam > 0).all(-1)
    lam = torch.where(e.lam > 0, e.lam, torch.ones_like(e.lam))
    w = 1.0 / lam
    gamma = -w.unsqueeze(-1) * w.unsqueeze(-2)  # (1/a - 1/b) / (a - b), exact at ties too
    value = torch.log(lam).sum(-1) + second_order(e, w, gamma=gamma)
    return torch.where(inside, value, torch.full_like(value, -float("inf")))


# ---------------------------------------------------------------------------------------------
# Rules


def _square(expr: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.args[0].shape)


def _owners(expr: Any, sites_per_matrix: int) -> np.ndarray:
    count = int(np.prod(expr.shape)) if expr.shape else 1
    return np.repeat(np.arange(count, dtype=np.int64), sites_per_matrix)


def _extreme_rule(to_symmetric: Any, side: Any) -> AtomRule:
    """``lambda_max`` of ``to_symmetric(X)``; ``side(expr)`` is that matrix's order."""

    def evaluate(expr: Any) -> Evaluator:
        return lambda x: largest_eigenvalue(to_symmetric(x))

    def kinks(expr: Any) -> KinkSite:
        n = side(expr)
        per = n * (n + 1) // 2 - 1

        def fn(x: Tensor, reference: Any = None) -> tuple[Tensor, Tensor]:
            # Sorted eigenvalue indices name the sites, so no reference is needed to pin them.
            residual, margin = largest_eigenvalue_sites(to_symmetric(x))
            return residual.reshape(-1), margin.reshape(-1)

        return KinkSite(fn, _owners(expr, per))

    def smoothed(expr: Any) -> SmoothEvaluator:
        return lambda mu, x: soft_largest_eigenvalue(to_symmetric(x), mu)

    return AtomRule(
        evaluate,
        smooth=False,
        kinks=kinks,
        smoothed=smoothed,
        note="kinks where the largest eigenvalue is multiple (a surface, not a point)",
    )


SPECTRAL: dict[type, AtomRule] = {
    # CVXPY's lambda_max takes a symmetric argument (its domain is X == X^T, its numeric reads
    # one triangle); the symmetric part agrees there and is what its PSD canonicalisation uses.
    lambda_max: _extreme_rule(symmetric_part, lambda e: _square(e)[-1]),
    sigma_max: _extreme_rule(dilation, lambda e: sum(_square(e)[-2:])),
    normNuc: AtomRule(
        lambda expr: nuclear_norm_value,
        smooth=False,
        kinks=lambda expr: KinkSite(
            lambda x, reference=None: tuple(t.reshape(-1) for t in nuclear_norm_sites(x)),
            _owners(expr, math.prod(_square(expr))),
        ),
        smoothed=lambda expr: lambda mu, x: soft_nuclear_norm(x, mu),
        note="kinks where a singular value is zero (the rank drops: a surface)",
    ),
    log_det: AtomRule(
        lambda expr: lambda x: log_det_value(symmetric_part(x)),
        note="smooth on positive definite matrices; -inf outside (CVXPY's numeric returns the "
        "log of a positive determinant of an indefinite matrix; its domain is X >> 0)",
    ),
}
