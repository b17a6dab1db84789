"""The batched damped Newton solver: what it returns is what the objective says at that point."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch

import declopt as dl
from declopt.backends.torch.minimize import newton
from declopt.derivatives import BatchedObjective
from declopt.frontend.compile import compile_problem
from declopt.kkt.tolerances import problem_scale
from declopt.program import BatchedParams


def _objective(expr: cp.Expression, x: cp.Parameter, u: cp.Variable, values: torch.Tensor):
    program = compile_problem(cp.Problem(cp.Minimize(expr)), [x], [u])
    params = BatchedParams((values,), (0,), values.shape[0])
    return BatchedObjective.of(program, params), params


class _Counting:
    """``BatchedObjective`` counting its one-pass evaluations."""

    def __init__(self, objective: BatchedObjective) -> None:
        self.inner, self.derivatives, self.evaluations = objective, objective.derivatives, 0

    def value_grad_hessian(self, u: torch.Tensor):
        self.evaluations += 1
        return self.inner.value_grad_hessian(u)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_returned_objective_and_gradient_are_the_points(dtype: torch.dtype) -> None:
    # The last, sub-tolerance Newton step is taken without a confirming evaluation; the objective
    # and gradient it reports (from the quadratic model) must match a fresh evaluation there.
    n = 7
    x, u = cp.Parameter(n), cp.Variable(2)
    expr = (
        cp.sum(dl.penalties.pseudo_huber(u[0] - x, 0.5))
        + cp.sum(cp.exp(u[1] - x))
        + (cp.square(u[0] - u[1]))
    )
    values = torch.randn(5, n, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 3
    objective, params = _objective(expr, x, u, values)
    u0 = torch.zeros(5, 2, dtype=dtype)
    result = newton(objective, u0, 50, problem_scale(params, u0))
    assert bool(result.converged.all())
    f, g = objective.value_and_grad(result.u)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(result.objective, f, rtol=64 * eps, atol=0)
    gscale = g.new_tensor(1.0) + values.abs().amax(-1, keepdim=True).exp()
    assert bool((result.gradient - g).abs().le(eps**0.5 * gscale).all())


@pytest.mark.parametrize("exact_model", [True, False])
def test_a_quadratic_takes_one_newton_step_and_no_confirming_evaluation(exact_model: bool) -> None:
    x, y = cp.Parameter(16), cp.Variable(1)
    values = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    objective, params = _objective(cp.sum_squares(y - x), x, y, values)
    assert objective.quadratic  # degree 2 in y, from the atoms' degree rules
    objective.quadratic = exact_model
    counting = _Counting(objective)
    u0 = torch.zeros(6, 1, dtype=torch.float64)
    result = newton(counting, u0, 50, problem_scale(params, u0))  # type: ignore[arg-type]
    torch.testing.assert_close(result.u[:, 0], values.mean(-1), rtol=1e-14, atol=1e-14)
    assert bool(result.converged.all())
    f, g = objective.value_and_grad(result.u)
    torch.testing.assert_close(result.objective, f, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(result.gradient, g, rtol=0, atol=1e-12)
    if exact_model:
        # The exact model gives the full step's point and shows the step from it is rounding:
        # only the start is evaluated.
        assert counting.evaluations == 1
        assert bool((result.iterations == 1).all())
    else:
        # The start and the full step's point; the step from there is rounding and not tried.
        assert counting.evaluations == 2
        assert bool((result.iterations == 2).all())


def test_a_higher_degree_objective_has_no_exact_model() -> None:
    x, u = cp.Parameter(3), cp.Variable(3)
    values = torch.randn(2, 3, dtype=torch.float64)
    quartic, _ = _objective(cp.sum(cp.power(u - x, 4)), x, u, values)
    huber, _ = _objective(cp.sum(cp.huber(u - x, 1.0)), x, u, values)
    scaled, _ = _objective(cp.sum(cp.multiply(x, cp.square(u))) / 4, x, u, values)
    assert not quartic.quadratic and not huber.quadratic
    assert scaled.quadratic  # a parameter times a square is still degree 2 in u
