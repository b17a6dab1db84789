"""Sphere and ball projections: exact forwards; closed-form gradients (the default) and gradients
from the declaration (``backward="implicit"``, kinks included), against each other, closed forms
and finite differences."""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import declopt as dl
from tests.helpers import batched_central_difference_vjp, implicit_vjp_of

P_VALUES = [1.0, 2.0, float("inf")]
BACKWARDS = ["native", "implicit"]
F64 = torch.float64
INF = float("inf")


def vjp(module: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.GradientWarning)
        return implicit_vjp_of(module, [x], v)[0]


def jacobian(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of a projection of one vector, by the module's backward."""
    n = x.shape[-1]
    return torch.stack([vjp(module, x, torch.eye(n, dtype=x.dtype)[i]) for i in range(n)])


@pytest.mark.parametrize("backward", BACKWARDS)
def test_l2_sphere_matches_closed_form_value_and_jacobian(backward: str) -> None:
    x = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=F64)
    proj = dl.nn.SphereProjection(2, radius=2.0, backward=backward)
    y = proj(x)
    torch.testing.assert_close(y, 2 * x / x.norm())
    unit = x / x.norm()
    expected = 2 * (torch.eye(4, dtype=F64) - torch.outer(unit, unit)) / x.norm()
    torch.testing.assert_close(jacobian(proj, x), expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_linf_sphere_outside_the_cube_is_clamp_with_zero_gradient_on_saturated_ties(
    backward: str,
) -> None:
    x = torch.tensor([2.0, -3.0, 0.4, 2.0, -0.7], dtype=F64)  # two tied maxima
    proj = dl.nn.SphereProjection(float("inf"), backward=backward)
    torch.testing.assert_close(proj(x), x.clamp(-1, 1))
    free = (x.abs() < 1).to(F64)
    torch.testing.assert_close(jacobian(proj, x), torch.diag(free), atol=1e-10, rtol=0)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_linf_sphere_inside_the_cube_moves_the_largest_coordinate_to_the_face(
    backward: str,
) -> None:
    x = torch.tensor([0.2, -0.6, 0.1], dtype=F64)
    proj = dl.nn.SphereProjection(float("inf"), backward=backward)
    torch.testing.assert_close(proj(x), torch.tensor([0.2, -1.0, 0.1], dtype=F64))
    torch.testing.assert_close(
        jacobian(proj, x), torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=F64)), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("backward", BACKWARDS)
def test_l1_sphere_outside_is_soft_threshold_with_its_jacobian_on_the_support(
    backward: str,
) -> None:
    x = torch.tensor([1.5, -0.2, 0.9, -1.1, 0.05], dtype=F64)
    proj = dl.nn.SphereProjection(1, radius=1.0, backward=backward)
    y = proj(x)
    tau = (1.5 + 0.9 + 1.1 - 1.0) / 3
    expected = torch.sign(x) * (x.abs() - tau).clamp(min=0)
    torch.testing.assert_close(y, expected)
    s = torch.sign(expected)
    support = (expected != 0).to(F64)
    closed = torch.diag(support) - torch.outer(s, s) / support.sum()
    torch.testing.assert_close(jacobian(proj, x), closed, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_ball_projections_leave_interior_points_alone(backward: str) -> None:
    x = torch.tensor([0.1, -0.2, 0.05], dtype=F64)
    for p in P_VALUES:
        proj = dl.nn.BallProjection(p, backward=backward)
        torch.testing.assert_close(proj(x), x)
        torch.testing.assert_close(jacobian(proj, x), torch.eye(3, dtype=F64), atol=1e-10, rtol=0)


def test_linf_ball_is_clamp() -> None:
    x = torch.randn(6, 8, dtype=F64) * 2
    torch.testing.assert_close(
        dl.nn.BallProjection(float("inf"), radius=0.5)(x), x.clamp(-0.5, 0.5)
    )


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("sphere", [True, False])
@pytest.mark.parametrize("p", P_VALUES)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.2, 3.0]))
def test_projection_gradients_match_central_differences(
    p: float, sphere: bool, backward: str, seed: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, generator=g, dtype=F64) * scale  # one problem: FD batches perturbations
    radius = torch.tensor(1.3, dtype=F64)
    cls = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    proj = cls(p, backward=backward)
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


def layer_vjp(
    cls: type, p: float, backward: str, x: torch.Tensor, r: torch.Tensor, v: torch.Tensor
) -> list[torch.Tensor]:
    """``[grad_x, grad_r]`` of ``<v, projection(x, r)>`` through the layer's ``backward``."""
    layer = cls(p, backward=backward).layer(x.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.GradientWarning)
        return implicit_vjp_of(lambda x, r: layer(x, r)[0], [x, r], v)


@pytest.mark.parametrize("sphere", [True, False])
@pytest.mark.parametrize("p", P_VALUES)
@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scales=st.lists(st.sampled_from([0.05, 0.3, 1.0, 3.0]), min_size=1, max_size=5),
    n=st.integers(1, 8),
    radius=st.sampled_from([0.5, 1.3]),
)
def test_closed_form_vjp_equals_the_implicit_backward(
    p: float, sphere: bool, seed: int, scales: list[float], n: int, radius: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(len(scales), n, generator=g, dtype=F64)
        * torch.tensor(scales, dtype=F64)[:, None]
    )
    v = torch.randn(len(scales), n, generator=g, dtype=F64)
    r = torch.tensor(radius, dtype=F64)
    cls = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    closed = layer_vjp(cls, p, "native", x, r, v)
    implicit = layer_vjp(cls, p, "implicit", x, r, v)
    for got, want in zip(closed, implicit):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


S, B = dl.nn.SphereProjection, dl.nn.BallProjection
# (class, p, x, a direction (dx, dr) that keeps the degenerate piece binding), radius 1.
DEGENERATE = {
    "L2 ball, on the sphere": (B, 2.0, [0.6, 0.8, 0.0], ([0.6, 0.8, 0.3], -0.5)),
    "L-inf ball, a coordinate on the face": (B, INF, [1.0, 0.2, -0.3], ([1.0, 0.5, -0.7], -0.2)),
    "L-inf ball, on the face and outside": (B, INF, [1.0, 2.2, -0.3], ([1.0, 0.5, -0.7], -0.2)),
    "L-inf sphere, tied maxima on the faces": (S, INF, [1.0, -1.0, -0.3], ([1.0, -1.0, 0.2], 0.0)),
    "L-inf sphere, tied maxima inside": (S, INF, [0.5, -0.5, -0.3], None),
    "L-inf ball, a zero inside": (B, INF, [0.5, 0.0, -0.3], None),
    "L1 ball, on the sphere": (B, 1.0, [0.5, 0.2, -0.3], ([1.0, 0.5, -1.0], -0.3)),
    "L1 ball, a zero inside": (B, 1.0, [0.5, 0.0, -0.3], None),
    "L1 sphere, on it with a zero": (S, 1.0, [0.5, 0.0, -0.5], ([0.5, 0.0, -0.5], 0.1)),
    "L1 sphere, inside with a zero": (S, 1.0, [0.5, 0.0, -0.2], ([0.1, 1.0, 0.3], 0.2)),
    "L1 sphere, a coordinate on the threshold": (S, 1.0, [2.0, 1.0, 0.0], ([0.3, -1.0, 0.5], 0.2)),
    "L2 sphere, x = 0": (S, 2.0, [0.0, 0.0, 0.0], None),
}


def full_jacobian(cls: type, p: float, backward: str, x: torch.Tensor) -> torch.Tensor:
    """``[J_x | J_r]``, ``(n, n + 1)``, at radius 1, from one backward per output coordinate."""
    r = torch.tensor(1.0, dtype=F64)
    rows = []
    for v in torch.eye(x.shape[-1], dtype=F64):
        gx, gr = layer_vjp(cls, p, backward, x, r, v)
        rows.append(torch.cat([gx, gr.reshape(1)]))
    return torch.stack(rows)


@pytest.mark.parametrize("case", DEGENERATE)
def test_closed_form_takes_the_active_side_at_degenerate_points(case: str) -> None:
    """Ties, faces, zeros and thresholds: the closed form is the implicit backward's
    ``degenerate="active"`` derivative, the one-sided derivative along perturbations that keep
    the degenerate piece binding."""
    cls, p, x, direction = DEGENERATE[case]
    x = torch.tensor(x, dtype=F64)
    closed = full_jacobian(cls, p, "native", x)
    torch.testing.assert_close(closed, full_jacobian(cls, p, "implicit", x), atol=1e-9, rtol=0)
    if direction is None:  # no side of it is differentiable along a useful direction
        return
    dx, dr = torch.tensor(direction[0], dtype=F64), direction[1]
    step = 1e-7
    layer = cls(p).layer(3)
    with torch.no_grad():
        r = torch.tensor(1.0, dtype=F64)
        moved = layer(x + step * dx, r + step * dr)[0]
        one_sided = (moved - layer(x, r)[0]) / step
    torch.testing.assert_close(
        closed @ torch.cat([dx, torch.tensor([dr], dtype=F64)]), one_sided, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("sphere", [True, False])
@pytest.mark.parametrize("p", P_VALUES)
def test_batched_radius_gets_one_gradient_per_problem(p: float, sphere: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = (
        torch.randn(4, 6, generator=g, dtype=F64)
        * torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=F64)[:, None]
    )
    r = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    v = torch.randn(4, 6, generator=g, dtype=F64)
    cls = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    closed = layer_vjp(cls, p, "native", x, r, v)
    assert closed[1].shape == (4,)
    for got, want in zip(closed, layer_vjp(cls, p, "implicit", x, r, v)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("sphere", [True, False])
@pytest.mark.parametrize("p", P_VALUES)
def test_matrix_free_kkt_solve_matches_the_dense_one(p: float, sphere: bool) -> None:
    """Above ``dense_max`` variables the implicit backward solves the KKT system matrix-free:
    MINRES, or the diagonal model of a separable Hessian checked against the true one."""
    from declopt.nn.projections import ProjectionSolver, declaration

    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([0.02, 0.1, 1.0, 3.0], dtype=F64)[:, None]
    x = torch.randn(4, 12, generator=g, dtype=F64) * scales
    r = torch.tensor(1.1, dtype=F64)
    v = torch.randn(4, 12, generator=g, dtype=F64)
    grads = {}
    for dense_max in (100, 4):
        layer = dl.Layer(
            *declaration(p, 12, sphere),
            solver=ProjectionSolver(p, sphere),
            backward="implicit",
            dense_max=dense_max,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dl.GradientWarning)
            grads[dense_max] = implicit_vjp_of(lambda x, r, f=layer: f(x, r)[0], [x, r], v)
        # L1 / L-inf: H = I (the kinks are rows), so the diagonal model answers; L2 couples,
        # along the norm's row only: the diagonal read in the row's null space answers.
        krylov = "diagonal" if p in (1.0, float("inf")) else "projected"
        assert layer.info.backward.method == ("eigh" if dense_max == 100 else krylov)
    assert not layer.info.backward.singular.any()
    assert layer.info.backward.second_order_ok.all()
    cls = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    for dense, free, closed in zip(grads[100], grads[4], layer_vjp(cls, p, "native", x, r, v)):
        torch.testing.assert_close(free, dense, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(free, closed, atol=1e-9, rtol=1e-9)


def test_info_after_a_closed_form_backward() -> None:
    proj = dl.nn.SphereProjection(1)
    x = (torch.randn(3, 4, 6, dtype=F64) * 2).requires_grad_(True)
    y = proj(x)
    y.sum().backward()
    info = proj.layer(6).info
    assert info.backend == "custom" and info.converged.shape == (3, 4) and info.all_converged
    assert info.backward is None  # filled by the implicit backward only
    torch.testing.assert_close(info.objective, 0.5 * (y - x).detach().square().sum(-1))
    assert float(info.kkt_residual.max()) < 1e-10


def test_projections_reject_an_unknown_backward() -> None:
    with pytest.raises(ValueError, match="backward must be 'native' or 'implicit'"):
        dl.nn.SphereProjection(2, backward="closed")


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("p", P_VALUES)
def test_float32_projection_gradients_agree_with_float64(p: float, backward: str) -> None:
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(16, 12, generator=g, dtype=F64) * 2
    v64 = torch.randn(16, 12, generator=g, dtype=F64)
    proj = dl.nn.SphereProjection(p, backward=backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.GradientWarning)
        g64 = implicit_vjp_of(proj, [x64], v64)[0]
        g32 = implicit_vjp_of(proj, [x64.float()], v64.float())[0]
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sphere", [True, False], ids=["sphere", "ball"])
@pytest.mark.parametrize("p", [1.0, 2.0], ids=["l1", "l2"])
@pytest.mark.parametrize("d", [12, 64, 256])
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_float32_implicit_backward_does_not_depend_on_the_units_of_x(
    p: float, sphere: bool, d: int, scale: float
) -> None:
    """The KKT solve at |x| far from the radius: the Hessian (2 |x| / r on the sphere) and the
    constraint row (2 y) have different units, and unscaled the system's condition grew as
    (|x| / r)^2: float32 gradients were 3 (d = 12) to 1200 (d = 64) times their size off at
    |x| = 1000 r on the dense path, 1e-5..5e-5 relative on MINRES (d = 256). Against the float64
    closed form."""
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(16, d, generator=g, dtype=F64) * 2 * scale
    v64 = torch.randn(16, d, generator=g, dtype=F64)
    module = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    exact = implicit_vjp_of(module(p, backward="native"), [x64], v64)[0]
    g32 = implicit_vjp_of(module(p, backward="implicit"), [x64.float()], v64.float())[0]
    # Far outside, the L1 projections put the radius on one entry: the gradient is 0, and the
    # float32 one is measured against v's size instead.
    unit = exact.abs().max() if bool((exact != 0).any()) else v64.abs().max()
    error = (g32.double() - exact).abs().max() / unit
    assert error < 5e-6


@pytest.mark.parametrize("sphere", [True, False], ids=["sphere", "ball"])
@pytest.mark.parametrize("p", [1.0, math.inf], ids=["l1", "linf"])
def test_float32_implicit_backward_is_float32_accurate_at_many_near_kinks(
    p: float, sphere: bool
) -> None:
    """d = 512: hundreds of entries lie within float32's sqrt(eps) of a kink without sitting on
    it; the implicit backward must not hold them (an O(1) error per entry), nor report spurious
    one-sided points."""
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(4, 512, generator=g, dtype=F64) * 3
    v64 = torch.randn(4, 512, generator=g, dtype=F64)
    module = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    exact = implicit_vjp_of(module(p, backward="native"), [x64], v64)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.GradientWarning)
        g32 = implicit_vjp_of(module(p, backward="implicit"), [x64.float()], v64.float())[0]
    error = (g32.double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-5


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


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("ulps", [0, 40])
def test_an_entry_close_to_the_linf_tie_keeps_its_own_derivative(
    dtype: torch.dtype, ulps: int
) -> None:
    """The exact forward decides ties exactly, so the implicit backward must not hold an entry
    40 ulps below the clipped value as tied (the iterative solvers' activity band is 64 ulps in
    float32 and 1.5e-8 in float64): its derivative stays 1, as the native backward's. An exact
    tie (0 ulps) is held by both."""
    eps = torch.finfo(dtype).eps
    x = torch.linspace(-0.9, 0.9, 10, dtype=F64)
    x[3], x[7] = 3.0, 1.0 - ulps * eps  # x[3] is clipped to the radius, x[7] is near it
    x = x.to(dtype).unsqueeze(0)
    v = torch.ones_like(x)
    grads = []
    for backward in ("native", "implicit"):
        proj = dl.nn.SphereProjection(math.inf, backward=backward)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dl.GradientWarning)
            grads.append(implicit_vjp_of(proj, [x], v)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=8 * eps, rtol=0)
    if ulps:
        assert float(grads[1][0, 7]) == pytest.approx(1.0, abs=8 * eps)


@pytest.mark.parametrize(
    ("scale", "dtype"),
    [
        (1e-30, torch.float32),
        (1e-22, torch.float32),
        (1e19, torch.float32),
        (1e-170, F64),
        (1e160, F64),
    ],
)
def test_l2_projection_of_tiny_and_huge_vectors(scale: float, dtype: torch.dtype) -> None:
    # |x|^2 of the entries themselves under- or overflows here; the projection must not.
    x = torch.tensor([[3.0, 4.0]], dtype=F64) * scale
    x = x.to(dtype).requires_grad_(True)
    y = dl.nn.SphereProjection(2)(x)
    torch.testing.assert_close(y.double(), torch.tensor([[0.6, 0.8]], dtype=F64), rtol=1e-6, atol=0)
    ball = dl.nn.BallProjection(2)(x.detach())
    want = x.detach() if scale < 1 else torch.tensor([[0.6, 0.8]], dtype=dtype)
    torch.testing.assert_close(ball, want, rtol=1e-6, atol=0)
    y[0, 0].backward()
    # d y_0 / dx = (1 - u_0^2, -u_0 u_1) / |x| with u = (0.6, 0.8)
    expected = torch.tensor([[0.64, -0.48]], dtype=F64) / (5.0 * scale)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("seed", "scale"), [(1, 3.0), (7, 0.1), (9, 0.1), (0, 0.1), (3, 0.1)])
def test_float32_l2_ball_rows_rounded_inside_are_active(seed: int, scale: float) -> None:
    # ||u|| - 1 of a float32 projection onto the unit ball rounds to a few ulps either side;
    # the activity band must follow the row's term sizes |D_u g| |u| (here |u| = 1), not its
    # largest gradient entry times the largest |u| (~0.01 at d = 1024), which read a row 2
    # ulps inside as inactive: gradient 2-99x off without a warning (seeds 1, 7, 9). Seeds 0
    # and 3: the matrix-free solve's check accepted the wrong diag(H 1) model at a residual of
    # 8e-4 (a rounding floor bounded by the largest row entry times sum |w|): 1e-3 off.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1024, generator=g) * scale
    v = torch.randn(8, 1024, generator=torch.Generator().manual_seed(seed + 1000))
    grads = []
    for backward in ("native", "implicit"):
        xx = x.clone().requires_grad_(True)
        (dl.nn.BallProjection(2.0, backward=backward)(xx) * v).sum().backward()
        grads.append(xx.grad)
    error = (grads[1] - grads[0]).abs().amax(-1) / grads[0].abs().amax(-1)
    assert (error <= 1e-5).all(), error
