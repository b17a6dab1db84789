"""dl.Layer on unconstrained declarations: closed forms, batching, diagnostics, bad input."""

from __future__ import annotations

from functools import partial

import cvxpy as cp
import numpy as np
import pytest
import torch

import declopt as dl

# These tests specify the torch backend and the implicit backward; backend parity is tested in
# tests/test_backends.py.
TorchLayer = partial(dl.Layer, backend="torch")


def ridge_layer(n: int, d: int) -> dl.Layer:
    X = cp.Parameter((n, d), name="X")
    y = cp.Parameter(n, name="y")
    mu = cp.Parameter(nonneg=True, name="mu")
    beta = cp.Variable(d, name="beta")
    objective = 0.5 * cp.sum_squares(X @ beta - y) + 0.5 * mu * cp.sum_squares(beta)
    return TorchLayer(cp.Problem(cp.Minimize(objective)), [X, y, mu], [beta])


def test_ridge_regression_matches_closed_form_and_its_mu_derivative() -> None:
    torch.manual_seed(0)
    n, d = 12, 4
    X = torch.randn(3, n, d, dtype=torch.float64)
    y = torch.randn(3, n, dtype=torch.float64)
    mu = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (beta,) = ridge_layer(n, d)(X, y, mu)
    gram = X.transpose(-1, -2) @ X + mu.detach() * torch.eye(d, dtype=torch.float64)
    expected = torch.linalg.solve(gram, (X.transpose(-1, -2) @ y.unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(beta, expected, rtol=1e-10, atol=1e-10)
    v = torch.randn(3, d, dtype=torch.float64)
    (beta * v).sum().backward()
    dbeta_dmu = -torch.linalg.solve(gram, expected.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(mu.grad, (dbeta_dmu * v).sum(), rtol=1e-9, atol=1e-10)


def test_ridge_gradient_with_respect_to_data_matches_autograd_through_closed_form() -> None:
    torch.manual_seed(1)
    n, d = 10, 3
    X = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dtype=torch.float64, requires_grad=True)
    mu = torch.tensor(0.3, dtype=torch.float64)
    (beta,) = ridge_layer(n, d)(X, y, mu)
    beta.sum().backward()
    got = (X.grad.clone(), y.grad.clone())
    X2, y2 = X.detach().requires_grad_(), y.detach().requires_grad_()
    gram = X2.T @ X2 + mu * torch.eye(d, dtype=torch.float64)
    torch.linalg.solve(gram, X2.T @ y2).sum().backward()
    torch.testing.assert_close(got[0], X2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got[1], y2.grad, rtol=1e-8, atol=1e-10)


def test_every_problem_in_a_batch_equals_the_same_problem_solved_alone() -> None:
    torch.manual_seed(2)
    x = cp.Parameter(6)
    u = cp.Variable()
    problem = cp.Problem(
        cp.Minimize(cp.sum(1 - cp.exp(-cp.square(u - x) / 2)) + 0.01 * cp.square(u))
    )
    layer = TorchLayer(problem, [x], [u])
    X = torch.randn(7, 6, dtype=torch.float64) * 3
    X[3] *= 100  # one hard problem must not change the others
    (batched,) = layer(X)
    alone = torch.stack([layer(X[i])[0] for i in range(7)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-12)


def test_batch_dims_broadcast_and_shared_parameters_get_summed_gradients() -> None:
    x = cp.Parameter(3)
    s = cp.Parameter(pos=True)
    u = cp.Variable(3)
    layer = TorchLayer(
        cp.Problem(cp.Minimize(cp.sum_squares(u - x) + s * cp.sum_squares(u))), [x, s], [u]
    )
    X = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    S = torch.rand(4, dtype=torch.float64, requires_grad=True)
    (U,) = layer(X, S.unsqueeze(0).expand(2, 4).clone())
    assert U.shape == (2, 4, 3)
    torch.testing.assert_close(U, X / (1 + S.unsqueeze(-1)))
    shared = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (U2,) = layer(X, shared)
    assert U2.shape == (2, 1, 3)
    U2.sum().backward()
    torch.testing.assert_close(shared.grad, (-X.detach() / 1.5**2).sum())


def test_float32_in_float32_out_and_unbatched_call() -> None:
    x = cp.Parameter(4)
    u = cp.Variable(4)
    layer = TorchLayer(
        cp.Problem(cp.Minimize(cp.sum_squares(u - x) + cp.sum(cp.abs(u)) * 0)), [x], [u]
    )
    X = torch.randn(4, requires_grad=True)
    (U,) = layer(X)
    assert U.shape == (4,) and U.dtype == torch.float32
    torch.testing.assert_close(U, X.detach(), atol=1e-5, rtol=1e-5)


def test_info_reports_backend_and_per_problem_diagnostics() -> None:
    x = cp.Parameter(5)
    u = cp.Variable()
    layer = TorchLayer(cp.Problem(cp.Minimize(cp.sum(cp.logistic(u - x)) + cp.square(u))), [x], [u])
    layer(torch.randn(2, 3, 5, dtype=torch.float64))
    info = layer.info
    assert info.backend == "torch" and "torch" in info.reason
    for field in (info.converged, info.iterations, info.objective, info.kkt_residual):
        assert field.shape == (2, 3)
    assert info.converged.all() and (info.kkt_residual < 1e-9).all() and (info.iterations > 0).all()


def test_maximize_is_solved_and_reported_with_its_own_sign() -> None:
    x = cp.Parameter(2)
    u = cp.Variable(2)
    layer = TorchLayer(cp.Problem(cp.Maximize(x @ u - cp.sum_squares(u))), [x], [u])
    X = torch.tensor([1.0, -2.0], dtype=torch.float64)
    (U,) = layer(X)
    torch.testing.assert_close(U, X / 2)
    torch.testing.assert_close(layer.info.objective, (X**2).sum() / 4)


def test_large_problems_use_lbfgs_and_cg_and_agree_with_the_closed_form() -> None:
    torch.manual_seed(3)
    n = 300
    x = cp.Parameter(n)
    w = cp.Parameter(n, pos=True)
    u = cp.Variable(n)
    objective = cp.sum(cp.multiply(w, cp.square(u))) - x @ u
    layer = TorchLayer(cp.Problem(cp.Minimize(objective)), [x, w], [u])
    X = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    W = (torch.rand(2, n, dtype=torch.float64) + 0.5).requires_grad_()
    (U,) = layer(X, W)
    torch.testing.assert_close(U, X / (2 * W), rtol=1e-7, atol=1e-8)
    (U * torch.ones_like(U)).sum().backward()
    assert layer.info.backward.method == "cg"
    torch.testing.assert_close(X.grad, 1 / (2 * W.detach()), rtol=1e-6, atol=1e-8)


def test_nonconvergence_is_reported_in_info_and_by_a_warning() -> None:
    x = cp.Parameter(3)
    u = cp.Variable()
    layer = TorchLayer(cp.Problem(cp.Minimize(cp.sum(cp.exp(u - x)) - u)), [x], [u], max_iter=1)
    with pytest.warns(dl.NonConvergenceWarning, match="did not converge"):
        layer(torch.randn(4, 3, dtype=torch.float64) * 5)
    assert not layer.info.all_converged
    strict = TorchLayer(layer.program, on_failure="raise", max_iter=1)
    with pytest.raises(dl.SolverError, match="did not converge"):
        strict(torch.randn(4, 3, dtype=torch.float64) * 5)


def test_unbounded_problem_is_reported_not_silent() -> None:
    x = cp.Parameter()
    u = cp.Variable()
    layer = TorchLayer(cp.Problem(cp.Minimize(-cp.exp(u) + x * u)), [x], [u])
    with pytest.warns(dl.NonConvergenceWarning):
        layer(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert not layer.info.converged.any()


def test_custom_solver_is_used_and_backward_comes_from_the_declaration() -> None:
    x = cp.Parameter(3)
    u = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(u - x) + cp.sum_squares(u)))
    calls = []

    def closed_form(x: torch.Tensor) -> tuple[torch.Tensor]:
        calls.append(x.shape)
        return (x / 2,)

    layer = TorchLayer(problem, [x], [u], solver=closed_form)
    X = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (U,) = layer(X)
    U.sum().backward()
    assert calls == [(5, 3)] and layer.info.backend == "custom"
    torch.testing.assert_close(X.grad, torch.full_like(X, 0.5))


def test_wrong_custom_solver_answer_is_flagged() -> None:
    x = cp.Parameter(3)
    u = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(u - x)))
    layer = TorchLayer(problem, [x], [u], solver=lambda x: (x + 1,))
    with pytest.warns(dl.NonConvergenceWarning):
        layer(torch.randn(2, 3, dtype=torch.float64))


def test_initializers_pick_the_lowest_local_minimum() -> None:
    x = cp.Parameter()
    u = cp.Variable()
    # Tilted double well: from u = 0 descent leads to the shallow minimum near u = -1; the deeper
    # one is near u = 1.2 and is found only from the initializer's start.
    problem = cp.Problem(cp.Minimize(cp.square(cp.square(u) - 1) - 0.5 * cp.power(u, 3) + x * u))
    X = torch.tensor([0.1, 0.1], dtype=torch.float64)
    (U_plain,) = TorchLayer(problem, [x], [u])(X)
    assert (U_plain < -0.5).all()
    seeded = TorchLayer(problem, [x], [u], initializers=[lambda x: torch.full_like(x, 2.0)])
    (U,) = seeded(X)
    assert (U > 1.0).all() and seeded.info.converged.all()


class TestBadInput:
    @pytest.fixture
    def layer(self) -> dl.Layer:
        x = cp.Parameter(4, name="x")
        s = cp.Parameter(nonneg=True, name="s")
        u = cp.Variable(name="u")
        return TorchLayer(
            cp.Problem(cp.Minimize(cp.sum_squares(u - x) + s * cp.square(u))), [x, s], [u]
        )

    def test_wrong_trailing_shape_names_the_parameter(self, layer: dl.Layer) -> None:
        with pytest.raises(dl.InputError, match=r"parameter 'x' has declared shape \(4,\)"):
            layer(torch.randn(8, 5), torch.tensor(1.0))

    def test_mismatched_batch_shapes_are_named(self, layer: dl.Layer) -> None:
        with pytest.raises(dl.InputError, match=r"x: \(3,\), s: \(2,\)"):
            layer(torch.randn(3, 4), torch.rand(2))

    def test_nan_input_names_parameter_and_batch_index(self, layer: dl.Layer) -> None:
        X = torch.randn(3, 4)
        X[2, 1] = float("nan")
        with pytest.raises(
            dl.InputError, match=r"'x' contains NaN or Inf at batch index \(2,\), entry \(1,\)"
        ):
            layer(X, torch.tensor(1.0))

    def test_inf_input_is_rejected(self, layer: dl.Layer) -> None:
        with pytest.raises(dl.InputError, match="'s' contains NaN or Inf"):
            layer(torch.randn(4), torch.tensor(float("inf")))

    def test_sign_attribute_is_checked(self, layer: dl.Layer) -> None:
        with pytest.raises(dl.InputError, match="'s' is declared nonneg"):
            layer(torch.randn(4), torch.tensor(-1.0))

    def test_wrong_number_of_arguments(self, layer: dl.Layer) -> None:
        with pytest.raises(dl.InputError, match=r"takes 2 parameter tensor\(s\) \(x, s\)"):
            layer(torch.randn(4))

    def test_unsupported_atom_is_named_at_construction(self) -> None:
        x = cp.Parameter((2, 2))
        u = cp.Variable((2, 2))
        problem = cp.Problem(cp.Minimize(cp.sum_squares(u - x) + cp.tr_inv(u)))
        with pytest.raises(dl.UnsupportedAtomError, match="tr_inv"):
            TorchLayer(problem, [x], [u])

    def test_problem_without_variables_is_rejected(self) -> None:
        x = cp.Parameter(2)
        with pytest.raises(dl.DeclarationError, match="variable"):
            TorchLayer(cp.Problem(cp.Minimize(cp.sum_squares(x))), [x], [])

    def test_unknown_backend_lists_the_registered_ones(self) -> None:
        x = cp.Parameter(2)
        u = cp.Variable(2)
        with pytest.raises(ValueError, match=r"unknown backend 'gurobi'.*torch"):
            TorchLayer(cp.Problem(cp.Minimize(cp.sum_squares(u - x))), [x], [u], backend="gurobi")


def test_numpy_and_python_numbers_are_accepted_as_shared_parameters() -> None:
    x = cp.Parameter(2)
    s = cp.Parameter(pos=True)
    u = cp.Variable(2)
    layer = TorchLayer(
        cp.Problem(cp.Minimize(cp.sum_squares(u - x) + s * cp.sum_squares(u))), [x, s], [u]
    )
    (U,) = layer(np.array([2.0, 4.0]), 1.0)
    torch.testing.assert_close(U, torch.tensor([1.0, 2.0], dtype=U.dtype))
