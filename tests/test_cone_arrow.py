"""The cone backend's block-arrow factorisation: its plan from a program's sparsity, its solves
against the dense matrix, and the interior point with it against the dense factorisations, on
random sparse programs (equalities, inequalities, second-order cones; feasible, unbounded and
broken members) and on the declarations it is for (robust pooling, the ball projection)."""

from __future__ import annotations

import dataclasses

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import declopt as dl
from declopt.backends import get
from declopt.backends.cone.arrow import ArrowFactor, ArrowPattern, low_rank_terms
from declopt.backends.cone.cones import ConeData, Cones
from declopt.backends.cone.ipm import Settings, solve
from declopt.diagnostics import Status

F64 = torch.float64


def _sparse_program(
    seed: int, batch: int, quadratic: bool, zero: int, soc: tuple[int, ...], dense: int = 0
):
    """Random programs whose columns form small coupled groups plus a few columns that couple
    to many groups (in shuffled order), and ``dense`` orthant rows over every column (a budget):
    ``(ConeData, A pattern, P pattern)``."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=int(rng.integers(4, 9)))
    hubs = int(rng.integers(0, 3))
    n = int(sizes.sum()) + hubs
    order = rng.permutation(n)
    groups = np.split(order[hubs:], np.cumsum(sizes)[:-1])
    hub = order[:hubs]

    def row_over(group: np.ndarray) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(group, size=int(rng.integers(1, group.size + 1)), replace=False)] = True
        if hubs and rng.random() < 0.5:
            mask[rng.choice(hub)] = True
        return mask

    zero_rows = [row_over(groups[rng.integers(len(groups))]) for _ in range(zero)]
    orthant = [row_over(group) for group in groups for _ in range(int(rng.integers(1, 3)))]
    orthant += [np.ones(n, dtype=bool) for _ in range(dense)]
    cone_rows = []
    for k in soc:
        head = np.zeros(n, dtype=bool)
        if rng.random() < 0.5:  # a head row that holds a column, or only data
            head[rng.integers(n)] = True
        cone_rows.append(head)
        for _ in range(k - 1):
            cone_rows.append(row_over(groups[rng.integers(len(groups))]))
    a_mask = np.array(zero_rows + orthant + cone_rows)
    cones = Cones(zero, len(orthant), soc)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, cones.rows, n, dtype=F64, generator=g) * torch.as_tensor(a_mask)
    x0 = torch.randn(batch, n, dtype=F64, generator=g)
    s0 = torch.randn(batch, cones.rows, dtype=F64, generator=g)
    s0[:, :zero] = 0
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + cones.shift_inside(s0)
    P, p_mask = None, None
    if quadratic:
        P = torch.zeros(batch, n, n, dtype=F64)
        for group in groups + ([hub] if hubs else []):
            X = torch.randn(batch, group.size, group.size, dtype=F64, generator=g)
            index = torch.as_tensor(group)
            P[:, index[:, None], index] += X @ X.mT / group.size
        for h in hub:  # each hub column couples to one column of every group
            u = torch.zeros(batch, n, dtype=F64)
            u[:, h] = 1
            for group in groups:
                u[:, rng.choice(group)] = 0.3
            P += u.unsqueeze(-1) * u.unsqueeze(-2)
        p_mask = (P != 0).any(0).numpy()
    q = torch.randn(batch, n, dtype=F64, generator=g)
    return ConeData(P, q, A, b, cones), a_mask, p_mask


def _plan(data: ConeData, a_mask: np.ndarray, p_mask: np.ndarray | None) -> ArrowPattern:
    cones = data.cones
    start = cones.zero + cones.nonneg
    # every column planned, and rows beyond a group and a hub (<= 5 entries) as rank-one terms
    arrow = ArrowPattern.plan(
        a_mask, p_mask, start, cones.soc, threshold=np.inf, min_columns=0, dense_row=5
    )
    assert arrow is not None
    return arrow


def _partition_is_exact(arrow: ArrowPattern) -> None:
    columns = [arrow.border] + [g.columns.flatten() for g in arrow.groups]
    every = torch.cat(columns)
    every = every[every < arrow.n]
    assert sorted(every.tolist()) == list(range(arrow.n))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    quadratic=st.booleans(),
    soc=st.sampled_from([(), (3,), (2, 5), (4, 4, 1)]),
    dense=st.integers(0, 2),
    exponent=st.floats(0, 6),
)
def test_the_factor_solves_the_dense_system(
    seed: int, quadratic: bool, soc: tuple[int, ...], dense: int, exponent: float
) -> None:
    """``M = P + A^T H^{-1} A + rho I`` with the diagonal weights spread over
    ``10^+-exponent``, second-order cones' blocks ``W^{-2}`` from a true NT scaling and rows
    over every column (rank-one terms): the solve's backward error is at rounding level
    (measured <= 1e-15, as the dense Cholesky factorisation; the explicit inverse of the blocks
    reached 1e-9 on nearly singular borders), with rank-one rows after one refinement step (as
    the interior point takes for such programs)."""
    data, a_mask, p_mask = _sparse_program(seed, 4, quadratic, zero=1, soc=soc, dense=dense)
    arrow = _plan(data, a_mask, p_mask)
    _partition_is_exact(arrow)
    assert arrow.dense_rows.numel() == dense
    data = dataclasses.replace(data, arrow=arrow)
    g = torch.Generator().manual_seed(seed)
    cones, batch, n = data.cones, data.batch, data.q.shape[-1]
    h = 10 ** (exponent * (2 * torch.rand(batch, cones.rows, dtype=F64, generator=g) - 1))
    H_inv = torch.diag_embed(h)
    cone_terms = None
    if soc:
        s = cones.shift_inside(torch.randn(batch, cones.rows, dtype=F64, generator=g))
        z = cones.shift_inside(torch.randn(batch, cones.rows, dtype=F64, generator=g))
        scaling = cones.scaling(s, z)
        a = torch.zeros(batch, cones.rows, dtype=F64)
        eta_rows = torch.zeros(batch, cones.rows, dtype=F64)
        for index, (eta, w) in zip(cones.groups(s.device), scaling.blocks):
            a[:, index] = torch.cat([w[..., :1], -w[..., 1:]], -1)
            eta_rows[:, index[:, 0]] = eta[..., 0]
            h[:, index] = (1 / eta**2).expand_as(w)  # W^{-2}'s diagonal part
        cone_terms = (a, eta_rows[:, arrow.soc_heads])
        eye = torch.eye(cones.rows, dtype=F64).expand(batch, -1, -1)
        W_inv2 = scaling.apply(scaling.apply(eye, inverse=True), inverse=True)
        soc_rows = slice(cones.zero + cones.nonneg, cones.rows)
        H_inv = torch.diag_embed(h)
        H_inv[:, soc_rows, soc_rows] = W_inv2[:, soc_rows, soc_rows]
    factor = ArrowFactor(data, h, 1e-8, low_rank_terms(data, h, cone_terms))
    assert not factor.failed.any()
    M = data.A.mT @ H_inv @ data.A
    if data.P is not None:
        M = M + data.P
    M = M + factor.rho[:, None, None] * torch.eye(n, dtype=F64)
    r = torch.randn(batch, n, 3, dtype=F64, generator=g)
    size = torch.linalg.matrix_norm(M, ord=np.inf)[:, None, None]

    def backward_error(x: torch.Tensor) -> torch.Tensor:
        residual = (M @ x - r).abs().amax((-2, -1), keepdim=True)
        scale = size * x.abs().amax((-2, -1), keepdim=True)
        return residual / (scale + r.abs().amax((-2, -1), keepdim=True))

    x = factor.solve(r)
    refined = x + factor.solve(r - M @ x)
    assert (backward_error(refined) <= 1e-13).all(), backward_error(refined).flatten()
    if not dense:  # rank-one rows over a nearly singular rest: up to 2e-10 before refinement
        assert (backward_error(x) <= 1e-13).all(), backward_error(x).flatten()


@pytest.mark.parametrize(
    "quadratic,zero,soc,dense",
    [
        (True, 0, (), 0),
        (True, 2, (), 0),
        (False, 1, (), 0),
        (True, 0, (4,), 0),
        (True, 1, (3, 5), 0),
        (False, 0, (4,), 0),
        (True, 0, (), 1),
        (False, 1, (), 2),
        (True, 1, (4,), 1),
    ],
)
def test_the_interior_point_with_the_plan_matches_the_dense_factorisation(
    quadratic: bool, zero: int, soc: tuple[int, ...], dense: int
) -> None:
    """The same batch solved with the block-arrow factors and with the dense ones: the same
    verdict per member (solved, unbounded, a member with a NaN in its data reported as a
    numerical failure), the same solutions and objective values."""
    for seed in range(4):
        data, a_mask, p_mask = _sparse_program(seed, 6, quadratic, zero, soc, dense)
        q = data.q.clone()
        q[2, 0] = float("nan")  # a broken member: the rest of the batch is unaffected
        data = dataclasses.replace(data, q=q)
        arrow = _plan(data, a_mask, p_mask)
        reference = solve(data, Settings(tol=1e-9))
        sparse = solve(dataclasses.replace(data, arrow=arrow), Settings(tol=1e-9))
        assert sparse.status.tolist() == reference.status.tolist(), seed
        assert sparse.status[2] == int(Status.NUMERICAL)
        solved = reference.status == int(Status.SOLVED)
        if quadratic:
            assert solved.sum() >= 2
        scale = reference.objective[solved].abs().clamp_min(1)
        torch.testing.assert_close(
            sparse.objective[solved] / scale, reference.objective[solved] / scale, atol=1e-7, rtol=0
        )
        if not soc:  # polished: exact on the active set
            x_scale = reference.x[solved].abs().amax(-1, keepdim=True).clamp_min(1)
            torch.testing.assert_close(
                sparse.x[solved] / x_scale, reference.x[solved] / x_scale, atol=1e-7, rtol=0
            )


def test_dense_and_tiny_programs_keep_the_dense_factorisation() -> None:
    """A QP whose matrices are dense has no block-arrow plan, nor does a program under
    ``MIN_COLUMNS`` columns; Huber pooling and the ball projection have one."""
    dense = ArrowPattern.plan(np.ones((35, 50), dtype=bool), np.ones((50, 50), dtype=bool), 10, ())
    assert dense is None
    tiny = ArrowPattern.plan(np.eye(6, dtype=bool), None, 0, ())
    assert tiny is None
    x, y = cp.Parameter(40), cp.Variable()
    huber = cp.Problem(cp.Minimize(cp.sum(dl.penalties.huber(y - x, 1.0))))
    layer = dl.Layer(huber, [x], [y], backend="cone")
    arrow = get("cone").canonical(layer.program).arrow
    assert arrow is not None and arrow.border.numel() == 1
    # the kept columns were reordered so that rows move as views: {s_i, t_i} pairs, then y
    assert [g.span for g in arrow.groups] == [(0, 80)] and arrow.border_span == (80, 81)
    p, z = cp.Parameter(40), cp.Variable(40)
    ball = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= 1])
    layer = dl.Layer(ball, [p], [z], backend="cone")
    arrow = get("cone").canonical(layer.program).arrow
    assert arrow is not None and arrow.border.numel() == 0
    assert {g.columns.shape[-1] for g in arrow.groups} == {1}
    assert all(g.span is not None for g in arrow.groups)


@pytest.mark.parametrize("working", [torch.float64, None])
def test_pooling_and_the_ball_projection_match_the_torch_backend(working) -> None:
    """The declarations the plan is for, through the layer: values and gradients agree with the
    torch backend (float64 solves), and float32 solves (pooling keeps its row-space
    factorisation there, see :func:`declopt.backends.cone.ipm.solve`; the ball's answers are
    its best iterates, see ``REDUCED_TOL``) to float32's accuracy."""
    g = torch.Generator().manual_seed(5)
    n = 40
    x, alpha, y = cp.Parameter(n), cp.Parameter(pos=True), cp.Variable()
    huber = cp.Problem(cp.Minimize(cp.sum(dl.penalties.huber(y - x, alpha))))
    p, r, z = cp.Parameter(n), cp.Parameter(pos=True), cp.Variable(n)
    ball = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= r])
    dtype = F64 if working is not None else torch.float32
    cases = [
        (huber, [x, alpha], [y], [2 * torch.randn(6, n, generator=g), torch.tensor(1.0)]),
        (ball, [p, r], [z], [torch.randn(6, n, generator=g) / 4, torch.tensor(1.0)]),
    ]
    for problem, params, variables, data in cases:
        data = [d.to(dtype) for d in data]
        cone = dl.Layer(problem, params, variables, backend="cone", working_dtype=working)
        reference = dl.Layer(problem, params, variables, backend="torch")
        assert get("cone").canonical(cone.program).arrow is not None
        inputs = [d.clone().requires_grad_() for d in data]
        (out,) = cone(*inputs)
        assert cone.info.converged.all()
        ref_inputs = [d.double().clone().requires_grad_() for d in data]
        (want,) = reference(*ref_inputs)
        tol = 1e-7 if dtype == F64 else 2e-4
        torch.testing.assert_close(out.double(), want.detach(), atol=tol, rtol=0)
        v = torch.randn(out.shape, generator=g, dtype=F64)
        grads = torch.autograd.grad((out.double() * v).sum(), inputs[0])
        wants = torch.autograd.grad((want * v).sum(), ref_inputs[0])
        torch.testing.assert_close(grads[0].double(), wants[0], atol=10 * tol, rtol=0)


@pytest.mark.parametrize("planned", [False, True])
def test_the_polish_holds_a_row_its_first_guess_missed(planned: bool) -> None:
    """An interior answer whose ``z > s`` test misses an active row (a nearly degenerate row at
    the early stop): the first polished point violates that row, the next guess holds it, and
    the polish ends at the exact solution (it used to give up and resume the interior point)."""
    from declopt.backends.cone import ipm

    data, a_mask, p_mask = _sparse_program(11, 6, True, zero=0, soc=())
    if planned:
        data = dataclasses.replace(data, arrow=_plan(data, a_mask, p_mask))
    exact = solve(data, Settings(tol=1e-10))
    assert (exact.status == int(Status.SOLVED)).all()
    held = exact.z - exact.s  # > 0 on the active rows
    assert (held.amax(-1) > 0).all()
    row = held.argmax(-1)
    s, z = exact.s.clone(), exact.z.clone()
    batch = torch.arange(6)
    s[batch, row], z[batch, row] = 1.0, 0.0  # the guess z > s misses it
    guess = dataclasses.replace(exact, s=s, z=z)
    polished, taken = ipm._polish(data, guess, Settings(tol=1e-9))
    assert taken.all()
    scale = exact.x.abs().amax(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(polished.x / scale, exact.x / scale, atol=1e-9, rtol=0)
    torch.testing.assert_close(polished.z, exact.z, atol=1e-8 * exact.z.abs().max(), rtol=0)


def _made_infeasible(seed: int, planned: bool) -> ConeData:
    """Six random QPs with a second-order cone; member 3 made primal infeasible (Clarabel:
    ``PrimalInfeasible``) by negative right-hand sides on its orthant rows."""
    data, a_mask, p_mask = _sparse_program(seed, 6, True, zero=0, soc=(9,))
    if planned:
        data = dataclasses.replace(data, arrow=_plan(data, a_mask, p_mask))
    b = data.b.clone()
    b[3] = -b[3].abs() - 1
    b[3, data.cones.nonneg :] = b[3, data.cones.nonneg :].abs() + 1
    return dataclasses.replace(data, b=b)


@pytest.mark.parametrize("planned", [False, True])
def test_a_breakdown_on_the_way_to_a_certificate_reports_it(planned: bool) -> None:
    """An infeasible problem's iterates grow without bound until a factorisation fails: the
    certificate its last finite iterate satisfies to the reduced tolerance is the verdict (2 of
    these 3 were reported ``NUMERICAL``), the other members are solved."""
    from test_cone_backend import _clarabel

    for seed in range(3):
        data = _made_infeasible(seed, planned)
        P, q, A, b = (getattr(data, k)[3].numpy() for k in ("P", "q", "A", "b"))
        assert _clarabel(P, q, A, b, data.cones)[0] == "PrimalInfeasible"
        result = solve(data, Settings(tol=1e-9))
        assert result.status.tolist() == [0, 0, 0, int(Status.INFEASIBLE), 0, 0], seed


def test_float32_solves_answer_their_best_iterate() -> None:
    """Computing in float32, second-order-cone iterates reach ~1e-5 and then diverge (the NT
    scaling's rounding): each problem is answered by its best iterate, within the reduced
    tolerance and near the float64 answer; the infeasible member is not reported solved
    (float32 may break down before its certificate: ``NUMERICAL`` or the iteration limit)."""
    from declopt.backends.cone import ipm

    for seed in range(3):
        data = _made_infeasible(seed, planned=True)
        reference = solve(data, Settings(tol=1e-9))
        single = dataclasses.replace(
            data, **{k: getattr(data, k).float() for k in ("P", "q", "A", "b")}
        )
        result = solve(single, Settings(tol=1e-6))
        solved = result.status == int(Status.SOLVED)
        assert solved.tolist() == [True, True, True, False, True, True], seed
        assert (result.residual[solved] <= ipm.REDUCED_TOL[torch.float32]).all()
        scale = reference.x[solved].abs().amax(-1, keepdim=True).clamp_min(1)
        error = (result.x[solved].double() - reference.x[solved]).abs() / scale
        assert (error <= 0.1).all(), error.amax(
            -1
        )  # residual 1e-4 times these programs' conditioning


def _simplex_closed_form(p: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection onto the probability simplex (sort and threshold)."""
    u, _ = p.sort(-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, p.shape[-1] + 1, dtype=p.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True)
    return (p - css.gather(-1, rho - 1) / rho).clamp_min(0)


def test_simplex_and_l1_ball_projections_match_their_closed_forms() -> None:
    """Rows over every column (the simplex's sum, the L1 ball's budget) as rank-one terms:
    the planned cone backend's polished answers are the exact projections, and its gradients
    the closed forms' (the simplex projection's Jacobian is ``I - 1 1^T / |S|`` on its support
    ``S``)."""
    g = torch.Generator().manual_seed(3)
    d = 64
    p, x = cp.Parameter(d), cp.Variable(d)
    simplex = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0, cp.sum(x) == 1])
    layer = dl.Layer(simplex, [p], [x], backend="cone")
    arrow = get("cone").canonical(layer.program).arrow
    assert arrow is not None and arrow.dense_rows.numel() == 1
    pv = (torch.randn(16, d, dtype=F64, generator=g) / d**0.5 * 3).requires_grad_()
    (xt,) = layer(pv)
    exact = _simplex_closed_form(pv.detach())
    torch.testing.assert_close(xt.detach(), exact, atol=1e-12, rtol=0)
    v = torch.randn(16, d, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((xt * v).sum(), pv)
    support = exact > 0
    vs = torch.where(support, v, 0.0)
    want = vs - support * vs.sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
    torch.testing.assert_close(grad, want, atol=1e-9, rtol=0)

    # the L1 ball |x|_1 <= 1: the sign times the simplex projection of |p| where |p|_1 > 1
    ball = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [cp.norm(x, 1) <= 1])
    layer = dl.Layer(ball, [p], [x], backend="cone")
    assert get("cone").canonical(layer.program).arrow.dense_rows.numel() == 1
    (xb,) = layer(pv.detach())
    outside = pv.detach().abs().sum(-1, keepdim=True) > 1
    closed = torch.where(
        outside, pv.detach().sign() * _simplex_closed_form(pv.detach().abs()), pv.detach()
    )
    torch.testing.assert_close(xb, closed, atol=1e-12, rtol=0)


def test_group_soft_thresholding_matches_its_closed_form() -> None:
    """Twelve second-order cones of one size (a group lasso's prox, ``min |x - p|^2 + lam sum_g
    |x_g|_2``): every cone's rank-two term in the low-rank block, the cones' rows taken as
    views; the answer is block soft-thresholding ``x_g = (1 - lam / (2 |p_g|))_+ p_g`` and the
    gradient its Jacobian's."""
    g = torch.Generator().manual_seed(4)
    groups, size = 12, 5
    p, x, lam = cp.Parameter(groups * size), cp.Variable(groups * size), cp.Parameter(pos=True)
    penalty = sum(cp.norm(x[size * i : size * (i + 1)], 2) for i in range(groups))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p) + lam * penalty))
    layer = dl.Layer(problem, [p, lam], [x], backend="cone")
    arrow = get("cone").canonical(layer.program).arrow
    assert arrow is not None and arrow.soc_heads.numel() == groups
    pv = torch.randn(8, groups * size, dtype=F64, generator=g).requires_grad_()
    lv = torch.tensor(1.5, dtype=F64)
    (xt,) = layer(pv, lv)
    assert layer.info.converged.all()

    def closed(pp: torch.Tensor) -> torch.Tensor:
        blocks = pp.reshape(8, groups, size)
        norm = blocks.norm(dim=-1, keepdim=True)
        return ((1 - lv / (2 * norm)).clamp_min(0) * blocks).reshape(8, -1)

    torch.testing.assert_close(xt.detach(), closed(pv.detach()), atol=1e-7, rtol=0)
    v = torch.randn(8, groups * size, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((xt * v).sum(), pv)
    pc = pv.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad((closed(pc) * v).sum(), pc)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=0)
