"""RobustPool: values, global minima of the nonconvex penalties, and implicit gradients."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import declopt as dl
from tests.helpers import central_difference_vjp, implicit_vjp_of

PENALTIES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]
NUMPY_PHI = {
    "quadratic": lambda z, a: 0.5 * z**2,
    "pseudo_huber": lambda z, a: a**2 * (torch.sqrt(1 + (z / a) ** 2) - 1),
    "huber": lambda z, a: torch.where(z.abs() <= a, 0.5 * z**2, a * (z.abs() - a / 2)),
    "welsch": lambda z, a: 1 - torch.exp(-(z**2) / (2 * a**2)),
    "truncated_quadratic": lambda z, a: 0.5 * torch.clamp(z**2, max=a**2),
}


def grid_minimiser(
    penalty: str, x: torch.Tensor, alpha: float, points: int = 20001
) -> torch.Tensor:
    """Dense 1-D grid search over [min x, max x] for each row of x (rows, n) -> (rows,)."""
    lo, hi = x.min(-1).values, x.max(-1).values
    ys = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, points, dtype=x.dtype)
    values = NUMPY_PHI[penalty](ys[:, :, None] - x[:, None, :], alpha).sum(-1)  # (rows, points)
    return ys.gather(-1, values.argmin(-1, keepdim=True)).squeeze(-1)


def test_quadratic_pool_is_the_mean_with_gradient_one_over_n() -> None:
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    y = dl.nn.RobustPool("quadratic")(x)
    torch.testing.assert_close(y, x.mean(-1))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 7))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_pool_output_shape_dtype_and_dim(penalty: str) -> None:
    x = torch.randn(2, 5, 3, dtype=torch.float32)
    pool = dl.nn.RobustPool(penalty, alpha=1.0, dim=1)
    y = pool(x)
    assert y.shape == (2, 3) and y.dtype == torch.float32
    assert dl.nn.RobustPool(penalty, dim=1, keepdim=True)(x).shape == (2, 1, 3)


@pytest.mark.parametrize("penalty", ["welsch", "truncated_quadratic"])
def test_nonconvex_pool_finds_global_minimiser_of_two_clusters(penalty: str) -> None:
    g = torch.Generator().manual_seed(0)
    big = 3.0 + 0.3 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    small = -2.0 + 0.3 * torch.randn(6, 25, generator=g, dtype=torch.float64)
    x = torch.cat([small, big], -1)[:, torch.randperm(65, generator=g)]
    y = dl.nn.RobustPool(penalty, alpha=1.0)(x)
    reference = grid_minimiser(penalty, x, 1.0)
    torch.testing.assert_close(y, reference, atol=1e-3, rtol=0)
    assert (y > 2).all()  # the larger cluster, not the mean


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch"])
def test_fast_and_generic_solvers_agree(penalty: str) -> None:
    x = torch.randn(4, 6, 30, dtype=torch.float64)
    x[..., :3] *= 10
    fast = dl.nn.RobustPool(penalty, alpha=1.0)(x)
    generic = dl.nn.RobustPool(penalty, alpha=1.0, solver="generic")(x)
    torch.testing.assert_close(fast, generic, atol=1e-8, rtol=1e-8)


def test_truncated_quadratic_fast_solver_is_never_worse_than_local_search() -> None:
    # The fast solver is exact (global); the generic one is a local search from mean/median.
    x = torch.randn(4, 6, 30, dtype=torch.float64) * 2
    x[..., :3] *= 10
    fast = dl.nn.RobustPool("truncated_quadratic")(x)
    generic = dl.nn.RobustPool("truncated_quadratic", solver="generic")(x)
    phi = NUMPY_PHI["truncated_quadratic"]
    f_fast = phi(fast.unsqueeze(-1) - x, 1.0).sum(-1)
    f_generic = phi(generic.unsqueeze(-1) - x, 1.0).sum(-1)
    assert (f_fast <= f_generic + 1e-12).all()
    grid = grid_minimiser("truncated_quadratic", x.reshape(-1, 30), 1.0).reshape(4, 6)
    assert (f_fast <= phi(grid.unsqueeze(-1) - x, 1.0).sum(-1) + 1e-12).all()


@pytest.mark.parametrize("penalty", PENALTIES[1:])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(0.3, 3.0))
def test_pool_gradients_match_central_differences(penalty: str, seed: int, alpha: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, generator=g, dtype=torch.float64) * 1.5
    a = torch.tensor(alpha, dtype=torch.float64)
    v = torch.randn(3, generator=g, dtype=torch.float64)

    layer = dl.nn.RobustPool(penalty).layer(9)

    def pool(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return layer(x, a)[0]

    if penalty in ("huber", "truncated_quadratic"):
        # Piecewise penalties: skip draws where a residual sits within the FD step of a kink.
        with torch.no_grad():
            y = pool(x, a)
        margin = ((y.unsqueeze(-1) - x).abs() - alpha).abs().min()
        if margin < 1e-4:
            return
    analytic = implicit_vjp_of(pool, [x, a], v)
    numeric = central_difference_vjp(pool, [x, a], v)
    for got, want in zip(analytic, numeric):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_learnable_alpha_receives_a_gradient() -> None:
    alpha = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    pool = dl.nn.RobustPool("welsch", alpha=alpha)
    x = torch.randn(5, 20, dtype=torch.float64)
    pool(x).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)


def test_unknown_penalty_and_bad_alpha_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown penalty 'cauchy'"):
        dl.nn.RobustPool("cauchy")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        dl.nn.RobustPool("huber", alpha=-1.0)
