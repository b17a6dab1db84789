"""``layer(..., warm_start=True)``: the previous call's solutions as the starting points (backends
that take starting points), the same answers, and clear refusals elsewhere."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch

import declopt as dl
from declopt.torch import CvxpyLayer

F64 = torch.float64


def _smooth_problem(n: int = 30) -> tuple[cp.Problem, cp.Parameter, cp.Variable]:
    q, x = cp.Parameter(n), cp.Variable(n)
    objective = cp.sum(cp.exp(x)) + cp.sum_squares(x) + q @ x
    return cp.Problem(cp.Minimize(objective), [cp.sum(x) == 1, x >= -1]), q, x


@pytest.mark.parametrize("make", [dl.Layer, CvxpyLayer])
def test_warm_start_gives_the_same_solutions_in_fewer_iterations(make) -> None:
    problem, q, x = _smooth_problem()
    layer = make(problem, [q], [x], backend="torch")
    data = 3 * torch.randn(8, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    layer(data)
    moved = data + 1e-3
    (warm,) = layer(moved, warm_start=True)
    warm_iterations = int(layer.info.iterations.sum())
    (cold,) = layer(moved)
    cold_iterations = int(layer.info.iterations.sum())
    assert torch.allclose(warm, cold, atol=1e-10)
    assert warm_iterations < cold_iterations


def test_warm_start_is_ignored_when_the_batch_changes() -> None:
    problem, q, x = _smooth_problem()
    layer = dl.Layer(problem, [q], [x], backend="torch")
    data = torch.randn(8, 30, generator=torch.Generator().manual_seed(1), dtype=F64)
    layer(data)
    (first,) = layer(data[:3], warm_start=True)
    (cold,) = layer(data[:3])
    assert torch.allclose(first, cold, atol=1e-10)


def test_warm_start_on_a_backend_without_starting_points_is_refused() -> None:
    problem, q, x = _smooth_problem(3)
    layer = dl.Layer(problem, [q], [x], backend="cvxpylayers")
    with pytest.raises(ValueError, match="warm_start=True needs a backend"):
        layer(torch.zeros(3, dtype=F64), warm_start=True)
    # cvxpylayers' own message through the drop-in (only its MOREAU solver warm-starts).
    with pytest.raises(ValueError, match="only supported with solver='MOREAU'"):
        CvxpyLayer(problem, [q], [x])(torch.zeros(3, dtype=F64), warm_start=True)
