"""The generic torch backend on declarations with kinks: smoothing continuation + kink finish."""

from __future__ import annotations

import math

import cvxpy as cp
import pytest
import torch

import declopt as dl
from declopt.frontend import compile_problem
from tests.helpers import batched_central_difference_vjp

F64 = torch.float64


def _projection_problem(p: float, sphere: bool, n: int) -> tuple[cp.Problem, list, list]:
    x, r, u = cp.Parameter(n), cp.Parameter(pos=True), cp.Variable(n)
    norm = cp.norm(u, 1 if p == 1 else "inf")
    constraint = norm == r if sphere else norm <= r
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [constraint]), [x, r], [u]


@pytest.mark.parametrize("sphere", [True, False], ids=["sphere", "ball"])
@pytest.mark.parametrize("p", [1.0, math.inf], ids=["l1", "linf"])
def test_generic_backend_reaches_the_exact_l1_and_linf_projections(p: float, sphere: bool) -> None:
    torch.manual_seed(0)
    n, radius = 5, torch.tensor(1.0, dtype=F64)
    problem, params, variables = _projection_problem(p, sphere, n)
    generic = dl.Layer(problem, params, variables, backend="torch", on_failure="raise")
    exact = (dl.nn.SphereProjection if sphere else dl.nn.BallProjection)(p, radius=radius)
    # Far outside, just outside, and strictly inside the unit ball of the norm.
    X = torch.cat([3 * torch.randn(2, n), 1.2 * torch.randn(1, n), 0.05 * torch.randn(1, n)])
    X = X.to(F64).requires_grad_()
    (U,) = generic(X, radius)
    assert generic.info.backend == "torch" and bool(generic.info.converged.all())
    expected = exact(X)
    torch.testing.assert_close(U, expected, atol=1e-9, rtol=0)
    # Same solution, so the same implicit gradient (from the same declaration).
    v = torch.randn_like(U)
    (g_generic,) = torch.autograd.grad(U, X, v)
    (g_exact,) = torch.autograd.grad(expected, X, v)
    torch.testing.assert_close(g_generic, g_exact, atol=1e-7, rtol=0)


def test_lasso_is_soft_thresholding_even_next_to_the_threshold() -> None:
    """Entries 1e-3..2e-2 above the threshold sit within the kink identification window of the
    last smoothed solve; the release check must move them off the kink."""
    n, lam = 8, 0.5
    x, u = cp.Parameter(n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x) + lam * cp.norm1(u)))
    layer = dl.Layer(problem, [x], [u], backend="torch", on_failure="raise")
    X = torch.tensor(
        [
            [0.51, -0.52, 0.49, 0.3, 1.0, -2.0, 0.505, 0.0],
            [0.2, 0.6, -0.7, 0.501, 0.0, 0.1, 3.0, -0.499],
        ],
        dtype=F64,
        requires_grad=True,
    )
    (U,) = layer(X)
    soft = torch.sign(X) * (X.abs() - lam).clamp(min=0)
    torch.testing.assert_close(U, soft, atol=1e-12, rtol=0)
    v = torch.randn_like(U)
    (grad,) = torch.autograd.grad(U, X, v)
    torch.testing.assert_close(grad, v * (X.abs() > lam), atol=1e-9, rtol=0)


def test_linf_sphere_with_coordinates_just_inside_the_cube_face() -> None:
    """Coordinates 1e-6..1e-1 inside the face of the cube look tied with the maximum after
    smoothing; they must be released (the projection clamps only the others)."""
    n = 6
    problem, params, variables = _projection_problem(math.inf, True, n)
    layer = dl.Layer(problem, params, variables, backend="torch", on_failure="raise")
    torch.manual_seed(7)
    X = 2 * torch.randn(8, n, dtype=F64)
    X[:, 0] = 3.0
    inside = torch.tensor([1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6, 0.0], dtype=F64)
    X[:, 1] = torch.sign(X[:, 1]) * (1 - inside)
    radius = torch.tensor(1.0, dtype=F64)
    (U,) = layer(X, radius)
    torch.testing.assert_close(U, X.clamp(-1, 1), atol=1e-12, rtol=0)


def test_prox_of_a_pairwise_maximum_matches_its_closed_form_in_float32() -> None:
    """``min 1/2 |u - x|^2 + sum(maximum(u, 0))``: ``x - 1`` above 1, ``0`` on ``[0, 1]``, ``x``
    below 0; float32 in, float32 out."""
    n = 8
    x, u = cp.Parameter(n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x) + cp.sum(cp.maximum(u, 0))))
    layer = dl.Layer(problem, [x], [u], backend="torch", on_failure="raise")
    X = torch.tensor([-2.0, -0.01, 0.0, 0.02, 0.5, 0.99, 1.01, 3.0])
    (U,) = layer(X)
    assert U.dtype == torch.float32
    expected = torch.where(X > 1, X - 1, torch.where(X < 0, X, torch.zeros_like(X)))
    torch.testing.assert_close(U, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: cp.norm1(v),
        lambda v: cp.norm(v, "inf"),
        lambda v: cp.max(v),
        lambda v: cp.min(v),
        lambda v: cp.sum(cp.abs(v)),
        lambda v: cp.sum(cp.maximum(v, 0.3)),
        lambda v: cp.sum(cp.minimum(v, -0.2, 2 * v)),
    ],
    ids=["norm1", "norm_inf", "max", "min", "abs", "maximum", "minimum"],
)
def test_smoothed_atoms_approach_the_originals(make) -> None:
    """The smoothed declaration is within ``mu (1 + log n)`` per atom entry of the original and
    converges to it as ``mu -> 0``."""
    n = 6
    x, u = cp.Parameter(n), cp.Variable(n)
    program = compile_problem(cp.Problem(cp.Minimize(make(u) + 0 * cp.sum(x))), [x], [u])
    assert program.smoothed is not None
    torch.manual_seed(1)
    X = torch.randn(n, dtype=F64)
    for _ in range(5):
        U = torch.randn(n, dtype=F64)
        U[0] = 0.0  # on an abs kink
        U[1] = U[2]  # a tie
        exact = program.objective((X,), U)
        for mu in (1e-1, 1e-3, 1e-6):
            smooth = program.smoothed.objective((X, torch.tensor(mu, dtype=F64)), U)
            assert abs(float(smooth - exact)) <= n * mu * (1 + math.log(n)) + 1e-12


def test_declarations_without_kinks_have_no_smoothed_form() -> None:
    x, u = cp.Parameter(3), cp.Variable(3)
    program = compile_problem(cp.Problem(cp.Minimize(cp.sum_squares(u - x))), [x], [u])
    assert program.kinks is None and program.smoothed is None


def _l1_regression(n: int = 4, k: int = 7) -> tuple:
    A, b, u = cp.Parameter((k, n)), cp.Parameter(k), cp.Variable(n)
    objective = cp.norm1(A @ u - b) + 0.1 * cp.sum_squares(u)
    return cp.Problem(cp.Minimize(objective)), [A, b], [u]


def _minimax(n: int = 4, k: int = 7) -> tuple:
    A, b, u = cp.Parameter((k, n)), cp.Parameter(k), cp.Variable(n)
    return cp.Problem(cp.Minimize(cp.max(A @ u - b) + 0.5 * cp.sum_squares(u))), [A, b], [u]


def _abs_in_a_constraint(n: int = 4) -> tuple:
    x, u = cp.Parameter(n), cp.Variable(n)
    constraint = cp.abs(u[0]) + cp.abs(u[1]) <= 0.5
    return cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [constraint]), [x], [u]


@pytest.mark.parametrize(
    "make", [_l1_regression, _minimax, _abs_in_a_constraint], ids=["l1reg", "minimax", "abs_con"]
)
def test_generic_backend_matches_a_conic_solver_and_finite_differences(make) -> None:
    """Kinks in many residuals (L1 regression), a max of affine pieces, and kinks inside a
    constraint: the torch backend's answer equals Clarabel's, and its implicit gradient equals
    central differences of the torch solution map."""
    problem, params, variables = make()
    torch.manual_seed(4)
    data = [2 * torch.randn(2, *p.shape, dtype=F64) for p in params]
    layer = dl.Layer(problem, params, variables, backend="torch", on_failure="raise")
    (U,) = layer(*[d.requires_grad_() for d in data])
    for i in range(2):
        for p, d in zip(params, data):
            p.value = d[i].detach().numpy()
        problem.solve(solver=cp.CLARABEL)
        reference = torch.from_numpy(variables[0].value)
        torch.testing.assert_close(U[i].detach(), reference, atol=1e-6, rtol=0)
    v = torch.randn_like(U)
    grads = torch.autograd.grad(U, data, v)
    fd = batched_central_difference_vjp(lambda *t: layer(*t)[0], [d.detach() for d in data], v)
    for g, f in zip(grads, fd):
        torch.testing.assert_close(g, f, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# cvxpylayers' own examples on the torch backend


def _readme_example() -> tuple[cp.Problem, list, list]:
    """cvxpylayers' README: ``min 0.5 |A x - b|_1 s.t. x >= 0``, ``A (3, 2)``."""
    n, m = 2, 3
    x, a, b = cp.Variable(n), cp.Parameter((m, n)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(a @ x - b, p=1)), [x >= 0])
    return problem, [a, b], [x]


# Each of these batches held a member left ITERATION_LIMIT before (KKT residuals up to 0.46):
# solutions with a residual of 1e-3 next to two at zero (kinks closer together than the last
# smoothing width), or at a vertex whose subgradient is 0.9995 of its limit.
@pytest.mark.parametrize("seed", [8, 9, 19])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_cvxpylayers_readme_example_converges_on_the_torch_backend(
    seed: int, dtype: torch.dtype
) -> None:
    problem, params, variables = _readme_example()
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 3, 2, generator=generator, dtype=F64)
    b = torch.randn(16, 3, generator=generator, dtype=F64)
    solutions, gradients = {}, {}
    for backend, data_dtype in (("torch", dtype), ("cvxpylayers", F64)):
        layer = dl.Layer(problem, params, variables, backend=backend, degenerate="active")
        inputs = [t.to(data_dtype).clone().requires_grad_() for t in (a, b)]
        (x,) = layer(*inputs)
        assert layer.info.converged.all(), (backend, layer.info.status_names)
        solutions[backend] = x.detach().double()
        gradients[backend] = [g.double() for g in torch.autograd.grad(x.sum(), inputs)]
    solution_tol, gradient_tol = (1e-6, 1e-4) if dtype == F64 else (1e-5, 1e-3)
    torch.testing.assert_close(
        solutions["torch"], solutions["cvxpylayers"], atol=solution_tol, rtol=0
    )
    for mine, theirs in zip(gradients["torch"], gradients["cvxpylayers"]):
        torch.testing.assert_close(mine, theirs, atol=gradient_tol, rtol=gradient_tol)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_cvxpylayers_monotone_regression_example_converges_on_the_torch_backend(
    dtype: torch.dtype,
) -> None:
    """cvxpylayers' monotonic output regression (``min |y - yhat|_2 s.t. diff(y) >= 0``, 10
    outputs, ``yhat = X theta + noise`` for 100 samples)."""
    n, m = 20, 10
    y, yhat = cp.Variable(m), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(cp.norm2(y - yhat)), [cp.diff(y) >= 0])
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(n, m, generator=generator, dtype=F64)
    data = torch.randn(100, n, generator=generator, dtype=F64) @ theta
    data = data + torch.randn(100, m, generator=generator, dtype=F64)
    upstream = torch.randn(100, m, generator=generator, dtype=F64)
    solutions, gradients = {}, {}
    for backend, data_dtype in (("torch", dtype), ("cvxpylayers", F64)):
        layer = dl.Layer(problem, [yhat], [y], backend=backend, degenerate="active")
        inputs = data.to(data_dtype).clone().requires_grad_()
        (out,) = layer(inputs)
        assert layer.info.converged.all(), (backend, layer.info.status_names)
        solutions[backend] = out.detach().double()
        (grad,) = torch.autograd.grad((out * upstream.to(data_dtype)).sum(), inputs)
        gradients[backend] = grad.double()
    scale = float(data.abs().max())
    solution_tol, gradient_tol = (1e-6, 1e-4) if dtype == F64 else (1e-5, 1e-3)
    torch.testing.assert_close(
        solutions["torch"], solutions["cvxpylayers"], atol=solution_tol * scale, rtol=0
    )
    torch.testing.assert_close(
        gradients["torch"], gradients["cvxpylayers"], atol=gradient_tol, rtol=gradient_tol
    )
