"""Euclidean projections onto Lp spheres and balls, p in {1, 2, inf}.

Each is declared in CVXPY (``min_u 1/2 |u - x|^2`` s.t. ``norm(u, p) == r`` or ``<= r``) and run
through :class:`declopt.Layer` with an exact fast forward passed as the layer's custom solver; the
backward comes from the declaration through the implicit backward, with the kinks of the L1 and
L-inf norms (zero coordinates, tied maxima) entering as active equalities.

Exact forwards (batched over rows, ``x: (B, n)``):

* L2: ``r x / |x|`` (sphere; ball: only outside). ``x = 0`` maps to ``r e_1`` on the sphere.
* L-inf: ``clamp(x, -r, r)`` outside the cube (ball and sphere); strictly inside, the sphere
  projection moves the largest ``|x_i|`` (first on ties) to ``sign(x_i) r``.
* L1 (Duchi et al. 2008): outside, soft-thresholding ``sign(x) max(|x| - tau, 0)`` with ``tau``
  from a sort; strictly inside, the sphere projection moves every coordinate outwards by
  ``(r - |x|_1) / n`` in its own orthant (zeros go to the positive side).
"""

from __future__ import annotations

import cvxpy as cp
import torch
from torch import Tensor, nn

from declopt.layer import Layer
from declopt.nn._scalar import register_positive_scalar

_P_VALUES = {1.0: 1, 2.0: 2, float("inf"): "inf"}


def _check_p(p: float) -> float:
    p = float(p)
    if p not in _P_VALUES:
        raise ValueError(f"p must be 1, 2 or inf, got {p}")
    return p


def _positive_sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def project_l2(x: Tensor, r: Tensor, sphere: bool) -> Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    if sphere:
        first = torch.zeros_like(x)
        first[..., 0] = 1
        direction = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), first)
        return r * direction
    return torch.where(norm > r, r * x / norm.clamp_min(torch.finfo(x.dtype).tiny), x)


def project_linf(x: Tensor, r: Tensor, sphere: bool) -> Tensor:
    clamped = torch.minimum(torch.maximum(x, -r), r)
    if not sphere:
        return clamped
    inside = x.abs().amax(-1, keepdim=True) < r
    pick = x.abs().argmax(-1, keepdim=True)
    lifted = x.scatter(
        -1, pick, (_positive_sign(x.gather(-1, pick)) * r).expand_as(pick).to(x.dtype)
    )
    return torch.where(inside, lifted, clamped)


def project_l1(x: Tensor, r: Tensor, sphere: bool) -> Tensor:
    n = x.shape[-1]
    magnitude = x.abs()
    total = magnitude.sum(-1, keepdim=True)
    # Duchi et al.: tau = (sum of the k largest |x| - r) / k for the largest feasible k.
    sorted_desc = magnitude.sort(-1, descending=True).values
    cumulative = sorted_desc.cumsum(-1) - r
    ks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    feasible = sorted_desc * ks > cumulative
    k = feasible.to(x.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last feasible index
    tau = cumulative.gather(-1, k) / (k + 1).to(x.dtype)
    outside = torch.sign(x) * (magnitude - tau).clamp(min=0)
    if not sphere:
        return torch.where(total > r, outside, x)
    grown = x + (r - total) / n * _positive_sign(x)
    return torch.where(total >= r, outside, grown)


_FORWARDS = {1.0: project_l1, 2.0: project_l2, float("inf"): project_linf}


class _Projection(nn.Module):
    sphere: bool

    def __init__(self, p: float, radius: float | Tensor = 1.0, dim: int = -1) -> None:
        super().__init__()
        self.p = _check_p(p)
        self.dim = dim
        register_positive_scalar(self, "radius", radius)
        self._layers: dict[int, Layer] = {}

    def layer(self, n: int) -> Layer:
        """The declarative layer projecting ``n``-vectors (declared once per ``n``)."""
        if n not in self._layers:
            x = cp.Parameter(n, name="x")
            r = cp.Parameter(pos=True, name="radius")
            u = cp.Variable(n, name="u")
            norm = cp.norm(u, _P_VALUES[self.p])
            constraint = norm == r if self.sphere else norm <= r
            problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [constraint])
            forward, sphere = _FORWARDS[self.p], self.sphere

            def solver(x: Tensor, r: Tensor) -> tuple[Tensor]:
                return (forward(x, r.reshape(*r.shape, 1), sphere),)

            # The exact forwards are tested against the declaration; no eager verification.
            self._layers[n] = Layer(problem, [x, r], [u], solver=solver, verify=False)
        return self._layers[n]

    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., n, ...)`` -> its projection, same shape (projects along ``dim``)."""
        moved = x.movedim(self.dim, -1)
        (u,) = self.layer(moved.shape[-1])(moved, self.radius.to(moved.dtype))
        return u.movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, radius={float(self.radius):g}, dim={self.dim}"


class SphereProjection(_Projection):
    """Projection onto ``{u : |u|_p = radius}`` along ``dim``; ``radius`` may be learnable."""

    sphere = True


class BallProjection(_Projection):
    """Projection onto ``{u : |u|_p <= radius}`` along ``dim``; ``radius`` may be learnable."""

    sphere = False
