"""The CVXPY front end: compiled atoms against ``expr.value``, vmap/grad compatibility, and
``compile_problem`` (layout, residuals, validation)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from cvxpy.atoms.affine.wraps import psd_wrap
from cvxpy.atoms.elementwise.hyperbolic import asinh, atanh, sinh, tanh
from cvxpy.atoms.elementwise.trig import cos, sin, tan
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from declopt.frontend import (
    DeclarationError,
    UnsupportedAtomError,
    compile_expression,
    compile_problem,
)

DT = torch.float64


class Leaves:
    """Makes Parameters/Variables with random values (a fresh, seeded generator per test)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def _value(self, shape, lo, hi, value):
        if value is not None:
            return np.asarray(value, dtype=float).reshape(shape)
        return self.rng.uniform(lo, hi, shape)

    def p(self, shape=(), lo=-2.0, hi=2.0, value=None, **attrs) -> cp.Parameter:
        leaf = cp.Parameter(shape, **attrs)
        leaf.value = self._value(shape, lo, hi, value)
        return leaf

    def v(self, shape=(), lo=-2.0, hi=2.0, value=None) -> cp.Variable:
        leaf = cp.Variable(shape)
        leaf.value = self._value(shape, lo, hi, value)
        return leaf


def env_of(expr: cp.Expression, dtype=DT) -> dict[int, torch.Tensor]:
    leaves = [*expr.variables(), *expr.parameters()]
    return {leaf.id: torch.tensor(np.asarray(leaf.value), dtype=dtype) for leaf in leaves}


def expected_value(expr: cp.Expression) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = expr.value
    if sp.issparse(value):
        value = value.toarray()
    return np.reshape(np.asarray(value, dtype=float), expr.shape)


def check(expr: cp.Expression, rtol: float = 1e-10) -> None:
    out = compile_expression(expr)(env_of(expr))
    assert tuple(out.shape) == expr.shape
    assert out.dtype == DT
    np.testing.assert_allclose(out.numpy(), expected_value(expr), rtol=rtol, atol=1e-12)


def _quiet(fn: Callable, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# (test id, builder) -- the id names the atom (and variant) under test.
Builder = Callable[[Leaves], cp.Expression]
CASES: list[tuple[str, Builder]] = [
    # affine
    ("add", lambda L: L.v(3) + L.p(3)),
    ("add_broadcast_row", lambda L: L.v((2, 3)) + L.p(3)),
    ("add_broadcast_col", lambda L: L.v((2, 3)) + L.p((2, 1))),
    ("add_many", lambda L: L.v(3) + L.p(3) + 2.0 + L.p(())),
    ("sub", lambda L: L.v((2, 2)) - L.p((2, 2))),
    ("neg_expression", lambda L: -L.v((2, 3))),
    ("promote_scalar", lambda L: L.p(()) + L.v(4)),
    ("promote_constant", lambda L: L.v((2, 2)) - 1.5),
    ("multiply", lambda L: cp.multiply(L.v(3), L.p(3))),
    ("multiply_broadcast", lambda L: cp.multiply(L.v((2, 3)), L.p((1, 3)))),
    ("multiply_scalar_param", lambda L: L.p(()) * L.v((2, 3))),
    ("multiply_sparse_constant", lambda L: cp.multiply(sp.eye(3, format="csr"), L.v((3, 3)))),
    ("matmul_matrix_vector", lambda L: L.p((2, 3)) @ L.v(3)),
    ("matmul_vector_vector", lambda L: L.v(3) @ L.p(3)),
    ("matmul_vector_matrix", lambda L: L.v(2) @ L.p((2, 3))),
    ("matmul_matrix_matrix", lambda L: L.p((2, 3)) @ L.v((3, 4))),
    ("matmul_constant", lambda L: np.arange(6.0).reshape(2, 3) @ L.v(3)),
    ("matmul_nd_batch", lambda L: L.p((2, 2, 3)) @ L.v(3)),
    ("div_scalar", lambda L: L.v(3) / 2.0),
    ("div_param", lambda L: L.v((2, 2)) / L.p((), lo=0.5, hi=2.0)),
    ("div_elementwise", lambda L: L.v(3) / L.p(3, lo=0.5, hi=2.0)),
    ("index_slice_step", lambda L: L.v(7)[1::2]),
    ("index_negative", lambda L: L.v(5)[-1]),
    ("index_negative_slice", lambda L: L.v(5)[-3:-1]),
    ("index_negative_step", lambda L: L.v(5)[::-2]),
    ("index_2d_int_slice", lambda L: L.v((3, 4))[1, 1:]),
    ("index_2d_slices", lambda L: L.v((3, 4))[:2, ::3]),
    ("index_2d_reverse_rows", lambda L: L.v((3, 4))[::-1, 0]),
    ("special_index_int_array", lambda L: L.v(5)[np.array([4, 0, 0, 2])]),
    ("special_index_bool", lambda L: L.v(4)[np.array([True, False, True, True])]),
    ("special_index_columns", lambda L: L.v((3, 4))[:, [0, 2]]),
    ("special_index_fancy_2d", lambda L: L.v((3, 4))[np.array([0, 2]), np.array([3, 1])]),
    (
        "special_index_bool_matrix",
        lambda L: L.v((2, 3))[np.array([[True, False, True], [False, True, True]])],
    ),
    ("sum_all", lambda L: cp.sum(L.v((2, 3)))),
    ("sum_axis0", lambda L: cp.sum(L.v((2, 3)), axis=0)),
    ("sum_axis1_keepdims", lambda L: cp.sum(L.v((2, 3)), axis=1, keepdims=True)),
    ("sum_keepdims_all", lambda L: cp.sum(L.v((2, 3)), keepdims=True)),
    ("sum_scalar", lambda L: cp.sum(L.v(()))),
    ("mean", lambda L: cp.mean(L.v((2, 3)))),
    ("mean_axis", lambda L: cp.mean(L.v((2, 3)), axis=1)),
    ("reshape_F", lambda L: cp.reshape(L.v((2, 3)), (3, 2), order="F")),
    ("reshape_C", lambda L: cp.reshape(L.v((2, 3)), (3, 2), order="C")),
    ("reshape_F_to_3d", lambda L: cp.reshape(L.v((4, 3)), (2, 3, 2), order="F")),
    ("reshape_F_vector_to_matrix", lambda L: cp.reshape(L.v(6), (2, 3), order="F")),
    ("vec_F", lambda L: cp.vec(L.v((2, 3)), order="F")),
    ("vec_C", lambda L: cp.vec(L.v((2, 3)), order="C")),
    ("transpose", lambda L: L.v((2, 3)).T),
    ("transpose_vector", lambda L: L.v(3).T),
    ("transpose_nd_reverse", lambda L: cp.transpose(L.v((2, 3, 4)))),
    ("transpose_nd_axes", lambda L: cp.permute_dims(L.v((2, 3, 4)), (1, 2, 0))),
    ("hstack_1d", lambda L: cp.hstack([L.v(2), L.p(3)])),
    ("hstack_2d", lambda L: cp.hstack([L.v((2, 1)), L.p((2, 3))])),
    ("hstack_scalars", lambda L: cp.hstack([L.v(()), L.p(())])),
    ("vstack_1d", lambda L: cp.vstack([L.v(3), L.p(3)])),
    ("vstack_2d", lambda L: cp.vstack([L.v((1, 3)), L.p((2, 3))])),
    ("concatenate_axis0", lambda L: cp.concatenate([L.v((2, 3)), L.p((1, 3))], axis=0)),
    ("concatenate_axis1", lambda L: cp.concatenate([L.v((2, 3)), L.p((2, 1))], axis=1)),
    ("concatenate_none", lambda L: cp.concatenate([L.v((2, 3)), L.p(2)], axis=None)),
    ("broadcast_to", lambda L: cp.broadcast_to(L.v(3), (2, 3))),
    ("trace", lambda L: cp.trace(L.v((3, 3)))),
    ("diag_vec", lambda L: cp.diag(L.v(3))),
    ("diag_vec_offset", lambda L: cp.diag(L.v(3), k=1)),
    ("diag_mat", lambda L: cp.diag(L.v((3, 3)))),
    ("diag_mat_offset", lambda L: cp.diag(L.v((3, 3)), k=-1)),
    ("cumsum", lambda L: cp.cumsum(L.v(4))),
    ("cumsum_axis1", lambda L: cp.cumsum(L.v((2, 3)), axis=1)),
    ("cumsum_axis_none", lambda L: cp.cumsum(L.v((2, 3)), axis=None)),
    ("upper_tri", lambda L: cp.upper_tri(L.v((3, 3)))),
    ("kron", lambda L: cp.kron(np.array([[1.0, 2.0], [0.5, -1.0]]), L.v((2, 3)))),
    ("convolve", lambda L: cp.convolve(L.p(3), L.v(4))),
    ("conv_deprecated", lambda L: _quiet(cp.conv, L.p(2), L.v(4))),
    ("conj", lambda L: cp.conj(L.v(3))),
    ("real", lambda L: cp.real(L.v(3))),
    ("imag", lambda L: cp.imag(L.v(3))),
    ("psd_wrap", lambda L: psd_wrap(L.p((2, 2)))),
    ("diff", lambda L: cp.diff(L.v(5))),
    ("outer", lambda L: cp.outer(L.v(3), L.p(2))),
    ("bool_constant", lambda L: L.v(3) + np.array([True, False, True])),
    ("int_constant", lambda L: L.v(3) + np.array([1, 2, 3])),
    # elementwise
    ("square", lambda L: cp.square(L.v((2, 3)))),
    ("power_2_5", lambda L: cp.power(L.v(4, lo=0.1, hi=3.0), 2.5)),
    ("power_3_negative_base", lambda L: cp.power(L.v(4), 3)),
    ("power_half", lambda L: cp.power(L.v(4, lo=0.0, hi=3.0), 0.5)),
    ("power_irrational", lambda L: cp.power(L.v(4, lo=0.1, hi=3.0), 2.7182818)),
    ("power_negative_fraction", lambda L: cp.power(L.v(4, lo=0.1, hi=3.0), -1.5)),
    ("power_0", lambda L: cp.power(L.v(3), 0)),
    ("power_1", lambda L: cp.power(L.v(3), 1)),
    (
        "power_param",
        lambda L: cp.power(L.v(3, lo=0.1, hi=2.0), L.p((), lo=1.0, hi=3.0, nonneg=True)),
    ),
    ("sqrt", lambda L: cp.sqrt(L.v(4, lo=0.0, hi=4.0))),
    ("inv_pos", lambda L: cp.inv_pos(L.v(4, lo=0.1, hi=4.0))),
    ("exp", lambda L: cp.exp(L.v((2, 2)))),
    ("log", lambda L: cp.log(L.v(3, lo=0.1, hi=5.0))),
    ("log1p", lambda L: cp.log1p(L.v(3, lo=-0.9, hi=5.0))),
    ("abs", lambda L: cp.abs(L.v((2, 3)))),
    ("maximum", lambda L: cp.maximum(L.v(4), L.p(4))),
    ("maximum_3_args_broadcast", lambda L: cp.maximum(L.v((2, 3)), L.p(3), 0.5)),
    ("minimum", lambda L: cp.minimum(L.v(4), L.p(4))),
    ("pos", lambda L: cp.pos(L.v(5))),
    ("neg_part", lambda L: cp.neg(L.v(5))),
    ("huber_constant_M", lambda L: cp.huber(L.v(6, lo=-3.0, hi=3.0), 1.0)),
    (
        "huber_param_M",
        lambda L: cp.huber(L.v(6, lo=-3.0, hi=3.0), L.p((), lo=0.5, hi=2.0, nonneg=True)),
    ),
    ("entr", lambda L: cp.entr(L.v(4, value=[0.0, 0.3, 1.0, 2.5]))),
    ("entr_outside_domain", lambda L: cp.entr(L.v(2, value=[-1.0, 0.5]))),
    (
        "kl_div",
        lambda L: cp.kl_div(L.v(4, value=[0.0, 0.5, 2.0, 1.0]), L.p(4, value=[1.0, 0.5, 1.0, 3.0])),
    ),
    (
        "rel_entr",
        lambda L: cp.rel_entr(
            L.v(4, value=[0.0, 0.5, 2.0, 1.0]), L.p(4, value=[1.0, 0.5, 1.0, 3.0])
        ),
    ),
    ("xexp", lambda L: cp.xexp(L.v(4, lo=0.0, hi=2.0))),
    ("logistic", lambda L: cp.logistic(L.v(5, value=[-800.0, -3.0, 0.0, 25.0, 800.0]))),
    ("sin", lambda L: sin(L.v(3))),
    ("cos", lambda L: cos(L.v(3))),
    ("tan", lambda L: tan(L.v(3, lo=-1.0, hi=1.0))),
    ("sinh", lambda L: sinh(L.v(3))),
    ("tanh", lambda L: tanh(L.v(3))),
    ("asinh", lambda L: asinh(L.v(3))),
    ("atanh", lambda L: atanh(L.v(3, lo=-0.9, hi=0.9))),
    ("one_minus_pos", lambda L: cp.one_minus_pos(L.v(3, lo=0.1, hi=0.9))),
    # reductions and other nonlinear atoms
    ("max_all", lambda L: cp.max(L.v((2, 3)))),
    ("max_axis0_keepdims", lambda L: cp.max(L.v((2, 3)), axis=0, keepdims=True)),
    ("min_all", lambda L: cp.min(L.v((2, 3)))),
    ("min_axis1", lambda L: cp.min(L.v((2, 3)), axis=1)),
    ("norm2_vector", lambda L: cp.norm(L.v(4))),
    ("norm2_fn", lambda L: cp.norm2(L.v(4))),
    ("norm1_vector", lambda L: cp.norm(L.v(4), 1)),
    ("norm1_fn", lambda L: cp.norm1(L.v((2, 3)))),
    ("norm_inf_vector", lambda L: cp.norm(L.v(4), "inf")),
    ("norm_inf_fn", lambda L: cp.norm_inf(L.v((2, 3)))),
    ("norm_fro", lambda L: cp.norm(L.v((2, 3)), "fro")),
    ("norm_matrix_1", lambda L: cp.norm(L.v((2, 3)), 1)),
    ("norm_matrix_inf", lambda L: cp.norm(L.v((2, 3)), "inf")),
    ("norm_p3", lambda L: cp.norm(L.v(4), 3)),
    ("pnorm_1_5", lambda L: cp.pnorm(L.v(4), 1.5)),
    ("pnorm_0_5", lambda L: cp.pnorm(L.v(4, lo=0.1, hi=2.0), 0.5)),
    ("pnorm_0_5_negative_entry", lambda L: cp.pnorm(L.v(3, value=[1.0, -1.0, 2.0]), 0.5)),
    ("pnorm_negative_p", lambda L: cp.pnorm(L.v(4, lo=0.1, hi=2.0), -2)),
    ("pnorm_negative_p_zero_entry", lambda L: cp.pnorm(L.v(3, value=[1.0, 0.0, 2.0]), -2)),
    ("norm2_axis0", lambda L: cp.norm(L.v((2, 3)), 2, axis=0)),
    ("norm2_axis1_keepdims", lambda L: cp.norm(L.v((2, 3)), 2, axis=1, keepdims=True)),
    ("norm1_axis1", lambda L: cp.norm(L.v((2, 3)), 1, axis=1)),
    ("norm_inf_axis0_keepdims", lambda L: cp.norm_inf(L.v((2, 3)), axis=0, keepdims=True)),
    ("norm1_keepdims_no_axis", lambda L: cp.norm1(L.v((2, 3)), keepdims=True)),
    ("sum_squares", lambda L: cp.sum_squares(L.v((2, 3)) - L.p((2, 3)))),
    ("quad_over_lin", lambda L: cp.quad_over_lin(L.v(3), L.p((), lo=0.5, hi=2.0))),
    ("quad_over_lin_axis", lambda L: cp.quad_over_lin(L.v((2, 3)), 2.0, axis=1)),
    (
        "quad_form_constant",
        lambda L: cp.quad_form(
            L.v(3), np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]])
        ),
    ),
    (
        "quad_form_param",
        lambda L: cp.quad_form(L.v(2), L.p((2, 2), value=[[2.0, 0.3], [0.3, 1.0]], PSD=True)),
    ),
    ("log_sum_exp", lambda L: cp.log_sum_exp(L.v((2, 3)))),
    ("log_sum_exp_axis1_keepdims", lambda L: cp.log_sum_exp(L.v((2, 3)), axis=1, keepdims=True)),
    ("prod", lambda L: cp.prod(L.v(4))),
    ("geo_mean", lambda L: cp.geo_mean(L.v(4, lo=0.0, hi=3.0))),
    ("geo_mean_weights", lambda L: cp.geo_mean(L.v(4, lo=0.0, hi=3.0), [1, 2, 0.5, 3])),
    (
        "geo_mean_exact_weights",
        lambda L: cp.geo_mean(L.v(3, lo=0.1, hi=3.0), [0.3, 1.7, 1.0], approx=False),
    ),
    (
        "geo_mean_zero_weight_ignores_entry",
        lambda L: cp.geo_mean(L.v(3, value=[1.0, -2.0, 0.5]), [1, 0, 2]),
    ),
    ("geo_mean_boundary", lambda L: cp.geo_mean(L.v(3, value=[1.0, 0.0, 0.5]), [1, 1, 2])),
    ("geo_mean_outside_domain", lambda L: cp.geo_mean(L.v(3, value=[1.0, -1.0, 0.5]))),
    ("geo_mean_one_weight_negative", lambda L: cp.geo_mean(L.v(2, value=[-3.0, 2.0]), [1, 0])),
    (
        "geo_mean_matrix_fortran_order",
        lambda L: cp.geo_mean(L.v((2, 3), lo=0.1, hi=2.0), [1, 2, 3, 4, 5, 6]),
    ),
    ("geo_mean_axis0", lambda L: cp.geo_mean(L.v((2, 3), lo=0.1, hi=2.0), [1, 3], axis=0)),
    (
        "geo_mean_axes_keepdims",
        lambda L: cp.geo_mean(
            L.v((2, 3, 2), lo=0.1, hi=2.0), [1, 2, 3, 4], axis=(2, 0), keepdims=True
        ),
    ),
    ("geo_mean_scalar", lambda L: cp.geo_mean(L.v((), lo=0.1, hi=2.0))),
    ("prod_axis1_keepdims", lambda L: cp.prod(L.v((2, 3)), axis=1, keepdims=True)),
    ("cummax", lambda L: cp.cummax(L.v((2, 4)), axis=1)),
    ("cumprod", lambda L: cp.cumprod(L.v(4), axis=0)),
    ("sum_largest", lambda L: cp.sum_largest(L.v(5), 2)),
    ("sum_largest_fractional_axis", lambda L: cp.sum_largest(L.v((2, 4)), 2.5, axis=1)),
    ("sum_smallest", lambda L: cp.sum_smallest(L.v(5), 3)),
    ("std", lambda L: cp.std(L.v(5))),
    ("var", lambda L: cp.var(L.v(5))),
    ("ptp", lambda L: cp.ptp(L.v(5))),
    ("log_normcdf", lambda L: cp.log_normcdf(L.v(3))),
    ("loggamma", lambda L: cp.loggamma(L.v(3, lo=0.5, hi=4.0))),
    (
        "composite",
        lambda L: (
            cp.sum(cp.exp(-cp.square(L.v(4) - L.p(4)) / 2)) + cp.norm(L.p((2, 4)) @ L.v(4) - 1, 1)
        ),
    ),
]


@pytest.mark.parametrize(("name", "build"), CASES, ids=[c[0] for c in CASES])
def test_atom_matches_cvxpy_value(name: str, build: Builder) -> None:
    check(build(Leaves(seed=len(name))))


def test_sparse_and_integer_constants_are_dense_floats() -> None:
    x = Leaves().v(3)
    expr = cp.multiply(np.array([1, 0, 2]), x) + cp.Constant(np.array([True, False, True]))
    out = compile_expression(expr)(env_of(expr, torch.float32))
    assert out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# elementwise atoms on random values (hypothesis)

ELEMENTWISE: list[tuple[str, Callable[[cp.Expression], cp.Expression], Callable]] = [
    # (id, atom, map from an unconstrained float to the atom's domain)
    ("abs", cp.abs, lambda a: a),
    ("square", cp.square, lambda a: a),
    ("power_1_7", lambda x: cp.power(x, 1.7), np.abs),
    ("power_neg_0_5", lambda x: cp.power(x, -0.5), lambda a: np.abs(a) + 0.1),
    ("sqrt", cp.sqrt, np.abs),
    ("exp", cp.exp, lambda a: a),
    ("log", cp.log, lambda a: np.abs(a) + 1e-3),
    ("log1p", cp.log1p, lambda a: np.abs(a)),
    ("inv_pos", cp.inv_pos, lambda a: np.abs(a) + 1e-2),
    ("pos", cp.pos, lambda a: a),
    ("neg", cp.neg, lambda a: a),
    ("huber", lambda x: cp.huber(x, 1.5), lambda a: a),
    ("entr", cp.entr, np.abs),
    ("logistic", cp.logistic, lambda a: a),
    ("xexp", cp.xexp, lambda a: a),
    ("maximum_with_constant", lambda x: cp.maximum(x, 0.25), lambda a: a),
    ("minimum_with_constant", lambda x: cp.minimum(x, 0.25), lambda a: a),
    ("kl_div_vs_one", lambda x: cp.kl_div(x, 1.0), np.abs),
    ("rel_entr_vs_two", lambda x: cp.rel_entr(x, 2.0), np.abs),
]


@pytest.mark.parametrize(("name", "atom", "domain"), ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
@settings(max_examples=25, deadline=None)
@given(values=arrays(np.float64, (2, 3), elements=st.floats(-6.0, 6.0, allow_subnormal=False)))
def test_elementwise_random_values(
    name: str, atom: Callable, domain: Callable, values: np.ndarray
) -> None:
    x = cp.Parameter((2, 3))
    x.value = domain(values)
    check(atom(x))


@pytest.mark.parametrize(
    ("atom", "value", "expected"),
    [
        (cp.log, -1.0, np.nan),
        (cp.sqrt, -1.0, np.nan),
        (cp.log, 0.0, -np.inf),
        (cp.inv_pos, 0.0, np.inf),
        (cp.entr, -1.0, -np.inf),
    ],
    ids=["log_negative", "sqrt_negative", "log_zero", "inv_pos_zero", "entr_negative"],
)
def test_outside_domain_gives_torch_values_not_exceptions(atom, value, expected) -> None:
    x = cp.Parameter()
    out = compile_expression(atom(x))({x.id: torch.tensor(value, dtype=DT)})
    np.testing.assert_equal(out.item(), expected)


# ---------------------------------------------------------------------------------------------
# transforms: vmap, grad, jvp, double backward


def _composite() -> tuple[cp.Expression, cp.Parameter, cp.Parameter, cp.Variable]:
    a = cp.Parameter((3, 4))
    b = cp.Parameter(3)
    y = cp.Variable(4)
    r = a @ y - b
    expr = (
        cp.sum(cp.exp(-cp.square(r) / 2))
        + cp.log_sum_exp(cp.hstack([y, b]))
        + cp.sum_squares(cp.reshape(y, (2, 2), order="F") @ np.array([1.0, -2.0]))
        + cp.sum(cp.logistic(cp.vstack([y[:3], b])[1]))
        + cp.quad_over_lin(y[::2], 2.0)
        + cp.norm(cp.multiply(b, y[1:]), 2)
        + cp.sum(cp.huber(r, 0.7))
        + cp.sum(cp.power(cp.square(y) + 1, 0.75))
    )
    return expr, a, b, y


def test_vmap_equals_loop() -> None:
    expr, a, b, y = _composite()
    f = compile_expression(expr)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, 4, dtype=DT, generator=gen)
    B = torch.randn(5, 3, dtype=DT, generator=gen)
    Y = torch.randn(5, 4, dtype=DT, generator=gen)

    def one(a_, b_, y_):
        return f({y.id: y_, a.id: a_, b.id: b_})

    batched = torch.func.vmap(one)(A, B, Y)
    looped = torch.stack([one(A[i], B[i], Y[i]) for i in range(5)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    # A parameter shared by the whole batch (in_dims=None).
    shared = torch.func.vmap(one, in_dims=(None, 0, 0))(A[0], B, Y)
    torch.testing.assert_close(shared, torch.stack([one(A[0], B[i], Y[i]) for i in range(5)]))


def test_grad_jvp_and_double_backward_on_compiled_objective() -> None:
    expr, a, b, y = _composite()
    prog = compile_problem(cp.Problem(cp.Minimize(expr)), [a, b], [y])
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(3, 4, dtype=DT, generator=gen)
    B = torch.randn(3, dtype=DT, generator=gen)
    U = torch.randn(4, dtype=DT, generator=gen)
    V = torch.randn(4, dtype=DT, generator=gen)

    def f(a_, b_, u_):
        return prog.objective((a_, b_), u_)

    inputs = tuple(t.clone().requires_grad_(True) for t in (A, B, U))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)

    g = torch.func.grad(lambda u_: f(A, B, u_))(U)
    torch.testing.assert_close(g, torch.autograd.functional.jacobian(lambda u_: f(A, B, u_), U))
    # Forward-over-reverse Hessian-vector product against reverse-over-reverse.
    _, hv = torch.func.jvp(torch.func.grad(lambda u_: f(A, B, u_)), (U,), (V,))
    hess = torch.autograd.functional.hessian(lambda u_: f(A, B, u_), U)
    torch.testing.assert_close(hv, hess @ V)

    # The solver's pattern: vmap the unbatched objective, differentiate the summed batch.
    As, Bs, Us, Vs = (torch.stack([t, 2 * t]) for t in (A, B, U, V))

    def total(us):
        return torch.func.vmap(lambda a_, b_, u_: f(a_, b_, u_))(As, Bs, us).sum()

    _, hvs = torch.func.jvp(torch.func.grad(total), (Us,), (Vs,))
    torch.testing.assert_close(hvs[0], hv)


def _objective_with_constants() -> tuple[cp.Parameter, cp.Variable, Callable]:
    x = cp.Parameter(4)
    y = cp.Variable()
    expr = (
        cp.sum(1 - cp.exp(-cp.square(y - x) / 2))
        + cp.sum(cp.huber(x - y, 1.0))
        + cp.sum(cp.hstack([y, y])[np.array([1, 0, 1])])
    )
    prog = compile_problem(cp.Problem(cp.Minimize(expr)), [x], [y])

    def hvp(X, U, V):
        def total(us):
            return torch.func.vmap(prog.objective)((X,), us).sum()

        return torch.func.jvp(torch.func.grad(total), (U,), (V,))

    return x, y, hvp


def test_constants_first_made_inside_grad_are_plain_tensors() -> None:
    # A tensor created inside torch.func.grad is a wrapper of that level; the constant cache must
    # not keep one (torch.compile later fails on it, and it is a dead wrapper in eager mode).
    x = cp.Parameter(3)
    expr = cp.sum(cp.multiply(np.array([1.0, 2.0, 3.0]), x)) + cp.sum(x[np.array([2, 0])])
    f = compile_expression(expr)
    torch.func.grad(lambda t: f({x.id: t}))(torch.ones(3, dtype=DT))
    functorch = torch._C._functorch
    for cell in _closure_tensors(f):
        assert not functorch.is_functorch_wrapped_tensor(cell)


def _closure_tensors(fn: Callable) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def visit(obj, depth):
        if id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        elif callable(obj) and getattr(obj, "__closure__", None):
            for c in obj.__closure__:
                visit(c.cell_contents, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("declopt"):
            visit(vars(obj), depth + 1)

    visit(fn, 0)
    assert found  # the walk reaches the cached constants
    return found


def test_torch_compile_cold_and_warm() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(5, 4, dtype=DT, generator=gen)
    U = torch.randn(5, 1, dtype=DT, generator=gen)
    V = torch.ones(5, 1, dtype=DT)
    _, _, cold = _objective_with_constants()
    _, _, warm = _objective_with_constants()
    reference = warm(X, U, V)  # fills the constant caches eagerly, under grad/jvp/vmap
    for fn in (cold, warm):
        torch._dynamo.reset()
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(X, U, V)
        torch.testing.assert_close(out, reference)


def test_residual_gradients_with_gradcheck() -> None:
    p = cp.Parameter(3)
    x = cp.Variable(3)
    X = cp.Variable((2, 2))
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(x - p) + cp.sum(cp.exp(X))),
        [
            cp.sum(cp.multiply(x, x)) == 1,
            cp.trace(X) == cp.sum(p),
            cp.exp(x) <= 2,
            cp.norm(cp.vec(X, order="F") - 1) <= p[0] ** 2,
        ],
    )
    prog = compile_problem(problem, [p], [x, X])
    gen = torch.Generator().manual_seed(2)
    P = torch.randn(3, dtype=DT, generator=gen, requires_grad=True)
    U = torch.randn(7, dtype=DT, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p_, u_: prog.equalities((p_,), u_), (P, U))
    assert torch.autograd.gradcheck(lambda p_, u_: prog.inequalities((p_,), u_), (P, U))
    assert torch.autograd.gradgradcheck(lambda p_, u_: prog.inequalities((p_,), u_), (P, U))


# ---------------------------------------------------------------------------------------------
# compile_problem


def _flat(*arrays: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.concatenate([np.asarray(a, dtype=float).reshape(-1) for a in arrays]))


def test_minimize_objective_layout_and_metadata() -> None:
    L = Leaves(3)
    W = L.p((2, 3))
    c = L.p(4, nonneg=True, lo=0.0)
    d = L.p((), nonpos=True, lo=-1.0, hi=0.0)
    X = L.v((2, 3))
    y = L.v(4)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(W, X)) + c @ cp.square(y) + d))
    prog = compile_problem(problem, [W, c, d], [X, y])
    assert prog.variable_shapes == ((2, 3), (4,))
    assert prog.parameter_shapes == ((2, 3), (4,), ())
    assert prog.num_variables == 10
    assert prog.parameter_names == (W.name(), c.name(), d.name())
    assert prog.variable_names == (X.name(), y.name())
    assert prog.parameter_signs == (None, "nonneg", "nonpos")
    assert prog.is_convex and prog.is_dpp and not prog.maximize
    assert prog.equalities is None and prog.inequalities is None

    u = _flat(X.value, y.value)  # row-major, in the order of `variables`
    Xu, yu = prog.unpack(u)
    np.testing.assert_array_equal(Xu.numpy(), X.value)
    np.testing.assert_array_equal(yu.numpy(), y.value)
    x = tuple(torch.tensor(np.asarray(p.value)) for p in (W, c, d))
    out = prog.objective(x, u)
    assert out.shape == ()
    np.testing.assert_allclose(out.item(), problem.objective.value, rtol=1e-12)


def test_maximize_objective_is_negated_and_flags() -> None:
    L = Leaves(4)
    p = L.p(3)
    x = L.v(3)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.log(cp.abs(x) + 1)) - cp.sum_squares(x - p)))
    prog = compile_problem(problem, [p], [x])
    out = prog.objective((torch.tensor(p.value),), torch.tensor(x.value))
    np.testing.assert_allclose(out.item(), -problem.objective.value, rtol=1e-12)
    assert prog.maximize
    assert not prog.is_convex  # log(abs(x) + 1) is not DCP
    assert not prog.is_dpp


def test_constraint_residuals() -> None:
    L = Leaves(5)
    A = L.p((2, 3))
    b = L.p(2)
    X = L.v((3, 2))
    y = L.v(3)
    z = L.v(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NonPos(...) is deprecated in CVXPY but still accepted
        constraints = [
            A @ y == b,  # Equality
            cp.sum(X, axis=0) == z,  # Equality on a matrix expression
            y <= 1.5,  # Inequality lhs - rhs
            cp.square(z) >= b,  # stored as Inequality(b, square(z))
            cp.Zero(X[0] - z),  # Zero
            cp.NonPos(y - 2),  # NonPos
            cp.NonNeg(X),  # NonNeg: residual -X
        ]
    problem = cp.Problem(cp.Minimize(cp.sum(y)), constraints)
    prog = compile_problem(problem, [A, b], [X, y, z])
    x = (torch.tensor(A.value), torch.tensor(b.value))
    u = _flat(X.value, y.value, z.value)

    Xv, yv, zv, Av, bv = X.value, y.value, z.value, A.value, b.value
    eq = np.concatenate([Av @ yv - bv, Xv.sum(axis=0) - zv, Xv[0] - zv])
    ineq = np.concatenate([yv - 1.5, bv - zv**2, yv - 2, -Xv.reshape(-1)])  # row-major
    np.testing.assert_allclose(prog.equalities(x, u).numpy(), eq, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(prog.inequalities(x, u).numpy(), ineq, rtol=1e-12, atol=1e-14)
    # The same values as CVXPY's own constraint expressions.
    cv_eq = np.concatenate([np.reshape(c.expr.value, -1) for c in constraints[:2]])
    np.testing.assert_allclose(prog.equalities(x, u).numpy()[:4], cv_eq, rtol=1e-12)


def test_variable_sign_and_bound_attributes_become_inequalities() -> None:
    lo = cp.Parameter(2)
    x = cp.Variable(2, nonneg=True)
    y = cp.Variable(3, bounds=[lo[0], np.array([1.0, np.inf, 2.0])])
    problem = cp.Problem(cp.Minimize(cp.sum(x) + cp.sum(y) + cp.sum(lo)), [x <= 5])
    prog = compile_problem(problem, [lo], [x, y])
    u = torch.tensor([1.0, -2.0, 0.5, 3.0, 4.0], dtype=DT)
    g = prog.inequalities((torch.tensor([0.25, 9.0], dtype=DT),), u)
    expected = [1 - 5, -2 - 5, -1.0, 2.0, 0.25 - 0.5, 0.25 - 3.0, 0.25 - 4.0, 0.5 - 1.0, 4.0 - 2.0]
    np.testing.assert_allclose(g.numpy(), expected)


def test_float32_is_preserved() -> None:
    p = cp.Parameter(3)
    x = cp.Variable(3)
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(x - p) + cp.norm(x, 1) + 0.5),
        [cp.sum(x) == 1.0, x >= -np.ones(3)],
    )
    prog = compile_problem(problem, [p], [x])
    f32 = torch.float32
    xs, u = (torch.randn(3, dtype=f32),), torch.randn(3, dtype=f32)
    assert prog.objective(xs, u).dtype == f32
    assert prog.equalities(xs, u).dtype == f32
    assert prog.inequalities(xs, u).dtype == f32
    # vmap in float32 too
    out = torch.func.vmap(prog.objective, in_dims=((0,), 0))(
        (torch.randn(4, 3, dtype=f32),), torch.randn(4, 3, dtype=f32)
    )
    assert out.shape == (4,) and out.dtype == f32


def test_constant_expression_is_not_aliased() -> None:
    x = cp.Variable(2)
    f = compile_expression(cp.Constant(np.array([1.0, 2.0])))
    env = {x.id: torch.zeros(2, dtype=DT)}
    out = f(env)
    out.add_(1.0)
    torch.testing.assert_close(f(env), torch.tensor([1.0, 2.0], dtype=DT))


def test_missing_or_misshaped_leaf_tensor() -> None:
    x = cp.Variable(2)
    p = cp.Parameter(2)
    f = compile_expression(x + p)
    with pytest.raises(KeyError, match=p.name()):
        f({x.id: torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        f({x.id: torch.zeros(3), p.id: torch.zeros(2)})


# ---------------------------------------------------------------------------------------------
# declaration errors


def _simple() -> tuple[cp.Problem, cp.Parameter, cp.Variable]:
    p = cp.Parameter(3, name="theta")
    x = cp.Variable(3, name="xvar")
    return cp.Problem(cp.Minimize(cp.sum_squares(x - p))), p, x


def test_error_no_variables_listed() -> None:
    problem, p, _ = _simple()
    with pytest.raises(DeclarationError, match="variables is empty"):
        compile_problem(problem, [p], [])


def test_error_problem_without_variables() -> None:
    p = cp.Parameter(name="lonely")
    other = cp.Variable(name="other")
    with pytest.raises(DeclarationError, match="no variables"):
        compile_problem(cp.Problem(cp.Minimize(p)), [p], [other])


def test_error_missing_parameter() -> None:
    problem, _, x = _simple()
    with pytest.raises(DeclarationError, match="theta"):
        compile_problem(problem, [], [x])


def test_error_extra_parameter() -> None:
    problem, p, x = _simple()
    extra = cp.Parameter(name="unused_param")
    with pytest.raises(DeclarationError, match="unused_param"):
        compile_problem(problem, [p, extra], [x])


def test_error_variable_not_listed() -> None:
    p = cp.Parameter(3)
    x = cp.Variable(3, name="xvar")
    t = cp.Variable(name="tvar")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p) + t), [t >= 0])
    with pytest.raises(DeclarationError, match="tvar"):
        compile_problem(problem, [p], [x])


def test_error_listed_variable_not_in_problem() -> None:
    problem, p, x = _simple()
    with pytest.raises(DeclarationError, match="stray"):
        compile_problem(problem, [p], [x, cp.Variable(name="stray")])


def test_error_duplicates_and_wrong_types() -> None:
    problem, p, x = _simple()
    with pytest.raises(DeclarationError, match="twice"):
        compile_problem(problem, [p, p], [x])
    with pytest.raises(DeclarationError, match="twice"):
        compile_problem(problem, [p], [x, x])
    with pytest.raises(DeclarationError, match=r"cp\.Parameter"):
        compile_problem(problem, [x], [x])
    with pytest.raises(DeclarationError, match=r"cp\.Variable"):
        compile_problem(problem, [p], [p])


def test_error_complex_and_integer_leaves() -> None:
    p = cp.Parameter(2, complex=True, name="zparam")
    x = cp.Variable(2, name="xvar")
    with pytest.raises(DeclarationError, match="zparam"):
        compile_problem(cp.Problem(cp.Minimize(cp.sum(cp.real(p) + x))), [p], [x])
    k = cp.Variable(2, integer=True, name="kvar")
    with pytest.raises(DeclarationError, match=r"kvar.*integer"):
        compile_problem(cp.Problem(cp.Minimize(cp.sum(k))), [], [k])


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("lambda_sum_largest", lambda X: cp.lambda_sum_largest(X + X.T, 2)),
        ("tr_inv", lambda X: cp.tr_inv(X + X.T)),
        ("MatrixFrac", lambda X: cp.matrix_frac(cp.vec(X, order="F")[:2], X + X.T)),
    ],
)
def test_error_unsupported_atom(name: str, build: Callable) -> None:
    X = cp.Variable((2, 2))
    expr = build(X)
    with pytest.raises(UnsupportedAtomError, match=name) as info:
        compile_expression(expr)
    assert str(expr) in str(info.value) or "Rewrite" in str(info.value)
    assert "Rewrite" in str(info.value) and "log_sum_exp" in str(info.value)
    with pytest.raises(UnsupportedAtomError, match=name):
        compile_problem(cp.Problem(cp.Minimize(expr + cp.sum(X))), [], [X])


def test_error_unsupported_atom_names_subexpression() -> None:
    X = cp.Variable((2, 2), name="xvar")
    inner = cp.tr_inv(X)
    with pytest.raises(UnsupportedAtomError) as info:
        compile_expression(cp.exp(inner) + 1)
    assert str(inner) in str(info.value)


def test_error_unsupported_constraint() -> None:
    x, y, z = cp.Variable(), cp.Variable(), cp.Variable()
    problem = cp.Problem(cp.Minimize(x + y + z), [cp.constraints.ExpCone(x, y, z)])
    with pytest.raises(UnsupportedAtomError, match="ExpCone"):
        compile_problem(problem, [], [x, y, z])


@pytest.mark.parametrize("rows", [1, 2])
def test_column_norm_with_constant_parts_matches_cvxpy(rows: int) -> None:
    # The constant parts' squares are summed once at compile time (pseudo-Huber's alpha row).
    rng = np.random.default_rng(rows)
    z = cp.Variable((1, 5))
    w = cp.Parameter((2, 5))
    z.value, w.value = rng.normal(size=(1, 5)), rng.normal(size=(2, 5))
    constant = rng.normal(size=(rows, 5))
    check(cp.norm(cp.vstack([z, constant]), 2, axis=0))
    check(cp.norm(cp.vstack([constant, z, w, 0.5 * constant]), 2, axis=0))
    check(cp.norm(cp.vstack([z, np.zeros((rows, 5))]), 2, axis=0))  # may vanish: guarded
