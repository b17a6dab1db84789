"""A custom solver's own backward (``solver.vjp``), used by ``dl.Layer(backward="native")``."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch

import declopt as dl
from tests.helpers import implicit_vjp_of

F64 = torch.float64
Grads = tuple[torch.Tensor | None, ...]


def scaled_mean_problem(n: int = 4) -> tuple[cp.Problem, list, list]:
    """``y = argmin_y sum((y - a x)^2) = a mean(x)``: ``x`` per problem, ``a`` shared."""
    x, a, y = cp.Parameter(n), cp.Parameter(), cp.Variable()
    return cp.Problem(cp.Minimize(cp.sum_squares(y - a * x))), [x, a], [y]


class ScaledMean:
    """Exact forward with a closed-form VJP; ``factor`` scales the VJP so tests can see it."""

    def __init__(self, factor: float = 1.0, shared_grad: str = "per_problem") -> None:
        self.factor, self.shared_grad, self.calls = factor, shared_grad, 0

    def __call__(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor]:
        return (a * x.mean(-1),)

    def vjp(self, params: Grads, outputs: Grads, grads: Grads) -> Grads:
        self.calls += 1
        (x, a), (g,) = params, grads
        grad_x = self.factor * (a * g / x.shape[-1]).unsqueeze(-1).expand_as(x)
        grad_a = self.factor * g * x.mean(-1)  # (*batch): the layer sums it down to a's shape
        if self.shared_grad == "summed":
            grad_a = grad_a.sum()
        if self.shared_grad == "none":
            grad_a = None
        return grad_x, grad_a


def test_a_solver_with_a_vjp_is_differentiated_by_it_by_default() -> None:
    solver = ScaledMean(factor=3.0)  # deliberately wrong by 3x: the test sees which backward ran
    layer = dl.Layer(*scaled_mean_problem(), solver=solver)
    assert layer.backward == "native"
    x, a = torch.randn(5, 4, dtype=F64), torch.tensor(2.0, dtype=F64)
    v = torch.randn(5, dtype=F64)
    gx, ga = implicit_vjp_of(lambda x, a: layer(x, a)[0], [x, a], v)
    assert solver.calls == 1
    torch.testing.assert_close(gx, 3.0 * a * v[:, None] / 4 * torch.ones_like(x))
    torch.testing.assert_close(ga, 3.0 * (v * x.mean(-1)).sum())


def test_backward_implicit_ignores_the_solvers_vjp() -> None:
    solver = ScaledMean(factor=3.0)
    layer = dl.Layer(*scaled_mean_problem(), solver=solver, backward="implicit")
    x, a = torch.randn(5, 4, dtype=F64), torch.tensor(2.0, dtype=F64)
    v = torch.randn(5, dtype=F64)
    gx, ga = implicit_vjp_of(lambda x, a: layer(x, a)[0], [x, a], v)
    assert solver.calls == 0
    torch.testing.assert_close(gx, a * v[:, None] / 4 * torch.ones_like(x))
    torch.testing.assert_close(ga, (v * x.mean(-1)).sum())


@pytest.mark.parametrize("shared_grad", ["per_problem", "summed"])
def test_vjp_gradients_may_come_per_problem_or_summed(shared_grad: str) -> None:
    layer = dl.Layer(*scaled_mean_problem(), solver=ScaledMean(shared_grad=shared_grad))
    x, a = torch.randn(2, 3, 4, dtype=F64), torch.tensor(2.0, dtype=F64)
    v = torch.randn(2, 3, dtype=F64)
    gx, ga = implicit_vjp_of(lambda x, a: layer(x, a)[0], [x, a], v)
    assert gx.shape == x.shape and ga.shape == ()
    torch.testing.assert_close(ga, (v * x.mean(-1)).sum())


def test_a_none_gradient_leaves_that_parameter_without_one() -> None:
    layer = dl.Layer(*scaled_mean_problem(), solver=ScaledMean(shared_grad="none"))
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    a = torch.tensor(2.0, dtype=F64, requires_grad=True)
    layer(x, a)[0].sum().backward()
    assert x.grad is not None and a.grad is None


def test_backward_native_needs_a_vjp() -> None:
    def solver(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor]:
        return (a * x.mean(-1),)

    assert dl.Layer(*scaled_mean_problem(), solver=solver).backward == "implicit"
    with pytest.raises(ValueError, match="custom solver has no vjp"):
        dl.Layer(*scaled_mean_problem(), solver=solver, backward="native")


def test_a_vjp_with_the_wrong_count_or_shape_is_named() -> None:
    class Bad(ScaledMean):
        def __init__(self, result: Grads) -> None:
            super().__init__()
            self.result = result

        def vjp(self, params: Grads, outputs: Grads, grads: Grads) -> Grads:
            return self.result

    x, a = torch.randn(5, 4, dtype=F64, requires_grad=True), torch.tensor(2.0, dtype=F64)
    layer = dl.Layer(*scaled_mean_problem(), solver=Bad((torch.zeros(5, 4, dtype=F64),)))
    with pytest.raises(dl.SolverError, match="vjp returned 1 gradient"):
        layer(x, a)[0].sum().backward()
    wrong = (torch.zeros(5, 3, dtype=F64), None)
    layer = dl.Layer(*scaled_mean_problem(), solver=Bad(wrong))
    with pytest.raises(dl.SolverError, match="shape \\(5, 3\\) for parameter"):
        layer(x, a)[0].sum().backward()
