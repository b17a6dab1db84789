"""Kink rows as index sets: the front end's rows are the kinks' exact Jacobian, the KKT core's
products and fits on them equal the dense ones, and the implicit backward gives the same
gradients with them as with dense kink rows."""

from __future__ import annotations

import dataclasses

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacfwd

import declopt as dl
from declopt.frontend.compile import compile_problem
from declopt.implicit import implicit_vjp
from declopt.kkt.jacobian import RowJacobian
from declopt.kkt.point import kkt_point
from declopt.linalg import masked_least_squares
from declopt.program import BatchedParams

F64 = torch.float64


def _declarations() -> dict[str, tuple[cp.Problem, list, cp.Variable]]:
    """Objectives with every linear kink site, on operands that are selections of ``u``."""
    u = cp.Variable(6, name="u")
    x = cp.Parameter(6, name="x")
    w = cp.Variable((2, 3), name="w")
    y = cp.Parameter((2, 3), name="y")
    smooth = cp.sum_squares(u - x)
    cases = {
        "abs": cp.sum(cp.abs(u - x)),
        "norm1 of -u": cp.norm1(-u[1:5]),
        "maximum of two": cp.sum(cp.maximum(u, x)),
        "maximum of three, broadcast": cp.sum(cp.maximum(u, 0.5, x)),
        "minimum of two": cp.sum(cp.minimum(2 * u, x)),
        "max": cp.max(u[::2]),
        "min": cp.min(u + x),
        "norm_inf": cp.norm(u - x, "inf"),
        "norm 2 (apex)": cp.norm(u[:3], 2),
        "sum_largest, fractional k": cp.sum_largest(u - x, 2.5),
        "cummax": cp.sum(cp.cummax(u)),
    }
    out = {name: (cp.Problem(cp.Minimize(smooth + e)), [x], u) for name, e in cases.items()}
    matrix = {
        "max along an axis": cp.sum(cp.max(w - y, axis=0)),
        "norm_inf along an axis": cp.sum(cp.norm(w.T, "inf", axis=1)),
        "abs of a reshape": cp.sum(cp.abs(cp.reshape(w, (3, 2), order="F"))),
        "cummax along an axis": cp.sum(cp.cummax(w, axis=1)),
    }
    for name, e in matrix.items():
        out[name] = (cp.Problem(cp.Minimize(cp.sum_squares(w - y) + e)), [y], w)
    return out


DECLARATIONS = _declarations()


def _point(problem: cp.Problem, param: cp.Parameter, var: cp.Variable, seed: int, ties: bool):
    """A random point with zeros and ties in ``u`` (where the kinks are) when ``ties``."""
    rng = np.random.default_rng(seed)
    m = var.size
    u = rng.choice([-1.0, 0.0, 0.5, 1.0], m) if ties else rng.standard_normal(m)
    x = rng.choice([-1.0, 0.0, 0.5], param.size) if ties else rng.standard_normal(param.size)
    return (torch.tensor(x, dtype=F64).reshape(param.shape),), torch.tensor(u, dtype=F64)


@pytest.mark.parametrize("name", sorted(DECLARATIONS))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), ties=st.booleans())
def test_kink_rows_are_the_exact_jacobian_of_the_kink_residuals(
    name: str, seed: int, ties: bool
) -> None:
    problem, (param,), var = DECLARATIONS[name]
    program = compile_problem(problem, [param], [var])
    assert program.kink_rows is not None, name
    x, u = _point(problem, param, var, seed, ties)
    residuals, margins, index, value = program.kink_rows(x, u)
    expected_residuals, expected_margins = program.kinks(x, u)
    torch.testing.assert_close(residuals, expected_residuals, rtol=0, atol=0)
    torch.testing.assert_close(margins, expected_margins, rtol=0, atol=0)
    jac = jacfwd(lambda uu: program.kinks(x, uu)[0])(u)
    rows = torch.zeros_like(jac).scatter_add(1, index, value)
    torch.testing.assert_close(rows, jac, rtol=0, atol=1e-15)
    # Linear: with the tie representatives pinned at u, a step moves the residuals by rows @ step.
    shifted = program.kinks(x, u + 0.25, u)[0] - residuals
    torch.testing.assert_close(shifted, rows @ torch.full_like(u, 0.25), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "expression",
    [
        lambda u, x, a: cp.abs(a @ u),  # a dense operand
        lambda u, x, a: cp.abs(cp.multiply(x, u)),  # a coefficient that depends on x
        lambda u, x, a: cp.abs(cp.square(u) - 1),  # a nonlinear operand
        lambda u, x, a: cp.abs(cp.abs(u) - x),  # a nonsmooth operand
    ],
)
def test_kinks_of_other_operands_stay_dense(expression) -> None:
    u, x, a = cp.Variable(4), cp.Parameter(4), cp.Parameter((3, 4))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(u) + cp.sum(expression(u, x, a))))
    ids = {p.id for p in problem.parameters()}
    program = compile_problem(problem, [p for p in (x, a) if p.id in ids], [u])
    assert program.kinks is not None and program.kink_rows is None


def test_spectral_kinks_stay_dense() -> None:
    X = cp.Variable((3, 3), symmetric=True)
    problem = cp.Problem(cp.Minimize(cp.lambda_max(X) + cp.sum_squares(X)))
    assert compile_problem(problem, [], [X]).kink_rows is None


def _row_jacobian(seed: int, batch: int = 3, k_d: int = 2, k_s: int = 7, m: int = 5):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, k_d, m, dtype=F64, generator=g)
    index = torch.randint(0, m, (batch, k_s, 2), generator=g)
    value = torch.randn(batch, k_s, 2, dtype=F64, generator=g)
    value[:, ::3, 1] = 0  # some one-entry rows
    return RowJacobian(dense, index, value), g


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_row_jacobian_products_and_rows_equal_the_dense_matrix(seed: int) -> None:
    jac, g = _row_jacobian(seed)
    full = jac.to_dense()
    batch, k, m = full.shape
    w, z = (
        torch.randn(batch, m, dtype=F64, generator=g),
        torch.randn(batch, k, dtype=F64, generator=g),
    )
    torch.testing.assert_close(jac.matvec(w), (full @ w.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(jac.rmatvec(z), (full.transpose(1, 2) @ z.unsqueeze(-1)).squeeze(-1))
    mask = torch.rand(batch, k, generator=g) > 0.4
    torch.testing.assert_close(jac.masked(mask).to_dense(), full * mask.unsqueeze(-1))
    rows = torch.randint(0, k, (batch, 4), generator=g)
    row_mask = torch.rand(batch, 4, generator=g) > 0.3
    expected = full.gather(1, rows.unsqueeze(-1).expand(-1, -1, m)) * row_mask.unsqueeze(-1)
    torch.testing.assert_close(jac.rows(rows, row_mask), expected)
    # Norms: the largest |entry| of each row, duplicates summed (in_u merges them).
    merged = RowJacobian(jac.dense, jac.index, jac.value)
    same = jac.index[..., 0] == jac.index[..., 1]
    merged.value = torch.stack(
        [
            jac.value[..., 0] + torch.where(same, jac.value[..., 1], 0),
            torch.where(same, 0, jac.value[..., 1]),
        ],
        -1,
    )
    torch.testing.assert_close(merged.norms(), merged.to_dense().abs().amax(-1))
    take = torch.tensor([True, False, True])
    other, _ = _row_jacobian(seed + 1)
    torch.testing.assert_close(jac.where(take, other).to_dense()[1], other.to_dense()[1])
    torch.testing.assert_close(jac.select(torch.tensor([2])).to_dense()[0], full[2])


def test_least_squares_on_many_index_set_rows_is_the_dense_fit() -> None:
    # 300 held rows (above the dense limit): pins and ties, plus two dense rows.
    g = torch.Generator().manual_seed(0)
    batch, m, k_s = 2, 400, 300
    dense = torch.randn(batch, 2, m, dtype=F64, generator=g)
    own = torch.randperm(m, generator=g)[:k_s].expand(batch, -1)
    rep = torch.full_like(own, 7)
    index = torch.stack([own, rep], -1)
    value = torch.stack(
        [torch.ones(batch, k_s), -(torch.rand(batch, k_s, generator=g) > 0.5).double()], -1
    )
    jac = RowJacobian(dense, index, value.to(F64))
    target = torch.randn(batch, m, dtype=F64, generator=g)
    mask = torch.ones(batch, 2 + k_s, dtype=torch.bool)
    mask[0, 5] = False
    lam = masked_least_squares(jac, target, mask)
    expected = masked_least_squares(jac.to_dense(), target, mask)
    torch.testing.assert_close(lam, expected, rtol=1e-8, atol=1e-10)
    assert (lam[0, 5] == 0).all()


@pytest.mark.parametrize("p", [1.0, float("inf")])
@pytest.mark.parametrize("d", [12, 200])
def test_the_backward_on_index_set_rows_equals_the_one_on_dense_rows(p: float, d: int) -> None:
    """The same declaration with its kink rows dense (``kink_rows`` removed): the same point,
    the same gradients (the dense KKT solve below 128 variables, MINRES above)."""
    from declopt.nn.projections import declaration

    problem, params, variables = declaration(p, d, sphere=True)
    program = compile_problem(problem, params, variables)
    dense = dataclasses.replace(program, kink_rows=None)
    torch.manual_seed(d)
    x = torch.randn(5, d, dtype=F64)
    radius = torch.ones((), dtype=F64)
    u = dl.nn.SphereProjection(p)(x).detach()
    batch = BatchedParams((x, radius), (0, None), 5)
    v = torch.randn(5, d, dtype=F64)
    points = [kkt_point(prog, batch, u) for prog in (program, dense)]
    assert points[0].jacobian.index.shape[1] > 0 and points[1].jacobian.index.shape[1] == 0
    torch.testing.assert_close(points[0].held, points[1].held)
    torch.testing.assert_close(points[0].multipliers, points[1].multipliers)
    torch.testing.assert_close(points[0].jacobian.to_dense(), points[1].jacobian.to_dense())
    grads = [implicit_vjp(prog, batch, u, v)[0] for prog in (program, dense)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    closed = torch.autograd.functional.vjp(lambda xx: dl.nn.SphereProjection(p)(xx), x, v)[1]
    torch.testing.assert_close(grads[0][0], closed, rtol=1e-8, atol=1e-10)
