"""Euclidean projections onto Lp spheres and balls, p in {1, 2, inf}.

Each is declared in CVXPY (``min_u 1/2 |u - x|^2`` s.t. ``norm(u, p) == r`` or ``<= r``) and run
through :class:`declopt.Layer` with an exact fast forward as the layer's custom solver. The backward
is, by default, the closed-form vector-Jacobian product of that forward (the solver's ``vjp``, used
through the layer's ``backward="native"``); ``backward="implicit"`` differentiates the declaration
instead, with the kinks of the L1 and L-inf norms (zero coordinates, tied maxima) entering as active
equalities. Both give the same gradients (tested), the closed form in a few elementwise passes.

Exact forwards (batched over rows, ``x: (B, n)``):

* L2: ``r x / |x|`` (sphere; ball: only outside). ``x = 0`` maps to ``r e_1`` on the sphere.
* L-inf: ``clamp(x, -r, r)`` outside the cube (ball and sphere); strictly inside, the sphere
  projection moves the largest ``|x_i|`` (first on ties) to ``sign(x_i) r``.
* L1: outside, soft-thresholding ``sign(x) max(|x| - tau, 0)`` with ``tau`` from Michelot's
  algorithm (a few elementwise passes; a sort as in Duchi et al. 2008 for hard inputs);
  strictly inside, the sphere projection moves every coordinate outwards by ``(r - |x|_1) / n``
  in its own orthant (zeros go to the positive side).

Closed-form Jacobians (``y`` the projection, ``v`` the upstream gradient):

* L2 sphere: ``J = r (I - y y^T / r^2) / |x|``, ``dy/dr = y / r``. Ball: identity and ``0``
  inside, the sphere's outside.
* L-inf (ball, and sphere outside the cube): ``J = diag(1 - sat)`` with ``sat = |y_i| = r``
  (the clamped coordinates), ``dy/dr = sign(y) sat``. Sphere strictly inside: the lifted
  coordinate is the one with ``|y_i| = r``, so the same formula holds.
* L1 sphere, and ball outside: with ``s = sign(y)`` and ``k = |s|_1`` the support size,
  ``J = diag(|s|) - s s^T / k``, ``dy/dr = s / k``. Outside this is soft-thresholding's Jacobian
  on the support; strictly inside every ``y_i`` is nonzero with the sign of ``x_i`` (zeros:
  ``+``) and ``J = I - s s^T / n`` is the derivative of ``x + (r - s.x) s / n``. Ball inside:
  identity and ``0``.

Degenerate points are decided exactly (no tolerance band), on the side the implicit backward takes
with ``degenerate="active"``: a ball point with ``|x|_p = r`` gets the sphere's derivative (the
constraint kept binding); an L-inf coordinate with ``|x_i| = r`` counts as clamped; an L1
coordinate on the threshold (``|x_i| = tau``, so ``y_i = 0``) counts as off the support. These are
the one-sided derivatives for perturbations that keep the constraint (or the clamp, or the zero)
binding. At ``x = 0`` the L2 sphere projection is discontinuous; its ``x``-gradient is taken as
``0`` there (the minimum-norm answer of the singular KKT system) and ``dy/dr = e_1``.
"""

from __future__ import annotations

import cvxpy as cp
import torch
from torch import Tensor, nn

from declopt.layer import Layer
from declopt.nn._checks import moved_to_last
from declopt.nn._scalar import register_positive_scalar

_P_VALUES = {1.0: 1, 2.0: 2, float("inf"): "inf"}


def _check_p(p: float) -> float:
    p = float(p)
    if p not in _P_VALUES:
        raise ValueError(f"p must be 1, 2 or inf, got {p}")
    return p


def _positive_sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _norm_and_direction(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(|x|_2 (..., 1), x / |x|_2)`` computed on ``x / max|x|``: squaring the entries
    themselves underflows below ~1e-19 (float32) and overflows above ~1e19 (a norm of 0 or
    inf, a wrong projection without a warning). The direction is 0 where ``x = 0``."""
    tiny = torch.finfo(x.dtype).tiny
    largest = x.abs().amax(-1, keepdim=True)
    scaled = x / largest.clamp_min(tiny)
    size = scaled.norm(dim=-1, keepdim=True)
    direction = scaled / size.clamp_min(tiny)
    return largest * size, direction


def project_l2(x: Tensor, r: Tensor, sphere: bool) -> Tensor:
    norm, direction = _norm_and_direction(x)
    if sphere:
        first = torch.zeros_like(x)
        first[..., 0] = 1
        return r * torch.where(norm > 0, direction, first)
    return torch.where(norm > r, r * direction, x)


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
    tau = _l1_threshold(magnitude, total, r)
    outside = torch.sign(x) * (magnitude - tau).clamp(min=0)
    if not sphere:
        return torch.where(total > r, outside, x)
    grown = x + (r - total) / n * _positive_sign(x)
    return torch.where(total >= r, outside, grown)


_MICHELOT_MAX_ITER = 32


def _l1_threshold(magnitude: Tensor, total: Tensor, r: Tensor) -> Tensor:
    """``tau (B, 1)`` with ``sum(max(|x| - tau, 0)) = r`` (rows with ``|x|_1 > r``; others: any).

    Michelot's algorithm (1986): ``tau <- (sum of |x_i| > tau, less r) / their count`` is Newton's
    method on the convex, decreasing, piecewise linear ``sum(max(|x| - tau, 0)) - r``; started
    below the root it increases to it exactly, in a few passes for typical data (rarely more than
    10 at n = 4096; each pass is elementwise, no sort). ``max |x| - r`` is such a start, and
    usually a close one. The sort-based threshold (Duchi et al. 2008) takes over for inputs that
    need more than ``_MICHELOT_MAX_ITER`` passes.
    """
    n = magnitude.shape[-1]
    tau = torch.maximum((total - r) / n, magnitude.amax(-1, keepdim=True) - r)
    count = None
    for _ in range(_MICHELOT_MAX_ITER):
        support = magnitude > tau
        new_count = support.sum(-1, keepdim=True)
        if count is not None and bool((new_count == count).all()):
            return tau
        count = new_count
        tau = ((magnitude * support).sum(-1, keepdim=True) - r) / count
    # Duchi et al.: tau = (sum of the k largest |x| - r) / k for the largest feasible k.
    sorted_desc = magnitude.sort(-1, descending=True).values
    cumulative = sorted_desc.cumsum(-1) - r
    ks = torch.arange(1, n + 1, dtype=magnitude.dtype, device=magnitude.device)
    feasible = sorted_desc * ks > cumulative
    k = feasible.to(magnitude.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last feasible index
    return cumulative.gather(-1, k) / (k + 1).to(magnitude.dtype)


def vjp_l2(x: Tensor, r: Tensor, y: Tensor, v: Tensor, sphere: bool) -> tuple[Tensor, Tensor]:
    norm = _norm_and_direction(x)[0]
    unit = y / r  # x / |x| where the sphere's formula applies (e_1 at x = 0 on the sphere)
    along = (unit * v).sum(-1, keepdim=True)
    # x = 0 (sphere only): the derivative is unbounded; 0 is the implicit backward's answer.
    scale = torch.where(norm > 0, r / norm.clamp_min(torch.finfo(x.dtype).tiny), 0)
    grad_x = scale * (v - unit * along)
    if sphere:
        return grad_x, along.squeeze(-1)
    outside = norm >= r
    return torch.where(outside, grad_x, v), torch.where(outside, along, 0).squeeze(-1)


def vjp_linf(x: Tensor, r: Tensor, y: Tensor, v: Tensor, sphere: bool) -> tuple[Tensor, Tensor]:
    # The forward writes exactly +-r into every clamped (or lifted) coordinate and nowhere else.
    saturated = y.abs() >= r
    grad_x = v.masked_fill(saturated, 0)
    grad_r = (torch.sign(y) * v).masked_fill(~saturated, 0).sum(-1)
    return grad_x, grad_r


def vjp_l1(x: Tensor, r: Tensor, y: Tensor, v: Tensor, sphere: bool) -> tuple[Tensor, Tensor]:
    s = torch.sign(y)
    support = s.abs()
    along = (s * v).sum(-1, keepdim=True) / support.sum(-1, keepdim=True).clamp_min(1)
    grad_x = v * support - s * along
    if sphere:
        return grad_x, along.squeeze(-1)
    outside = x.abs().sum(-1, keepdim=True) >= r
    return torch.where(outside, grad_x, v), torch.where(outside, along, 0).squeeze(-1)


_FORWARDS = {1.0: project_l1, 2.0: project_l2, float("inf"): project_linf}
_VJPS = {1.0: vjp_l1, 2.0: vjp_l2, float("inf"): vjp_linf}


class ProjectionSolver:
    """The exact forward of one projection as a layer's custom solver, with its closed-form VJP.

    ``solver(x, r) -> (y,)`` with ``x: (*batch, n)``, ``r: (*batch_r)`` broadcasting with
    ``batch``; ``solver.vjp((x, r), (y,), (v,)) -> (grad_x (*batch, n), grad_r (*batch))`` (the
    layer sums ``grad_r`` down to the shape of ``r``).
    """

    exact = True  # closed forms: ties and zeros are exact (the layer decides kinks to a few ulps)

    def __init__(self, p: float, sphere: bool) -> None:
        self.p, self.sphere = _check_p(p), sphere

    def __call__(self, x: Tensor, r: Tensor) -> tuple[Tensor]:
        return (_FORWARDS[self.p](x, r.unsqueeze(-1), self.sphere),)

    def vjp(
        self, params: tuple[Tensor, ...], outputs: tuple[Tensor, ...], grads: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        (x, r), (y,), (v,) = params, outputs, grads
        return _VJPS[self.p](x, r.unsqueeze(-1), y, v, self.sphere)


def declaration(p: float, n: int, sphere: bool) -> tuple[cp.Problem, list, list]:
    """``(problem, [x, radius], [u])``: the projection of ``n``-vectors as a CVXPY declaration."""
    x = cp.Parameter(n, name="x")
    r = cp.Parameter(pos=True, name="radius")
    u = cp.Variable(n, name="u")
    norm = cp.norm(u, _P_VALUES[_check_p(p)])
    constraint = norm == r if sphere else norm <= r
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [constraint]), [x, r], [u]


class _Projection(nn.Module):
    sphere: bool

    def __init__(
        self, p: float, radius: float | Tensor = 1.0, dim: int = -1, backward: str = "native"
    ) -> None:
        super().__init__()
        self.p = _check_p(p)
        self.dim = dim
        if backward not in ("native", "implicit"):
            raise ValueError(f"backward must be 'native' or 'implicit', got {backward!r}")
        self.backward = backward
        register_positive_scalar(self, "radius", radius)
        self._layers: dict[int, Layer] = {}

    def layer(self, n: int) -> Layer:
        """The declarative layer projecting ``n``-vectors (declared once per ``n``)."""
        if n not in self._layers:
            problem, params, variables = declaration(self.p, n, self.sphere)
            # The exact forwards are tested against the declaration; no eager verification.
            self._layers[n] = Layer(
                problem,
                params,
                variables,
                solver=ProjectionSolver(self.p, self.sphere),
                verify=False,
                backward=self.backward,
            )
        return self._layers[n]

    @torch.compiler.disable  # declares CVXPY layers lazily; one graph break under torch.compile
    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., n, ...)`` -> its projection, same shape (projects along ``dim``)."""
        moved = moved_to_last(x, self.dim, type(self).__name__)
        (u,) = self.layer(moved.shape[-1])(moved, self.radius.to(moved.dtype))
        return u.movedim(-1, self.dim)

    def __getstate__(self) -> dict:
        # The declared layers are a cache (and hold closures): rebuilt on first use after load.
        state = dict(self.__dict__)
        state["_layers"] = {}
        return state

    def extra_repr(self) -> str:
        extra = "" if self.backward == "native" else f", backward={self.backward!r}"
        return f"p={self.p:g}, radius={float(self.radius):g}, dim={self.dim}{extra}"


class SphereProjection(_Projection):
    """Projection onto ``{u : |u|_p = radius}`` along ``dim``; ``radius`` may be learnable.

    ``backward="native"`` (default): the closed-form VJP; ``"implicit"``: the implicit backward of
    the declaration (same gradients, much slower for large ``n``).
    """

    sphere = True


class BallProjection(_Projection):
    """Projection onto ``{u : |u|_p <= radius}`` along ``dim``; ``radius`` may be learnable.

    ``backward``: as for :class:`SphereProjection`.
    """

    sphere = False
