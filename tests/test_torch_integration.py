"""Layers as PyTorch-native modules: torch.func transforms, forward mode, double backward,
serialization, dl.gradcheck, empty batches, dtypes, option checks and torch.compile."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import declopt as dl

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore", dl.GradientWarning)


def _ridge() -> tuple[dl.Layer, torch.Tensor]:
    """``argmin |A y - b|^2 + lam |y|^2``: closed form ``(A^T A + lam I)^-1 A^T b``."""
    a = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    b, lam, y = cp.Parameter(6), cp.Parameter(nonneg=True), cp.Variable(3)
    objective = cp.sum_squares(a.numpy() @ y - b) + lam * cp.sum_squares(y)
    return dl.Layer(cp.Problem(cp.Minimize(objective)), [b, lam], [y], backend="torch"), a


def _ridge_closed(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(a.T @ a + lam * torch.eye(3, dtype=F64), a.T @ b)


def _ball() -> dl.Layer:
    """Projection onto ``|u|_2 <= r`` written with a nonlinear constraint (closed form r x/|x|
    outside the ball)."""
    x, r, u = cp.Parameter(4), cp.Parameter(pos=True), cp.Variable(4)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.sum_squares(u) <= r**2])
    return dl.Layer(problem, [x, r], [u], backend="torch")


def _ball_closed(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return r * x / torch.linalg.norm(x)


X = torch.tensor([1.5, -2.0, 0.7, 3.0], dtype=F64)
R = torch.tensor(1.3, dtype=F64)
B = torch.linspace(-1, 2, 6, dtype=F64)
LAM = torch.tensor(0.7, dtype=F64)


def test_vmap_over_a_layer_matches_its_batched_call_and_the_closed_form() -> None:
    layer, a = _ridge()
    bs = torch.stack([B, 2 * B, -B])
    mapped = vmap(lambda b: layer(b, LAM)[0])(bs)
    torch.testing.assert_close(mapped, layer(bs, LAM)[0])
    torch.testing.assert_close(mapped, torch.stack([_ridge_closed(a, b, LAM) for b in bs]))


def test_vmap_aligns_parameters_with_different_batch_dims() -> None:
    layer, a = _ridge()
    lams = torch.tensor([0.3, 0.9], dtype=F64)
    bs = torch.stack([B, -B, 2 * B])  # own batch (3,), vmapped lam (2,)
    mapped = vmap(lambda lam: layer(bs, lam)[0])(lams)
    want = torch.stack([torch.stack([_ridge_closed(a, b, lam) for b in bs]) for lam in lams])
    torch.testing.assert_close(mapped, want)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "jvp"])
def test_first_order_transforms_match_the_closed_forms(transform: str) -> None:
    layer, a = _ridge()
    ball = _ball()
    cases = [
        (lambda b, lam: layer(b, lam)[0], lambda b, lam: _ridge_closed(a, b, lam), (B, LAM)),
        (lambda x, r: ball(x, r)[0], _ball_closed, (X, R)),
    ]
    for f, closed, args in cases:
        if transform == "grad":
            got = grad(lambda *t, f=f: f(*t).pow(2).sum(), argnums=(0, 1))(*args)
            want = grad(lambda *t, c=closed: c(*t).pow(2).sum(), argnums=(0, 1))(*args)
        elif transform == "jvp":
            tangents = (torch.ones_like(args[0]), torch.ones_like(args[1]))
            got, want = jvp(f, args, tangents)[1], jvp(closed, args, tangents)[1]
        else:
            jac = jacrev if transform == "jacrev" else jacfwd
            got = jac(f, argnums=(0, 1))(*args)
            want = jac(closed, argnums=(0, 1))(*args)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_forward_mode_through_a_kink_matches_soft_thresholding() -> None:
    x, lam, u = cp.Parameter(4), cp.Parameter(nonneg=True), cp.Variable(4)
    objective = 0.5 * cp.sum_squares(u - x) + lam * cp.norm1(u)
    layer = dl.Layer(cp.Problem(cp.Minimize(objective)), [x, lam], [u], backend="torch")

    def soft(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * torch.clamp(x.abs() - lam, min=0)

    one = torch.tensor(1.0, dtype=F64)
    torch.testing.assert_close(
        jacfwd(lambda t: layer(t, one)[0])(X), jacfwd(lambda t: soft(t, one))(X), atol=1e-9, rtol=0
    )


@pytest.mark.parametrize("order", ["forward-over-reverse", "reverse-over-reverse"])
def test_hessians_through_layers_match_the_closed_forms(order: str) -> None:
    layer, a = _ridge()
    ball = _ball()
    cases = [
        (
            lambda lam: layer(B, lam)[0].pow(2).sum(),
            lambda lam: _ridge_closed(a, B, lam).pow(2).sum(),
            LAM,
        ),
        (lambda x: ball(x, R)[0].pow(3).sum(), lambda x: _ball_closed(x, R).pow(3).sum(), X),
    ]
    for f, closed, arg in cases:
        outer = jacfwd if order == "forward-over-reverse" else jacrev
        got = outer(jacrev(f))(arg)
        torch.testing.assert_close(got, hessian(closed)(arg), atol=1e-9, rtol=1e-9)


def test_double_backward_gives_hessian_vector_products_and_passes_gradgradcheck() -> None:
    ball = _ball()
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(ball(x, R)[0].pow(3).sum(), x, create_graph=True)
    v = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=F64)
    (hv,) = torch.autograd.grad(g, x, v)
    want = hessian(lambda t: _ball_closed(t, R).pow(3).sum())(X) @ v
    torch.testing.assert_close(hv, want, atol=1e-10, rtol=1e-10)
    inputs = (X.clone().requires_grad_(), R.clone().requires_grad_())
    assert torch.autograd.gradgradcheck(lambda x, r: ball(x, r)[0], inputs)


def test_a_meta_gradient_through_an_inner_step_on_a_layer_matches_the_closed_form() -> None:
    """MAML-style: one gradient step on lam through the layer, then the outer loss's gradient
    with respect to the starting lam (needs the second derivative)."""
    layer, a = _ridge()

    def outer(lam: torch.Tensor, solve: object) -> torch.Tensor:
        inner = solve(B, lam).pow(2).sum()
        (step,) = torch.autograd.grad(inner, lam, create_graph=True)
        return solve(2 * B, lam - 0.1 * step).sum()

    lam = LAM.clone().requires_grad_()
    (got,) = torch.autograd.grad(outer(lam, lambda b, s: layer(b, s)[0]), lam)
    lam2 = LAM.clone().requires_grad_()
    (want,) = torch.autograd.grad(outer(lam2, lambda b, s: _ridge_closed(a, b, s)), lam2)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_jacobian_of_a_vmapped_layer_matches_the_closed_form() -> None:
    ball = _ball()
    xs = torch.stack([X, 2 * X])
    got = jacrev(lambda t: vmap(lambda x: ball(x, R)[0])(t))(xs)
    want = jacrev(lambda t: vmap(lambda x: _ball_closed(x, R))(t))(xs)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_per_sample_gradients_and_tangents_under_vmap_match_the_closed_form() -> None:
    """vmap(grad(f)): per-sample gradients, also of a parameter the vmap shares (one gradient
    per instance); vmap(jvp(f)) likewise."""
    ball = _ball()
    xs = torch.stack([X, 2 * X, -X])

    def loss(solve: object) -> object:
        return lambda x, r: solve(x, r).pow(2).sum() * x.sum()

    def layer(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return ball(x, r)[0]

    got = vmap(grad(loss(layer), argnums=(0, 1)), in_dims=(0, None))(xs, R)
    want = vmap(grad(loss(_ball_closed), argnums=(0, 1)), in_dims=(0, None))(xs, R)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)

    def tangent(solve: object) -> object:
        return lambda x: jvp(lambda t: solve(t, R), (x,), (torch.ones_like(x),))[1]

    torch.testing.assert_close(
        vmap(tangent(layer))(xs), vmap(tangent(_ball_closed))(xs), atol=1e-10, rtol=1e-10
    )


def test_vmap_over_a_jacobian_of_a_layer_says_what_to_do() -> None:
    ball = _ball()
    xs = torch.stack([X, 2 * X])
    with pytest.raises(NotImplementedError, match=r"jacrev / jacfwd / hessian over a vmap"):
        vmap(jacrev(lambda x: ball(x, R)[0]))(xs)
    with pytest.raises(NotImplementedError, match=r"jacrev / jacfwd / hessian over a vmap"):
        vmap(jacfwd(lambda x: ball(x, R)[0]))(xs)


def test_second_derivatives_through_a_custom_vjp_raise_instead_of_returning_zeros() -> None:
    proj = dl.nn.SphereProjection(2)  # closed-form vjp (backward="native")
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(proj(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="backward='implicit'"):
        torch.autograd.grad(g.sum(), x)
    implicit = dl.nn.SphereProjection(2, backward="implicit")
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(implicit(x).pow(3).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    want = hessian(lambda t: (t / torch.linalg.norm(t)).pow(3).sum())(X).sum(0)
    torch.testing.assert_close(h, want, atol=1e-9, rtol=1e-9)


def _box() -> tuple[cp.Problem, list, list]:
    x, u = cp.Parameter(3), cp.Variable(3)
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= 0, u <= 1]), [x], [u]


def _roundtrips() -> list:
    def saved(module: torch.nn.Module) -> torch.nn.Module:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    return [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy, saved]


@pytest.mark.parametrize("roundtrip", _roundtrips(), ids=["pickle", "deepcopy", "torch.save"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: dl.Layer(*_box(), backend="torch"),
        lambda: dl.Layer(*_box(), backend="cvxpylayers"),
        lambda: dl.nn.RobustPool("welsch", alpha=0.4),
        lambda: dl.nn.SphereProjection(1, radius=1.7),
    ],
    ids=["torch", "cvxpylayers", "robust-pool", "projection"],
)
def test_modules_survive_serialization_after_a_forward(make: object, roundtrip: object) -> None:
    module = make()
    data = torch.tensor([[1.5, 0.3, -0.2], [0.5, 2.0, 0.9]], dtype=F64)
    before = module(data)
    after = roundtrip(module)(data)
    before = before if isinstance(before, torch.Tensor) else before[0]
    after = after if isinstance(after, torch.Tensor) else after[0]
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_gradcheck_accepts_one_sided_points_and_catches_a_wrong_gradient() -> None:
    layer = dl.Layer(*_box(), backend="torch")
    points = torch.tensor([[1.0, 0.5, -1.0], [0.3, 2.0, 0.0], [0.2, 0.4, 0.6]], dtype=F64)
    report = dl.gradcheck(layer, points)
    assert report and report.one_sided.tolist() == [True, True, False]
    assert "3 of 3 problem(s) agree" in str(report)

    class WrongVJP:
        def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x.clamp(0, 1),)

        def vjp(self, params: tuple, outputs: tuple, grads: tuple) -> tuple:
            return (2 * grads[0],)

    wrong = dl.Layer(*_box(), solver=WrongVJP(), verify=False)
    report = dl.gradcheck(wrong, torch.tensor([[0.3, 0.4, 0.5]], dtype=F64))
    assert not report and "first failing batch indices: [(0,)]" in str(report)


@pytest.mark.parametrize("backend", ["torch", "cvxpylayers", "scipy"])
def test_an_empty_batch_gives_empty_outputs_and_gradients(backend: str) -> None:
    layer = dl.Layer(*_box(), backend=backend)
    x = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    (u,) = layer(x)
    assert u.shape == (0, 3) and layer.info.converged.shape == (0,)
    u.sum().backward()
    assert x.grad is None or x.grad.shape == (0, 3)


def test_numpy_float64_inputs_keep_their_dtype() -> None:
    layer = dl.Layer(*_box(), backend="torch")
    (u,) = layer(np.array([[1.5, 0.3, -0.2]]))
    assert u.dtype == torch.float64


def test_python_number_hyperparameters_follow_the_input_dtype() -> None:
    y = dl.nn.SphereProjection(2, radius=1.7)(torch.randn(3, 8, dtype=F64))
    torch.testing.assert_close(torch.linalg.norm(y, dim=-1), torch.full((3,), 1.7, dtype=F64))
    assert dl.nn.RobustPool("huber", alpha=0.3).alpha.dtype == F64


@pytest.mark.parametrize("option", [{"max_iters": 5}, {"foo": 1}])
def test_unknown_backend_options_are_refused_at_construction(option: dict) -> None:
    with pytest.raises(ValueError, match="its options are method, max_iter"):
        dl.Layer(*_box(), backend="torch", **option)


def test_torch_compile_of_a_model_with_a_layer_runs_without_warnings() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), dl.nn.RobustPool("huber"), torch.nn.Linear(8, 2)
    )
    x = torch.randn(4, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = torch.compile(model, backend="aot_eager")
        y = compiled(x)
    torch.testing.assert_close(y, model(x))


def test_layers_run_under_inference_mode() -> None:
    with torch.inference_mode():
        (u,) = dl.Layer(*_box(), backend="torch")(torch.tensor([[1.5, 0.3, -0.2]], dtype=F64))
    torch.testing.assert_close(u, torch.tensor([[1.0, 0.3, 0.0]], dtype=F64))
    # An unconstrained smooth declaration of a few variables (the Taylor pass's memo keys on
    # tensor versions, which inference tensors do not have: this raised a RuntimeError).
    x, v = cp.Parameter(3), cp.Variable(3)
    smooth = cp.Problem(cp.Minimize(cp.sum_squares(v - x) + cp.sum(cp.exp(v))))
    data = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    layer = dl.Layer(smooth, [x], [v], backend="torch")
    with torch.inference_mode():
        (w,) = layer(data)
    torch.testing.assert_close(w, layer(data)[0])


def test_a_native_cvxpylayers_backward_refuses_transforms_and_second_derivatives() -> None:
    layer = dl.Layer(*_box(), backend="cvxpylayers")
    x = torch.tensor([0.5, 0.3, -0.2], dtype=F64)
    with pytest.raises(NotImplementedError, match="backward='implicit'"):
        jacrev(lambda t: layer(t)[0])(x)
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(leaf)[0].pow(3).sum(), leaf, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(g.sum(), leaf)
    implicit = dl.Layer(*_box(), backend="cvxpylayers", backward="implicit")
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(implicit(leaf)[0].pow(3).sum(), leaf, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), leaf)
    torch.testing.assert_close(h, torch.tensor([3.0, 1.8, 0.0], dtype=F64), atol=1e-6, rtol=0)
