"""Backends: one declaration through "torch", "cvxpylayers" and "scipy" gives the same answer.

Tolerances (float64), relative to the largest entry of the reference (absolute below 1):

- solutions: torch vs scipy ``1e-8`` (both polish to ~1e-14); torch or scipy vs cvxpylayers
  ``1e-6`` (SCS at ``eps = 1e-8`` through diffcp; measured up to ~1e-7).
- gradients by the implicit backward (torch, scipy, cvxpylayers with ``backward="implicit"``):
  ``1e-5`` — the same formula at solutions that agree to ~1e-8.
- gradients by cvxpylayers' native backward (diffcp, dense or LSMR derivative): ``1e-4``
  (measured 1e-9 .. 2e-6).
- multipliers vs the torch backend's: scipy ``1e-8``, cvxpylayers ``1e-5`` (absolute).
- float32 through cvxpylayers vs float64: ``1e-5`` (solutions), ``1e-4`` (gradients).

cvxpylayers is slow per call (~5 ms per problem), so batches are small and every layer is built
once per declaration (``_layer`` caches them) while Hypothesis draws the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import cache

import cvxpy as cp
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import Tensor
from torch.func import grad, jacrev

import declopt as dl
from declopt import backends
from declopt.backends import BatchedParams, Solution
from declopt.backends.cvxpylayers_backend import CvxpyLayersBackend
from declopt.frontend.dpp import dpp_culprit
from declopt.inputs import prepare_inputs

F64 = torch.float64
SOLUTION_ATOL = {"scipy": 1e-8, "cvxpylayers": 1e-6}
IMPLICIT_RTOL = 1e-5
NATIVE_RTOL = 1e-4
MULTIPLIER_ATOL = {"scipy": 1e-8, "cvxpylayers": 1e-5}
EXAMPLES = settings(max_examples=10, deadline=None)
FEWER_EXAMPLES = settings(max_examples=6, deadline=None)  # constrained: every backend is slower
# diffcp's backward converts torch tensors with np.array(...), which NumPy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

# -------------------------------------------------------------------------------------------------
# declarations: name -> (problem, parameters, variables), and random data for them


def _ridge(n: int = 8, d: int = 3) -> tuple:
    X, y = cp.Parameter((n, d), name="X"), cp.Parameter(n, name="y")
    mu, beta = cp.Parameter(nonneg=True, name="mu"), cp.Variable(d, name="beta")
    objective = 0.5 * cp.sum_squares(X @ beta - y) + 0.5 * mu * cp.sum_squares(beta)
    return cp.Problem(cp.Minimize(objective)), [X, y, mu], [beta]


def _huber_pool(n: int = 9) -> tuple:
    x, alpha, y = cp.Parameter(n, name="x"), cp.Parameter(pos=True, name="alpha"), cp.Variable()
    return cp.Problem(cp.Minimize(cp.sum(dl.penalties.huber(y - x, alpha)))), [x, alpha], [y]


def _pseudo_huber_pool(n: int = 9) -> tuple:
    x, y = cp.Parameter(n, name="x"), cp.Variable(name="y")
    return cp.Problem(cp.Minimize(cp.sum(dl.penalties.pseudo_huber(y - x, 0.7)))), [x], [y]


def _logistic_regression(n: int = 12, d: int = 3) -> tuple:
    # Z holds label * features, so the declaration stays DPP (no product of two parameters).
    Z, lam = cp.Parameter((n, d), name="Z"), cp.Parameter(nonneg=True, name="lam")
    w = cp.Variable(d, name="w")
    objective = cp.sum(cp.logistic(-Z @ w)) / n + lam * cp.sum_squares(w)
    return cp.Problem(cp.Minimize(objective)), [Z, lam], [w]


def _box_least_squares(n: int = 6, d: int = 4) -> tuple:
    A, b = cp.Parameter((n, d), name="A"), cp.Parameter(n, name="b")
    lo, hi = cp.Parameter(d, name="lo"), cp.Parameter(d, name="hi")
    x = cp.Variable(d, name="x")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= lo, x <= hi])
    return problem, [A, b, lo, hi], [x]


def _qp(nv: int = 6, ni: int = 4, ne: int = 2) -> tuple:
    Q, q = cp.Parameter((nv, nv), name="Q"), cp.Parameter(nv, name="q")
    G, h = cp.Parameter((ni, nv), name="G"), cp.Parameter(ni, name="h")
    A, b = cp.Parameter((ne, nv), name="A"), cp.Parameter(ne, name="b")
    w = cp.Variable(nv, name="w")
    objective = 0.5 * cp.sum_squares(Q @ w) + q @ w
    problem = cp.Problem(cp.Minimize(objective), [G @ w <= h, A @ w == b])
    return problem, [Q, q, G, h, A, b], [w]


def _ball_projection(d: int = 5) -> tuple:
    p, r, z = cp.Parameter(d, name="p"), cp.Parameter(pos=True, name="r"), cp.Variable(d, name="z")
    return cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= r]), [p, r], [z]


DECLARATIONS: dict[str, Callable[[], tuple]] = {
    "ridge": _ridge,
    "huber_pool": _huber_pool,
    "pseudo_huber_pool": _pseudo_huber_pool,
    "logistic_regression": _logistic_regression,
    "box_least_squares": _box_least_squares,
    "qp": _qp,
    "ball_projection": _ball_projection,
}
UNCONSTRAINED = ["ridge", "huber_pool", "pseudo_huber_pool", "logistic_regression"]
CONSTRAINED = ["box_least_squares", "qp", "ball_projection"]


def _data(name: str, seed: int, batch: int = 3) -> list[Tensor]:
    """Random well-posed data: every problem feasible, strictly convex, moderately scaled."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=F64)

    if name == "ridge":
        return [randn(batch, 8, 3), randn(batch, 8), 0.2 + rand(())]
    if name == "huber_pool":
        return [2 * randn(batch, 9), 0.5 + rand(())]
    if name == "pseudo_huber_pool":
        return [2 * randn(batch, 9)]
    if name == "logistic_regression":
        return [randn(batch, 12, 3), 0.05 + 0.2 * rand(())]
    if name == "box_least_squares":
        return [randn(batch, 6, 4), 2 * randn(batch, 6), -rand(batch, 4), rand(batch, 4)]
    if name == "qp":
        Q = randn(batch, 6, 6) / 6**0.5 + torch.eye(6, dtype=F64)
        G, A, w0 = randn(batch, 4, 6), randn(batch, 2, 6), 0.3 * randn(batch, 6)
        h = (G @ w0.unsqueeze(-1)).squeeze(-1) + rand(batch, 4)  # w0 is strictly feasible
        b = (A @ w0.unsqueeze(-1)).squeeze(-1)
        return [Q, 3 * randn(batch, 6), G, h, A, b]
    if name == "ball_projection":
        return [2 * randn(batch, 5), 0.5 + rand(())]
    raise KeyError(name)


@cache
def _layer(name: str, backend: str, backward: str | None = None, **options: object) -> dl.Layer:
    problem, parameters, variables = DECLARATIONS[name]()
    return dl.Layer(problem, parameters, variables, backend=backend, backward=backward, **options)


def _forward_backward(
    layer: dl.Layer, data: Sequence[Tensor], seed: int = 0
) -> tuple[tuple[Tensor, ...], list[Tensor]]:
    """The layer's outputs and ``d/d(data) <v, outputs>`` for a seeded random ``v``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in data]
    outputs = layer(*inputs)
    g = torch.Generator().manual_seed(seed)
    # v is drawn in float64 whatever the dtype, so float32 and float64 calls see the same v.
    loss = sum(
        (o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() for o in outputs
    )
    grads = torch.autograd.grad(loss, inputs)
    return tuple(o.detach() for o in outputs), list(grads)


def _assert_same(got: Sequence[Tensor], want: Sequence[Tensor], tol: float) -> None:
    """Entries within ``tol * max(1, max |want|)``: conic solvers' tolerances are relative."""
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, float(b.abs().max())))


def _assert_same_gradients(got: Sequence[Tensor], want: Sequence[Tensor], rtol: float) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * max(float(b.abs().max()), 1e-3))


def _solve(name: str, backend: str, data: Sequence[Tensor]) -> Solution:
    """``backend.solve`` called directly, for the multipliers the layer does not expose."""
    program = _layer(name, "scipy").program
    inputs = prepare_inputs(program, data)
    start = torch.zeros(inputs.params.size, program.num_variables, dtype=F64)
    return backends.get(backend).solve(program, inputs.params, starts=[start])


# -------------------------------------------------------------------------------------------------
# parity: unconstrained convex problems, all backends, solutions and gradients


@pytest.mark.parametrize("name", UNCONSTRAINED)
@EXAMPLES
@given(seed=st.integers(0, 2**31 - 1))
def test_unconstrained_convex_problems_agree_across_all_backends(name: str, seed: int) -> None:
    _assert_backends_agree_with_torch(name, _data(name, seed))


# -------------------------------------------------------------------------------------------------
# parity: constrained convex problems


@pytest.mark.parametrize("name", CONSTRAINED)
@FEWER_EXAMPLES
@given(seed=st.integers(0, 2**31 - 1))
def test_constrained_convex_problems_agree_across_all_backends(name: str, seed: int) -> None:
    _assert_backends_agree_with_torch(name, _data(name, seed))


def _assert_backends_agree_with_torch(name: str, data: list[Tensor]) -> None:
    """scipy and cvxpylayers (implicit and its native diffcp backward) against the torch backend:
    solutions and gradients."""
    want_u, want_g = _forward_backward(_layer(name, "torch"), data)
    for backend, backward, rtol in [
        ("scipy", None, IMPLICIT_RTOL),
        ("cvxpylayers", "implicit", IMPLICIT_RTOL),
        ("cvxpylayers", None, NATIVE_RTOL),
    ]:
        u, g = _forward_backward(_layer(name, backend, backward), data)
        _assert_same(u, want_u, SOLUTION_ATOL[backend])
        _assert_same_gradients(g, want_g, rtol)


@pytest.mark.parametrize("name", CONSTRAINED)
@FEWER_EXAMPLES
@given(seed=st.integers(0, 2**31 - 1))
def test_constrained_problems_backends_agree_on_multipliers(name: str, seed: int) -> None:
    data = _data(name, seed)
    want = _solve(name, "torch", data)
    for backend in ("scipy", "cvxpylayers"):
        got = _solve(name, backend, data)
        assert got.converged.all()
        for a, b in [
            (got.eq_multipliers, want.eq_multipliers),
            (got.ineq_multipliers, want.ineq_multipliers),
        ]:
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=MULTIPLIER_ATOL[backend])


# -------------------------------------------------------------------------------------------------
# parity: nonconvex problems, torch and scipy from the same starting points


def _welsch_pool(n: int = 15) -> tuple:
    x, y = cp.Parameter(n, name="x"), cp.Variable(name="y")
    return cp.Problem(cp.Minimize(cp.sum(dl.penalties.welsch(y - x, 1.0)))), [x], [y]


def _median(x: Tensor) -> Tensor:
    return x.median(dim=-1).values


@cache
def _welsch_layer(backend: str) -> dl.Layer:
    problem, parameters, variables = _welsch_pool()
    return dl.Layer(problem, parameters, variables, backend=backend, initializers=[_median])


@EXAMPLES
@given(seed=st.integers(0, 2**31 - 1))
def test_nonconvex_problems_torch_and_scipy_agree_from_the_same_starts(seed: int) -> None:
    # Inliers around a centre c and a few far outliers: the global minimiser is the unique
    # minimum near c, which the median start reaches; the zero start may end elsewhere, and
    # both backends keep the lowest objective of the two starts.
    g = torch.Generator().manual_seed(seed)
    centre = 6 * torch.rand(4, 1, generator=g, dtype=F64) - 3
    inliers = centre + 0.3 * torch.randn(4, 11, generator=g, dtype=F64)
    outliers = centre + torch.tensor([8.0, -9.0, 12.0, 15.0], dtype=F64)  # (4, 4)
    x = torch.cat([inliers, outliers], dim=-1)
    want_u, want_g = _forward_backward(_welsch_layer("torch"), [x])
    got_u, got_g = _forward_backward(_welsch_layer("scipy"), [x])
    torch.testing.assert_close(
        _welsch_layer("scipy").info.objective,
        _welsch_layer("torch").info.objective,
        rtol=0,
        atol=1e-10,
    )
    _assert_same(got_u, want_u, SOLUTION_ATOL["scipy"])
    _assert_same_gradients(got_g, want_g, IMPLICIT_RTOL)


# -------------------------------------------------------------------------------------------------
# cvxpylayers adapter: multipliers, batches, dtypes, failures, errors


def test_cvxpylayers_multipliers_satisfy_the_seed_stationarity_convention() -> None:
    # Equalities, <= and >= rows, a NonNeg constraint, matrix-shaped rows, a nonneg variable and a
    # bounded one (lowered to explicit rows), and Maximize:
    # D_u f = lambda^T D_u [h; g] and lambda_g <= 0.
    c = cp.Parameter((2, 3), name="c")
    X = cp.Variable((2, 3), name="X")
    s = cp.Variable(3, nonneg=True, name="s")
    t = cp.Variable(2, bounds=[-0.2, 0.3], name="t")
    objective = -cp.sum_squares(X - c) - cp.sum_squares(s - c[0]) - cp.sum_squares(t + c[:, 0])
    constraints = [
        cp.sum(X, axis=0) == s,
        X <= 0.4,
        X[1] >= -0.5,
        cp.constraints.NonNeg(X[0] + 0.25),
        cp.sum(s) + cp.sum(t) <= 1,
    ]
    problem = cp.Problem(cp.Maximize(objective), constraints)
    program = dl.Layer(problem, [c], [X, s, t], backend="cvxpylayers").program
    data = 2 * torch.randn(4, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    params = prepare_inputs(program, [data]).params
    sol = backends.get("cvxpylayers").solve(program, params, starts=[])
    assert sol.converged.all() and sol.kkt_residual.max() < 1e-7
    assert (sol.ineq_multipliers <= 1e-12).all() and (sol.ineq_multipliers < -1e-3).any()
    for b in range(4):
        x, u = (data[b],), sol.u[b]
        df = grad(program.objective, argnums=1)(x, u)
        jh = jacrev(program.equalities, argnums=1)(x, u)
        jg = jacrev(program.inequalities, argnums=1)(x, u)
        rhs = sol.eq_multipliers[b] @ jh + sol.ineq_multipliers[b] @ jg
        torch.testing.assert_close(df, rhs, rtol=0, atol=1e-7)


def test_cvxpylayers_takes_multi_dim_batches_and_shared_parameters() -> None:
    layer = _layer("box_least_squares", "cvxpylayers")
    A, b, lo, hi = _data("box_least_squares", seed=3, batch=6)
    A = A.reshape(2, 3, 6, 4)
    lo_shared, hi_shared = lo[0], hi[0]  # no batch dims: shared by all 6 problems
    (x,) = layer(A, b.reshape(2, 3, 6), lo_shared, hi_shared)
    assert x.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            (alone,) = layer(A[i, j], b.reshape(2, 3, 6)[i, j], lo_shared, hi_shared)
            torch.testing.assert_close(x[i, j], alone, rtol=0, atol=1e-8)


def test_cvxpylayers_shared_parameter_gradient_is_the_sum_over_the_batch() -> None:
    layer = _layer("huber_pool", "cvxpylayers")
    x, alpha = _data("huber_pool", seed=4, batch=5)
    _, (_, shared) = _forward_backward(layer, [x, alpha])
    _, (_, expanded) = _forward_backward(layer, [x, alpha.expand(5).clone()])
    torch.testing.assert_close(shared, expanded.sum(), rtol=1e-10, atol=1e-12)
    _, (_, reference) = _forward_backward(_layer("huber_pool", "torch"), [x, alpha])
    torch.testing.assert_close(shared, reference, rtol=NATIVE_RTOL, atol=1e-8)


def test_cvxpylayers_float32_in_float32_out_with_float32_gradients() -> None:
    layer = _layer("qp", "cvxpylayers")
    data = _data("qp", seed=5)
    want_u, want_g = _forward_backward(layer, data)
    got_u, got_g = _forward_backward(layer, [t.float() for t in data])
    assert got_u[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_g)
    _assert_same([u.double() for u in got_u], want_u, 1e-5)
    _assert_same_gradients([g.double() for g in got_g], want_g, 1e-4)


def _infeasible_box_data(batch: int, bad: Sequence[int]) -> list[Tensor]:
    A, b, lo, hi = _data("box_least_squares", seed=6, batch=batch)
    for i in bad:
        lo[i, 1] = hi[i, 1] + 1.0  # lo > hi: no feasible point
    return [A, b, lo, hi]


def test_infeasible_members_are_reported_by_batch_index_and_do_not_spoil_the_rest() -> None:
    layer = _layer("box_least_squares", "cvxpylayers")
    data = _infeasible_box_data(6, bad=[1, 4])
    with pytest.warns(dl.NonConvergenceWarning, match=r"2 of 6 .*\[\(1,\), \(4,\)\]"):
        (x,), grads = _forward_backward(layer, data)
    assert layer.info.converged.tolist() == [True, False, True, True, False, True]
    assert torch.isfinite(x).all() and (x[[1, 4]] == 0).all()
    assert all(torch.isfinite(g).all() and (g[[1, 4]] == 0).all() for g in grads)
    good = [0, 2, 3, 5]
    (alone,) = layer(*[t[good] for t in data])
    torch.testing.assert_close(x[good], alone, rtol=0, atol=1e-9)


def test_infeasible_members_of_a_multi_dim_batch_raise_with_their_index_on_request() -> None:
    problem, parameters, variables = _box_least_squares()
    layer = dl.Layer(problem, parameters, variables, backend="cvxpylayers", on_failure="raise")
    A, b, lo, hi = _infeasible_box_data(4, bad=[3])
    shaped = [A.reshape(2, 2, 6, 4), b.reshape(2, 2, 6), lo.reshape(2, 2, 4), hi.reshape(2, 2, 4)]
    with pytest.raises(dl.SolverError, match=r"\(1, 1\)"):
        layer(*shaped)


def test_members_scs_solves_only_inaccurately_are_reported_not_returned() -> None:
    problem, parameters, variables = _qp()
    layer = dl.Layer(problem, parameters, variables, backend="cvxpylayers", max_iter=2)
    with pytest.warns(dl.NonConvergenceWarning, match=r"2 of 2 .*\[\(0,\), \(1,\)\]"):
        (w,) = layer(*_data("qp", seed=14, batch=2))
    assert (w == 0).all() and not layer.info.converged.any()


def test_scipy_reports_infeasible_members_too() -> None:
    layer = _layer("box_least_squares", "scipy")
    with pytest.warns(dl.NonConvergenceWarning, match=r"\[\(2,\)\]"):
        (x,) = layer(*_infeasible_box_data(3, bad=[2]))
    assert layer.info.converged.tolist() == [True, True, False] and torch.isfinite(x).all()


def test_non_dpp_problem_sent_to_cvxpylayers_names_the_subexpression_and_suggests_torch() -> None:
    a, x = cp.Parameter(pos=True, name="a"), cp.Parameter(3, name="x")
    u = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(a * a * u - x)))
    with pytest.raises(ValueError, match=r"`a \* a` is DCP but not DPP.*backend='torch'"):
        dl.Layer(problem, [a, x], [u], backend="cvxpylayers")


def test_nonconvex_problem_sent_to_cvxpylayers_names_the_nonconvex_part() -> None:
    problem, parameters, variables = _welsch_pool(4)
    with pytest.raises(ValueError, match=r"`exp\(.*neither convex nor concave.*backend='torch'"):
        dl.Layer(problem, parameters, variables, backend="cvxpylayers")


def test_dpp_culprit_names_a_constraint_with_the_wrong_curvature() -> None:
    u, r = cp.Variable(2), cp.Parameter(pos=True)
    problem = cp.Problem(cp.Minimize(cp.sum(u)), [cp.sum_squares(u) >= r])
    assert "constraint" in dpp_culprit(problem) and "convex left" in dpp_culprit(problem)
    assert dpp_culprit(_ball_projection()[0]) is None


def test_cvxpylayers_needs_a_cvxpy_declaration() -> None:
    program = _layer("ridge", "torch").program
    torch_only = dl.Program(
        parameter_names=program.parameter_names,
        parameter_shapes=program.parameter_shapes,
        variable_names=program.variable_names,
        variable_shapes=program.variable_shapes,
        objective=program.objective,
        is_convex=True,
        is_dpp=True,
    )
    assert "Program.source" in CvxpyLayersBackend().supports(torch_only)
    with pytest.raises(ValueError, match=r"Program\.source"):
        dl.Layer(torch_only, backend="cvxpylayers")


def test_cvxpylayers_layer_is_built_once_per_program() -> None:
    layer = _layer("ridge", "cvxpylayers")
    layer(*_data("ridge", seed=7))
    backend = backends.get("cvxpylayers")
    first = backend.compiled(layer.program)
    layer(*_data("ridge", seed=8))
    assert backend.compiled(layer.program) is first


# -------------------------------------------------------------------------------------------------
# registry and automatic dispatch


def test_auto_sends_dpp_convex_problems_to_the_cone_backend_and_says_why() -> None:
    problem, parameters, variables = _qp()
    layer = dl.Layer(problem, parameters, variables)
    layer(*_data("qp", seed=9))
    assert layer.info.backend == "cone" and "DPP-convex" in layer.info.reason


def test_auto_sends_large_cone_programs_to_cvxpylayers_and_says_why() -> None:
    """A QP of 120 variables with a dense quadratic is a cone program of 120 columns after
    presolve with no block-arrow structure: beyond the dense interior point's range, so
    cvxpylayers (sparse) takes it. The L2-ball projection at d = 256 (257 columns) has a plan
    (diagonal plus the cone's rank-two term), so the cone backend takes it."""
    Q, q, w = cp.Parameter((120, 120)), cp.Parameter(120), cp.Variable(120)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Q @ w) + q @ w), [w >= -1, w <= 1])
    layer = dl.Layer(problem, [Q, q], [w])
    assert layer.backend_name == "cvxpylayers"
    assert "120 columns" in layer.reason and "backend='cone' forces it" in layer.reason
    p, r, z = cp.Parameter(256), cp.Parameter(pos=True), cp.Variable(256)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= r])
    layer = dl.Layer(problem, [p, r], [z])
    assert layer.backend_name == "cone"


def test_auto_sends_non_dpp_problems_to_torch_and_names_the_culprit() -> None:
    problem, parameters, variables = _welsch_pool(4)
    layer = dl.Layer(problem, parameters, variables)
    assert layer.backend_name == "torch"
    assert "not DPP-convex" in layer.reason and "exp(" in layer.reason


def test_auto_preference_is_an_argument_that_keeps_dpp_problems_on_torch() -> None:
    problem, parameters, variables = _ridge()
    assert dl.Layer(problem, parameters, variables).backend_name == "cone"
    chosen = dl.Layer(problem, parameters, variables, backend=backends.Auto(prefer="cvxpylayers"))
    assert chosen.backend_name == "cvxpylayers"
    on_torch = dl.Layer(problem, parameters, variables, backend=backends.Auto(prefer="torch"))
    assert on_torch.backend_name == "torch" and "torch backend takes it" in on_torch.reason
    with pytest.raises(ValueError, match="prefer"):
        backends.Auto(prefer="scs")


def test_auto_preferring_torch_still_sends_what_torch_refuses_to_a_conic_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Refusing:
        name = "torch"

        def supports(self, program: dl.Program) -> str | None:
            return "it refuses everything (test double)"

    monkeypatch.setitem(backends._REGISTRY, "torch", Refusing())
    problem, parameters, variables = _qp()
    layer = dl.Layer(problem, parameters, variables, backend=backends.Auto(prefer="torch"))
    assert layer.backend_name == "cone" and "torch cannot" in layer.reason


def test_registry_lists_the_backends_and_rejects_unknown_or_duplicate_names() -> None:
    assert {"torch", "cvxpylayers", "scipy", "cone"} <= set(backends.available())
    with pytest.raises(ValueError, match=r"registered backends: .*cvxpylayers"):
        backends.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        backends.register("scipy", backends.get("scipy"))
    with pytest.raises(ValueError, match="reserved"):
        backends.register("auto", backends.get("scipy"))


class _ClosedFormRidge:
    """A third-party backend: solves ridge regression in closed form, knows no multipliers."""

    name = "closed_form_ridge"

    def supports(self, program: dl.Program) -> str | None:
        return None

    def solve(self, program: dl.Program, params: BatchedParams, **options: object) -> Solution:
        X, y, mu = (
            v if d is not None else v.expand(params.size, *v.shape)
            for v, d in zip(params.values, params.in_dims)
        )
        gram = X.transpose(-1, -2) @ X + mu[:, None, None] * torch.eye(X.shape[-1], dtype=X.dtype)
        u = torch.linalg.solve(gram, (X.transpose(-1, -2) @ y.unsqueeze(-1))).squeeze(-1)
        zeros = torch.zeros(params.size, dtype=X.dtype)
        return Solution(
            u=u,
            converged=torch.ones(params.size, dtype=torch.bool),
            iterations=torch.zeros(params.size, dtype=torch.int64),
            objective=zeros,
        )


def test_a_registered_third_party_backend_is_used_by_name_and_differentiated_implicitly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register("closed_form_ridge", _ClosedFormRidge())
    problem, parameters, variables = _ridge()
    layer = dl.Layer(problem, parameters, variables, backend="closed_form_ridge")
    data = _data("ridge", seed=10)
    u, g = _forward_backward(layer, data)
    want_u, want_g = _forward_backward(_layer("ridge", "torch"), data)
    _assert_same(u, want_u, 1e-10)
    _assert_same_gradients(g, want_g, 1e-8)
    assert layer.info.backend == "closed_form_ridge"


def test_scipy_backend_accepts_any_scipy_method() -> None:
    data = _data("ridge", seed=13)
    (want,) = _layer("ridge", "torch")(*data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.NonConvergenceWarning)
        (got,) = _layer("ridge", "scipy", method="BFGS")(*data)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# degenerate= on the cvxpylayers backend: weak activity judged against the solver's accuracy


def _nnls_on_a_bound(residual: bool) -> tuple[cp.Problem, list, list, Tensor, Tensor, Tensor]:
    """Least squares ``min |A x - b|^2, x >= 0`` whose minimiser has ``x_0 = 0`` with a zero
    multiplier (weakly active). ``residual``: ``b - A x*`` orthogonal to ``range(A)`` (``f > 0``);
    else ``b = A x*`` (``f = 0`` and ``D_u f = 0`` at the solution)."""
    g = torch.Generator().manual_seed(0)
    n, k, batch = 3, 5, 4
    x = cp.Variable(n)
    a, b = cp.Parameter((k, n)), cp.Parameter(k)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(a @ x - b)), [x >= 0])
    a_t = torch.randn(batch, k, n, generator=g, dtype=F64)
    x_star = torch.rand(batch, n, generator=g, dtype=F64) + 0.5
    x_star[:, 0] = 0.0
    b_t = (a_t @ x_star.unsqueeze(-1)).squeeze(-1)
    if residual:
        q = torch.linalg.qr(a_t, mode="complete").Q[:, :, n:]
        r = torch.randn(batch, k, 1, generator=g, dtype=F64)
        b_t = b_t + (q @ (q.transpose(1, 2) @ r)).squeeze(-1)
    return problem, [a, b], [x], a_t, b_t, x_star


def _one_sided_grad_b(a_t: Tensor, side: str) -> Tensor:
    """``d sum(x) / d b`` of the least squares above: ``inactive`` drops ``x_0 >= 0`` (``x = A^+
    b``), ``active`` holds ``x_0 = 0`` (least squares on the other columns)."""
    cols = a_t if side == "inactive" else a_t[:, :, 1:]
    return torch.linalg.pinv(cols).sum(-2)


@pytest.mark.parametrize("side", ["active", "inactive"])
@pytest.mark.parametrize("residual", [False, True])
def test_cvxpylayers_implicit_backward_honours_degenerate(side: str, residual: bool) -> None:
    """SCS leaves the weakly active bound ~1e-9 away with a ~1e-8 multiplier; judged against
    SCS's accuracy it is weakly active, as at the exact solution, so ``degenerate=`` picks the
    side (it was read as strictly active: ``one_sided`` False and the "active" derivative
    whatever ``degenerate`` said, where ``f = 0`` at the solution)."""
    problem, params, variables, a_t, b_t, x_star = _nnls_on_a_bound(residual)
    expected = _one_sided_grad_b(a_t, side)
    # Where f = 0 at the solution scipy's polished point judges multipliers of ~1e-6 against a
    # gradient scale of ~0 (a known gap: its KKT point takes no gradient-term floor yet).
    backends_here = ("cvxpylayers", "torch", "cone") + (("scipy",) if residual else ())
    for name in backends_here:
        layer = dl.Layer(
            problem,
            params,
            variables,
            backend=name,
            backward="implicit",
            degenerate=dl.Degenerate(side, report="ignore"),
        )
        b_in = b_t.clone().requires_grad_()
        (x_t,) = layer(a_t, b_in)
        (grad_b,) = torch.autograd.grad(x_t.sum(), b_in)
        assert layer.info.converged.all(), name
        torch.testing.assert_close(x_t.detach(), x_star, atol=1e-6, rtol=0)
        assert layer.info.one_sided.all(), name
        assert layer.info.backward.one_sided.all(), name
        torch.testing.assert_close(grad_b, expected, atol=1e-5, rtol=0, msg=name)
