"""The one-pass Taylor expansion (atoms' closed-form jets) against autograd, atom by atom."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from cvxpy.atoms.elementwise.hyperbolic import asinh, atanh, sinh, tanh
from cvxpy.atoms.elementwise.trig import cos, sin, tan
from cvxpy.atoms.elementwise.xexp import xexp
from cvxpy.atoms.one_minus_pos import one_minus_pos
from hypothesis import given, settings
from hypothesis import strategies as st

import declopt as dl
from declopt.derivatives import Derivatives
from declopt.frontend.atoms import RULES
from declopt.frontend.atoms.jets import is_fused
from declopt.frontend.compile import compile_expression, compile_problem

N = 4
x = cp.Parameter(N)
a = cp.Parameter(pos=True)
A = cp.Parameter((3, N))
u = cp.Variable(N)
y = cp.Variable()
w = cp.Variable((2, 2))

# Each declaration keeps the variables inside its atoms' domains for u, y, w in (-1, 1) and
# x in (-1, 1), a in (0.5, 1.5).
CASES = {
    "exp, log, log1p": (cp.sum(cp.exp(u - x) + cp.log(u + 2) + cp.log1p(u + 1.5)), [x], [u]),
    "powers": (
        cp.sum(cp.square(u - x) + cp.sqrt(u + 2) + cp.power(u + 2, 3) + cp.inv_pos(u + 2))
        + cp.sum(cp.power(u + 2, 1)),
        [x],
        [u],
    ),
    "huber": (cp.sum(dl.penalties.huber(y - x, a)), [x, a], [y]),
    "pseudo-Huber (column norm of a stack)": (
        cp.sum(dl.penalties.pseudo_huber(y - x, 0.7)),
        [x],
        [y],
    ),
    "welsch": (cp.sum(dl.penalties.welsch(y - x, a)), [x, a], [y]),
    "truncated quadratic": (cp.sum(dl.penalties.truncated_quadratic(y - x, a)), [x, a], [y]),
    "entr, xexp, logistic, one_minus_pos": (
        cp.sum(-cp.entr(u + 2) + xexp(u) + cp.logistic(u - x) + one_minus_pos(u / 4 + 0.5)),
        [x],
        [u],
    ),
    "trig and hyperbolic": (
        cp.sum(sin(u) + cos(u) + tan(u / 2) + sinh(u) + tanh(u) + asinh(u) + atanh((u - x) / 4)),
        [x],
        [u],
    ),
    "least squares, products, quotients": (
        cp.sum_squares(A @ u - x[:3])
        + a * cp.sum(cp.multiply(u, u + x))
        + cp.sum((u + 3) / (y + 3))
        + cp.quad_over_lin(u - x, 2.0)
        + y * cp.sum(u),
        [A, x, a],
        [u, y],
    ),
    "matrix variable": (
        cp.sum_squares(w @ w.T - A[:2, :2])
        + cp.trace(w)
        + cp.sum(cp.huber(cp.vec(w, order="C") - x, 0.7))
        + cp.sum(cp.cumsum(cp.hstack([w[0], w[:, 1]])))
        + cp.sum(cp.norm(w - A[:2, 2:], 2, axis=1))
        + cp.sum(cp.kron(w, cp.reshape(x[:2], (1, 2), order="C"))),
        [A, x],
        [w],
    ),
    "abs, maximum, minimum, 2-norm": (
        cp.sum(cp.abs(u - x)) / a
        + cp.sum(cp.maximum(u, x, 0.2))
        + cp.sum(cp.minimum(u, -x))
        + cp.norm(u - x, 2)
        + cp.sum(cp.vstack([u, x])),
        [x, a],
        [u],
    ),
    "log_sum_exp (all entries, along an axis)": (
        cp.log_sum_exp(u - x)
        + cp.sum(cp.log_sum_exp(w, axis=0))
        + cp.sum(cp.log_sum_exp(cp.reshape(u, (2, 2), order="C") + w, axis=1, keepdims=True)),
        [x],
        [u, w],
    ),
    "maximise": (cp.Maximize(-cp.sum_squares(u - x) - cp.sum(cp.exp(u))), [x], [u]),
    # Compact derivatives: a promoted scalar, broadcasts and negations carry one derivative per
    # broadcast row; sums over an axis (kept or not) multiply it by the rows it stands for.
    "broadcasts and axis sums (compact derivatives)": (
        cp.sum(cp.multiply(cp.sum(cp.square(y - A), axis=0), x))
        + cp.sum(cp.exp(cp.sum(0.5 * cp.huber(y - A, 0.3), axis=1, keepdims=True)))
        + cp.sum(cp.square(cp.reshape(u[:3], (3, 1), order="C") + cp.reshape(u, (1, N), "C")))
        + cp.sum(cp.exp(-y + x) + cp.maximum(y, x) + cp.multiply(y - x, y + x) + x / (y + 3))
        + cp.sum(cp.sum(cp.multiply(a, cp.square(u - y)), axis=0)),
        [A, x, a],
        [u, y],
    ),
    # Sums read a negated operand through (a - b, not a + (-b)), the variables' among them; an
    # elementwise atom of a compact derivative keeps its slope and the derivative apart (Scaled)
    # until a sum over entries that share the derivative (axis 0 of ``A - u``) or not (axis 1).
    "subtracted operands, deferred products": (
        cp.sum(cp.square(x - u - y))
        + cp.sum(cp.exp(-u - y + x))
        + cp.sum(0.5 * cp.huber(x - (u - y), 0.5))
        + cp.sum(cp.multiply(cp.sum(cp.square(A - u), axis=0), x))
        + cp.sum(cp.exp(cp.sum(cp.huber(A - u, 0.4), axis=1) / 4))
        + cp.sum(cp.sqrt(cp.square(y - x) + 1) - cp.square(y - A))
        # quotients by one number read -a / b as a / (-b), a promoted divisor as the number
        + cp.sum(cp.exp(-cp.square(u - x) / 3) + cp.exp(-cp.square(y - x) / (2 + cp.sum(x))))
        + cp.sum(-cp.square(u) / -3.0)
        # column norms of one-row parts with compact derivatives: deferred too, with the
        # origin's guard (no strictly signed part) and with two dependent parts
        + cp.sum(
            cp.norm(cp.vstack([cp.reshape(y - x, (1, N), "C"), cp.reshape(x, (1, N), "C")]), 2, 0)
        )
        + cp.sum(
            cp.norm(
                cp.vstack([cp.reshape(y - x, (1, N), "C"), cp.reshape(2 * y + x, (1, N), "C")]),
                2,
                0,
            )
        ),
        [A, x],
        [u, y],
    ),
    "column norms and rearrangements (compact derivatives)": (
        cp.sum(cp.norm(cp.vstack([cp.reshape(y - x, (1, N), "C"), 0.5 * np.ones((1, N))]), 2, 0))
        + cp.sum(
            cp.norm(
                cp.vstack(
                    [cp.reshape(cp.square(u), (2, 2), "F"), cp.reshape(y + x[:2], (1, 2), "C")]
                ),
                2,
                axis=0,
            )
        )
        + cp.sum(cp.exp(cp.reshape(y - x, (2, 2), order="F").T[0]))
        + cp.sum(cp.exp((y + u)[[0, 2]]) + cp.square(cp.reshape(u + y, (2, 2), order="C")[1]))
        + cp.sum(
            cp.norm(cp.vstack([cp.reshape(u, (1, N), "C"), cp.reshape(x, (1, N), "C")]), 2, 0)
        ),
        [x],
        [u, y],
    ),
}


def _derivatives(name: str) -> tuple[Derivatives, Derivatives, int, list]:
    objective, params, variables = CASES[name]
    if not isinstance(objective, (cp.Minimize, cp.Maximize)):
        objective = cp.Minimize(objective)
    program = compile_problem(cp.Problem(objective), params, variables)
    assert program.objective_taylor is not None, f"{name}: no Taylor expansion"
    dims = tuple(0 for _ in params)
    m = sum(v.size for v in variables)
    autograd = Derivatives(program.objective, dims)
    taylor = Derivatives(program.objective, dims, taylor=program.objective_taylor)
    return autograd, taylor, m, params


def _inputs(params: list, m: int, seed: int, batch: int = 3) -> tuple[tuple, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=g, dtype=torch.float64)

    values = tuple(uniform(low=0.5, high=1.5) if p is a else uniform(*p.shape) for p in params)
    return values, uniform(m)


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_expansion_matches_autograd(name: str, seed: int) -> None:
    autograd, taylor, m, params = _derivatives(name)
    values, point = _inputs(params, m, seed)
    for want, got in zip(
        autograd.value_grad_hessian(values, point), taylor.value_grad_hessian(values, point)
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w_ = torch.randn(
        point.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    for want, got in zip(
        autograd.param_vjp(values, point, w_), taylor.param_vjp(values, point, w_)
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if m == 1:
        wanted = (True,) * len(values)
        want_g, want_h, want_grads = autograd.scalar_vjp(values, point, w_, wanted)
        got_g, got_h, got_grads = taylor.scalar_vjp(values, point, w_, wanted)
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_h, want_h, rtol=1e-12, atol=1e-12)
        for want, got in zip(want_grads, got_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_shared_parameters_are_summed_over_the_batch() -> None:
    _, _, m, params = _derivatives("huber")
    values, point = _inputs(params, m, 0)
    shared = (values[0], values[1][0])  # x batched, a shared
    dims = (0, None)
    program = compile_problem(
        cp.Problem(cp.Minimize(CASES["huber"][0])), CASES["huber"][1], CASES["huber"][2]
    )
    auto = Derivatives(program.objective, dims)
    fast = Derivatives(program.objective, dims, taylor=program.objective_taylor)
    v = torch.ones_like(point)
    for want, got in zip(auto.param_vjp(shared, point, v), fast.param_vjp(shared, point, v)):
        torch.testing.assert_close(got, want)
    _, _, want = auto.scalar_vjp(shared, point, v, (True, True))
    _, _, got = fast.scalar_vjp(shared, point, v, (True, True))
    assert got[1].shape == ()
    for g_want, g_got in zip(want, got):
        torch.testing.assert_close(g_got, g_want)


def test_an_atom_without_a_jet_keeps_autograd() -> None:
    # prod has no closed-form jet rule: the program has no expansion, derivatives still work.
    program = compile_problem(cp.Problem(cp.Minimize(-cp.prod(u + 2))), [], [u])
    assert program.objective_taylor is None
    # A parameter-only subexpression with no rule of its own does not matter.
    program = compile_problem(cp.Problem(cp.Minimize(cp.sum_squares(u - x) + cp.prod(x))), [x], [u])
    assert program.objective_taylor is not None


def test_a_threshold_that_depends_on_the_variable_has_no_closed_form() -> None:
    # Elementwise rules are derivatives in their first operand only; a variable in any other
    # operand (CVXPY forbids it for huber's M today) must decline rather than drop its terms.
    node = cp.huber(u, 1.0)
    rule = RULES[type(node)].jet
    assert rule is not None
    assert rule(node, (True, False)) is not None
    assert rule(node, (True, True)) is None


def test_declared_pooling_layer_matches_the_hand_written_one() -> None:
    # The declared path (Taylor expansion, one evaluation per Newton step) and RobustPool agree.
    X = torch.randn(4, 6, 9, dtype=torch.float64, requires_grad=True)
    xp = cp.Parameter(9)
    yv = cp.Variable()
    for penalty in ("quadratic", "huber", "pseudo_huber", "welsch"):
        declared = dl.Layer(
            cp.Problem(cp.Minimize(cp.sum(dl.penalties.get(penalty)(yv - xp, 1.0)))),
            [xp],
            [yv],
            backend="torch",
        )
        pool = dl.nn.RobustPool(penalty, alpha=1.0)
        (Y,) = declared(X)
        (gy,) = torch.autograd.grad(Y.sum(), X)
        Z = pool(X)
        (gz,) = torch.autograd.grad(Z.sum(), X)
        if penalty == "welsch":  # nonconvex: both pick the same local minimum from the median
            close = (Y - Z).abs() < 1e-8
            assert close.float().mean() > 0.9
            torch.testing.assert_close(gy[close], gz[close], rtol=1e-7, atol=1e-9)
            continue
        torch.testing.assert_close(Y, Z, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gy, gz, rtol=1e-7, atol=1e-9)


def test_column_norm_of_a_stack_is_evaluated_from_its_parts() -> None:
    # DCP's elementwise hypot: the stack is never built, the values are CVXPY's.
    z = cp.Parameter((1, 6))
    c = cp.Parameter((2, 6))
    expr = cp.norm(cp.vstack([z, c, np.full((1, 6), 0.5)]), 2, axis=0)
    fn = compile_expression(expr)
    z.value = np.random.default_rng(0).normal(size=(1, 6))
    c.value = np.random.default_rng(1).normal(size=(2, 6))
    got = fn({z.id: torch.tensor(z.value), c.id: torch.tensor(c.value)})
    np.testing.assert_allclose(got.numpy(), expr.value, rtol=1e-14)


def test_a_strictly_signed_part_means_no_kink() -> None:
    # pseudo_huber's [z; alpha] with alpha > 0 never vanishes: smooth, no kink sites ...
    for alpha in (0.7, cp.Parameter(pos=True)):
        params = [x] if isinstance(alpha, float) else [x, alpha]
        objective = cp.sum(dl.penalties.pseudo_huber(y - x, alpha))
        program = compile_problem(cp.Problem(cp.Minimize(objective)), params, [y])
        assert program.kinks is None and program.objective_taylor is not None
    # ... while [u; x] with an unsigned x keeps its kink at the origin, evaluated on the parts.
    column = cp.norm(
        cp.vstack([cp.reshape(u, (1, N), order="C"), cp.reshape(x, (1, N), order="C")]), 2, axis=0
    )
    program = compile_problem(cp.Problem(cp.Minimize(cp.sum(column))), [x], [u])
    assert program.kinks is not None and program.smoothed is not None
    point = torch.zeros(N, dtype=torch.float64)
    residuals, margins = program.kinks((torch.zeros(N, dtype=torch.float64),), point)
    assert residuals.shape == margins.shape and bool((margins == 0).all())
    value = program.smoothed.objective(
        (torch.ones(N, dtype=torch.float64), torch.tensor(1e-3)), point
    )
    assert abs(float(value) - N) < 1e-2


def test_the_expansion_traces_whole_under_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    # compile=True runs the expansion and its VJPs under torch.compile: no graph break
    # (fullgraph), the same values and gradients as eagerly. aot_eager: no C++ build in tests.
    import declopt.derivatives as derivatives_module

    def traced(fn, enabled):
        if not enabled:
            return fn
        return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)

    derivatives_module.derivatives_for.cache_clear()
    monkeypatch.setattr(derivatives_module, "maybe_compile", traced)
    xp, yv = cp.Parameter(30), cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.sum(dl.penalties.huber(yv - xp, 1.0))))
    out = []
    for compile in (False, True):
        layer = dl.Layer(problem, [xp], [yv], backend="torch", compile=compile)
        X = torch.randn(6, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        X.requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "compile failed ...; eagerly"
            (Y,) = layer(X)
            Y.sum().backward()
        out.append((Y.detach(), X.grad))
    derivatives_module.derivatives_for.cache_clear()
    torch.testing.assert_close(out[1], out[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huber_curvature_counts_the_threshold_as_inside(dtype: torch.dtype) -> None:
    # CVXPY's huber is x^2 for |x| <= M: on the threshold itself the curvature is the inside
    # one (2), and the next representable number beyond it is outside (0).
    M = 0.75
    z = torch.tensor([-M, M, 0.0, 0.3, 2.0, -2.0], dtype=dtype)
    beyond = torch.nextafter(torch.tensor(M, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    z = torch.cat([z, beyond.reshape(1), -beyond.reshape(1)])
    node = cp.huber(cp.Variable(z.shape[0]), M)
    jet = RULES[type(node)].jet(node, (True, False))
    one = torch.eye(z.shape[0], dtype=dtype)
    threshold = torch.tensor(M, dtype=dtype)
    # A constant threshold's jet computes the value too (one softshrink for all three).
    assert is_fused(jet)
    grad, hess, value = jet([z, threshold], [one, None], [None, None], True)
    evaluate = RULES[type(node)].evaluate(node)
    torch.testing.assert_close(value, evaluate(z, threshold), rtol=0, atol=0)
    slope = torch.diagonal(grad)
    curvature = torch.diagonal(torch.diagonal(hess, dim1=-2, dim2=-1))
    want_slope = 2 * z.clamp(-M, M)
    want_curvature = torch.tensor([2, 2, 2, 2, 0, 0, 0, 0], dtype=dtype)
    torch.testing.assert_close(slope, want_slope)
    torch.testing.assert_close(curvature, want_curvature)


@pytest.mark.parametrize("name", list(CASES))
def test_the_value_free_pass_gives_the_same_derivatives(name: str) -> None:
    objective, params, variables = CASES[name]
    if not isinstance(objective, (cp.Minimize, cp.Maximize)):
        objective = cp.Minimize(objective)
    program = compile_problem(cp.Problem(objective), params, variables)
    m = sum(v.size for v in variables)
    values, point = _inputs(params, m, 3, batch=1)
    xs, uu = tuple(v[0] for v in values), point[0]
    full = program.objective_taylor(xs, uu)
    for second in (True, False):
        free = program.objective_taylor(xs, uu, second=second, value=False)
        assert len(free) == (2 if second else 1)
        for got, want in zip(free, full[1:]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_backward_pass_skips_the_values_no_jet_reads() -> None:
    # 0.5 sum(huber(y - x)): the gradient and curvature read y - x, not the huber values or
    # their sum (huber's closed-form f', f'' do not use f; a constant factor's product rule
    # does not read the other factor).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    program = compile_problem(cp.Problem(cp.Minimize(CASES["huber"][0])), [x, a], [y])
    xs = (torch.linspace(-2, 2, N, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    uu = torch.zeros(1, dtype=torch.float64)
    counts = []
    for value in (True, False):
        Count.calls = 0
        with Count():
            program.objective_taylor(xs, uu, value=value)
        counts.append(Count.calls)
    assert counts[1] + 4 <= counts[0], counts


@pytest.mark.parametrize(
    ("penalty", "passes"),
    [("quadratic", 2), ("huber", 7), ("welsch", 8), ("pseudo_huber", 8)],
)
def test_pooling_derivatives_defer_the_products_with_the_compact_derivative(
    penalty: str, passes: int
) -> None:
    # sum(phi(y - x_i)) over n entries: the pass forms z = y - x, the local slopes and
    # curvatures, and reduces them; never phi'(z) times y's derivative entry by entry (its
    # product, and the curvature's, were one full-size pass each), nor -x. Counted: operations
    # writing a tensor of n entries, without the value (the backward's pass).
    from torch.utils._python_dispatch import TorchDispatchMode

    n = 64
    xp, yv = cp.Parameter(n), cp.Variable()
    phi = dl.penalties.get(penalty)
    objective = cp.sum(phi(yv - xp, 1.0)) if penalty != "quadratic" else cp.sum(phi(yv - xp))
    program = compile_problem(cp.Problem(cp.Minimize(objective)), [xp], [yv])

    class Passes(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket).split(".")[-1]
            views = {"view", "expand", "reshape", "unsqueeze", "squeeze", "select", "slice"}
            views |= {"permute", "transpose", "alias", "detach"}
            if name not in views and isinstance(out, torch.Tensor) and out.numel() >= n:
                Passes.count += 1
            return out

    xs = (torch.linspace(-2, 2, n, dtype=torch.float64),)
    with Passes():
        _, hess = program.objective_taylor(xs, torch.zeros(1, dtype=torch.float64), value=False)
    assert Passes.count <= passes, Passes.count
    want = Derivatives(program.objective, (0,)).hessian(
        (xs[0].unsqueeze(0),), torch.zeros(1, 1, dtype=torch.float64)
    )
    torch.testing.assert_close(hess.reshape(1, 1, 1), want, rtol=1e-12, atol=1e-12)
