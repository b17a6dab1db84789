"""Spectral atoms (``lambda_max``, ``lambda_min``, ``sigma_max``, ``log_det``) and PSD
constraints through the torch front end: values against CVXPY, the second-order expansions
against autograd where eigenvalues are simple, and layers (solutions and implicit gradients)
against closed forms written here with numpy/torch, against central finite differences
(``gradcheck``) and against cvxpylayers. Ties (multiple eigenvalues, PSD matrices with a null
space of dimension >= 2) are the point: they are where autograd through ``eigh`` fails."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, hessian, vmap

import declopt as dl
from declopt.frontend.atoms.spectral import (
    largest_eigenvalue,
    largest_eigenvalue_sites,
    log_det_value,
    nuclear_norm_value,
    soft_largest_eigenvalue,
    soft_nuclear_norm,
)
from declopt.frontend.compile import compile_expression

F64 = torch.float64


def _symmetric(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return scale * (a + a.T) / 2


def _with_spectrum(values: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=F64))
    return q @ torch.diag(torch.tensor(values, dtype=F64)) @ q.T


def _spectral_map(p: torch.Tensor, fn) -> torch.Tensor:
    """``V diag(fn(lambda)) V^T`` of the symmetric part (differentiable in ``p``)."""
    lam, v = torch.linalg.eigh((p + p.T) / 2)
    return v @ torch.diag(fn(lam)) @ v.T


def _water_level(values: torch.Tensor, amount: float) -> tuple[torch.Tensor, int]:
    """``theta`` with ``sum (v_i - theta)_+ = amount`` (``values`` ascending) and how many
    entries it cuts: the prox of ``amount * 2 * max`` (a differentiable function of ``values``)."""
    n = values.numel()
    for k in range(1, n + 1):
        theta = (values[-k:].sum() - amount) / k
        if k == n or float(values[-k - 1]) <= float(theta.detach()):
            return theta, k
    raise AssertionError


# ---------------------------------------------------------------------------------------------
# Values and expansions


@pytest.mark.parametrize("seed", range(3))
def test_values_match_cvxpy(seed: int) -> None:
    s = _symmetric(4, seed)
    pd = s @ s.T + 0.1 * torch.eye(4, dtype=F64)
    a = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    cases = [
        (cp.lambda_max, s),
        (cp.lambda_min, s),
        (cp.log_det, pd),
        (cp.sigma_max, a),
        (cp.normNuc, a),
        (cp.normNuc, a.T),
    ]
    for atom, value in cases:
        expr = atom(cp.Constant(value.numpy()))
        param = cp.Parameter(tuple(value.shape))
        got = compile_expression(atom(param))({param.id: value})
        assert float(got) == pytest.approx(float(expr.value), rel=1e-12, abs=1e-12)


def test_log_det_is_minus_inf_outside_the_positive_definite_cone() -> None:
    # Two negative eigenvalues: the determinant is positive (CVXPY's numeric returns its log).
    x = _with_spectrum([-1.0, -2.0, 3.0], 0)
    assert log_det_value(x) == -float("inf")
    assert log_det_value(_with_spectrum([0.0, 1.0, 2.0], 0)) == -float("inf")


@pytest.mark.parametrize("seed", range(4))
def test_expansions_match_autograd_where_eigenvalues_are_simple(seed: int) -> None:
    s = _symmetric(5, seed)
    pd = s @ s.T + 0.5 * torch.eye(5, dtype=F64)
    mu = torch.tensor(0.3, dtype=F64)

    def true_max(x):
        return torch.linalg.eigvalsh((x + x.T) / 2)[-1]

    def true_soft(x):
        lam = torch.linalg.eigvalsh((x + x.T) / 2)
        return mu * (torch.logsumexp(lam / mu, 0) - np.log(5))

    def true_log_det(x):
        return torch.logdet((x + x.T) / 2)

    cases = [
        (lambda x: largest_eigenvalue((x + x.T) / 2), true_max, s),
        (lambda x: soft_largest_eigenvalue((x + x.T) / 2, mu), true_soft, s),
        (lambda x: log_det_value((x + x.T) / 2), true_log_det, pd),
    ]
    for mine, true, at in cases:
        assert torch.allclose(mine(at), true(at), atol=1e-12)
        assert torch.allclose(grad(mine)(at), grad(true)(at), atol=1e-10)
        assert torch.allclose(hessian(mine)(at), hessian(true)(at), atol=1e-8)


def test_largest_eigenvalue_at_a_tie_is_differentiated_on_its_piece() -> None:
    """At a double top eigenvalue: the gradient is the cluster's mean projector and the Hessian
    is finite (the mean of the cluster's eigenvalues, which autograd through eigh is not)."""
    x = _with_spectrum([-1.0, 0.5, 2.0, 2.0], 3)
    _, v = torch.linalg.eigh(x)
    top = v[:, 2:]
    g = grad(largest_eigenvalue)(x)
    assert torch.allclose(g, top @ top.T / 2, atol=1e-12)
    h = hessian(largest_eigenvalue)(x)
    assert bool(torch.isfinite(h).all())
    # Along a direction that keeps the cluster tied, the mean is exact to second order.
    e = _symmetric(4, 7, 1e-3)
    step = torch.linalg.eigvalsh(x + e)[2:].mean() - 2.0
    model = (g * e).sum() + 0.5 * (h.reshape(16, 16) @ e.reshape(16)) @ e.reshape(16)
    assert float(abs(step - model)) < 1e-8


def test_sites_vanish_exactly_on_the_tie_and_not_off_it() -> None:
    residual, margin = largest_eigenvalue_sites(_with_spectrum([0.0, 1.0, 3.0, 3.0], 1))
    held = margin <= 1e-12
    assert int(held.sum()) == 2  # (2,2) - (3,3) and (2,3): a double eigenvalue, 3 - 1 rows
    assert float(residual[held].abs().max()) < 1e-12
    _, margin = largest_eigenvalue_sites(_with_spectrum([0.0, 1.0, 2.0, 3.0], 1))
    assert float(margin.min()) > 0.5


def test_smoothed_largest_eigenvalue_lies_below_within_mu_log_n() -> None:
    x = _with_spectrum([-1.0, 0.5, 2.0, 2.0], 3)
    for mu in (1e-1, 1e-3):
        soft = soft_largest_eigenvalue(x, torch.tensor(mu, dtype=F64))
        assert 2.0 - mu * np.log(4) - 1e-12 <= float(soft) <= 2.0 + 1e-12


def test_nuclear_norm_expansion_and_smoothing() -> None:
    a = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=F64)

    def true(x):
        return torch.linalg.svdvals(x).sum()

    assert torch.allclose(nuclear_norm_value(a), true(a), atol=1e-12)
    assert torch.allclose(grad(nuclear_norm_value)(a), grad(true)(a), atol=1e-10)
    assert torch.allclose(hessian(nuclear_norm_value)(a), hessian(true)(a), atol=1e-8)
    for mu in (1e-1, 1e-3):
        soft = soft_nuclear_norm(a, torch.tensor(mu, dtype=F64))
        assert true(a) - 2 * mu - 1e-12 <= soft <= true(a) + 1e-12
    assert (
        float(soft_nuclear_norm(torch.zeros(3, 2, dtype=F64), torch.tensor(0.1, dtype=F64))) == 0.0
    )


def test_expansions_are_vmap_compatible() -> None:
    xs = torch.stack([_symmetric(3, k) for k in range(4)])
    values = vmap(largest_eigenvalue)(xs)
    assert torch.allclose(values, torch.linalg.eigvalsh(xs)[:, -1], atol=1e-12)
    assert vmap(hessian(largest_eigenvalue))(xs).shape == (4, 3, 3, 3, 3)


# ---------------------------------------------------------------------------------------------
# Layers: closed forms


def _psd_projection_layer(n: int) -> dl.Layer:
    p, x = cp.Parameter((n, n)), cp.Variable((n, n))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >> 0])
    return dl.Layer(problem, [p], [x], backend="torch")


def _psd_projection(p: torch.Tensor) -> torch.Tensor:
    """Frobenius projection onto ``{X : (X + X^T)/2 >> 0}``: clip the symmetric part's
    eigenvalues, keep the antisymmetric part."""
    return _spectral_map(p, lambda lam: lam.clamp(min=0)) + (p - p.T) / 2


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    negative=st.integers(0, 3),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
)
def test_psd_projection_matches_its_closed_form(seed: int, negative: int, scale: float) -> None:
    """Null spaces of dimension 0-3 (ties of lambda_min at 0), data in any units."""
    n = 4
    spectrum = [-2.0, -1.0, -0.5][:negative] + [0.7, 1.3, 2.1, 3.0][: n - negative]
    p = scale * _with_spectrum(spectrum, seed)
    p = p + scale * 0.3 * torch.triu(torch.ones(n, n, dtype=F64), 1)  # an antisymmetric part
    layer = _psd_projection_layer(n)
    leaf = p.clone().requires_grad_()
    (x,) = layer(leaf)
    assert torch.allclose(x, _psd_projection(p), atol=1e-9 * scale)
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    (x * w).sum().backward()
    ref = p.clone().requires_grad_()
    (_psd_projection(ref) * w).sum().backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-7)


@pytest.mark.parametrize(
    "spectrum", [[-1.0, 0.0, 0.2, 0.3], [0.0, 0.1, 1.0, 1.05], [1.0, 2.0, 3.0, 5.0]]
)
def test_prox_of_lambda_max_matches_its_closed_form(spectrum: list[float]) -> None:
    """``argmin lambda_max(X) + |X - P|^2``: the eigenvalues of ``P`` above the water level
    ``theta`` (``sum (lambda - theta)_+ = 1/2``) are cut to it, a cluster of 1-4 tied ones."""
    n = 4
    p_param, x_var = cp.Parameter((n, n)), cp.Variable((n, n))
    problem = cp.Problem(cp.Minimize(cp.lambda_max(x_var) + cp.sum_squares(x_var - p_param)))
    layer = dl.Layer(problem, [p_param], [x_var], backend="torch")

    def prox(p: torch.Tensor) -> torch.Tensor:
        lam, v = torch.linalg.eigh((p + p.T) / 2)
        theta, k = _water_level(lam, 0.5)
        new = torch.cat([lam[: n - k], theta.expand(k)])
        return v @ torch.diag(new) @ v.T + (p - p.T) / 2

    p = _with_spectrum(spectrum, 5)
    _, k = _water_level(torch.tensor(spectrum, dtype=F64), 0.5)
    leaf = p.clone().requires_grad_()
    (x,) = layer(leaf)
    assert torch.allclose(x, prox(p), atol=1e-10)
    w = _symmetric(n, 11) + torch.triu(torch.ones(n, n, dtype=F64), 1)
    (x * w).sum().backward()
    ref = p.clone().requires_grad_()
    (prox(ref) * w).sum().backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-8), k


def test_prox_of_sigma_max_matches_its_closed_form() -> None:
    """``argmin sigma_max(X) + |X - P|^2``: the singular values above the water level are cut
    (two of them here: a tie of the top singular value at the solution)."""
    p_param, x_var = cp.Parameter((3, 2)), cp.Variable((3, 2))
    problem = cp.Problem(cp.Minimize(cp.sigma_max(x_var) + cp.sum_squares(x_var - p_param)))
    layer = dl.Layer(problem, [p_param], [x_var], backend="torch")

    def prox(p: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        theta, k = _water_level(s.flip(0), 0.5)
        cut = torch.minimum(s, theta.expand(2)) if k == 2 else torch.cat([theta[None], s[1:]])
        return u @ torch.diag(cut) @ vh

    g = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(2, 2, generator=g, dtype=F64))
    p = q1[:, :2] @ torch.diag(torch.tensor([1.3, 1.0], dtype=F64)) @ q2.T
    leaf = p.clone().requires_grad_()
    (x,) = layer(leaf)
    assert torch.allclose(x, prox(p), atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(x), torch.tensor([0.9, 0.9], dtype=F64), atol=1e-10)
    w = torch.randn(3, 2, generator=g, dtype=F64)
    (x * w).sum().backward()
    ref = p.clone().requires_grad_()
    (prox(ref) * w).sum().backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-8)


@pytest.mark.parametrize(
    ("shape", "singular_values"),
    [((3, 2), [1.3, 0.2]), ((3, 3), [2.0, 0.3, 0.1]), ((2, 4), [1.0, 0.4]), ((3, 3), [0.2, 0.1])],
)
def test_prox_of_the_nuclear_norm_is_singular_value_thresholding(
    shape: tuple[int, int], singular_values: list[float]
) -> None:
    """``argmin |X|_* + |X - P|^2`` shrinks the singular values by 1/2: the rank drops (kinks of
    every zero singular value, the structural ones of a wide or tall matrix included), down to
    ``X = 0``."""
    m, n = shape
    g = torch.Generator().manual_seed(m * 10 + n)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    r = len(singular_values)
    p = q1[:, :r] @ torch.diag(torch.tensor(singular_values, dtype=F64)) @ q2[:, :r].T
    p_param, x_var = cp.Parameter(shape), cp.Variable(shape)
    problem = cp.Problem(cp.Minimize(cp.normNuc(x_var) + cp.sum_squares(x_var - p_param)))
    layer = dl.Layer(problem, [p_param], [x_var], backend="torch")

    def prox(p: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        return u @ torch.diag((s - 0.5).clamp(min=0)) @ vh

    leaf = p.clone().requires_grad_()
    (x,) = layer(leaf)
    assert torch.allclose(x, prox(p), atol=1e-10)
    w = torch.randn(shape, generator=g, dtype=F64)
    (x * w).sum().backward()
    ref = p.clone().requires_grad_()
    (prox(ref) * w).sum().backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-8)


def test_log_det_maximisation_gives_the_inverse() -> None:
    """``argmax log_det(X) - tr(S X) = S^{-1}`` for ``S`` positive definite;
    ``d(S^{-1}) = -S^{-1} dS S^{-1}``."""
    s_param, x_var = cp.Parameter((3, 3)), cp.Variable((3, 3))
    # The penalty makes the antisymmetric part (which neither term sees) unique: zero.
    antisymmetric = cp.sum_squares(x_var - x_var.T)
    problem = cp.Problem(cp.Maximize(cp.log_det(x_var) - cp.trace(s_param @ x_var) - antisymmetric))
    layer = dl.Layer(problem, [s_param], [x_var], backend="torch")
    s = _with_spectrum([0.5, 1.0, 4.0], 4)
    leaf = s.clone().requires_grad_()
    (x,) = layer(leaf)
    inverse = torch.linalg.inv(s)
    assert torch.allclose(x, inverse, atol=1e-9)
    w = _symmetric(3, 8)
    (x * w).sum().backward()
    ref = s.clone().requires_grad_()
    # X depends on the symmetric part of S only (tr(S X) with X symmetric at the optimum).
    (torch.linalg.inv((ref + ref.T) / 2) * w).sum().backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-8)


def test_lambda_min_maximisation_matches_its_closed_form() -> None:
    """``argmax lambda_min(X) - |X - P|^2``: the eigenvalues below the water level rise to it."""
    n = 3
    p_param, x_var = cp.Parameter((n, n)), cp.Variable((n, n))
    problem = cp.Problem(cp.Maximize(cp.lambda_min(x_var) - cp.sum_squares(x_var - p_param)))
    layer = dl.Layer(problem, [p_param], [x_var], backend="torch")
    p = _with_spectrum([0.0, 0.1, 2.0], 6)
    (x,) = layer(p)
    # Mirror of the lambda_max prox: cut -lambda from above.
    theta, k = _water_level(-torch.tensor([2.0, 0.1, 0.0], dtype=F64), 0.5)
    assert k == 2
    expected = torch.tensor([-float(theta), -float(theta), 2.0], dtype=F64)
    assert torch.allclose(torch.linalg.eigvalsh((x + x.T) / 2), expected.sort().values, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# A small SDP: gradcheck and the other backends


def _sdp(weight: float = 1.0) -> tuple[cp.Problem, cp.Parameter, cp.Variable]:
    c, x = cp.Parameter((3, 3)), cp.Variable((3, 3))
    objective = cp.trace(c @ x) + weight * cp.sum_squares(x)
    return cp.Problem(cp.Minimize(objective), [x >> 0, cp.trace(x) == 1]), c, x


@pytest.mark.parametrize("weight", [1.0, 0.1])
def test_small_sdp_passes_gradcheck_in_float64(weight: float) -> None:
    """Rank 2 (weight 1) and rank 1 (weight 0.1: a null space of dimension 2) solutions."""
    problem, c, x = _sdp(weight)
    layer = dl.Layer(problem, [c], [x], backend="torch")
    m = 3 * torch.tensor([[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 0.5]], dtype=F64)
    leaf = m.clone().requires_grad_()
    (solution,) = layer(leaf)
    rank = int((torch.linalg.eigvalsh((solution + solution.T) / 2) > 1e-8).sum())
    assert rank == (2 if weight == 1.0 else 1)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (leaf,), eps=1e-6, atol=1e-6)


def test_sdp_agrees_with_cvxpylayers_and_clarabel() -> None:
    problem, c, x = _sdp(0.3)
    m = torch.tensor([[1.0, 0.4, -0.2], [0.4, 0.5, 0.1], [-0.2, 0.1, 2.0]], dtype=F64)
    w = _symmetric(3, 9)
    results = []
    for backend in ("torch", "cvxpylayers"):
        layer = dl.Layer(problem, [c], [x], backend=backend)
        leaf = m.clone().requires_grad_()
        (solution,) = layer(leaf)
        (solution * w).sum().backward()
        results.append((solution.detach(), leaf.grad))
    c.value = m.numpy()
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert np.allclose(results[0][0].numpy(), x.value, atol=1e-9)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)


@pytest.mark.parametrize("weight", [1.0, 0.1])
def test_sdp_implicit_backward_on_cvxpylayers_answers_matches_the_torch_backend(
    weight: float,
) -> None:
    """declopt's implicit backward at cvxpylayers' solution and duals (the PSD dual's trace on
    the constraint's row, the rest fitted on the held kink rows) against the torch backend and
    cvxpylayers' own backward."""
    problem, c, x = _sdp(weight)
    m = torch.tensor([[1.0, 0.4, -0.2], [0.4, 0.5, 0.1], [-0.2, 0.1, 2.0]], dtype=F64)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    grads = {}
    for name, options in {
        "torch": {"backend": "torch"},
        "implicit": {"backend": "cvxpylayers", "backward": "implicit"},
        "native": {"backend": "cvxpylayers"},
    }.items():
        layer = dl.Layer(problem, [c], [x], **options)
        leaf = m.clone().requires_grad_()
        (solution,) = layer(leaf)
        (solution * w).sum().backward()
        grads[name] = leaf.grad
        if name == "implicit":
            assert layer.info.gradient == "implicit"
    assert torch.allclose(grads["implicit"], grads["torch"], atol=1e-7)
    assert torch.allclose(grads["native"], grads["torch"], atol=1e-5)


def test_psd_projection_in_float32() -> None:
    layer = _psd_projection_layer(4)
    p = _with_spectrum([-1.0, -0.5, 0.7, 2.0], 1)
    leaf = p.float().requires_grad_()
    (x,) = layer(leaf)
    assert x.dtype == torch.float32
    x.sum().backward()
    ref = p.clone().requires_grad_()
    _psd_projection(ref).sum().backward()
    assert torch.allclose(x.double(), _psd_projection(p), atol=1e-6)
    assert torch.allclose(leaf.grad.double(), ref.grad, atol=1e-5)


def test_batched_psd_constraints_and_batched_parameters() -> None:
    """A stacked ``(2, n, n)`` PSD constraint is one row per matrix; a batch of parameters."""
    p, x = cp.Parameter((2, 3, 3)), cp.Variable((2, 3, 3))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >> 0])
    layer = dl.Layer(problem, [p], [x], backend="torch")
    data = torch.stack(
        [
            torch.stack([_with_spectrum([-1.0, 0.5, 2.0], k), _with_spectrum([-1, -1, 1.0], k)])
            for k in range(3)
        ]
    )
    (out,) = layer(data)
    expected = torch.stack([torch.stack([_psd_projection(m) for m in pair]) for pair in data])
    assert out.shape == (3, 2, 3, 3)
    assert torch.allclose(out, expected, atol=1e-9)


def test_the_cone_backend_refuses_a_psd_cone_and_auto_routes_around_it() -> None:
    problem, c, x = _sdp()
    with pytest.raises(ValueError, match=r"(?i)psd"):
        dl.Layer(problem, [c], [x], backend="cone")
    layer = dl.Layer(problem, [c], [x])
    assert layer.backend_name != "cone"
