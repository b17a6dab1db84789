"""What the torch front end compiles beyond ==/<=/>= and the plain leaves: ``cp.SOC``
constraints, ``geo_mean``, symmetric variables and parameters. Expected values are closed forms
written here, checked against cvxpylayers and central finite differences."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import cvxpy as cp
import numpy as np
import pytest
import torch

import declopt as dl
from declopt.frontend import UnsupportedAtomError, compile_problem

F64 = torch.float64
WEIGHTS = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def outputs_and_grad(layer: dl.Layer, value: np.ndarray, weights: torch.Tensor):
    """The layer's first output at ``value`` and the gradient of ``<weights, output>``."""
    x = torch.tensor(value, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(x)[0]
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach().numpy(), grad.numpy()


def central_differences(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, h: float = 1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return grad


# ---------------------------------------------------------------------------------------------
# cp.SOC


def prox_norm_problem():
    """min s + ||x - a||^2 s.t. ||x|| <= s, i.e. the prox of ||.||_2 with step 1/2."""
    a = cp.Parameter(3)
    x, s = cp.Variable(3), cp.Variable()
    return cp.Problem(cp.Minimize(s + cp.sum_squares(x - a)), [cp.SOC(s, x)]), a, x


def prox_norm(a: np.ndarray) -> np.ndarray:
    # Stationarity in x: 2(x - a) + x / ||x|| = 0 (s = ||x|| at the optimum), so x = c a with
    # c = 1 - 1 / (2 ||a||) when ||a|| > 1/2; else x = 0 (the apex).
    return max(0.0, 1.0 - 1.0 / (2.0 * np.linalg.norm(a))) * a


SOC_POINTS = {
    "outside_the_apex": np.array([1.0, 2.0, -0.5]),
    "at_the_apex": np.array([0.2, 0.1, -0.1]),
}


@pytest.mark.parametrize("backend", ["torch", "cone", "cvxpylayers"])
@pytest.mark.parametrize("point", list(SOC_POINTS))
def test_soc_prox_of_the_norm_matches_the_closed_form(backend: str, point: str) -> None:
    problem, a, x = prox_norm_problem()
    value = SOC_POINTS[point]
    layer = dl.Layer(problem, [a], [x], backend=backend)
    out, grad = outputs_and_grad(layer, value, WEIGHTS)
    np.testing.assert_allclose(out, prox_norm(value), atol=1e-6)
    expected = central_differences(lambda v: prox_norm(v) @ WEIGHTS.numpy(), value)
    np.testing.assert_allclose(grad, expected, atol=1e-5)


@pytest.mark.parametrize("backend", ["cone", "cvxpylayers"])
def test_two_norm_origin_in_an_objective_on_an_inexact_backend(backend: str) -> None:
    """``argmin |x| + |x - a|^2 = 0`` for ``|a| <= 1/2``, with zero gradient: an interior point
    stops ~1e-11 from the origin, where ``|x|`` itself is ~1e-11; the kink is still held,
    because the test is also relative to the answer's resolution (``Tolerances.resolution``).
    (Before it, the cone backend's gradient here was ``[1, 2, 3]``. What is left, ~1e-6, is the
    norm's curvature ``1/|x| ~ 1e11`` at the inexact answer in the KKT solve.)"""
    a = cp.Parameter(3)
    x = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.norm(x, 2) + cp.sum_squares(x - a)))
    value = SOC_POINTS["at_the_apex"]
    out, grad = outputs_and_grad(dl.Layer(problem, [a], [x], backend=backend), value, WEIGHTS)
    np.testing.assert_allclose(out, prox_norm(value), atol=1e-6)
    np.testing.assert_allclose(grad, np.zeros(3), atol=1e-5)


def test_soc_problem_compiles_and_auto_takes_it() -> None:
    problem, a, x = prox_norm_problem()
    layer = dl.Layer(problem, [a], [x])
    assert layer.program.has_functions and layer.backend_name in ("cone", "torch")
    program = layer.program
    assert program.inequalities is not None and program.kinks is not None  # the apex


@pytest.mark.parametrize("backend", ["torch", "cone"])
def test_soc_matrix_cones_along_both_axes_match_cvxpylayers(backend: str) -> None:
    A = cp.Parameter((2, 3))
    X, t, r = cp.Variable((2, 3)), cp.Variable(3), cp.Variable(2)
    problem = cp.Problem(
        cp.Minimize(cp.sum(t) + cp.sum(r) + cp.sum_squares(X - A)),
        [cp.SOC(t, X, axis=0), cp.constraints.SOC(r, X, axis=1)],
    )
    value = np.array([[1.0, 2.0, -0.5], [3.0, 0.2, 1.0]])
    weights = torch.arange(1.0, 7.0, dtype=F64).reshape(2, 3)
    out, grad = outputs_and_grad(dl.Layer(problem, [A], [X], backend=backend), value, weights)
    ref_layer = dl.Layer(problem, [A], [X], backend="cvxpylayers")
    ref, ref_grad = outputs_and_grad(ref_layer, value, weights)
    np.testing.assert_allclose(out, ref, atol=5e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=5e-4)
    # The rows are the cones: norm of each column <= t, of each row <= r.
    x_star = out
    layer = dl.Layer(problem, [A], [X, t, r], backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, t_star, r_star = (o.detach().numpy() for o in layer(torch.tensor(value, dtype=F64)))
    np.testing.assert_allclose(np.linalg.norm(x_star, axis=0), t_star, atol=5e-5)
    np.testing.assert_allclose(np.linalg.norm(x_star, axis=1), r_star, atol=5e-5)


def test_soc_inequality_rows_are_norm_minus_t() -> None:
    X, t = cp.Variable((2, 3)), cp.Variable(2)
    s, y = cp.Variable(), cp.Variable(4)
    problem = cp.Problem(cp.Minimize(cp.sum(t) + s), [cp.SOC(t, X, axis=1), cp.SOC(s, y), X >= 0])
    program = compile_problem(problem, [], [X, t, s, y])
    rng = np.random.default_rng(0)
    u = torch.tensor(rng.normal(size=6 + 2 + 1 + 4), dtype=F64)
    g = program.inequalities((), u).numpy()
    Xv, tv, sv, yv = u[:6].reshape(2, 3).numpy(), u[6:8].numpy(), u[8].item(), u[9:].numpy()
    expected = [*(np.linalg.norm(Xv, axis=1) - tv), np.linalg.norm(yv) - sv, *(-Xv.reshape(-1))]
    np.testing.assert_allclose(g, expected, rtol=1e-12)


def test_exponential_cone_stays_unsupported() -> None:
    x, y, z = cp.Variable(), cp.Variable(), cp.Variable()
    problem = cp.Problem(cp.Minimize(z - x), [cp.constraints.ExpCone(x, y, z), y == 1])
    with pytest.raises(UnsupportedAtomError, match="ExpCone"):
        compile_problem(problem, [], [x, y, z])


# ---------------------------------------------------------------------------------------------
# geo_mean


def geo_mean_problem(p):
    """max geo_mean(x, p) s.t. sum(x) <= b, x >= 0: x_i = w_i b (w = p / sum(p))."""
    b = cp.Parameter(pos=True)
    x = cp.Variable(len(p))
    problem = cp.Problem(cp.Maximize(cp.geo_mean(x, p)), [cp.sum(x) <= b, x >= 0])
    return problem, b, x


@pytest.mark.parametrize("backend", ["torch", "cvxpylayers"])
def test_geo_mean_allocation_matches_the_closed_form(backend: str) -> None:
    p = [1.0, 2.0, 5.0]
    w = np.array(p) / sum(p)
    problem, b, x = geo_mean_problem(p)
    out, grad = outputs_and_grad(dl.Layer(problem, [b], [x], backend=backend), 2.0, WEIGHTS)
    np.testing.assert_allclose(out, w * 2.0, atol=1e-5)
    # d x / d b = w; central differences of the closed form say the same.
    fd = central_differences(lambda v: (w * v) @ WEIGHTS.numpy(), np.array(2.0))
    np.testing.assert_allclose(grad, w @ WEIGHTS.numpy(), atol=1e-5)
    np.testing.assert_allclose(grad, fd, atol=1e-6)


def test_geo_mean_with_a_parameter_inside_matches_cvxpylayers_and_differences() -> None:
    c = cp.Parameter(3)
    x = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - c) - cp.geo_mean(x, [1, 2, 1])), [x >= 0.1])
    value = np.array([1.0, 0.5, 2.0])
    torch_layer = dl.Layer(problem, [c], [x], backend="torch")
    out, grad = outputs_and_grad(torch_layer, value, WEIGHTS)
    ref, ref_grad = outputs_and_grad(
        dl.Layer(problem, [c], [x], backend="cvxpylayers"), value, WEIGHTS
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-4)

    def solve(v: np.ndarray) -> float:
        with torch.no_grad():
            return float(torch_layer(torch.tensor(v, dtype=F64))[0] @ WEIGHTS)

    np.testing.assert_allclose(grad, central_differences(solve, value, 1e-5), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# symmetric variables and parameters


def symmetric_projection_problem(n: int = 3):
    """min ||X - P||_F^2 over symmetric X with trace(X) = b: X = sym(P) + (b - tr P) / n I."""
    P, b = cp.Parameter((n, n)), cp.Parameter()
    X = cp.Variable((n, n), symmetric=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [cp.trace(X) == b])
    return problem, P, b, X


def symmetric_projection(P: np.ndarray, b: float) -> np.ndarray:
    n = P.shape[0]
    return (P + P.T) / 2 + (b - np.trace(P)) / n * np.eye(n)


@pytest.mark.parametrize("backend", ["torch", "cvxpylayers", "auto"])
def test_symmetric_variable_projection_matches_the_closed_form(backend: str) -> None:
    problem, P, b, X = symmetric_projection_problem()
    value = np.random.default_rng(1).normal(size=(3, 3))
    weights = torch.arange(1.0, 10.0, dtype=F64).reshape(3, 3)
    layer = dl.Layer(problem, [P, b], [X], backend=backend)
    Pt = torch.tensor(value, dtype=F64, requires_grad=True)
    bt = torch.tensor(1.5, dtype=F64, requires_grad=True)
    (Xs,) = layer(Pt, bt)
    gP, gb = torch.autograd.grad((Xs * weights).sum(), (Pt, bt))
    np.testing.assert_allclose(Xs.detach().numpy(), symmetric_projection(value, 1.5), atol=1e-6)

    def loss(v: np.ndarray) -> float:
        return float((symmetric_projection(v, 1.5) * weights.numpy()).sum())

    np.testing.assert_allclose(gP.numpy(), central_differences(loss, value), atol=1e-5)
    fd_b = central_differences(
        lambda v: (symmetric_projection(value, v) * weights.numpy()).sum(), np.array(1.5)
    )
    np.testing.assert_allclose(gb.numpy(), fd_b, atol=1e-5)


def test_symmetric_variable_adds_the_symmetry_rows_and_auto_avoids_the_cone_backend() -> None:
    problem, P, b, X = symmetric_projection_problem()
    program = compile_problem(problem, [P, b], [X])
    u = torch.arange(9.0, dtype=F64)
    h = program.equalities((torch.zeros(3, 3, dtype=F64), torch.tensor(0.0, dtype=F64)), u)
    M = u.reshape(3, 3).numpy()
    rows, cols = np.triu_indices(3, k=1)
    np.testing.assert_allclose(h.numpy(), [np.trace(M), *(M[rows, cols] - M[cols, rows])])
    with pytest.raises(ValueError, match=r"rewrites variable.*symmetric"):
        dl.Layer(problem, [P, b], [X], backend="cone")
    layer = dl.Layer(problem, [P, b], [X])
    assert layer.backend_name in ("cvxpylayers", "torch"), layer.reason


def test_symmetric_parameter_is_checked_and_named() -> None:
    S = cp.Parameter((2, 2), symmetric=True, name="S")
    x = cp.Variable(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + cp.sum(S @ x)))
    layer = dl.Layer(problem, [S], [x], backend="torch")
    M = torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=F64)
    (out,) = layer(M)
    torch.testing.assert_close(out, -M.sum(0) / 2)
    # Rounding of a symmetric matrix computed in the dtype passes ...
    A = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    layer(A @ A.transpose(-1, -2) / 3)
    # ... a matrix that is not symmetric does not, in any batch member.
    bad = torch.stack([M, M + torch.tensor([[0.0, 1e-3], [0.0, 0.0]], dtype=F64)])
    with pytest.raises(ValueError, match=r"'S' is declared symmetric.*batch index \(1,\)"):
        layer(bad)
    with pytest.raises(dl.InputError, match="'S'"):
        dl.Layer(problem, [S], [x], backend="cvxpylayers")(bad)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["PSD", "NSD"])
def test_semidefinite_variables_compile_as_symmetric_with_their_cone(sign: float) -> None:
    """``Variable(PSD=True)`` / ``NSD=True``: the Frobenius projection of ``C`` onto the
    PSD (NSD) matrices, the symmetric part's eigenvalues clipped at 0, on the torch backend and
    on cvxpylayers (whose stand-in for the variable stays symmetric)."""
    X = cp.Variable((3, 3), name="Xvar", **{"PSD" if sign > 0 else "NSD": True})
    C = cp.Parameter((3, 3))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - C)))
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))
    c = q @ torch.diag(torch.tensor([-1.0, 0.5, 2.0], dtype=F64)) @ q.T
    c = c + 0.2 * torch.triu(torch.ones(3, 3, dtype=F64), 1)
    lam, v = torch.linalg.eigh((c + c.T) / 2)
    clipped = lam.clamp(min=0) if sign > 0 else lam.clamp(max=0)
    expected = v @ torch.diag(clipped) @ v.T
    for backend in ("torch", "cvxpylayers"):
        (x,) = dl.Layer(problem, [C], [X], backend=backend)(c)
        assert torch.allclose(x, expected, atol=1e-6 if backend == "cvxpylayers" else 1e-10)


def test_diagonal_variables_stay_refused() -> None:
    X = cp.Variable((2, 2), name="Xvar", diag=True)
    C = cp.Parameter((2, 2))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - C)))
    with pytest.raises(UnsupportedAtomError, match=r"Xvar.*diag"):
        compile_problem(problem, [C], [X])
    program = dl.Layer(problem, [C], [X]).program
    assert not program.has_functions and "diag" in str(program.frontend_error)
