"""``declopt.torch.CvxpyLayer`` ported from cvxpylayers 1.2's documented usage (its README and
examples): each pattern runs through the drop-in with the default backend (cvxpylayers) and, where
the torch front end compiles the declaration, with ``backend="torch"``; outputs and gradients are
compared between the two (float64, 1e-5) and with ``cvxpylayers.torch.CvxpyLayer`` itself."""

from __future__ import annotations

import contextlib
import math

import cvxpy as cp
import pytest
import torch
from cvxpylayers.torch import CvxpyLayer as Reference
from diffcp.cone_program import SolverError as DiffcpSolverError

import declopt as dl
from declopt.torch import CvxpyLayer

TOL = 1e-5
F64 = torch.float64


def _outputs_and_grads(layer, *params, **call):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    outs = layer(*params, **call)
    torch.manual_seed(0)
    weights = [torch.randn_like(o) for o in outs]
    sum((w * o).sum() for w, o in zip(weights, outs)).backward()
    return [o.detach() for o in outs], [p.grad for p in params]


def _close(a, b, tol=TOL):
    for x, y in zip(a, b):
        assert torch.allclose(x.to(F64), y.to(F64), atol=tol, rtol=tol), (x, y)


def _agree(problem, parameters, variables, params, torch_backend=True, reference=True, **call):
    """Drop-in (default backend) against torch and cvxpylayers itself; returns the outputs."""
    outs, grads = _outputs_and_grads(CvxpyLayer(problem, parameters, variables), *params, **call)
    if torch_backend:
        layer = CvxpyLayer(problem, parameters, variables, backend="torch")
        t_outs, t_grads = _outputs_and_grads(layer, *params)
        _close(outs, t_outs)
        _close(grads, t_grads)
    if reference:
        ref = Reference(problem, parameters, variables)
        r_outs, r_grads = _outputs_and_grads(ref, *params, solver_args={"eps": 1e-10})
        _close(outs, r_outs, 1e-4)
        _close(grads, r_grads, 1e-4)
    return outs


def _least_squares():
    x = cp.Variable(2)
    A, b = cp.Parameter((3, 2)), cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)))
    return problem, [A, b], [x]


def test_readme_pnorm_example_runs_unchanged() -> None:
    torch.manual_seed(0)
    n, m = 2, 3
    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    assert problem.is_dpp()
    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    A_tch = torch.randn(m, n, requires_grad=True)
    b_tch = torch.randn(m, requires_grad=True)
    (solution,) = layer(A_tch, b_tch)
    solution.sum().backward()
    assert solution.shape == (n,) and A_tch.grad.shape == (m, n)
    (expected,) = Reference(problem, parameters=[A, b], variables=[x])(
        A_tch, b_tch, solver_args={"eps": 1e-10}
    )
    assert torch.allclose(solution.double(), expected.double(), atol=1e-4)


def test_least_squares_layer_matches_torch_backend_and_cvxpylayers() -> None:
    torch.manual_seed(1)
    problem, parameters, variables = _least_squares()
    _agree(
        problem, parameters, variables, [torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64)]
    )


def test_relu_layer_with_a_subset_of_variables() -> None:
    # cvxpylayers' ReLU example: the layer returns y only (here with an auxiliary t dropped).
    x = cp.Parameter(4)
    y, t = cp.Variable(4), cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + cp.square(t)), [y >= 0, t >= 1])
    X = torch.randn(5, 4, dtype=F64)
    (Y,) = _agree(problem, [x], [y], [X])
    assert torch.allclose(Y, torch.relu(X), atol=1e-6)


def test_sigmoid_layer_matches_torch_sigmoid() -> None:
    x = cp.Parameter(3)
    y = cp.Variable(3)
    objective = -x @ y - cp.sum(cp.entr(y) + cp.entr(1.0 - y))
    problem = cp.Problem(cp.Minimize(objective))
    X = torch.tensor([-1.0, 0.2, 1.5], dtype=F64)
    # SCS's exponential cones are inexact; Clarabel solves them to 1e-8.
    layer = CvxpyLayer(problem, [x], [y], solver=cp.CLARABEL)
    outs, grads = _outputs_and_grads(layer, X)
    assert torch.allclose(outs[0], torch.sigmoid(X), atol=1e-5)
    # d sigmoid = s (1 - s): the native backward reproduces it. (The torch backend does not
    # converge from u = 0 on entr(1 - y); not compared here.)
    s_ = torch.sigmoid(X)
    torch.manual_seed(0)
    w = torch.randn(3, dtype=F64)
    assert torch.allclose(grads[0], w * s_ * (1 - s_), atol=1e-4)


def test_softmax_layer_matches_torch_softmax() -> None:
    x = cp.Parameter(4)
    y = cp.Variable(4)
    problem = cp.Problem(cp.Minimize(-x @ y - cp.sum(cp.entr(y))), [cp.sum(y) == 1])
    X = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=F64)
    # Exponential cones: Clarabel (SCS is inexact on them). The torch backend is not compared:
    # its Newton solve from u = 0 meets entr's boundary (a known limitation, not the drop-in's).
    (Y,) = CvxpyLayer(problem, [x], [y], solver_args={"solve_method": "Clarabel"})(X)
    assert torch.allclose(Y, torch.softmax(X, -1), atol=1e-5)


def test_batched_parameters_give_batched_outputs() -> None:
    torch.manual_seed(2)
    problem, parameters, variables = _least_squares()
    A, b = torch.randn(6, 3, 2, dtype=F64), torch.randn(6, 3, dtype=F64)
    (X,) = _agree(problem, parameters, variables, [A, b])
    assert X.shape == (6, 2)


def test_unbatched_parameter_is_shared_by_the_batch() -> None:
    torch.manual_seed(3)
    problem, parameters, variables = _least_squares()
    A, b = torch.randn(3, 2, dtype=F64), torch.randn(4, 3, dtype=F64)
    (X,) = _agree(problem, parameters, variables, [A, b])
    assert X.shape == (4, 2)


def test_solver_args_at_call_time_override_construction() -> None:
    problem, parameters, variables = _least_squares()
    layer = CvxpyLayer(problem, parameters, variables, solver_args={"eps": 1e-3})
    A, b = torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64)
    (loose,) = layer(A, b)
    (tight,) = layer(A, b, solver_args={"eps": 1e-10, "max_iters": 10_000})
    (exact,) = CvxpyLayer(problem, parameters, variables, backend="torch")(A, b)
    assert (tight - exact).abs().max() < 1e-7
    assert (tight - exact).abs().max() <= (loose - exact).abs().max()


def test_dl_layer_takes_solver_args_at_call_time() -> None:
    problem, parameters, variables = _least_squares()
    layer = dl.Layer(problem, parameters, variables, backend="cvxpylayers")
    (X,) = layer(torch.randn(3, 2), torch.randn(3), solver_args={"solve_method": "Clarabel"})
    assert X.shape == (2,)


def test_solver_args_are_refused_by_a_backend_that_takes_none() -> None:
    problem, parameters, variables = _least_squares()
    layer = dl.Layer(problem, parameters, variables, backend="torch")
    with pytest.raises(ValueError, match="takes no solver_args"):
        layer(torch.randn(3, 2), torch.randn(3), solver_args={"eps": 1e-6})


def test_solver_name_string_routes_to_cvxpylayers() -> None:
    problem, parameters, variables = _least_squares()
    layer = dl.Layer(problem, parameters, variables, solver=cp.CLARABEL)
    assert layer.backend_name == "cvxpylayers" and layer.solver is None
    assert layer.options["solver_args"]["solve_method"] == "Clarabel"
    layer(torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64))
    assert layer.info.gradient == "native (cvxpylayers)"


def test_gp_example_matches_cvxpylayers() -> None:
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a = cp.Parameter(pos=True, value=2.0)
    b = cp.Parameter(pos=True, value=1.0)
    c = cp.Parameter(value=0.5)
    problem = cp.Problem(
        cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y**c]
    )
    assert problem.is_dgp(dpp=True)
    params = [
        torch.tensor(2.0, dtype=F64),
        torch.tensor(1.0, dtype=F64),
        torch.tensor(0.5, dtype=F64),
    ]
    layer = CvxpyLayer(problem, parameters=[a, b, c], variables=[x, y, z], gp=True)
    outs, grads = _outputs_and_grads(layer, *params)
    ref = Reference(problem, parameters=[a, b, c], variables=[x, y, z], gp=True)
    r_outs, r_grads = _outputs_and_grads(ref, *params, solver_args={"eps": 1e-10})
    _close(outs, r_outs, 1e-4)
    _close(grads, r_grads, 1e-4)
    # The torch front end compiles it through CVXPY's log-space reduction (tests/test_log_log.py).
    layer = CvxpyLayer(problem, parameters=[a, b, c], variables=[x, y, z], gp=True, backend="torch")
    assert layer.program.log_log and layer.program.has_functions
    t_outs, t_grads = _outputs_and_grads(layer, *params)
    _close(outs, t_outs)
    _close(grads, t_grads)


def test_gp_that_is_not_log_log_convex_is_refused_by_the_torch_backend() -> None:
    x = cp.Variable(pos=True)
    a = cp.Parameter(pos=True)
    problem = cp.Problem(cp.Minimize(x - a / x))  # a difference: not DGP
    with pytest.raises(dl.DeclarationError, match="gp=True, but the problem is not log-log"):
        CvxpyLayer(problem, [a], [x], gp=True, backend="torch")


def _sdp():
    C = cp.Parameter((3, 3), symmetric=True)
    X = cp.Variable((3, 3), symmetric=True)
    problem = cp.Problem(
        cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1]
    )
    return problem, C, X


def test_sdp_with_psd_constraint_runs_through_the_default_backend() -> None:
    problem, C, X = _sdp()
    M = torch.tensor([[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 0.5]], dtype=F64)
    layer = CvxpyLayer(problem, [C], [X])
    outs, grads = _outputs_and_grads(layer, M)
    assert torch.linalg.eigvalsh(outs[0]).min() > -1e-6
    ref = Reference(problem, [C], [X])
    r_outs, r_grads = _outputs_and_grads(ref, M, solver_args={"eps": 1e-10})
    _close(outs, r_outs, 1e-4)
    _close(grads, r_grads, 1e-4)
    assert layer.info.gradient == "native (cvxpylayers)"


def test_sdp_runs_through_the_torch_backend_with_the_implicit_backward() -> None:
    problem, C, X = _sdp()
    M = torch.tensor([[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 0.5]], dtype=F64)
    layer = CvxpyLayer(problem, [C], [X], backend="torch")
    outs, _ = _outputs_and_grads(layer, M)
    ref = Reference(problem, [C], [X])
    r_outs, _ = _outputs_and_grads(ref, M, solver_args={"eps": 1e-10})
    _close(outs, r_outs, 1e-5)
    assert layer.info.gradient == "implicit"


def test_implicit_backward_of_what_the_front_end_cannot_compile_is_refused() -> None:
    x, y, z = cp.Variable(), cp.Variable(), cp.Variable()
    a = cp.Parameter()
    problem = cp.Problem(
        cp.Minimize(-x + cp.square(y - a)), [cp.constraints.ExpCone(x, y, z), z == 1]
    )
    with pytest.raises(ValueError, match=r"implicit.*torch front end"):
        dl.Layer(problem, [a], [x], backend="cvxpylayers", backward="implicit")


def test_auto_sends_what_the_front_end_cannot_compile_to_cvxpylayers() -> None:
    a = cp.Parameter(pos=True)
    x, y, z = cp.Variable(), cp.Variable(), cp.Variable()
    # exp(x) <= z as an exponential cone (the front end has no rule for ExpCone).
    problem = cp.Problem(cp.Minimize(z - a * x), [cp.constraints.ExpCone(x, y, z), y == 1])
    layer = dl.Layer(problem, [a], [x, z])
    assert layer.backend_name == "cvxpylayers" and "torch front end" in layer.reason
    (X, Z) = layer(torch.tensor(2.0, dtype=F64))
    # min exp(x) - a x: x = log a, z = a.
    assert torch.allclose(X, torch.tensor(math.log(2.0), dtype=F64), atol=1e-4)
    assert torch.allclose(Z, torch.tensor(2.0, dtype=F64), atol=1e-4)


@pytest.mark.parametrize(
    "atom",
    [
        lambda X: -cp.log_det(X),
        lambda X: cp.lambda_max(X),
        lambda X: -cp.geo_mean(cp.diag(X)),
        lambda X: cp.normNuc(X),
        lambda X: cp.sigma_max(X),
    ],
    ids=["log_det", "lambda_max", "geo_mean", "normNuc", "sigma_max"],
)
@pytest.mark.parametrize("backend", ["cvxpylayers", "torch"])
def test_matrix_atoms_on_a_psd_variable_match_cvxpy(atom, backend: str) -> None:
    """cvxpylayers' SDP-type atoms on a symmetric variable with ``X >> 0``, through the drop-in
    on cvxpylayers and on the torch backend (the torch front end compiles all of them)."""
    P = cp.Parameter((2, 2))
    X = cp.Variable((2, 2), symmetric=True)
    problem = cp.Problem(cp.Minimize(atom(X) + cp.sum_squares(X - P)), [X >> 0])
    M = torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=F64)
    layer = CvxpyLayer(problem, [P], [X], backend=backend)
    outs, grads = _outputs_and_grads(layer, M)
    ref = Reference(problem, [P], [X])
    r_outs, r_grads = _outputs_and_grads(ref, M, solver_args={"eps": 1e-10})
    _close(outs, r_outs, 1e-4)
    _close(grads, r_grads, 1e-3)


def _dual_problem():
    x = cp.Variable(2)
    c, b = cp.Parameter(2), cp.Parameter()
    eq_con = cp.sum(x) == b
    ineq_con = x >= 0
    problem = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x)), [eq_con, ineq_con])
    return problem, [c, b], x, eq_con, ineq_con


def test_dual_variables_as_outputs_with_gradients_match_cvxpylayers() -> None:
    problem, parameters, x, eq_con, ineq_con = _dual_problem()
    variables = [x, eq_con.dual_variables[0], ineq_con.dual_variables[0]]
    params = [torch.tensor([1.0, 2.0], dtype=F64), torch.tensor(1.0, dtype=F64)]
    outs, grads = _outputs_and_grads(CvxpyLayer(problem, parameters, variables), *params)
    ref = Reference(problem, parameters, variables)
    r_outs, r_grads = _outputs_and_grads(ref, *params, solver_args={"eps": 1e-10})
    _close(outs, r_outs, 1e-4)
    _close(grads, r_grads, 1e-4)


def test_dual_variables_follow_cvxpy_sign_and_the_torch_multipliers_the_seed_sign() -> None:
    problem, parameters, x, _, ineq_con = _dual_problem()
    params = [torch.tensor([1.0, 4.0], dtype=F64), torch.tensor(1.0, dtype=F64)]
    layer = CvxpyLayer(problem, parameters, [x, ineq_con.dual_variables[0]])
    _, dual = layer(*params)
    assert bool((dual >= -1e-7).all()) and dual.max() > 0.1  # x_2 >= 0 is active
    torch_layer = dl.Layer(problem, parameters, [x], backend="torch")
    torch_layer(*params)
    # CVXPY's dual of `x >= 0` (g = -x <= 0) is -lambda_g in the seed convention.
    assert torch.allclose(-torch_layer.info.ineq_multipliers, dual, atol=1e-6)


def test_dual_variables_with_the_torch_backend_are_refused() -> None:
    problem, parameters, x, eq_con, _ = _dual_problem()
    with pytest.raises(dl.DeclarationError, match="dual variables"):
        dl.Layer(problem, parameters, [x, eq_con.dual_variables[0]], backend="torch")


def test_infeasible_problem_raises_diffcp_solver_error() -> None:
    t = cp.Parameter()
    y = cp.Variable()
    problem = cp.Problem(cp.Minimize(y), [y >= t, y <= t - 1])
    with pytest.raises(DiffcpSolverError, match="infeasible"):
        CvxpyLayer(problem, [t], [y])(torch.tensor(1.0))


def test_unbounded_problem_raises_diffcp_solver_error() -> None:
    t = cp.Parameter()
    y = cp.Variable()
    problem = cp.Problem(cp.Minimize(y), [y <= t])
    with pytest.raises(DiffcpSolverError, match="unbounded"):
        CvxpyLayer(problem, [t], [y])(torch.tensor(1.0))


def test_torch_backend_failure_raises_diffcp_solver_error() -> None:
    t = cp.Parameter()
    y = cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.square(y)), [y >= t, y <= t - 1])
    with pytest.raises(DiffcpSolverError):
        CvxpyLayer(problem, [t], [y], backend="torch")(torch.tensor(1.0, dtype=F64))


def test_wrong_parameter_count_raises_cvxpylayers_value_error() -> None:
    problem, parameters, variables = _least_squares()
    layer = CvxpyLayer(problem, parameters, variables)
    with pytest.raises(ValueError, match="A tensor must be provided for each CVXPY parameter"):
        layer(torch.randn(3, 2))


def test_wrong_parameter_shape_raises_cvxpylayers_value_error() -> None:
    problem, parameters, variables = _least_squares()
    layer = CvxpyLayer(problem, parameters, variables)
    with pytest.raises(ValueError, match="Invalid parameter shape for parameter 1"):
        layer(torch.randn(3, 2), torch.randn(4))


def test_parameters_not_matching_the_problem_raise_cvxpylayers_value_error() -> None:
    problem, parameters, variables = _least_squares()
    with pytest.raises(ValueError, match=r"must exactly match problem\.parameters"):
        CvxpyLayer(problem, parameters[:1], variables)


def test_non_dpp_problem_raises_problem_must_be_dpp() -> None:
    p = cp.Parameter(pos=True)
    x = cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.square(x - p * p)))
    with pytest.raises(ValueError, match=r"Problem must be DPP\."):
        CvxpyLayer(problem, [p], [x])


def test_variable_outside_the_problem_raises_cvxpylayers_value_error() -> None:
    problem, parameters, _ = _least_squares()
    with pytest.raises(ValueError, match=r"must be a subset of problem\.variables"):
        CvxpyLayer(problem, parameters, [cp.Variable(2)])


def _entropic_transport(n: int = 4) -> tuple[cp.Problem, list, list, tuple[torch.Tensor, ...]]:
    cost = cp.Parameter((n, n))
    a, b = cp.Parameter(n, nonneg=True), cp.Parameter(n, nonneg=True)
    plan = cp.Variable((n, n))
    objective = cp.sum(cp.multiply(cost, plan)) - 0.1 * cp.sum(cp.entr(plan))
    marginals = [cp.sum(plan, axis=1) == a, cp.sum(plan, axis=0) == b]
    g = torch.Generator().manual_seed(0)
    c_t = torch.rand(n, n, generator=g, dtype=torch.float64)
    a_t = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b_t = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return (
        cp.Problem(cp.Minimize(objective), marginals),
        [cost, a, b],
        [plan],
        (c_t, a_t / a_t.sum(), b_t / b_t.sum()),
    )


def _marginal_gradients(layer: dl.Layer, data: tuple[torch.Tensor, ...]) -> tuple:
    cost, a, b = data
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    weights = torch.linspace(-1, 1, cost.numel(), dtype=cost.dtype).reshape(cost.shape)
    (plan,) = layer(cost, a, b)
    return torch.autograd.grad((plan * weights).sum(), (a, b))


def test_entropic_transport_gradients_are_the_minimum_norm_representative() -> None:
    """The two marginal constraints share a redundant row: the marginals' gradient is unique up
    to ``(+t 1, -t 1)``. declopt's implicit backward returns one representative on every backend
    (the minimum-norm one: equal totals), flags the singular system, and differs from
    cvxpylayers' native one along that direction only (README, "Non-unique gradients")."""
    problem, params, variables, data = _entropic_transport()
    grads = {}
    for name, options in (
        ("torch", {"backend": "torch"}),
        ("implicit", {"backend": "cvxpylayers", "backward": "implicit"}),
        ("native", {"backend": "cvxpylayers"}),
    ):
        layer = dl.Layer(problem, params, variables, **options)
        with pytest.warns(dl.GradientWarning) if name != "native" else contextlib.nullcontext():
            grads[name] = _marginal_gradients(layer, data)
        if name != "native":
            assert layer.info.backward.singular.all(), name
    ga, gb = grads["torch"]
    torch.testing.assert_close(ga.sum(), gb.sum(), rtol=0, atol=1e-9)  # minimum norm
    for got, want in zip(grads["implicit"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # SCS's accuracy
    shift_a = grads["native"][0] - ga
    shift_b = grads["native"][1] - gb
    torch.testing.assert_close(shift_a, shift_a.mean().expand_as(shift_a), rtol=0, atol=1e-5)
    torch.testing.assert_close(shift_b, -shift_a, rtol=0, atol=1e-5)


def _l1_fit() -> tuple[cp.Problem, list, list]:
    x = cp.Variable(2)
    A, b = cp.Parameter((3, 2)), cp.Parameter(3)
    return cp.Problem(cp.Minimize(cp.pnorm(A @ x - b, 1)), [x >= 0]), [A, b], [x]


def test_solver_args_reach_diffcp_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffcp's own keys win over declopt's defaults, as cvxpylayers passes them through;
    SCS 3's eps_abs / eps_rel replace the default eps (diffcp would turn it into both)."""
    import cvxpylayers.interfaces.diffcp_if as diffcp_if

    seen: list[dict] = []
    original = diffcp_if.diffcp.solve_and_derivative_batch

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(diffcp_if.diffcp, "solve_and_derivative_batch", spy)
    problem, parameters, variables = _l1_fit()
    torch.manual_seed(0)
    A = torch.randn(3, 2, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64)
    given = {"eps_abs": 1e-3, "eps_rel": 1e-3, "mode": "lsqr", "n_jobs_forward": 1}
    given["n_jobs_backward"] = 1
    CvxpyLayer(problem, parameters, variables)(A, b, solver_args=given)
    assert seen, "diffcp was not called"
    for key, value in given.items():
        assert seen[-1][key] == value, (key, seen[-1])
    assert "eps" not in seen[-1]


def test_a_cvxpylayers_custom_solver_is_passed_to_cvxpylayers() -> None:
    """cvxpylayers 1.2's SolverInterface (its own test's batch mock, delegating to diffcp)."""
    import diffcp
    from cvxpylayers.interfaces.base import SolverInterface
    from cvxpylayers.interfaces.diffcp_if import (
        _build_diffcp_matrices,
        _compute_gradients,
        dims_to_solver_dict,
    )

    class Batch(SolverInterface):
        canon_solver = "DIFFCP"

        def __init__(self, ctx) -> None:
            self.ctx = ctx

        def solve_torch_batch(self, P, q, A, dims, solver_args, needs_grad):
            ctx, batch = self.ctx, q.shape[0]
            As, bs, cs, b_idxs = _build_diffcp_matrices(
                A.T.contiguous(), q.T.contiguous(), ctx.A_structure, ctx.A_shape, ctx.b_idx, batch
            )
            cones = [dims_to_solver_dict(ctx.dims)] * batch
            xs, ys, _, _, adjoint = diffcp.solve_and_derivative_batch(As, bs, cs, cones)
            primal = torch.stack([torch.from_numpy(x) for x in xs])
            dual = torch.stack([torch.from_numpy(y) for y in ys])
            return primal, dual, (adjoint, bs, b_idxs, batch)

        def derivative_torch_batch(self, dprimal, ddual, data):
            adjoint, bs, b_idxs, batch = data
            dq, dA = _compute_gradients(
                adjoint, dprimal.detach().numpy(), ddual.detach().numpy(), bs, b_idxs, batch
            )
            return (
                None,
                torch.stack([torch.from_numpy(g) for g in dq]),
                torch.stack([torch.from_numpy(g) for g in dA]),
            )

    problem, parameters, variables = _l1_fit()
    ctx = Reference(problem, parameters, variables).ctx.solver_ctx
    torch.manual_seed(0)
    params = (torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64))
    want = _outputs_and_grads(Reference(problem, parameters, variables, solver=Batch(ctx)), *params)
    got = _outputs_and_grads(CvxpyLayer(problem, parameters, variables, solver=Batch(ctx)), *params)
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_a_failed_batch_says_what_to_change_on_the_cvxpylayers_backend() -> None:
    problem, parameters, variables = _l1_fit()
    torch.manual_seed(0)
    layer = CvxpyLayer(problem, parameters, variables)
    with pytest.raises(DiffcpSolverError) as raised:
        layer(torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64), solver_args={"max_iters": 1})
    message = str(raised.value)
    assert "solver_args" in message and "initializers=" not in message, message
    assert "on_failure='warn' returns the batch" in message, message


def test_a_wrong_sign_names_the_argument_of_an_unnamed_parameter() -> None:
    x = cp.Variable()
    a, lam = cp.Parameter(), cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.square(x - a) + lam * cp.abs(x)))
    layer = CvxpyLayer(problem, [a, lam], [x])
    with pytest.raises(dl.InputError, match=r"\(argument 1 of the call\) is declared nonneg"):
        layer(torch.tensor(1.0, dtype=F64), torch.tensor(-0.5, dtype=F64))
