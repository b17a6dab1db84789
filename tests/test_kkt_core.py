"""The KKT core: tolerances relative to each problem's scale, activity at float32 solutions, one
KKT point per solution, and the policies that steer the backward."""

from __future__ import annotations

import math
import warnings

import cvxpy as cp
import pytest
import torch

import declopt as dl
from declopt.inputs import prepare_inputs
from declopt.kkt.point import kkt_point
from tests.helpers import implicit_vjp_of

F64 = torch.float64
SCALES = [1e-8, 1e-4, 1.0, 1e4, 1e8]


def _box_projection() -> tuple[cp.Problem, list, list]:
    x, lo, hi = cp.Parameter(5), cp.Parameter(5), cp.Parameter(5)
    u = cp.Variable(5)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= lo, u <= hi])
    return problem, [x, lo, hi], [u]


def _l1_ball() -> tuple[cp.Problem, list, list]:
    x, r = cp.Parameter(5), cp.Parameter(nonneg=True)
    u = cp.Variable(5)
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.norm1(u) <= r]), [x, r], [u]


def _pseudo_huber_pool() -> tuple[cp.Problem, list, list]:
    x, a = cp.Parameter(7), cp.Parameter(pos=True)
    y = cp.Variable()
    return cp.Problem(cp.Minimize(cp.sum(dl.penalties.pseudo_huber(y - x, a)))), [x, a], [y]


def _data(name: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if name == "box":
        x = torch.randn(4, 5, generator=g, dtype=F64) * 2
        lo = torch.full((4, 5), -1.0, dtype=F64)
        return [x, lo, lo + 2.0]
    if name == "l1":
        return [torch.randn(4, 5, generator=g, dtype=F64) * 2, torch.tensor(1.5, dtype=F64)]
    return [torch.randn(4, 7, generator=g, dtype=F64) * 2, torch.tensor(0.7, dtype=F64)]


DECLARATIONS = {"box": _box_projection, "l1": _l1_ball, "pseudo_huber": _pseudo_huber_pool}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", list(DECLARATIONS))
def test_torch_backend_answer_and_gradient_do_not_depend_on_the_units(
    name: str, scale: float
) -> None:
    """Every declaration here is homogeneous: scaling all data by s scales the solution by s and
    leaves the Jacobian du/dx unchanged, so the relative answer and the gradient must be those
    at s = 1."""
    layer = dl.Layer(*DECLARATIONS[name](), backend="torch")
    data = _data(name)
    v = torch.randn(data[0].shape[0], *layer.program.variable_shapes[0], dtype=F64)

    def solve(s: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = [(s * t).requires_grad_() for t in data]
        (u,) = layer(*inputs)
        assert layer.info.converged.all(), f"not converged at scale {s}"
        (u * v).sum().backward()
        return u.detach() / s, [t.grad for t in inputs]

    reference_u, reference_grads = solve(1.0)
    u, grads = solve(scale)
    torch.testing.assert_close(u, reference_u, atol=1e-9, rtol=1e-9)
    # d(v.u)/dx is scale-free; d/dr of a radius likewise (u is homogeneous of degree 1).
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


def test_float32_points_just_inside_a_bound_are_not_active() -> None:
    """sqrt(eps) in float32 is 3.4e-4: a point 1e-4 inside a bound used to count as active and
    get derivative 0. The activity tolerance at a returned solution is 64 ulps of |u|."""
    x, u = cp.Parameter(3), cp.Variable(3)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= 0, u <= 1])
    X = torch.tensor([[1 - 1e-4, 1.5, 0.5]], dtype=torch.float32, requires_grad=True)
    for layer in (
        dl.Layer(problem, [x], [u], backend="torch", degenerate="active"),
        dl.Layer(problem, [x], [u], solver=lambda t: (t.clamp(0, 1),), degenerate="active"),
    ):
        X.grad = None
        (U,) = layer(X)
        U.sum().backward()
        torch.testing.assert_close(X.grad, torch.tensor([[1.0, 0.0, 1.0]]), atol=1e-5, rtol=0)
        assert layer.info.active.tolist() == [[False, False, False, False, True, False]]


def test_float32_l1_projection_of_small_data_keeps_its_implicit_gradient() -> None:
    """Data of size 1/sqrt(d) projected onto the unit L1 sphere: the solution's entries are much
    smaller than 1, and an activity test of 64 ulps times (1 + |u|) counted entries merely near
    zero as on the kink (1.7-6% off at d >= 2048)."""
    g = torch.Generator().manual_seed(0)
    d = 2048
    x = torch.randn(2, d, generator=g) / math.sqrt(d)
    v = torch.randn(2, d, generator=g)
    exact = implicit_vjp_of(dl.nn.SphereProjection(1), [x.double()], v.double())[0]
    implicit = implicit_vjp_of(dl.nn.SphereProjection(1, backward="implicit"), [x], v)[0]
    error = (implicit.double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-4


def test_backend_point_is_the_one_the_layer_reports_and_differentiates() -> None:
    problem, params, variables = _box_projection()
    layer = dl.Layer(problem, params, variables, backend="torch", degenerate="active")
    data = [t.requires_grad_() for t in _data("box")]
    (U,) = layer(*data)
    prepared = prepare_inputs(layer.program, [t.detach() for t in data])
    point = kkt_point(layer.program, prepared.params, U.detach())
    torch.testing.assert_close(layer.info.active, point.active)
    torch.testing.assert_close(layer.info.ineq_multipliers, point.ineq_multipliers)
    U.sum().backward()
    assert layer.info.backward is not None and not layer.info.backward.singular.any()


def _clamp_layer(**kwargs: object) -> dl.Layer:
    x, u = cp.Parameter(1), cp.Variable(1)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u <= 1])
    return dl.Layer(problem, [x], [u], backend="torch", **kwargs)


@pytest.mark.parametrize(
    ("policy", "derivative"),
    [(dl.Degenerate("active", "ignore"), 0.0), (dl.Degenerate("inactive", "ignore"), 1.0)],
)
def test_degenerate_policy_value_picks_the_side_silently(
    policy: dl.Degenerate, derivative: float
) -> None:
    layer = _clamp_layer(degenerate=policy)
    x = torch.ones(1, dtype=F64, requires_grad=True)  # exactly on the bound: weakly active
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.GradientWarning)
        layer(x)[0].sum().backward()
    assert float(x.grad) == pytest.approx(derivative, abs=1e-10)
    assert bool(layer.info.backward.one_sided.all())


def test_degenerate_policy_can_warn_on_either_side() -> None:
    layer = _clamp_layer(degenerate=dl.Degenerate("inactive", "warn"))
    x = torch.ones(1, dtype=F64, requires_grad=True)
    with pytest.warns(dl.GradientWarning, match="treating them as inactive"):
        layer(x)[0].sum().backward()
    assert float(x.grad) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: dl.Degenerate(side="left"), "side"),
        (lambda: dl.Degenerate(report="loud"), "report"),
        (lambda: _clamp_layer(degenerate="sideways"), "degenerate must be one of"),
        (lambda: dl.LinearSolver("cholesky"), "kind"),
        (lambda: _clamp_layer(backward="closed"), "backward must be"),
        (lambda: _clamp_layer(dense_max=4, linear_solver=dl.LinearSolver()), "not both"),
    ],
)
def test_bad_policy_values_are_refused_with_the_choices(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_linear_solver_value_switches_the_backward_to_krylov() -> None:
    problem, params, variables = _box_projection()
    data = _data("box")
    grads = {}
    for kind in ("dense", "krylov"):
        layer = dl.Layer(
            problem,
            params,
            variables,
            backend="torch",
            degenerate="active",
            backward=dl.Implicit(dl.LinearSolver(kind)),
        )
        ones = torch.ones(4, 5, dtype=F64)
        grads[kind] = implicit_vjp_of(lambda *t, f=layer: f(*t)[0], data, ones)
        # Matrix-free: a box projection's Hessian is I, so the checked diagonal model answers.
        assert layer.info.backward.method == ("eigh" if kind == "dense" else "diagonal")
    for dense, krylov in zip(grads["dense"], grads["krylov"]):
        torch.testing.assert_close(dense, krylov, atol=1e-9, rtol=1e-9)


def test_compile_switch_does_not_shadow_the_module_method() -> None:
    layer = _clamp_layer(compile=False)
    assert layer.compiled is False
    assert callable(layer.compile)  # nn.Module.compile, not a bool
    assert layer.backward == "implicit" and isinstance(layer.backward_strategy, dl.Implicit)


def test_problem_scale_is_the_largest_entry_of_each_problems_data_and_solution() -> None:
    from declopt.kkt.tolerances import problem_scale
    from declopt.program import BatchedParams

    batched = torch.tensor([[1.0, -3.0], [0.5, 0.25], [0.0, 0.0]], dtype=torch.float64)
    shared = torch.tensor([-2.0], dtype=torch.float32)
    empty = torch.zeros(0)
    params = BatchedParams((batched, shared, empty), (0, None, None), 3)
    u = torch.tensor([[0.1], [4.0], [0.0]], dtype=torch.float32)
    scale = problem_scale(params, u)
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale, torch.tensor([3.0, 4.0, 2.0]))
    # Cached per batch: the second call reads the same data scale with another u.
    assert params.data_scale is params.data_scale
    torch.testing.assert_close(
        problem_scale(params, torch.zeros(3, 1)), torch.tensor([3.0, 2.0, 2.0])
    )
    # No data and u = 0: the unit is 1; NaN data gives 1 too (the solvers report the NaN).
    nothing = BatchedParams((), (), 2)
    torch.testing.assert_close(problem_scale(nothing, torch.zeros(2, 3)), torch.ones(2))
    bad = BatchedParams((torch.tensor([[float("nan")], [1.0]]),), (0,), 2)
    torch.testing.assert_close(problem_scale(bad, torch.zeros(2, 1)), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("m", [5, 40])  # the objective's Taylor pass (m <= 16) and autograd
def test_affine_rows_leave_the_lagrangian_hessian_to_the_objective(m: int) -> None:
    """A QP's rows are affine: the Lagrangian's Hessian and its products come from the
    objective alone (its closed-form pass where it has one) and equal the Lagrangian's own;
    a curved row (an L1 ball's norm) keeps the Lagrangian's."""
    from declopt.derivatives import BatchedObjective
    from declopt.frontend import compile_problem
    from declopt.kkt.functions import lagrangian
    from declopt.kkt.point import lagrangian_derivatives
    from declopt.program import BatchedParams

    g = torch.Generator().manual_seed(6)
    Q, q, G, h = cp.Parameter((m, m)), cp.Parameter(m), cp.Parameter((3, m)), cp.Parameter(3)
    u = cp.Variable(m)
    qp = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Q @ u) + q @ u), [G @ u <= h, u >= -1])
    program = compile_problem(qp, [Q, q, G, h], [u])
    assert program.constraints_affine
    values = (
        torch.randn(4, m, m, generator=g, dtype=F64),
        torch.randn(4, m, generator=g, dtype=F64),
        torch.randn(4, 3, m, generator=g, dtype=F64),
        torch.rand(4, 3, generator=g, dtype=F64),
    )
    params = BatchedParams(values, (0, 0, 0, 0), 4)
    at = torch.randn(4, m, generator=g, dtype=F64)
    point = kkt_point(program, params, at)
    lam = torch.randn(4, point.sizes.total, generator=g, dtype=F64)
    derivatives = lagrangian_derivatives(program, params, point, lam)
    assert derivatives.curvature is not derivatives
    extended = BatchedParams((*values, lam), (0, 0, 0, 0, 0), 4)
    own = BatchedObjective(lagrangian(program), extended)
    v = torch.randn(4, m, generator=g, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(derivatives.hessian(at), own.hessian(at))
        torch.testing.assert_close(derivatives.hvp_at(at)(v), own.hvp(at, v))
    ball, ball_params, ball_vars = _l1_ball()
    curved = compile_problem(ball, ball_params, ball_vars)
    assert not curved.constraints_affine
    data = BatchedParams(tuple(_data("l1")), (0, None), 4)
    curved_point = kkt_point(curved, data, torch.randn(4, 5, generator=g, dtype=F64))
    curved_derivatives = lagrangian_derivatives(curved, data, curved_point)
    assert curved_derivatives.curvature is curved_derivatives
