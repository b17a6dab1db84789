"""Atom rules: the completeness check, kink sites of every nonsmooth atom (ties for any number of
arguments, zeros), per-row gating of kinks inside inequalities, and the smoothed forms.

Expected values come from closed forms written here with numpy/torch, never from declopt."""

from __future__ import annotations

import math
from collections.abc import Callable

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import declopt as dl
from declopt.frontend.atoms import RULES, AtomRule, AtomRuleError, check_rules

DT = torch.float64


def jacobian(layer: dl.Layer, x: np.ndarray) -> np.ndarray:
    """``du/dx`` of a one-parameter layer, by backpropagating unit vectors."""
    n = x.size
    rows = []
    for i in range(n):
        X = torch.tensor(x, dtype=DT, requires_grad=True)
        (U,) = layer(X)
        (g,) = torch.autograd.grad(U.reshape(-1)[i], X)
        rows.append(g.numpy())
    return np.stack(rows)


def capped_simplex_projection(x: np.ndarray, k: float) -> np.ndarray:
    """Projection onto ``{0 <= w <= 1, sum w = k}``: ``clip(x - tau, 0, 1)`` by bisection."""
    lo, hi = x.min() - 1.0, x.max()
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        if np.clip(x - tau, 0, 1).sum() > k:
            lo = tau
        else:
            hi = tau
    return np.clip(x - 0.5 * (lo + hi), 0, 1)


def prox_sum_largest(x: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Prox of ``sum_largest(., k)`` (Moreau: ``x`` minus the projection onto its dual set) and
    its Jacobian ``I - dP``, ``dP = I - 11^T/|F|`` on the free entries ``F`` of the projection."""
    w = capped_simplex_projection(x, k)
    free = (w > 1e-12) & (w < 1 - 1e-12)
    dp = np.zeros((x.size, x.size))
    f = np.flatnonzero(free)
    if f.size:
        dp[np.ix_(f, f)] = np.eye(f.size) - 1.0 / f.size
    return x - w, np.eye(x.size) - dp


def torch_prox_sum_largest(k: float) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
    def solve(x: torch.Tensor) -> tuple[torch.Tensor]:
        flat = x.detach().reshape(-1, x.shape[-1]).numpy()
        u = np.stack([prox_sum_largest(row, k)[0] for row in flat]).reshape(x.shape)
        return (torch.tensor(u, dtype=x.dtype),)

    return solve


def prox_layer(regulariser: Callable[[cp.Variable], cp.Expression], n: int, **kwargs) -> dl.Layer:
    x = cp.Parameter(n)
    u = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x) + regulariser(u)))
    return dl.Layer(problem, [x], [u], **kwargs)


def exact(k: float = 1.0, sign: float = 1.0) -> dict:
    """An exact custom solver for the prox of ``sum_largest(sign u, k)`` (``sign = -1``: of
    ``-sum_smallest(u, k)``), differentiated by the implicit backward."""
    base = torch_prox_sum_largest(k)

    def solve(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (sign * base(sign * x)[0],)

    return {"solver": solve, "backward": "implicit"}


BACKENDS = [pytest.param({"backend": "torch"}, id="torch"), pytest.param(None, id="exact")]

# (regulariser, x, k of the equivalent sum_largest, sign): every one is max(u) (or max(-u)) at
# a tie of two entries, except the sum_largest cases.
TIES = {
    "max": (lambda u: cp.max(u), [2.0, 1.8, 0.0], 1.0, 1.0),
    "sum_largest_1": (lambda u: cp.sum_largest(u, 1), [2.0, 1.8, 0.0], 1.0, 1.0),
    "cummax_last": (lambda u: cp.cummax(u)[2], [2.0, 1.8, 0.0], 1.0, 1.0),
    "neg_sum_smallest_1": (lambda u: -cp.sum_smallest(u, 1), [-2.0, -1.8, 0.0], 1.0, -1.0),
    "maximum_first_third": (lambda u: cp.maximum(u[0], u[1], u[2]), [2.0, 0.0, 1.8], 1.0, 1.0),
    "sum_largest_2": (lambda u: cp.sum_largest(u, 2), [3.0, 2.0, 2.0, 0.0], 2.0, 1.0),
    "sum_largest_fractional": (lambda u: cp.sum_largest(u, 1.5), [3.0, 2.0, 2.0, 0.0], 1.5, 1.0),
}


@pytest.mark.parametrize("options", BACKENDS)
@pytest.mark.parametrize("name", list(TIES))
def test_tie_jacobian_matches_closed_form(name: str, options: dict | None) -> None:
    regulariser, x, k, sign = TIES[name]
    x = np.asarray(x)
    layer = prox_layer(regulariser, x.size, **(options or exact(k, sign)))
    expected_u, expected_jac = prox_sum_largest(sign * x, k)
    expected_u = sign * expected_u
    (U,) = layer(torch.tensor(x, dtype=DT))
    np.testing.assert_allclose(U.numpy(), expected_u, atol=1e-7)
    assert np.sum(np.isclose(expected_u, np.sort(expected_u)[::-1][int(k)])) >= 2  # on a tie
    np.testing.assert_allclose(jacobian(layer, x), expected_jac, atol=1e-6)


def test_tie_jacobian_of_max_is_averaged_over_the_tied_entries() -> None:
    layer = prox_layer(lambda u: cp.max(u), 3, **exact())
    np.testing.assert_allclose(
        jacobian(layer, np.array([2.0, 1.8, 0.0]))[0], [0.5, 0.5, 0.0], atol=1e-10
    )


AWAY = {
    "cummax_last": (lambda u: cp.cummax(u)[2], [2.0, 0.5, 0.0]),
    "maximum_three": (lambda u: cp.maximum(u[0], u[1], u[2]), [2.0, 0.0, 0.5]),
    "sum_largest_2": (lambda u: cp.sum_largest(u, 2), [3.0, 0.5, 0.3, -1.0]),
}


@pytest.mark.parametrize("options", BACKENDS)
@pytest.mark.parametrize("name", list(AWAY))
def test_away_from_ties_keeps_the_smooth_derivative(name: str, options: dict | None) -> None:
    regulariser, x = AWAY[name]
    x = np.asarray(x)
    layer = prox_layer(regulariser, x.size, **(options or exact(2.0 if "2" in name else 1.0)))
    expected_u, expected_jac = prox_sum_largest(x, 2.0 if "2" in name else 1.0)
    (U,) = layer(torch.tensor(x, dtype=DT))
    np.testing.assert_allclose(U.numpy(), expected_u, atol=1e-7)
    np.testing.assert_allclose(jacobian(layer, x), expected_jac, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# zeros: soft thresholding and its one-sided relatives


def soft_threshold(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * (x.abs() - 1).clamp(min=0)


def prox_pos(x: torch.Tensor) -> torch.Tensor:  # prox of sum(max(u, 0))
    return torch.where(x > 1, x - 1, torch.where(x < 0, x, torch.zeros_like(x)))


def prox_neg(x: torch.Tensor) -> torch.Tensor:  # prox of sum(max(-u, 0))
    return -prox_pos(-x)


ZEROS = {
    "abs": (lambda u: cp.sum(cp.abs(u)), soft_threshold, [2.0, 0.0, -0.5, -3.0]),
    "norm1": (lambda u: cp.norm1(u), soft_threshold, [2.0, 0.0, -0.5, -3.0]),
    "pos": (lambda u: cp.sum(cp.pos(u)), prox_pos, [2.0, 0.5, -1.0]),
    "neg": (lambda u: cp.sum(cp.neg(u)), prox_neg, [-2.0, -0.5, 1.0]),
}


def closed_form_jacobian(prox: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray):
    return torch.autograd.functional.jacobian(prox, torch.tensor(x, dtype=DT)).numpy()


@pytest.mark.parametrize("options", BACKENDS)
@pytest.mark.parametrize("name", list(ZEROS))
def test_zero_kink_jacobian_matches_closed_form(name: str, options: dict | None) -> None:
    regulariser, prox, x = ZEROS[name]
    x = np.asarray(x)
    solver = {"solver": lambda t: (prox(t),), "backward": "implicit"}
    layer = prox_layer(regulariser, x.size, **(options or solver))
    (U,) = layer(torch.tensor(x, dtype=DT))
    np.testing.assert_allclose(U.numpy(), prox(torch.tensor(x, dtype=DT)).numpy(), atol=1e-7)
    np.testing.assert_allclose(jacobian(layer, x), closed_form_jacobian(prox, x), atol=1e-6)


ONE_SIDED = {
    "abs_at_threshold": (lambda u: cp.sum(cp.abs(u)), soft_threshold, [1.0, 0.3]),
    "pos_at_zero": (lambda u: cp.sum(cp.pos(u)), prox_pos, [0.0, 2.0]),
    "max_at_release": (lambda u: cp.max(u), None, [2.0, 1.0]),
}


def prox_max(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(prox_sum_largest(x.numpy(), 1.0)[0], dtype=DT)


@pytest.mark.parametrize("name", list(ONE_SIDED))
def test_one_sided_kink_derivative_is_one_of_the_one_sided_differences(name: str) -> None:
    """Where the prox has only one-sided derivatives (the solution sits on a kink with a zero
    multiplier), the derivative is one of them."""
    regulariser, prox, x = ONE_SIDED[name]
    prox = prox or prox_max
    x = np.asarray(x)
    layer = prox_layer(regulariser, x.size, solver=lambda t: (prox(t),), backward="implicit")
    got = jacobian(layer, x)
    h = 1e-6
    for j in range(x.size):
        e = np.eye(x.size)[j] * h
        f = [prox(torch.tensor(x + s * e, dtype=DT)).numpy() for s in (-2, -1, 0, 1, 2)]
        right = (-3 * f[2] + 4 * f[3] - f[4]) / (2 * h)
        left = (3 * f[2] - 4 * f[1] + f[0]) / (2 * h)
        col = got[:, j]
        assert np.allclose(col, right, atol=1e-5) or np.allclose(col, left, atol=1e-5), (j, col)


# ---------------------------------------------------------------------------------------------
# kinks inside inequalities are gated per row


@pytest.mark.parametrize("backend", [None, "torch"])
def test_abs_kink_in_an_inequality_is_gated_by_its_own_row(backend: str | None) -> None:
    x = cp.Parameter(3)
    u = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.abs(u) <= 1])
    if backend is None:
        options = {"solver": lambda t: (t.clamp(-1, 1),), "backward": "implicit"}
    else:
        options = {"backend": backend}
    layer = dl.Layer(problem, [x], [u], **options)
    point = np.array([3.0, 0.0, 0.5])
    (U,) = layer(torch.tensor(point, dtype=DT))
    np.testing.assert_allclose(U.numpy(), [1.0, 0.0, 0.5], atol=1e-7)
    np.testing.assert_allclose(jacobian(layer, point), np.diag([0.0, 1.0, 1.0]), atol=1e-6)


def test_kink_in_a_nonelementwise_inequality_is_gated_by_the_rows_that_read_it() -> None:
    """``max(abs(X), axis=1) <= 1``: row 0 is active, row 1 (with a zero entry) is not; the zero
    of row 1 is not a kink of the active row, so its derivative stays 1."""
    x = cp.Parameter((2, 2))
    u = cp.Variable((2, 2))
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.max(cp.abs(u), axis=1) <= 1])
    layer = dl.Layer(problem, [x], [u], solver=lambda t: (t.clamp(-1, 1),), backward="implicit")
    X = torch.tensor([[3.0, 0.5], [0.0, 0.5]], dtype=DT, requires_grad=True)
    (U,) = layer(X)
    (g,) = torch.autograd.grad(U[1, 0], X)
    np.testing.assert_allclose(g.numpy(), [[0.0, 0.0], [1.0, 0.0]], atol=1e-8)


# ---------------------------------------------------------------------------------------------
# the completeness check


def test_completeness_check_refuses_a_nonsmooth_rule_without_kinks() -> None:
    fake = AtomRule(lambda expr: torch.abs, smooth=False)
    with pytest.raises(AtomRuleError, match="FakeAtom"):
        check_rules({type("FakeAtom", (), {}): fake})


def test_completeness_check_refuses_a_nonsmooth_rule_without_smoothing() -> None:
    fake = AtomRule(lambda expr: torch.abs, smooth=False, kinks=lambda expr: None)
    with pytest.raises(AtomRuleError, match="smoothing"):
        check_rules({type("FakeAtom", (), {}): fake})


def test_every_atom_in_the_table_passes_the_completeness_check() -> None:
    check_rules(RULES)
    nonsmooth = {cls.__name__ for cls, rule in RULES.items() if not rule.smooth}
    assert nonsmooth == {
        "abs",
        "norm1",
        "maximum",
        "minimum",
        "max",
        "min",
        "norm_inf",
        "Pnorm",
        "PnormApprox",
        "sum_largest",
        "cummax",
        "lambda_max",
        "sigma_max",
        "normNuc",
    }


# ---------------------------------------------------------------------------------------------
# smoothed atoms


def _vector(n: int):
    return arrays(np.float64, n, elements=st.floats(-3, 3, allow_nan=False))


MAX_TYPE = {
    "abs": (lambda v: cp.abs(v), lambda a: np.abs(a)),
    "norm1": (lambda v: cp.norm1(v), lambda a: np.abs(a).sum()),
    "norm_inf": (lambda v: cp.norm_inf(v), lambda a: np.abs(a).max()),
    "max": (lambda v: cp.max(v), lambda a: a.max()),
    "pnorm2": (lambda v: cp.norm(v, 2), lambda a: np.linalg.norm(a)),
    "pnorm3": (lambda v: cp.pnorm(v, 3), lambda a: (np.abs(a) ** 3).sum() ** (1 / 3)),
    "sum_largest_2": (lambda v: cp.sum_largest(v, 2), lambda a: np.sort(a)[::-1][:2].sum()),
    "sum_largest_2.5": (
        lambda v: cp.sum_largest(v, 2.5),
        lambda a: np.sort(a)[::-1][:2].sum() + 0.5 * np.sort(a)[::-1][2],
    ),
    "cummax": (lambda v: cp.cummax(v), lambda a: np.maximum.accumulate(a)),
    "maximum3": (lambda v: cp.maximum(v[0], v[1], v[2]), lambda a: a[:3].max()),
}
MIN_TYPE = {
    "min": (lambda v: cp.min(v), lambda a: a.min()),
    "minimum3": (lambda v: cp.minimum(v[0], v[1], v[2]), lambda a: a[:3].min()),
}


def smoothed_value(build: Callable, a: np.ndarray, mu: float) -> np.ndarray:
    v = cp.Variable(a.size)
    expr = build(v)
    problem = cp.Problem(cp.Minimize(cp.sum(expr)))
    program = dl.frontend.compile_problem(problem, [], [v]).smoothed
    mu_t = torch.tensor(mu, dtype=DT)
    return program.objective((mu_t,), torch.tensor(a, dtype=DT)).numpy()


@pytest.mark.parametrize("name", list(MAX_TYPE))
@settings(max_examples=25, deadline=None)
@given(a=_vector(5), mu=st.sampled_from([1e-1, 1e-2, 1e-4]))
def test_smoothed_max_type_atom_lies_below_within_order_mu(name: str, a, mu: float) -> None:
    build, reference = MAX_TYPE[name]
    exact_value = float(np.sum(reference(a)))
    smoothed = float(smoothed_value(build, a, mu))
    slack = 1e-12 * (1 + abs(exact_value))
    assert smoothed <= exact_value + slack
    assert exact_value - smoothed <= 2 * a.size * a.size * mu + slack


@pytest.mark.parametrize("name", list(MIN_TYPE))
@settings(max_examples=25, deadline=None)
@given(a=_vector(5), mu=st.sampled_from([1e-1, 1e-2, 1e-4]))
def test_smoothed_min_type_atom_lies_above_within_order_mu(name: str, a, mu: float) -> None:
    build, reference = MIN_TYPE[name]
    exact_value = float(np.sum(reference(a)))
    smoothed = float(smoothed_value(build, a, mu))
    slack = 1e-12 * (1 + abs(exact_value))
    assert smoothed >= exact_value - slack
    assert smoothed - exact_value <= 2 * a.size * mu + slack


def test_smoothed_sum_largest_is_exact_when_all_entries_tie() -> None:
    a = np.full(5, 0.7)
    assert math.isclose(smoothed_value(lambda v: cp.sum_largest(v, 2), a, 0.1), 1.4, rel_tol=1e-12)


def test_polynomial_degrees_come_from_the_atom_rules() -> None:
    import declopt as dl
    from declopt.frontend.atoms import RULES
    from declopt.frontend.atoms.base import polynomial_degree

    x, a = cp.Parameter(4), cp.Parameter(pos=True)
    A = cp.Parameter((3, 4))
    u, y = cp.Variable(4), cp.Variable()
    degrees = {
        "parameters only": (cp.sum(cp.exp(x)) * a, 0),
        "affine": (A @ u - x[:3], 1),
        "least squares": (cp.sum_squares(A @ u - x[:3]) + a * cp.sum_squares(u), 2),
        "quadratic pooling": (cp.sum(dl.penalties.quadratic(y - x)), 2),
        "products": (cp.sum(cp.multiply(u, u - x)) + y * cp.sum(u), 2),
        "quotient by a parameter": (cp.sum(cp.square(u) / a), 2),
        "quad_over_lin by a constant": (cp.quad_over_lin(u, 2.0), 2),
        "cubic": (cp.sum(cp.power(u, 3)), 3),
        "quotient by a variable": (cp.sum(u / y), None),
        "huber (piecewise)": (cp.sum(cp.huber(u, 1.0)), None),
        "abs": (cp.sum(cp.abs(u)), None),
        "welsch": (cp.sum(dl.penalties.welsch(y - x, a)), None),
        "fractional power": (cp.sum(cp.power(u + 2, 1.5)), None),
    }
    for name, (expr, want) in degrees.items():
        assert polynomial_degree(expr, RULES) == want, name
