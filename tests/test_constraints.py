"""Constrained declarations through the torch backend and the implicit backward.

Closed forms (box projection, equality-constrained QP, L2 sphere), random constrained problems
against central finite differences, one-sided derivatives at weakly active points, infeasibility.
"""

from __future__ import annotations

from functools import partial

import cvxpy as cp
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import declopt as dl
from tests.helpers import batched_central_difference_vjp, implicit_vjp_of

TorchLayer = partial(dl.Layer, backend="torch")


def box_layer(n: int, **options: object) -> dl.Layer:
    x = cp.Parameter(n)
    u = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= 0, u <= 1])
    return TorchLayer(problem, [x], [u], **options)


def test_box_projection_is_clamp_with_zero_gradient_on_active_bounds() -> None:
    x = torch.tensor([[-0.5, 0.3, 1.7, 0.9], [2.0, -1.0, 0.5, 0.1]], dtype=torch.float64)
    x.requires_grad_(True)
    layer = box_layer(4)
    (u,) = layer(x)
    torch.testing.assert_close(u, x.detach().clamp(0, 1), atol=1e-12, rtol=0)
    assert layer.info.converged.all() and (layer.info.kkt_residual < 1e-10).all()
    assert layer.info.active.shape == (2, 8)
    v = torch.randn(2, 4, dtype=torch.float64)
    (u * v).sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 1)
    torch.testing.assert_close(x.grad, torch.where(inside, v, 0.0), atol=1e-10, rtol=0)


def test_box_projection_in_float32_has_float32_accurate_gradients() -> None:
    x = torch.rand(64, 10, generator=torch.Generator().manual_seed(0)) * 3 - 1
    # Keep clear of the bounds by more than float32's active-set tolerance (~sqrt(eps)).
    x = torch.where((x.abs() < 1e-2) | ((x - 1).abs() < 1e-2), x + 0.05, x).requires_grad_(True)
    (u,) = box_layer(10)(x)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, x.detach().clamp(0, 1), atol=1e-5, rtol=0)
    u.sum().backward()
    inside = ((x.detach() > 0) & (x.detach() < 1)).float()
    torch.testing.assert_close(x.grad, inside, atol=1e-4, rtol=0)


def test_equality_constrained_qp_matches_kkt_closed_form_in_all_data() -> None:
    torch.manual_seed(0)
    m, k = 5, 2
    Q0 = torch.randn(m, m, dtype=torch.float64)
    Q = (Q0 @ Q0.T + m * torch.eye(m, dtype=torch.float64)).requires_grad_(True)
    q = torch.randn(m, dtype=torch.float64, requires_grad=True)
    A = torch.randn(k, m, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, dtype=torch.float64, requires_grad=True)
    Qp, qp, Ap, bp = cp.Parameter((m, m)), cp.Parameter(m), cp.Parameter((k, m)), cp.Parameter(k)
    u = cp.Variable(m)
    objective = 0.5 * cp.sum(cp.multiply(cp.reshape(u, (m, 1)) @ cp.reshape(u, (1, m)), Qp))
    problem = cp.Problem(cp.Minimize(objective + qp @ u), [Ap @ u == bp])
    layer = TorchLayer(problem, [Qp, qp, Ap, bp], [u])
    (y,) = layer(Q, q, A, b)
    v = torch.randn(m, dtype=torch.float64)
    (y * v).sum().backward()
    got = [t.grad.clone() for t in (Q, q, A, b)]

    leaves = [t.detach().clone().requires_grad_(True) for t in (Q, q, A, b)]
    Qs, qs, As, bs = leaves
    Qsym = 0.5 * (Qs + Qs.T)  # the declared objective sees only the symmetric part
    kkt = torch.cat([torch.cat([Qsym, As.T], 1), torch.cat([As, torch.zeros(k, k)], 1)], 0)
    sol = torch.linalg.solve(kkt, torch.cat([-qs, bs]))[:m]
    torch.testing.assert_close(y.detach(), sol.detach(), atol=1e-10, rtol=1e-10)
    (sol * v).sum().backward()
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad, atol=1e-9, rtol=1e-8)


def test_l2_sphere_projection_matches_closed_form_jacobian() -> None:
    n = 4
    x = cp.Parameter(n)
    u = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.sum_squares(u) == 1])
    layer = TorchLayer(problem, [x], [u], initializers=[lambda x: x / x.norm(dim=-1, keepdim=True)])
    X = torch.randn(3, n, dtype=torch.float64) * 2
    (Y,) = layer(X)
    expected = X / X.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(Y, expected, atol=1e-10, rtol=0)
    v = torch.randn(3, n, dtype=torch.float64)
    grads = implicit_vjp_of(lambda X: layer(X)[0], [X], v)[0]
    eye = torch.eye(n, dtype=torch.float64)
    jac = (eye - expected.unsqueeze(-1) * expected.unsqueeze(-2)) / X.norm(dim=-1)[:, None, None]
    torch.testing.assert_close(grads, (jac @ v.unsqueeze(-1)).squeeze(-1), atol=1e-9, rtol=1e-8)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), convex=st.booleans())
def test_random_constrained_problems_match_central_differences(seed: int, convex: bool) -> None:
    """Mixed equality and inequality constraints, convex or not, strictly complementary."""
    g = torch.Generator().manual_seed(seed)
    n = 4
    x = cp.Parameter(n)
    a = cp.Parameter(n)
    s = cp.Parameter(pos=True)
    u = cp.Variable(n)
    smooth = 0.5 * cp.sum_squares(u - x) + 0.1 * cp.sum(cp.exp(u))
    if not convex:
        smooth = smooth - 0.2 * cp.sum(1 - cp.exp(-cp.square(u - 1)))
    constraints = [a @ u == s, u <= 1.5]
    layer = TorchLayer(cp.Problem(cp.Minimize(smooth), constraints), [x, a, s], [u])
    X = torch.randn(n, generator=g, dtype=torch.float64) * 2
    A = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    S = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    with torch.no_grad():
        (U,) = layer(X, A, S)
    info = layer.info
    assert info.converged.all() and info.kkt_residual.max() < 1e-9
    margin = torch.where(info.active, info.ineq_multipliers.abs(), (U - 1.5).abs())
    if margin.min() < 1e-4:
        return  # not strictly complementary: finite differences would straddle a kink
    v = torch.randn(n, generator=g, dtype=torch.float64)
    analytic = implicit_vjp_of(lambda *t: layer(*t)[0], [X, A, S], v)
    numeric = batched_central_difference_vjp(lambda *t: layer(*t)[0], [X, A, S], v)
    for got, want in zip(analytic, numeric):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("degenerate", "side"), [("active", "right"), ("inactive", "left")])
def test_weakly_active_bound_gives_the_documented_one_sided_derivative(
    degenerate: str, side: str
) -> None:
    # u = clamp(x, 0, 1) at x = 1: the bound is active with a zero multiplier.
    layer = box_layer(1, degenerate=degenerate)
    x = torch.tensor([1.0], dtype=torch.float64)
    grad = implicit_vjp_of(lambda x: layer(x)[0], [x], torch.ones(1, dtype=torch.float64))[0]
    assert layer.info.one_sided.all()
    h = 1e-6
    with torch.no_grad():
        if side == "right":
            fd = (layer(x + h)[0] - layer(x)[0]) / h
        else:
            fd = (layer(x)[0] - layer(x - h)[0]) / h
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=0)


def test_weakly_active_bound_warns_or_raises_by_choice() -> None:
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    with pytest.warns(dl.GradientWarning, match="one-sided"):
        box_layer(1)(x)[0].sum().backward()
    with pytest.raises(dl.SolverError, match="one-sided"):
        box_layer(1, degenerate="raise")(x)[0].sum().backward()


def test_infeasible_member_is_reported_by_batch_index_and_others_are_solved() -> None:
    x = cp.Parameter()
    u = cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.square(u)), [u >= 1, u <= x])
    layer = TorchLayer(problem, [x], [u])
    X = torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)
    with pytest.warns(dl.NonConvergenceWarning, match=r"\(1,\)"):
        (U,) = layer(X)
    assert layer.info.converged.tolist() == [True, False, True]
    torch.testing.assert_close(U[[0, 2]], torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)


def test_constrained_batch_members_are_independent() -> None:
    layer = box_layer(3)
    X = torch.randn(6, 3, dtype=torch.float64) * 2
    X[2] *= 50
    (batched,) = layer(X)
    alone = torch.stack([layer(X[i])[0] for i in range(6)])
    torch.testing.assert_close(batched, alone, atol=1e-12, rtol=0)


def test_nonsmooth_objective_is_differentiated_on_its_kinks() -> None:
    """Lasso prox: min 1/2 |u - x|^2 + lam |u|_1 = soft threshold; zeros sit on abs kinks."""
    x = cp.Parameter(5)
    lam = cp.Parameter(pos=True)
    u = cp.Variable(5)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x) + lam * cp.norm(u, 1)))

    def soft_threshold(x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.sign(x) * (x.abs() - lam).clamp(min=0),)

    layer = dl.Layer(problem, [x, lam], [u], solver=soft_threshold)
    X = torch.tensor([1.5, -0.2, 0.9, -1.1, 0.05], dtype=torch.float64, requires_grad=True)
    L = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (U,) = layer(X, L)
    assert layer.info.converged.all()  # verified: nonsmooth stationarity holds with kinks
    U.sum().backward()
    support = (U.detach() != 0).to(torch.float64)
    torch.testing.assert_close(X.grad, support, atol=1e-10, rtol=0)
    torch.testing.assert_close(L.grad, -torch.sign(U.detach()).sum(), atol=1e-10, rtol=0)


def test_backend_multipliers_decide_activity_when_a_block_has_no_rows() -> None:
    """A conic solver returns points ~1e-8 inside the constraint; its multiplier says active."""
    from declopt.inputs import prepare_inputs
    from declopt.kkt.point import kkt_point

    p, z = cp.Parameter(3), cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= 1])
    layer = TorchLayer(problem, [p], [z])
    P = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    params = prepare_inputs(layer.program, [P]).params
    u, lam_g = P / 5 * (1 - 1e-7), torch.tensor([[-4.0]], dtype=torch.float64)
    assert kkt_point(layer.program, params, u, ineq_multipliers=lam_g).active.all()


@pytest.mark.parametrize("backend", ["torch", "cone"])
def test_only_the_parameters_that_need_a_gradient_get_one(backend: str) -> None:
    """A constrained layer whose constraint data do not require grad: the gradients of the
    others are those of the full backward, and the fixed ones get none (their passes are
    skipped)."""
    g = torch.Generator().manual_seed(4)
    n, k = 6, 3
    x, G, h = cp.Parameter(n), cp.Parameter((k, n)), cp.Parameter(k)
    u = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [G @ u <= h])
    layer = dl.Layer(problem, [x, G, h], [u], backend=backend)
    data = [
        torch.randn(4, n, generator=g, dtype=torch.float64) * 2,
        torch.randn(4, k, n, generator=g, dtype=torch.float64),
        torch.rand(4, k, generator=g, dtype=torch.float64) * 0.1,
    ]
    v = torch.randn(4, n, generator=g, dtype=torch.float64)
    every = implicit_vjp_of(lambda *t: layer(*t)[0], data, v)
    assert bool((every[2] != 0).any())  # some inequality is active
    some = [t.clone().requires_grad_(i != 1) for i, t in enumerate(data)]
    (layer(*some)[0] * v).sum().backward()
    assert some[1].grad is None
    for i in (0, 2):
        torch.testing.assert_close(some[i].grad, every[i], atol=1e-10, rtol=1e-10)
