"""Batched KKT solves: exact where well posed, least squares and flagged where not."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import declopt as dl
from declopt.linalg import conjugate_gradient, masked_least_squares, solve_symmetric

F64 = torch.float64


def test_well_posed_systems_are_solved_exactly_and_not_flagged() -> None:
    a = torch.randn(4, 5, 5, dtype=F64)
    matrix = a @ a.transpose(-1, -2) + 5 * torch.eye(5, dtype=F64)
    rhs = torch.randn(4, 5, dtype=F64)
    z, report = solve_symmetric(matrix, rhs)
    torch.testing.assert_close(z, torch.linalg.solve(matrix, rhs))
    assert not report.singular.any() and report.second_order_ok.all()
    assert (report.residual < 1e-12).all()


def test_singular_system_gets_min_norm_solution_and_only_that_problem_is_flagged() -> None:
    matrix = torch.stack([torch.eye(3, dtype=F64), torch.diag(torch.tensor([1.0, 2.0, 0.0]))])
    matrix = matrix.to(F64)
    rhs = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], dtype=F64)
    z, report = solve_symmetric(matrix, rhs)
    assert report.singular.tolist() == [False, True]
    torch.testing.assert_close(z[1], torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    assert torch.isfinite(z).all()


def test_inertia_reveals_a_kkt_point_that_is_not_a_minimum() -> None:
    # [[H, a], [a^T, 0]] with H negative on the null space of a^T: a constrained maximum.
    kkt = torch.tensor([[-1.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    _, report = solve_symmetric(kkt.unsqueeze(0), torch.ones(1, 3, dtype=F64), 1)
    assert not report.second_order_ok.any()
    ok = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    _, report = solve_symmetric(ok.unsqueeze(0), torch.ones(1, 3, dtype=F64), 1)
    assert report.second_order_ok.all()


def test_conjugate_gradient_matches_dense_solve_and_flags_negative_curvature() -> None:
    a = torch.randn(3, 30, 30, dtype=F64)
    matrix = a @ a.transpose(-1, -2) + torch.eye(30, dtype=F64)
    rhs = torch.randn(3, 30, dtype=F64)
    z, report = conjugate_gradient(lambda d: (matrix @ d.unsqueeze(-1)).squeeze(-1), rhs)
    torch.testing.assert_close(z, torch.linalg.solve(matrix, rhs), rtol=1e-8, atol=1e-8)
    assert report.second_order_ok.all()
    matrix[1] = -matrix[1]
    _, report = conjugate_gradient(lambda d: (matrix @ d.unsqueeze(-1)).squeeze(-1), rhs)
    assert report.second_order_ok.tolist() == [True, False, True]


def test_flat_objective_gives_a_flagged_least_squares_gradient_not_nan() -> None:
    # Truncated quadratic with every point beyond alpha: the objective is flat around y.
    x = cp.Parameter(3)
    y = cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.sum(dl.penalties.truncated_quadratic(y - x, 0.1))))
    layer = dl.Layer(problem, [x], [y], solver=lambda x: (x.mean(-1) * 0 + 5.0,), verify=False)
    X = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64, requires_grad=True)
    (Y,) = layer(X)
    with pytest.warns(dl.GradientWarning, match="1 singular"):
        Y.sum().backward()
    assert layer.info.backward.singular.all()
    torch.testing.assert_close(X.grad, torch.zeros_like(X))


@pytest.mark.parametrize("k", [6, 200], ids=["dense", "cg"])
def test_masked_least_squares_is_the_minimum_norm_fit_on_the_active_rows(k: int) -> None:
    """Dense normal equations (Cholesky, eigh fallback) up to 128 active rows, CG above; a
    duplicated row (dependent constraints) must still give the minimum-norm multipliers."""
    g = torch.Generator().manual_seed(3)
    batch, m = 3, 256
    jac = torch.randn(batch, k, m, generator=g, dtype=torch.float64)
    jac[:, 1] = jac[:, 0]  # dependent rows
    target = torch.randn(batch, m, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, k, generator=g) < 0.8
    mask[:, :2] = True
    lam = masked_least_squares(jac, target, mask)
    for b in range(batch):
        rows = mask[b].nonzero().squeeze(-1)
        expected = torch.linalg.pinv(jac[b, rows].T) @ target[b]
        torch.testing.assert_close(lam[b, rows], expected, atol=1e-8, rtol=1e-8)
        assert bool((lam[b, ~mask[b]] == 0).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), k=st.integers(0, 5))
def test_the_ldl_path_matches_the_eigendecomposition(seed: int, n: int, k: int) -> None:
    """KKT matrices ``[H, A^T; A, 0]`` (``H`` indefinite or not): the Bunch-Kaufman path's
    solution, singularity verdict and inertia test are the eigendecomposition's."""
    from declopt.linalg import _solve_by_eigh, default_rcond

    g = torch.Generator().manual_seed(seed)
    H = torch.randn(4, n, n, dtype=torch.float64, generator=g)
    H = H + H.mT
    A = torch.randn(4, k, n, dtype=torch.float64, generator=g)
    top = torch.cat([H, A.mT], -1)
    bottom = torch.cat([A, torch.zeros(4, k, k, dtype=torch.float64)], -1)
    K = torch.cat([top, bottom], -2)
    r = torch.randn(4, n + k, dtype=torch.float64, generator=g)
    with torch.no_grad():
        z, report = solve_symmetric(K, r, k)
        z_ref, ref = _solve_by_eigh(K, r, default_rcond(K.dtype, n + k), torch.tensor(k))
    assert torch.equal(report.singular, ref.singular)
    assert torch.equal(report.second_order_ok, ref.second_order_ok)
    scale = z_ref.abs().amax(-1, keepdim=True)
    cond = torch.linalg.cond(K).unsqueeze(-1)
    assert ((z - z_ref).abs() <= 1e-13 * cond * scale).all()


def test_a_singular_system_takes_the_minimum_norm_solution() -> None:
    """A rank-deficient matrix in the batch sends the batch to the eigendecomposition: the
    minimum-norm solution and ``singular`` for that member."""
    K = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[2.0, 1.0], [1.0, 3.0]]], dtype=torch.float64)
    r = torch.tensor([[4.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    with torch.no_grad():
        z, report = solve_symmetric(K, r)
    assert report.singular.tolist() == [True, False]
    torch.testing.assert_close(z[0], torch.tensor([2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(K[1] @ z[1], r[1])


def test_kkt_block_scales_are_powers_of_two_that_bring_both_blocks_near_one() -> None:
    from declopt.linalg import kkt_block_scales

    hess = torch.stack([3e6 * torch.eye(4), 1e-5 * torch.eye(4), torch.zeros(4, 4)]).double()
    jac = torch.stack([2e-3 * torch.ones(2, 4), 7e4 * torch.ones(2, 4), torch.zeros(2, 4)]).double()
    s_u, s_c = kkt_block_scales(hess, jac)
    for s in (s_u, s_c):
        assert torch.equal(torch.exp2(torch.round(torch.log2(s))), s)  # exact scalings
    top = (s_u**2 * hess.abs().amax((-2, -1)))[:2]
    side = (s_u * s_c * jac.abs().amax((-2, -1)))[:2]
    assert ((top >= 0.5) & (top <= 2)).all() and ((side >= 0.5) & (side <= 2)).all()
    assert s_u[2] == 1 and s_c[2] == 1  # zero blocks are left alone


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 10),
    k=st.integers(0, 6),
    kind=st.sampled_from(["definite", "indefinite", "dependent", "mixed"]),
)
def test_the_schur_path_answers_as_the_bordered_eigendecomposition(
    seed: int, m: int, k: int, kind: str
) -> None:
    """``solve_held_kkt`` (Schur complement where ``H`` is definite and the held rows
    independent, the bordered matrix elsewhere): solution, singularity verdict and inertia
    test as the eigendecomposition of the bordered matrix on each problem's held rows."""
    from declopt.kkt.jacobian import RowJacobian
    from declopt.linalg import (
        _HeldBlocks,
        _solve_by_eigh,
        _solve_by_schur,
        default_rcond,
        kkt_block_scales,
        solve_held_kkt,
    )

    g = torch.Generator().manual_seed(seed)
    batch = 6
    root = torch.randn(batch, m, m, dtype=F64, generator=g)
    hess = root @ root.mT + 0.1 * torch.eye(m, dtype=F64)
    if kind in ("indefinite", "mixed"):
        sym = torch.randn(batch, m, m, dtype=F64, generator=g)
        flip = torch.arange(batch) % 2 == 0 if kind == "mixed" else torch.ones(batch, dtype=bool)
        hess = torch.where(flip[:, None, None], sym + sym.mT, hess)
    jac = torch.randn(batch, k, m, dtype=F64, generator=g) * 1e3  # units unlike H's
    if kind in ("dependent", "mixed") and k >= 2:
        jac[1::2, 1] = 2 * jac[1::2, 0]
    held = torch.rand(batch, k, generator=g) < 0.7
    if kind == "dependent" and k >= 2:
        held[:, :2] = True
    top = torch.randn(batch, m, dtype=F64, generator=g)
    bottom = torch.randn(batch, k, dtype=F64, generator=g)
    with torch.no_grad():
        w, z, report = solve_held_kkt(hess, RowJacobian.of_dense(jac), held, top, bottom)
        blocks = _HeldBlocks.of(hess, RowJacobian.of_dense(jac), held, top, bottom)
        clear = _solve_by_schur(blocks, default_rcond(F64, m + k))[2]
    assert report is not None
    # Which path answered: the Schur complement exactly where H is definite and the held rows
    # independent (dependent pairs are exact multiples; indefinite H are random symmetric).
    definite = torch.linalg.eigvalsh(hess)[:, 0] > 0
    count = held.sum(-1)
    rank = torch.tensor([int(torch.linalg.matrix_rank(jac[b, held[b]])) for b in range(batch)])
    assert torch.equal(clear, definite & (rank == count))
    for b in range(batch):
        rows = held[b].nonzero().squeeze(-1)
        r = rows.numel()
        a = jac[b, rows]
        K = torch.cat(
            [torch.cat([hess[b], a.T], -1), torch.cat([a, torch.zeros(r, r, dtype=F64)], -1)]
        )
        rhs = torch.cat([top[b], bottom[b, rows]])
        want, ref = _solve_by_eigh(K[None], rhs[None], default_rcond(F64, m + r), torch.tensor(r))
        if bool(ref.singular):  # minimum norm solutions depend on the scaling; verdict only
            assert bool(report.singular[b])
            continue
        assert not bool(report.singular[b])
        assert bool(report.second_order_ok[b]) == bool(ref.second_order_ok)
        got = torch.cat([w[b], z[b, rows]])
        # Solved block-equilibrated, which can be the worse conditioned of the two.
        s_u, s_c = kkt_block_scales(hess[b : b + 1], a[None])
        scales = torch.cat([s_u.expand(m), s_c.expand(r)])
        scaled = scales[:, None] * K * scales[None, :]
        cond = max(float(torch.linalg.cond(K)), float(torch.linalg.cond(scaled)))
        scale = max(float(want.abs().max()), float(rhs.abs().max() / K.abs().max()))
        assert float((got - want[0]).abs().max()) <= 1e-12 * cond * scale
        assert bool((z[b, ~held[b]] == 0).all())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 12),
    k=st.integers(0, 5),
    coupled=st.sampled_from(["none", "all", "some"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_the_diagonal_model_answers_only_where_it_is_exact(
    seed: int, m: int, k: int, coupled: str, dtype: torch.dtype
) -> None:
    """``kkt_minres`` with the diagonal model: a diagonal ``H`` is answered by the model
    (``method == "diagonal"``), a coupled one by MINRES (``"minres"``: the model is wrong),
    and either way the solution is the dense solve's, in units far from 1."""
    from declopt.kkt.jacobian import RowJacobian
    from declopt.linalg import kkt_minres, solve_held_kkt

    g = torch.Generator().manual_seed(seed)
    batch = 4
    diag = torch.rand(batch, m, dtype=F64, generator=g) * 10 + 0.1
    hess = torch.diag_embed(diag) * 1e4
    if coupled != "none" and m >= 2:
        which = torch.arange(batch) < (batch if coupled == "all" else 2)
        root = torch.randn(batch, m, 1, dtype=F64, generator=g)
        hess = hess + 1e4 * which[:, None, None] * (root @ root.mT)
    jac = torch.randn(batch, k, m, dtype=F64, generator=g) * 1e-3
    held = torch.rand(batch, k, generator=g) < 0.8
    held[:, : min(k, m)] &= True
    if k > m:  # more held rows than variables would be dependent
        held[:, m:] = False
    top = torch.randn(batch, m, dtype=F64, generator=g)
    bottom = torch.randn(batch, k, dtype=F64, generator=g) * held
    with torch.no_grad():
        w, z, _ = solve_held_kkt(hess, RowJacobian.of_dense(jac), held, top, bottom)
        low = hess.to(dtype)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return (low @ v.unsqueeze(-1)).squeeze(-1)

        rhs = torch.cat([top, bottom], -1).to(dtype)
        solution, report = kkt_minres(hvp, jac.to(dtype), held, rhs, diagonal=True)
    is_diagonal = coupled == "none" or m < 2
    # A coupled H: MINRES, or the diagonal read in the held rows' null space where it is exact
    # there (a coupling along the rows, a null space of one dimension); the solution decides.
    assert report.method in (("diagonal",) if is_diagonal else ("projected", "minres"))
    assert not report.singular.any()
    want = torch.cat([w, z], -1)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    scale = want.abs().amax(-1, keepdim=True)
    assert ((solution.to(F64) - want).abs() <= tol * scale).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(2, 40),
    k=st.integers(1, 4),
    sparse=st.integers(0, 3),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_the_projected_diagonal_answers_a_coupling_along_the_held_rows(
    seed: int, m: int, k: int, sparse: int, dtype: torch.dtype
) -> None:
    """``H = D + A^T C A`` (an L2 norm's curvature beside its row): ``diag(H 1)`` is wrong, the
    diagonal read in the rows' null space is exact (``method == "projected"``), with dense and
    index-set rows, and the solution is the dense solve's; a coupling off the rows' span goes
    to MINRES."""
    from declopt.kkt.jacobian import RowJacobian
    from declopt.linalg import kkt_minres, solve_held_kkt

    g = torch.Generator().manual_seed(seed)
    batch = 3
    dense = torch.randn(batch, k, m, dtype=F64, generator=g)
    index = torch.randint(0, m, (batch, sparse, 2), generator=g)
    index[..., 1] = (index[..., 0] + 1) % m  # ties u_i - u_{i+1}
    value = torch.tensor([1.0, -1.0], dtype=F64).expand(batch, sparse, 2).clone()
    jac = RowJacobian(dense, index, value)
    rows = jac.to_dense()
    held = torch.ones(batch, k + sparse, dtype=torch.bool)
    diag = torch.rand(batch, m, dtype=F64, generator=g) * 10 + 0.5
    c = torch.randn(batch, k + sparse, k + sparse, dtype=F64, generator=g)
    along = rows.mT @ (c + c.mT) @ rows  # A^T C A, C symmetric
    off = torch.randn(batch, m, 1, dtype=F64, generator=g)
    for hess, expected in (
        (torch.diag_embed(diag) + along, "projected"),
        (torch.diag_embed(diag) + 3 * off @ off.mT, "minres"),
    ):
        top = torch.randn(batch, m, dtype=F64, generator=g)
        bottom = torch.randn(batch, k + sparse, dtype=F64, generator=g)
        with torch.no_grad():
            w, z, _ = solve_held_kkt(hess, jac, held, top, bottom)
            low = hess.to(dtype)
            rhs = torch.cat([top, bottom], -1).to(dtype)

            def hvp(v: torch.Tensor, low: torch.Tensor = low) -> torch.Tensor:
                return (low @ v.unsqueeze(-1)).squeeze(-1)

            solution, report = kkt_minres(hvp, jac.to(dtype), held, rhs)
        if int(torch.linalg.matrix_rank(rows).min()) < k + sparse:
            return  # dependent rows (a repeated tie): a singular system, tested elsewhere
        if expected == "minres" and int(torch.linalg.matrix_rank(rows).min()) >= m - 1:
            continue  # the rows leave (almost) no room: any coupling is along them
        assert report.method == expected
        want = torch.cat([w, z], -1)
        tol = 1e-8 if dtype == torch.float64 else 5e-3
        assert ((solution.to(F64) - want).abs() <= tol * want.abs().amax(-1, keepdim=True)).all()


def test_a_batched_objective_stops_trying_the_diagonal_model_once_it_fails() -> None:
    """The model's attempt costs one check per function, not one per solve: after a coupled
    Hessian fails it, later Krylov solves of that function go straight to MINRES."""
    from declopt.derivatives import BatchedObjective
    from declopt.kkt.jacobian import RowJacobian
    from declopt.program import BatchedParams

    def separable(x: tuple[torch.Tensor, ...], u: torch.Tensor) -> torch.Tensor:
        return ((u - x[0]) ** 2).sum()

    def coupled(x: tuple[torch.Tensor, ...], u: torch.Tensor) -> torch.Tensor:
        return ((u - x[0]) ** 2).sum() + u.sum() ** 2

    x = torch.randn(3, 5, dtype=F64)
    params = BatchedParams((x,), (0,), 3)
    u = torch.randn(3, 5, dtype=F64)
    jac = RowJacobian.of_dense(torch.randn(3, 1, 5, dtype=F64))
    held = torch.ones(3, 1, dtype=torch.bool)
    rhs = torch.randn(3, 6, dtype=F64)
    for fn, methods in ((separable, ["diagonal", "diagonal"]), (coupled, ["minres", "minres"])):
        objective = BatchedObjective(fn, params)
        got = [objective.kkt_krylov(u, jac, held, rhs)[1].method for _ in range(2)]
        assert got == methods
        assert objective.derivatives.diagonal_hessian == (fn is separable)


def test_kkt_solves_of_an_empty_batch_are_empty() -> None:
    """No problems (two-entry index rows included): empty answers, not a reshape error."""
    from declopt.kkt.jacobian import RowJacobian
    from declopt.linalg import kkt_minres, solve_held_kkt

    dense = torch.zeros(0, 1, 3, dtype=F64)
    index = torch.zeros(0, 2, 2, dtype=torch.long)
    jac = RowJacobian(dense, index, torch.zeros(0, 2, 2, dtype=F64))
    held = torch.ones(0, 3, dtype=torch.bool)
    with torch.no_grad():
        solution, report = kkt_minres(lambda v: v, jac, held, torch.ones(0, 6, dtype=F64))
        hess = torch.zeros(0, 3, 3, dtype=F64)
        w, z, dense_report = solve_held_kkt(
            hess, jac, held, torch.ones(0, 3, dtype=F64), torch.zeros(0, 3, dtype=F64)
        )
    assert solution.shape == (0, 6) and report.singular.shape == (0,)
    assert w.shape == (0, 3) and z.shape == (0, 3)
    assert dense_report is not None and dense_report.singular.shape == (0,)


def test_a_non_finite_matrix_is_answered_nan_and_singular_without_ending_the_batch() -> None:
    """LAPACK cannot decompose a matrix with a NaN (a Hessian where the declaration is not
    differentiable); that member comes back NaN and singular, the others exact."""
    from declopt.kkt.jacobian import RowJacobian
    from declopt.linalg import solve_held_kkt

    hess = 2 * torch.eye(4, dtype=F64).expand(3, 4, 4).clone()
    hess[1, 0, 0] = float("nan")
    g = torch.Generator().manual_seed(8)
    jac = RowJacobian.of_dense(torch.randn(3, 2, 4, generator=g, dtype=F64))
    top = torch.randn(3, 4, generator=g, dtype=F64)
    held = torch.ones(3, 2, dtype=torch.bool)
    with torch.no_grad():
        z, report = solve_symmetric(hess, top)
        w, _, kkt_report = solve_held_kkt(hess, jac, held, top, torch.zeros(3, 2, dtype=F64))
    for solution, rep in ((z, report), (w, kkt_report)):
        assert rep is not None
        assert rep.singular.tolist() == [False, True, False]
        assert not bool(rep.second_order_ok[1])
        assert bool(torch.isnan(solution[1]).all()) and bool(torch.isfinite(solution[[0, 2]]).all())
    torch.testing.assert_close(z[[0, 2]], top[[0, 2]] / 2)
