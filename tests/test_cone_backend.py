"""The cone backend: CVXPY's canonicalisation, the batched interior-point method and the map
back to the layer's variables and multipliers, against Clarabel, the torch backend, closed forms
and finite differences."""

from __future__ import annotations

import warnings

import clarabel
import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import declopt as dl
from declopt.backends import get
from declopt.backends.cone.cones import ConeData, Cones
from declopt.backends.cone.ipm import solve
from declopt.diagnostics import Status
from declopt.errors import NonConvergenceWarning

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# the cones


def _interior(cones: Cones, batch: int, generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(batch, cones.rows, dtype=F64, generator=generator)
    v[:, : cones.zero] = 0
    return cones.shift_inside(v)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_nt_scaling_maps_z_and_s_to_one_point(seed: int) -> None:
    """``W z = W^{-1} s = lambda`` on every cone, and ``lambda o (lambda \\ v) = v``."""
    g = torch.Generator().manual_seed(seed)
    cones = Cones(2, 3, (4, 1 + int(torch.randint(1, 6, (1,), generator=g)), 4))
    s, z = _interior(cones, 5, g), _interior(cones, 5, g)
    scaling = cones.scaling(s, z)
    lam = scaling.apply(z)
    conic = cones.conic
    torch.testing.assert_close(lam[:, conic], scaling.apply(s, inverse=True)[:, conic])
    v = torch.randn(5, cones.rows, dtype=F64, generator=g)
    torch.testing.assert_close(scaling.apply(scaling.apply(v), inverse=True), v)
    # W^2 and W^-2 in one pass, also on matrices' columns
    vv = torch.randn(5, cones.rows, 3, dtype=F64, generator=g)
    torch.testing.assert_close(scaling.square(vv), scaling.apply(scaling.apply(vv)))
    twice = scaling.apply(scaling.apply(vv, inverse=True), inverse=True)
    torch.testing.assert_close(scaling.square(vv, inverse=True), twice)
    back = cones.circ(lam, cones.circ_solve(lam, v))
    torch.testing.assert_close(back[:, conic], v[:, conic])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_max_step_reaches_the_boundary_exactly(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cones = Cones(0, 3, (3, 5))
    v = _interior(cones, 6, g)
    d = 3 * torch.randn(6, cones.rows, dtype=F64, generator=g)
    alpha = cones.max_step(v, d)
    finite = torch.isfinite(alpha)
    inside = cones.min_eigenvalue(v + 0.999 * alpha.clamp_max(1e6)[:, None] * d)
    assert (inside[finite] > -1e-9).all()
    edge = cones.min_eigenvalue(v[finite] + alpha[finite][:, None] * d[finite])
    torch.testing.assert_close(edge, torch.zeros_like(edge), atol=1e-8, rtol=0)
    beyond = cones.min_eigenvalue(v[finite] + 1.001 * alpha[finite][:, None] * d[finite])
    assert (beyond < 0).all()
    # an unbounded step stays inside
    assert (cones.min_eigenvalue(v[~finite] + 1e3 * d[~finite]) > 0).all()


# ---------------------------------------------------------------------------------------------
# the interior-point method against Clarabel


def _clarabel(P, q, A, b, cones: Cones, tight: bool = False):
    parts = []
    if cones.zero:
        parts.append(clarabel.ZeroConeT(cones.zero))
    if cones.nonneg:
        parts.append(clarabel.NonnegativeConeT(cones.nonneg))
    parts += [clarabel.SecondOrderConeT(k) for k in cones.soc]
    options = clarabel.DefaultSettings()
    options.verbose = False
    if tight:  # a reference for exact (polished) answers
        options.tol_gap_abs = options.tol_gap_rel = options.tol_feas = 1e-12
        options.tol_ktratio = 1e-10
    n = q.shape[0]
    Pm = sp.csc_matrix(np.triu(P)) if P is not None else sp.csc_matrix((n, n))
    solution = clarabel.DefaultSolver(Pm, q, sp.csc_matrix(A), b, parts, options).solve()
    return str(solution.status), np.array(solution.x), solution.obj_val


def _random_programs(cones: Cones, batch: int, n: int, quadratic: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, cones.rows, n, dtype=F64, generator=g)
    x0 = torch.randn(batch, n, dtype=F64, generator=g)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + _interior(cones, batch, g)
    P = None
    if quadratic:
        Q = torch.randn(batch, n, n, dtype=F64, generator=g)
        P = Q @ Q.mT / n
    q = torch.randn(batch, n, dtype=F64, generator=g)
    return ConeData(P, q, A, b, cones)


@pytest.mark.parametrize(
    "cones,quadratic",
    [(Cones(3, 15), True), (Cones(0, 30), True), (Cones(2, 10, (4, 5, 4)), True)],
)
def test_interior_point_agrees_with_clarabel(cones: Cones, quadratic: bool) -> None:
    data = _random_programs(cones, 8, 12, quadratic, seed=3)
    result = solve(data)
    assert (result.status == int(Status.SOLVED)).all()
    for i in range(8):
        P = None if data.P is None else data.P[i].numpy()
        status, x, obj = _clarabel(
            P, data.q[i].numpy(), data.A[i].numpy(), data.b[i].numpy(), cones
        )
        assert status == "Solved"
        assert abs(result.objective[i].item() - obj) <= 1e-7 * max(1.0, abs(obj))
        if not cones.soc:  # polished: exact on the active set
            np.testing.assert_allclose(result.x[i].numpy(), x, atol=1e-6 * np.abs(x).max())


def test_an_early_polish_that_fails_resumes_the_interior_point(monkeypatch) -> None:
    """The interior point stops at ``POLISH_FROM`` and polishes; a problem whose active set is
    not yet plain there (forced here by stopping at 1e-1) is taken up again from where it
    stopped and polished at the full tolerance: the answers are the exact ones either way."""
    from declopt.backends.cone import ipm

    data = _random_programs(Cones(3, 15), 8, 12, quadratic=True, seed=3)
    exact = solve(data, ipm.Settings(tol=1e-9))
    monkeypatch.setattr(ipm, "POLISH_FROM", 1e-9)  # no early stop
    reference = solve(data, ipm.Settings(tol=1e-9))
    resumed = []
    original = ipm._resume
    monkeypatch.setattr(ipm, "_resume", lambda *a: resumed.append(a[3].sum()) or original(*a))
    monkeypatch.setattr(ipm, "POLISH_FROM", 1e-1)
    early = solve(data, ipm.Settings(tol=1e-9))
    assert resumed and resumed[0] > 0
    for result in (exact, early):
        assert (result.status == int(Status.SOLVED)).all()
        torch.testing.assert_close(result.x, reference.x, atol=1e-10, rtol=0)
        torch.testing.assert_close(result.objective, reference.objective, atol=1e-10, rtol=1e-12)
        assert (result.residual <= 1e-9).all()
    for i in range(8):
        P = data.P[i].numpy()
        _, x, _ = _clarabel(
            P, data.q[i].numpy(), data.A[i].numpy(), data.b[i].numpy(), data.cones, tight=True
        )
        np.testing.assert_allclose(early.x[i].numpy(), x, atol=1e-7 * np.abs(x).max(), rtol=0)


def test_linear_programs_report_unbounded_members() -> None:
    """Random LPs with free variables are mostly unbounded; Clarabel's verdict per member."""
    cones = Cones(3, 15)
    data = _random_programs(cones, 16, 12, quadratic=False, seed=0)
    result = solve(data)
    for i in range(16):
        status, _, obj = _clarabel(
            None, data.q[i].numpy(), data.A[i].numpy(), data.b[i].numpy(), cones
        )
        want = {"Solved": Status.SOLVED, "DualInfeasible": Status.UNBOUNDED}[status]
        assert result.status[i].item() == int(want), i
        if want == Status.SOLVED:
            assert abs(result.objective[i].item() - obj) <= 1e-7 * max(1.0, abs(obj))


@pytest.mark.parametrize("unit,cost", [(1e-6, 1.0), (1e6, 1.0), (1.0, 1e-8), (1e4, 1e7)])
def test_solutions_do_not_depend_on_the_data_units(unit: float, cost: float) -> None:
    """The same programs in other units (the solution's ``x -> unit x``, the objective's
    ``f -> cost f``: ``P cost / unit^2``, ``q cost / unit``, ``b unit``): the same verdicts and
    iterations (to one), the solution in the new units."""
    data = _random_programs(Cones(2, 12, (3,)), 6, 8, quadratic=True, seed=5)
    base = solve(data)
    scaled = ConeData(
        data.P * cost / unit**2, data.q * cost / unit, data.A, data.b * unit, data.cones
    )
    other = solve(scaled)
    assert torch.equal(other.status, base.status)
    assert (other.iterations - base.iterations).abs().max() <= 1
    torch.testing.assert_close(other.x / unit, base.x, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(other.objective / cost, base.objective, rtol=1e-8, atol=1e-10)


def test_equilibration_stops_once_settled_and_scales_badly_scaled_data_near_one() -> None:
    """Ruiz passes stop as soon as a pass would move no row or column by more than 1%: data
    whose rows and columns already peak at 1 is left as it is; rows and columns spanning 1e-6 ..
    1e6 end with their largest entries near 1."""
    from declopt.backends.cone.equilibrate import equilibrate

    g = torch.Generator().manual_seed(2)
    cones = Cones(1, 5)
    signs = torch.randint(0, 2, (3, cones.rows, 4), generator=g).to(F64) * 2 - 1
    unit = ConeData(
        None, torch.ones(3, 4, dtype=F64), signs, torch.ones(3, cones.rows, dtype=F64), cones
    )
    _, scaling = equilibrate(unit)
    assert torch.equal(scaling.D, torch.ones_like(scaling.D))
    assert torch.equal(scaling.E, torch.ones_like(scaling.E))
    rows = 10.0 ** torch.linspace(-6, 6, cones.rows, dtype=F64)
    cols = 10.0 ** torch.linspace(3, -3, 4, dtype=F64)
    A = torch.randn(3, cones.rows, 4, dtype=F64, generator=g) * rows[:, None] * cols
    scaled, _ = equilibrate(
        ConeData(None, torch.ones(3, 4, dtype=F64), A, torch.ones(3, 6, dtype=F64), cones)
    )
    for peaks in (scaled.A.abs().amax(-1), scaled.A.abs().amax(-2)):
        assert ((peaks > 0.5) & (peaks < 2)).all(), peaks


@pytest.mark.parametrize("cones", [Cones(0, 6), Cones(2, 4)])
def test_a_shared_quadratic_keeps_one_matrix_and_each_problem_its_own_units(cones: Cones) -> None:
    """One ``P`` and ``A`` for the batch, ``q`` and ``b`` per problem in units 1e-6 .. 1e6:
    equilibration keeps ``P`` one matrix (the per-problem cost scale apart, ``P_scale``), the
    row-space factors are built once, and each problem's answer is Clarabel's."""
    from declopt.backends.cone.equilibrate import equilibrate

    g = torch.Generator().manual_seed(11)
    n, batch = 9, 7
    Q = torch.randn(1, n, n, dtype=F64, generator=g)
    P = Q @ Q.mT / n + 0.1 * torch.eye(n, dtype=F64)
    A = torch.randn(1, cones.rows, n, dtype=F64, generator=g)
    x0 = torch.randn(batch, n, dtype=F64, generator=g)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + _interior(cones, batch, g)
    units = 10.0 ** torch.linspace(-6, 6, batch, dtype=F64)
    q = torch.randn(batch, n, dtype=F64, generator=g) * units[:, None]
    data = ConeData(P, q, A, b, cones)
    scaled, _ = equilibrate(data)
    assert scaled.P.shape[0] == 1 and scaled.P_scale is not None
    assert scaled.P_scale.shape == (batch,) and scaled.P_scale.unique().numel() > 1
    result = solve(data)
    assert (result.status == int(Status.SOLVED)).all()
    for i in range(batch):
        args = (P[0].numpy(), q[i].numpy(), A[0].numpy(), b[i].numpy(), cones)
        status, x, obj = _clarabel(*args, tight=True)
        assert status == "Solved"
        np.testing.assert_allclose(result.x[i].numpy(), x, atol=1e-7 * np.abs(x).max(), rtol=0)
        assert abs(result.objective[i].item() - obj) <= 1e-8 * max(1.0, abs(obj))


# ---------------------------------------------------------------------------------------------
# the backend through dl.Layer


def _qp(batch: int, shared: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nv, ni, ne = 8, 5, 2
    Q, q = cp.Parameter((nv, nv)), cp.Parameter(nv)
    G, h = cp.Parameter((ni, nv)), cp.Parameter(ni)
    A, b = cp.Parameter((ne, nv)), cp.Parameter(ne)
    w = cp.Variable(nv)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Q @ w) + q @ w), [G @ w <= h, A @ w == b])
    lead = () if shared else (batch,)
    Qv = torch.randn(*lead, nv, nv, dtype=F64, generator=g) / nv**0.5 + torch.eye(nv, dtype=F64)
    Gv = torch.randn(*lead, ni, nv, dtype=F64, generator=g)
    Av = torch.randn(*lead, ne, nv, dtype=F64, generator=g)
    w0 = 0.3 * torch.randn(batch, nv, dtype=F64, generator=g)
    hv = (Gv @ w0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, ni, dtype=F64, generator=g)
    bv = (Av @ w0.unsqueeze(-1)).squeeze(-1)
    qv = 3 * torch.randn(batch, nv, dtype=F64, generator=g)
    return problem, [Q, q, G, h, A, b], [w], [Qv, qv, Gv, hv, Av, bv]


def _solve_and_grad(layer, data, seed=1):
    inputs = [t.clone().requires_grad_() for t in data]
    outputs = layer(*inputs)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outputs]
    loss = sum((o * v).sum() for o, v in zip(outputs, weights))
    return [o.detach() for o in outputs], torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("shared", [False, True])
def test_qp_matches_the_torch_backend(shared: bool) -> None:
    problem, params, variables, data = _qp(6, shared)
    ref = dl.Layer(problem, params, variables, backend="torch")
    cone = dl.Layer(problem, params, variables, backend="cone")
    (u_ref,), g_ref = _solve_and_grad(ref, data)
    (u,), grads = _solve_and_grad(cone, data)
    assert cone.info.converged.all()
    torch.testing.assert_close(u, u_ref, atol=1e-9, rtol=0)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-8 * b.abs().max().item(), rtol=0)


def test_qp_gradients_pass_gradcheck() -> None:
    problem, params, variables, data = _qp(2, shared=False, seed=4)
    layer = dl.Layer(problem, params, variables, backend="cone")
    inputs = [t.clone().requires_grad_() for t in data]
    assert torch.autograd.gradcheck(lambda *a: layer(*a)[0], inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cvxpylayers_readme_example_converges_in_both_dtypes(dtype: torch.dtype) -> None:
    """``0.5 |A x - b|_1, x >= 0`` (cvxpylayers' README) at batch 64: every member converged,
    agreeing with cvxpylayers."""
    g = torch.Generator().manual_seed(0)
    A, b, x = cp.Parameter((3, 2)), cp.Parameter(3), cp.Variable(2)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    data = [torch.randn(64, 3, 2, generator=g), torch.randn(64, 3, generator=g)]
    data = [t.to(dtype) for t in data]
    cone = dl.Layer(problem, [A, b], [x], backend="cone")
    (u,), _ = _solve_and_grad(cone, data)
    assert cone.info.converged.all()
    assert u.dtype == dtype
    ref = dl.Layer(problem, [A, b], [x], backend="cvxpylayers", n_jobs=1)
    (u_ref,), _ = _solve_and_grad(ref, [t.double() for t in data])
    atol = 1e-6 if dtype == F64 else 1e-5
    torch.testing.assert_close(u.double(), u_ref, atol=atol, rtol=0)


def test_ball_projection_matches_the_closed_form() -> None:
    """A second-order cone: ``min |z - p|^2, |z| <= r`` is ``p * min(1, r / |p|)``."""
    g = torch.Generator().manual_seed(2)
    d = 6
    p, r, z = cp.Parameter(d), cp.Parameter(pos=True), cp.Variable(d)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= r])
    pv = torch.randn(8, d, dtype=F64, generator=g) * torch.linspace(0.2, 2, 8, dtype=F64)[:, None]
    rv = torch.tensor(1.0, dtype=F64)
    layer = dl.Layer(problem, [p, r], [z], backend="cone")
    pin = pv.clone().requires_grad_()
    (zt,) = layer(pin, rv)
    norm = pv.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(zt.detach(), pv * (rv / norm).clamp_max(1), atol=1e-7, rtol=0)
    v = torch.randn(8, d, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((zt * v).sum(), pin)
    pc = pv.clone().requires_grad_()
    closed = pc * (rv / pc.norm(dim=-1, keepdim=True)).clamp_max(1)
    (want,) = torch.autograd.grad((closed * v).sum(), pc)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=0)


def test_weighted_ball_projections_all_answer_their_best_iterate() -> None:
    """``min |s * z - q|^2 / 2, |z| <= 1`` (a diagonal metric): the float64 iterates reach 1e-9
    .. 1e-8, then lose accuracy until a factorisation fails; each problem answers its best
    iterate within CVXPY's solvers' 1e-8 (24 of 64 ended ``NUMERICAL`` before). The answers are
    as accurate as the solved ones: an interior point's relative gap, not the solution, is at
    ``tol`` (no polish for second-order cones), hence the loose comparison."""
    g = torch.Generator().manual_seed(0)
    d, batch = 8, 64
    q, s, z = cp.Parameter(d), cp.Parameter(d, pos=True), cp.Variable(d)
    objective = 0.5 * cp.sum_squares(cp.multiply(s, z) - q)
    problem = cp.Problem(cp.Minimize(objective), [cp.norm(z, 2) <= 1])
    weights = (torch.rand(batch, d, dtype=F64, generator=g) * 10 + 0.1).sqrt()
    data = (weights * torch.randn(batch, d, dtype=F64, generator=g), weights)
    layer = dl.Layer(problem, [q, s], [z], backend="cone")
    (cone,) = layer(*data)
    assert (layer.info.status == Status.SOLVED).all()
    (torch_z,) = dl.Layer(problem, [q, s], [z], backend="torch")(*data)
    torch.testing.assert_close(cone, torch_z, atol=1e-4, rtol=0)


def test_infeasible_and_unbounded_members_are_reported_per_problem() -> None:
    """``min c x`` over ``lo <= x <= hi``: ``lo > hi`` is infeasible, ``hi = +big`` with
    ``c < 0``... here unboundedness comes from an absent upper bound: ``x >= lo`` only."""
    x, lo, hi, c = cp.Variable(), cp.Parameter(), cp.Parameter(), cp.Parameter()
    bounded = cp.Problem(cp.Minimize(c * x), [x >= lo, x <= hi])
    layer = dl.Layer(bounded, [lo, hi, c], [x], backend="cone")
    lo_v = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    hi_v = torch.tensor([1.0, 1.0, 3.0], dtype=F64)
    c_v = torch.tensor([1.0, 1.0, -2.0], dtype=F64)
    with pytest.warns(NonConvergenceWarning, match="infeasible at batch indices \\[\\(1,\\)\\]"):
        (xt,) = layer(lo_v, hi_v, c_v)
    assert layer.info.status.tolist() == [Status.SOLVED, Status.INFEASIBLE, Status.SOLVED]
    torch.testing.assert_close(xt, torch.tensor([0.0, 0.0, 3.0], dtype=F64))

    open_above = cp.Problem(cp.Minimize(c * x), [x >= lo])
    layer = dl.Layer(open_above, [lo, c], [x], backend="cone")
    with pytest.warns(NonConvergenceWarning, match="unbounded at batch indices \\[\\(0,\\)\\]"):
        (xt,) = layer(torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([-1.0, 2.0], dtype=F64))
    assert layer.info.status.tolist() == [Status.UNBOUNDED, Status.SOLVED]
    torch.testing.assert_close(xt, torch.tensor([0.0, 1.0], dtype=F64))


def test_a_user_variable_defined_by_an_equality_is_recovered_with_its_multiplier() -> None:
    """``y == A x`` makes ``y`` a defined column: eliminated before the solve, recovered after,
    with the equality's multiplier from stationarity in ``y``."""
    g = torch.Generator().manual_seed(7)
    x, y = cp.Variable(3), cp.Variable(2)
    A, t = cp.Parameter((2, 3)), cp.Parameter(2)
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(y - t) + 0.1 * cp.sum_squares(x)), [y == A @ x, x >= -0.2]
    )
    data = [torch.randn(4, 2, 3, dtype=F64, generator=g), torch.randn(4, 2, dtype=F64, generator=g)]
    cone_layer = dl.Layer(problem, [A, t], [x, y], backend="cone")
    canonical = get("cone").canonical(cone_layer.program)
    assert canonical.elimination.columns.numel() >= 2
    ref = dl.Layer(problem, [A, t], [x, y], backend="torch")
    outs, grads = _solve_and_grad(cone_layer, data)
    outs_ref, grads_ref = _solve_and_grad(ref, data)
    for a, b in zip(outs + list(grads), outs_ref + list(grads_ref)):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)
    from declopt.program import BatchedParams

    params = BatchedParams(tuple(data), (0, 0), 4)
    mine = get("cone").solve(cone_layer.program, params)
    theirs = get("torch").solve(ref.program, params, starts=[torch.zeros(4, 5, dtype=F64)])
    torch.testing.assert_close(mine.eq_multipliers, theirs.eq_multipliers, atol=1e-7, rtol=0)
    torch.testing.assert_close(mine.ineq_multipliers, theirs.ineq_multipliers, atol=1e-7, rtol=0)


def test_maximisation_matches_the_torch_backend() -> None:
    x, c = cp.Variable(3), cp.Parameter(3)
    problem = cp.Problem(cp.Maximize(c @ x - cp.sum_squares(x)), [cp.sum(x) == 1, x >= 0])
    data = [torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=F64)]
    (u,), grads = _solve_and_grad(dl.Layer(problem, [c], [x], backend="cone"), data)
    (u_ref,), grads_ref = _solve_and_grad(dl.Layer(problem, [c], [x], backend="torch"), data)
    torch.testing.assert_close(u, u_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-8, rtol=0)


def test_refusals_name_the_cause_and_the_alternative() -> None:
    x, a = cp.Variable(2), cp.Parameter(2)
    exp_cone = cp.Problem(cp.Minimize(cp.sum(cp.exp(x)) - a @ x))
    with pytest.raises(ValueError, match=r"exponential cones.*backend='cvxpylayers'"):
        dl.Layer(exp_cone, [a], [x], backend="cone")
    not_dpp = cp.Problem(cp.Minimize(cp.sum_squares(x) + a[0] * a[1] * x[0]))
    with pytest.raises(ValueError, match="DPP"):
        dl.Layer(not_dpp, [a], [x], backend="cone")


def test_a_parameter_cvxpy_rewrites_is_refused_and_auto_falls_back() -> None:
    """A symmetric parameter is stored by CVXPY as its upper triangle; writing its declared
    entries would shift every later parameter (a silent wrong answer before this check)."""
    x, S, a = cp.Variable(2), cp.Parameter((2, 2), symmetric=True), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(S @ x)), [x >= 0])
    with pytest.raises(ValueError, match=r"rewrites parameter.*symmetric"):
        dl.Layer(problem, [S, a], [x], backend="cone")
    layer = dl.Layer(problem, [S, a], [x])
    assert layer.backend_name == "cvxpylayers" and "rewrites parameter" in layer.reason


def test_float32_parameters_on_a_shared_batch() -> None:
    problem, params, variables, data = _qp(5, shared=True, seed=3)
    layer = dl.Layer(problem, params, variables, backend="cone")
    (u32,) = layer(*[t.float() for t in data])
    (u64,) = layer(*data)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, atol=1e-5, rtol=1e-5)


def test_auto_sends_small_dpp_convex_problems_to_the_cone_backend() -> None:
    problem, params, variables, data = _qp(3, shared=False)
    layer = dl.Layer(problem, params, variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(*data)
    assert layer.info.backend == "cone"
    assert "cone" in layer.info.reason


def test_computing_in_float32_converges_near_the_float64_answer() -> None:
    """``working_dtype=None`` on float32 inputs: the interior point runs in float32 (as on a GPU
    where float64 is slow) and stops at float32's tolerance."""
    problem, params, variables, data = _qp(16, shared=False, seed=6)
    (u64,) = dl.Layer(problem, params, variables, backend="cone")(*data)
    layer = dl.Layer(problem, params, variables, backend="cone", working_dtype=None)
    (u32,) = layer(*[t.float() for t in data])
    assert layer.info.converged.all()
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, atol=1e-3 * u64.abs().max().item(), rtol=0)


def test_transport_with_a_redundant_marginal_row_matches_the_torch_backend() -> None:
    """``min <C, P> + |P|^2 / 2`` over couplings: the marginal rows are linearly dependent (the
    duals are not unique) and several entries are weakly active. The polish releases rows its
    first active-set guess holds with a wrong-sign multiplier."""
    n = 4
    P, C = cp.Variable((n, n)), cp.Parameter((n, n))
    r, c = cp.Parameter(n), cp.Parameter(n)
    problem = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(C, P)) + 0.5 * cp.sum_squares(P)),
        [cp.sum(P, axis=1) == r, cp.sum(P, axis=0) == c, P >= 0],
    )
    g = torch.Generator().manual_seed(0)
    data = [
        torch.rand(3, n, n, dtype=F64, generator=g),
        torch.full((3, n), 1 / n, dtype=F64),
        torch.full((3, n), 1 / n, dtype=F64),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (u,), grads = _solve_and_grad(dl.Layer(problem, [C, r, c], [P], backend="cone"), data)
        (u_ref,), g_ref = _solve_and_grad(dl.Layer(problem, [C, r, c], [P], backend="torch"), data)
    torch.testing.assert_close(u, u_ref, atol=1e-7, rtol=0)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_misread_data_layout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The construction-time check against CVXPY's ``apply_parameters``: a parameter layout read
    wrongly (here: its entries reversed) is refused, never solved."""
    from declopt.backends.cone import canonical

    right = canonical._fortran_flat
    monkeypatch.setattr(canonical, "_fortran_flat", lambda value: right(value).flip(0))
    x, A, b = cp.Variable(3), cp.Parameter((2, 3)), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
    A.value = np.ones((2, 3))
    with pytest.raises(canonical.Unsupported, match="does not reproduce CVXPY's own"):
        canonical.canonicalise(problem, [A, b], [x], 0, 3)
    np.testing.assert_array_equal(A.value, np.ones((2, 3)))  # the user's value is restored
    assert b.value is None


def test_solutions_at_zero_with_zero_data_are_accepted() -> None:
    """``min c x, x >= 0`` (``b = 0``; with a zero cost entry the solution set is a ray), the
    projection of 0 onto a ball, and ``min x_0`` with two free unused variables: every residual
    shrinks with the terms it is measured against, so without the equilibrated unit as a floor
    these ran to the iteration cap."""
    x, c = cp.Variable(3), cp.Parameter(3)
    layer = dl.Layer(cp.Problem(cp.Minimize(c @ x), [x >= 0]), [c], [x], backend="cone")
    (u,) = layer(torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.5]], dtype=F64))
    assert layer.info.converged.all()
    torch.testing.assert_close(u, torch.zeros_like(u), atol=1e-9, rtol=0)

    a = cp.Parameter(3)
    ball = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [cp.norm(x, 2) <= 1])
    layer = dl.Layer(ball, [a], [x], backend="cone")
    (u,) = layer(torch.zeros(2, 3, dtype=F64))
    assert layer.info.converged.all()
    torch.testing.assert_close(u, torch.zeros_like(u), atol=1e-9, rtol=0)

    t = cp.Parameter()
    free = cp.Problem(cp.Minimize(a @ x), [x[0] >= t])
    layer = dl.Layer(free, [t, a], [x], backend="cone")
    with pytest.warns(NonConvergenceWarning, match="unbounded at batch indices \\[\\(1,\\)\\]"):
        layer(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0]], dtype=F64))
    assert layer.info.status.tolist() == [Status.SOLVED, Status.UNBOUNDED]


def _dense_reduction(canonical, params):
    """The reduced program by the definition (see ``Elimination``), from the full data maps
    written out densely: the reference the block maps must reproduce."""
    full, _ = canonical.theta(params, F64)
    n, rows, el = canonical.n, canonical.rows, canonical.elimination
    Ab = canonical.A.apply(full).reshape(-1, n + 1, rows).transpose(-1, -2)
    A_c, b_c = Ab[..., :n], Ab[..., n]
    q = canonical.q.apply(full)[:, :n]
    P = canonical.P.apply(full).reshape(-1, n, n).transpose(-1, -2)
    E, R, e_rows, K = el.columns, el.kept_columns, el.rows, el.kept_rows
    c = el.coefficients
    T = -A_c[:, e_rows][:, :, R] / c[:, None]
    t = -b_c[:, e_rows] / c
    batch = full.shape[1]  # theta holds one column per problem
    S = torch.zeros(batch, n, R.numel(), dtype=F64)  # x = S x_R + s
    S[:, R, torch.arange(R.numel())] = 1
    S[:, E] = T
    s = torch.zeros(batch, n, dtype=F64)
    s[:, E] = t
    P_red = S.mT @ P @ S
    q_red = (S.mT @ (q + (P @ s.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)
    return P_red, q_red, -A_c[:, K][:, :, R], b_c[:, K]


def test_the_reduced_data_blocks_equal_the_dense_reduction() -> None:
    """Each block of the reduced program is written straight from the parameters (no full
    matrix formed and cut up), skipping structurally zero blocks and applying a diagonal P_ee
    as a product; the result is the substitution x = S x_R + s of the full program, for a
    diagonal P_ee (sum_squares), a full one (quad_form of a defined variable), a coupling block
    P_re (a variable partly defined) and shared or batched parameters."""
    from declopt.program import BatchedParams

    w, y, v = cp.Variable(4), cp.Variable(3), cp.Variable(3)
    Q, c = cp.Parameter((3, 4)), cp.Parameter(3)
    S3 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
    declarations = {
        "diagonal": (cp.sum_squares(Q @ w - c) + cp.sum(w), [w >= -1], [w]),
        "full": (cp.quad_form(y, S3) + c @ y + cp.sum_squares(w), [y == Q @ w, w >= -1], [w, y]),
        "coupled": (
            cp.quad_form(v, S3) + cp.sum_squares(w) + c @ v,
            [v[0] == Q[0, :] @ w, v[1:] >= -1, w >= -1],
            [w, v],
        ),
    }
    seen = set()
    g = torch.Generator().manual_seed(3)
    for name, (objective, constraints, variables) in declarations.items():
        problem = cp.Problem(cp.Minimize(objective), constraints)
        layer = dl.Layer(problem, [Q, c], variables, backend="cone")
        canonical = get("cone").canonical(layer.program)
        blocks = canonical.blocks
        assert canonical.elimination.columns.numel() > 0
        seen.add((blocks.P_ee_diagonal, blocks.P_re is not None))
        for shared in (False, True):
            Qv = torch.randn(*(() if shared else (5,)), 3, 4, dtype=F64, generator=g)
            params = BatchedParams(
                (Qv, torch.randn(5, 3, dtype=F64, generator=g)), (None if shared else 0, 0), 5
            )
            data = canonical.data(params, F64).data
            for mine, ref in zip(
                (data.P, data.q, data.A, data.b), _dense_reduction(canonical, params)
            ):
                assert mine.shape[0] in (1, 5)
                torch.testing.assert_close(mine.expand_as(ref), ref, atol=1e-12, rtol=0)
            if name == "diagonal":  # P = Q^T Q: built once when Q is shared
                assert (data.P.shape[0] == 1) == shared
        ref_layer = dl.Layer(problem, [Q, c], variables, backend="torch")
        inputs = [
            torch.randn(2, 3, 4, dtype=F64, generator=g),
            torch.randn(2, 3, dtype=F64, generator=g),
        ]
        for a, b in zip(layer(*inputs), ref_layer(*inputs)):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=0)
    assert seen == {(True, False), (False, False), (True, True)}, seen
