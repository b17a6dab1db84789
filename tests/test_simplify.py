"""The sums-through-affine-nodes rewrite: same values as CVXPY, fewer full-size nodes."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
from cvxpy.atoms.affine.binary_operators import multiply
from cvxpy.atoms.affine.sum import Sum
from hypothesis import given, settings
from hypothesis import strategies as st

import declopt as dl
from declopt.frontend.simplify import hoisted

n = 5
x = cp.Parameter(n)
alpha = cp.Parameter(pos=True)
y = cp.Variable()
u = cp.Variable(n)

CASES = {
    "scaled": cp.sum(0.5 * cp.square(y - x)),
    "scaled by a parameter": cp.sum(cp.multiply(alpha, cp.abs(u - x))),
    "shifted and negated (Welsch)": cp.sum(dl.penalties.welsch(y - x, alpha)),
    "pseudo-Huber": cp.sum(dl.penalties.pseudo_huber(y - x, 0.7)),
    "divided, promoted, constants": cp.sum(cp.exp(u) / 4 + y + np.arange(n) - 2 * x),
    "nested sums": cp.sum(3 * cp.sum(cp.square(u)) + cp.sum(-u, axis=0, keepdims=True)),
    "axis sums are left alone": cp.sum(
        cp.sum(0.5 * cp.square(cp.reshape(u, (n, 1), order="C")), axis=0)
    ),
}


def _sums_of_scalings(expr: cp.Expression) -> int:
    """Full sums whose argument is a scaling by one number (what the rewrite removes)."""
    own = int(
        isinstance(expr, Sum)
        and expr.axis is None
        and isinstance(expr.args[0], multiply)
        and any(a.size == 1 or type(a).__name__ == "Promote" for a in expr.args[0].args)
    )
    return own + sum(_sums_of_scalings(a) for a in expr.args)


def _atoms(expr: cp.Expression, kind: type) -> list:
    found = [expr] if isinstance(expr, kind) else []
    for a in expr.args:
        found.extend(_atoms(a, kind))
    return found


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_the_rewrite_keeps_cvxpys_value(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x.value, alpha.value = rng.normal(size=n), float(rng.uniform(0.2, 3.0))
    y.value, u.value = float(rng.normal()), rng.normal(size=n)
    expr = CASES[name]
    rewritten = hoisted(expr)
    assert rewritten.shape == expr.shape
    np.testing.assert_allclose(rewritten.value, expr.value, rtol=1e-12, atol=1e-12)
    assert _sums_of_scalings(rewritten) == 0
    if name == "axis sums are left alone":
        assert any(s.axis == 0 for s in _atoms(rewritten, Sum))


def test_atoms_under_the_sum_are_the_same_nodes() -> None:
    # Kink sites and the gating of inequality rows key on node identity.
    expr = cp.sum(cp.multiply(alpha, cp.abs(u - x))) + cp.sum(0.5 * cp.huber(u, 1.0))
    rewritten = hoisted(expr)
    assert {id(a) for a in _atoms(rewritten, cp.abs)} == {id(a) for a in _atoms(expr, cp.abs)}
    assert {id(a) for a in _atoms(rewritten, cp.huber)} == {id(a) for a in _atoms(expr, cp.huber)}


def test_nothing_to_rewrite_is_the_same_object() -> None:
    expr = cp.sum_squares(u - x) + cp.norm(u, 1)
    assert hoisted(expr) is expr


def test_declared_layers_agree_with_and_without_the_scaling_inside() -> None:
    import torch

    X = torch.randn(3, n, dtype=torch.float64)
    inside = dl.Layer(cp.Problem(cp.Minimize(cp.sum(0.5 * cp.huber(y - x, 0.5)))), [x], [y])
    outside = dl.Layer(cp.Problem(cp.Minimize(0.5 * cp.sum(cp.huber(y - x, 0.5)))), [x], [y])
    torch.testing.assert_close(inside(X)[0], outside(X)[0], rtol=1e-10, atol=1e-10)
