"""Declarations whose atoms have a domain edge at the default start (entr, log at 0): the torch
backend starts inside the domain and never lets a raw linear-algebra error through."""

from __future__ import annotations

import cvxpy as cp
import torch

import declopt as dl
from declopt.backends.torch.minimize import newton_direction

F64 = torch.float64


def test_softmax_declared_with_entropy_matches_torch_softmax_and_its_gradient() -> None:
    x, y = cp.Parameter(4), cp.Variable(4)
    problem = cp.Problem(cp.Minimize(-x @ y - cp.sum(cp.entr(y))), [cp.sum(y) == 1])
    layer = dl.Layer(problem, [x], [y], backend="torch")
    X = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    leaf = X.clone().requires_grad_()
    (Y,) = layer(leaf)
    assert layer.info.converged.all()
    torch.testing.assert_close(Y, torch.softmax(X, -1), atol=1e-10, rtol=0)
    (Y * v).sum().backward()
    ref = X.clone().requires_grad_()
    (torch.softmax(ref, -1) * v).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, atol=1e-9, rtol=0)


def test_sigmoid_declared_with_binary_entropy_matches_torch_sigmoid() -> None:
    x, y = cp.Parameter(5), cp.Variable(5)
    objective = -x @ y - cp.sum(cp.entr(y) + cp.entr(1 - y))
    layer = dl.Layer(cp.Problem(cp.Minimize(objective)), [x], [y], backend="torch")
    X = torch.linspace(-3, 3, 5, dtype=F64).unsqueeze(0)
    (Y,) = layer(X)
    assert layer.info.converged.all()
    torch.testing.assert_close(Y, torch.sigmoid(X), atol=1e-9, rtol=0)


def test_a_hessian_that_is_not_finite_gives_a_descent_direction_not_an_error() -> None:
    hessian = torch.tensor([[[float("inf"), 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]])
    gradient = torch.tensor([[1.0, -2.0], [2.0, 1.0]])
    d, _ = newton_direction(hessian.double(), gradient.double())
    assert torch.isfinite(d).all()
    assert ((d * gradient.double()).sum(-1) < 0).all()


def test_scipy_leaves_a_start_where_an_equality_has_no_gradient() -> None:
    """``sum_squares(u) == r`` has a zero gradient at the zero start, where SLSQP cannot move."""
    x, r, u = cp.Parameter(4), cp.Parameter(pos=True), cp.Variable(4)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.sum_squares(u) == r])
    layer = dl.Layer(problem, [x, r], [u], backend="scipy")
    X = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    R = torch.tensor(2.0, dtype=F64)
    (U,) = layer(X, R)
    assert layer.info.converged.all()
    torch.testing.assert_close(U, R.sqrt() * X / X.norm(dim=-1, keepdim=True), atol=1e-10, rtol=0)
