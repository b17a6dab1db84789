"""Implicit gradients of random unconstrained declarations against central finite differences."""

from __future__ import annotations

import warnings
from functools import partial

import cvxpy as cp
import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import declopt as dl
from tests.helpers import batched_central_difference_vjp, implicit_vjp_of

TorchLayer = partial(dl.Layer, backend="torch")
F64 = torch.float64


def random_problem(terms: list[str], m: int, n: int) -> tuple[cp.Problem, list, cp.Variable]:
    """A smooth objective in ``u`` built from the chosen terms; parameters enter nonlinearly."""
    A = cp.Parameter((n, m), name="A")
    b = cp.Parameter(n, name="b")
    s = cp.Parameter(pos=True, name="s")
    u = cp.Variable(m, name="u")
    objective = 0.5 * cp.sum_squares(A @ u - b) + 0.5 * s * cp.sum_squares(u)
    pieces = {
        "logistic": cp.sum(cp.logistic(cp.multiply(b[:m], u))),
        "lse": cp.log_sum_exp(A @ u),
        "exp": s * cp.sum(cp.exp(u / 4)),
        "welsch": cp.sum(1 - cp.exp(-cp.square(u - b[:m]) / 2)),  # nonconvex
        "quad_over_lin": cp.quad_over_lin(u, s + 1),
        "power": cp.sum(cp.power(cp.square(u) + 1, 1.5)),
    }
    for term in terms:
        objective = objective + pieces[term]
    return cp.Problem(cp.Minimize(objective)), [A, b, s], u


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    terms=st.lists(
        st.sampled_from(["logistic", "lse", "exp", "welsch", "quad_over_lin", "power"]),
        max_size=3,
        unique=True,
    ),
    m=st.integers(1, 4),
)
def test_random_unconstrained_declarations_match_central_differences(
    seed: int, terms: list[str], m: int
) -> None:
    n = m + 2
    problem, params, u = random_problem(terms, m, n)
    layer = TorchLayer(problem, params, [u])
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, m, generator=g, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    s = torch.rand((), generator=g, dtype=F64) + 0.5
    v = torch.randn(m, generator=g, dtype=F64)
    with torch.no_grad():
        layer(A, b, s)
    assert layer.info.converged.all() and layer.info.kkt_residual.max() < 1e-8

    def run(*t: torch.Tensor) -> torch.Tensor:
        return layer(*t)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.GradientWarning)  # a strict minimum: no flags
        analytic = implicit_vjp_of(run, [A, b, s], v)
    numeric = batched_central_difference_vjp(run, [A, b, s], v)
    for got, want in zip(analytic, numeric):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_matrix_variables_and_reshapes_differentiate_correctly(seed: int) -> None:
    """Column-major reshape/vec and matrix variables in the declaration, against differences."""
    P = cp.Parameter((3, 2), name="P")
    U = cp.Variable((3, 2), name="U")
    w = cp.Parameter(6, name="w")
    objective = (
        0.5 * cp.sum_squares(U - P)
        + cp.sum(cp.exp(cp.multiply(w, cp.vec(U)) / 3))
        + 0.1 * cp.sum_squares(cp.reshape(U, (2, 3), order="F") @ P)
    )
    layer = TorchLayer(cp.Problem(cp.Minimize(objective)), [P, w], [U])
    g = torch.Generator().manual_seed(seed)
    Pv = torch.randn(3, 2, generator=g, dtype=F64)
    wv = torch.randn(6, generator=g, dtype=F64)
    v = torch.randn(3, 2, generator=g, dtype=F64)

    def run(*t: torch.Tensor) -> torch.Tensor:
        return layer(*t)[0]

    analytic = implicit_vjp_of(run, [Pv, wv], v)
    numeric = batched_central_difference_vjp(run, [Pv, wv], v)
    for got, want in zip(analytic, numeric):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
