"""Sphere and ball projections: exact forwards, gradients from the declaration (kinks included)."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import declopt as dl
from tests.helpers import batched_central_difference_vjp, implicit_vjp_of

P_VALUES = [1.0, 2.0, float("inf")]
F64 = torch.float64


def vjp(module: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.GradientWarning)
        return implicit_vjp_of(module, [x], v)[0]


def jacobian(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of a projection of one vector, by the implicit backward."""
    n = x.shape[-1]
    return torch.stack([vjp(module, x, torch.eye(n, dtype=x.dtype)[i]) for i in range(n)])


def test_l2_sphere_matches_closed_form_value_and_jacobian() -> None:
    x = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=F64)
    proj = dl.nn.SphereProjection(2, radius=2.0)
    y = proj(x)
    torch.testing.assert_close(y, 2 * x / x.norm())
    unit = x / x.norm()
    expected = 2 * (torch.eye(4, dtype=F64) - torch.outer(unit, unit)) / x.norm()
    torch.testing.assert_close(jacobian(proj, x), expected, atol=1e-10, rtol=1e-9)


def test_linf_sphere_outside_the_cube_is_clamp_with_zero_gradient_on_saturated_ties() -> None:
    x = torch.tensor([2.0, -3.0, 0.4, 2.0, -0.7], dtype=F64)  # two tied maxima
    proj = dl.nn.SphereProjection(float("inf"))
    torch.testing.assert_close(proj(x), x.clamp(-1, 1))
    free = (x.abs() < 1).to(F64)
    torch.testing.assert_close(jacobian(proj, x), torch.diag(free), atol=1e-10, rtol=0)


def test_linf_sphere_inside_the_cube_moves_the_largest_coordinate_to_the_face() -> None:
    x = torch.tensor([0.2, -0.6, 0.1], dtype=F64)
    proj = dl.nn.SphereProjection(float("inf"))
    torch.testing.assert_close(proj(x), torch.tensor([0.2, -1.0, 0.1], dtype=F64))
    torch.testing.assert_close(
        jacobian(proj, x), torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=F64)), atol=1e-10, rtol=0
    )


def test_l1_sphere_outside_is_soft_threshold_with_its_jacobian_on_the_support() -> None:
    x = torch.tensor([1.5, -0.2, 0.9, -1.1, 0.05], dtype=F64)
    proj = dl.nn.SphereProjection(1, radius=1.0)
    y = proj(x)
    tau = (1.5 + 0.9 + 1.1 - 1.0) / 3
    expected = torch.sign(x) * (x.abs() - tau).clamp(min=0)
    torch.testing.assert_close(y, expected)
    s = torch.sign(expected)
    support = (expected != 0).to(F64)
    closed = torch.diag(support) - torch.outer(s, s) / support.sum()
    torch.testing.assert_close(jacobian(proj, x), closed, atol=1e-10, rtol=0)


def test_ball_projections_leave_interior_points_alone() -> None:
    x = torch.tensor([0.1, -0.2, 0.05], dtype=F64)
    for p in P_VALUES:
        proj = dl.nn.BallProjection(p)
        torch.testing.assert_close(proj(x), x)
        torch.testing.assert_close(jacobian(proj, x), torch.eye(3, dtype=F64), atol=1e-10, rtol=0)


def test_linf_ball_is_clamp() -> None:
    x = torch.randn(6, 8, dtype=F64) * 2
    torch.testing.assert_close(
        dl.nn.BallProjection(float("inf"), radius=0.5)(x), x.clamp(-0.5, 0.5)
    )


@pytest.mark.parametrize("sphere", [True, False])
@pytest.mark.parametrize("p", P_VALUES)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.2, 3.0]))
def test_projection_gradients_match_central_differences(
    p: float, sphere: bool, seed: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, generator=g, dtype=F64) * scale  # one problem: FD batches perturbations
    radius = torch.tensor(1.3, dtype=F64)
    cls = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    proj = cls(p)
    layer = proj.layer(5)

    def run(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return layer(x, r)[0]

    # Stay off degenerate points: finite differences must not cross a kink or a tie.
    with torch.no_grad():
        y = run(x, radius)
    gaps = [torch.tensor(1.0, dtype=F64)]
    if p == float("inf"):
        top = x.abs().sort(-1, descending=True).values
        gaps += [top[0] - top[1], (x.abs() - radius).abs().min()]
    if p == 1:
        gaps += [(x.abs() - (x.abs() - y.abs()).amax(-1, keepdim=True)).abs().min()]
    gaps.append((torch.linalg.vector_norm(x, ord=p, dim=-1) - radius).abs().min())
    if min(float(gap) for gap in gaps) < 1e-4:
        return
    v = torch.randn(5, generator=g, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.GradientWarning)
        analytic = implicit_vjp_of(run, [x, radius], v)
    numeric = batched_central_difference_vjp(run, [x, radius], v)
    for got, want in zip(analytic, numeric):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("p", P_VALUES)
def test_float32_projection_gradients_agree_with_float64(p: float) -> None:
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(16, 12, generator=g, dtype=F64) * 2
    v64 = torch.randn(16, 12, generator=g, dtype=F64)
    proj = dl.nn.SphereProjection(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.GradientWarning)
        g64 = implicit_vjp_of(proj, [x64], v64)[0]
        g32 = implicit_vjp_of(proj, [x64.float()], v64.float())[0]
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, atol=1e-4, rtol=1e-4)


def test_learnable_radius_gets_the_gradient_of_the_closed_form() -> None:
    radius = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))
    x = torch.randn(4, 6, dtype=F64)
    dl.nn.SphereProjection(2, radius=radius)(x).sum().backward()
    torch.testing.assert_close(radius.grad, (x / x.norm(dim=-1, keepdim=True)).sum())


def test_generic_torch_backend_reaches_the_same_l2_projections() -> None:
    import cvxpy as cp

    n = 5
    x, r, u = cp.Parameter(n), cp.Parameter(pos=True), cp.Variable(n)
    X = torch.randn(4, n, dtype=F64) * 3
    R = torch.tensor(1.5, dtype=F64)
    for sphere in (True, False):
        norm = cp.norm(u, 2)
        constraint = norm == r if sphere else norm <= r
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [constraint])
        generic = dl.Layer(problem, [x, r], [u], backend="torch", initializers=[lambda x, r: x / 2])
        exact = (dl.nn.SphereProjection if sphere else dl.nn.BallProjection)(2, radius=R)
        torch.testing.assert_close(generic(X, R)[0], exact(X), atol=1e-9, rtol=0)


def test_bad_p_and_radius_are_rejected() -> None:
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        dl.nn.SphereProjection(3)
    with pytest.raises(ValueError, match="radius must be a positive"):
        dl.nn.BallProjection(2, radius=0.0)
