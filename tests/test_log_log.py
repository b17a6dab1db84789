"""Log-log convex programs (``gp=True``) on declopt's own backends.

The torch front end compiles a DGP declaration through CVXPY's ``Dgp2Dcp`` reduction
(``declopt.frontend.compile_log_log``): the solvers work on ``u = log x`` and the layer returns
``exp(u)``. Outputs and gradients with respect to every parameter are compared with closed forms,
with the cvxpylayers backend (which solves the declaration itself with ``gp=True``) and with
central finite differences of CVXPY's own solution map (``problem.solve(gp=True)`` at ``p +- h``).
Float64 throughout.
"""

from __future__ import annotations

import copy
import math

import cvxpy as cp
import numpy as np
import pytest
import torch

import declopt as dl
from declopt.program import EXP
from declopt.torch import CvxpyLayer

F64 = torch.float64


def t(*values: float, grad: bool = True) -> torch.Tensor:
    value = torch.tensor(values[0] if len(values) == 1 else list(values), dtype=F64)
    return value.requires_grad_(grad)


def _x_plus_a_over_x():
    """``min x + a/x`` over ``x > 0``: ``x* = sqrt(a)``."""
    x = cp.Variable(pos=True, name="x")
    a = cp.Parameter(pos=True, name="a")
    return cp.Problem(cp.Minimize(x + a / x)), a, x


def _readme_gp():
    """cvxpylayers' README GP example (``c`` declared positive so that ``c*y`` is a monomial)."""
    x, y, z = (cp.Variable(pos=True, name=n) for n in "xyz")
    a = cp.Parameter(pos=True, value=2.0, name="a")
    b = cp.Parameter(pos=True, value=1.0, name="b")
    c = cp.Parameter(pos=True, value=0.5, name="c")
    problem = cp.Problem(
        cp.Minimize(1.0 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x <= c * y]
    )
    return problem, [a, b, c], [x, y, z]


README_VALUES = (2.0, 1.0, 0.5)


def _outputs_and_grads(layer, params, weights):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    outs = layer(*params)
    sum((w * o).sum() for w, o in zip(weights, outs)).backward()
    return [o.detach() for o in outs], [p.grad for p in params]


def _cvxpy_solution(problem, parameters, variables, values):
    for p, v in zip(parameters, values):
        p.value = v
    # SCS at a tight eps: Clarabel stops ~1e-6 short on these exponential-cone programs.
    problem.solve(gp=True, solver=cp.SCS, eps=1e-10, max_iters=1_000_000)
    assert problem.status == cp.OPTIMAL
    return [np.asarray(v.value, dtype=np.float64) for v in variables]


def _finite_differences(problem, parameters, variables, values, weights, h=1e-4):
    """``d/dp_i sum_j w_j . x_j(p)`` by central differences of CVXPY's solutions."""
    grads = []
    for i in range(len(values)):
        plus, minus = list(values), list(values)
        plus[i], minus[i] = values[i] + h, values[i] - h
        fp = _cvxpy_solution(problem, parameters, variables, plus)
        fm = _cvxpy_solution(problem, parameters, variables, minus)
        grads.append(sum(float(np.sum(w * (p - m))) for w, p, m in zip(weights, fp, fm)) / (2 * h))
    return grads


# ---------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_x_plus_a_over_x_is_sqrt_a_with_its_derivative(backend: str) -> None:
    problem, a, x = _x_plus_a_over_x()
    layer = dl.Layer(problem, [a], [x], gp=True, backend=backend)
    assert layer.backend_name == backend
    a_t = t(2.0, 9.0, 0.25)
    (x_star,) = layer(a_t)
    x_star.sum().backward()
    root = a_t.detach().sqrt()
    torch.testing.assert_close(x_star.detach(), root, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(a_t.grad, 0.5 / root, atol=1e-8, rtol=1e-8)
    # info.objective is the declared objective's value (the program's is its log): 2 sqrt(a).
    torch.testing.assert_close(layer.info.objective, 2 * root, atol=1e-9, rtol=1e-9)
    assert bool(layer.info.converged.all())


def test_the_compiled_program_is_the_log_space_reduction_of_the_declared_parameters() -> None:
    problem, a, x = _x_plus_a_over_x()
    layer = dl.Layer(problem, [a], [x], gp=True, backend="torch")
    program = layer.program
    assert program.log_log and program.has_functions and program.output_transform is EXP
    assert program.source[0] is problem and program.source[1] == (a,)
    assert program.source[2] == (x,)
    assert program.parameter_names == ("a",) and program.variable_names == ("x",)
    assert program.parameter_signs == ("pos",)
    assert program.is_convex and program.is_dpp
    # f(u) = log(exp(u) + a exp(-u)) at u = log x, evaluated with the declared a.
    u = torch.tensor([math.log(3.0)], dtype=F64)
    value = program.objective((torch.tensor(2.0, dtype=F64),), u)
    torch.testing.assert_close(value, torch.tensor(math.log(3.0 + 2.0 / 3.0), dtype=F64))
    f, g, h = program.objective_taylor((torch.tensor(2.0, dtype=F64),), u)
    torch.testing.assert_close(f, value)

    def f_of(w):
        return program.objective((torch.tensor(2.0, dtype=F64),), w)

    torch.testing.assert_close(g, torch.func.grad(f_of)(u))
    torch.testing.assert_close(h, torch.func.hessian(f_of)(u))
    (out,) = program.to_outputs(program.unpack(u[None]))
    torch.testing.assert_close(out, torch.tensor([3.0], dtype=F64))
    (back,) = program.from_outputs((out,))
    torch.testing.assert_close(back, u)


def test_maximize_volume_under_a_surface_bound() -> None:
    """``max xyz s.t. xy + yz + zx <= a``: the cube ``x = y = z = sqrt(a/3)``, value
    ``(a/3)^(3/2)``."""
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a = cp.Parameter(pos=True, name="area")
    problem = cp.Problem(cp.Maximize(x * y * z), [x * y + y * z + z * x <= a])
    layer = dl.Layer(problem, [a], [x, y, z], gp=True, backend="torch")
    a_t = t(3.0, 12.0)
    outs = layer(a_t)
    (outs[0] + 2 * outs[1] + 3 * outs[2]).sum().backward()
    side = (a_t.detach() / 3).sqrt()
    for o in outs:
        torch.testing.assert_close(o.detach(), side, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(a_t.grad, 6 / (2 * (3 * a_t.detach()).sqrt()), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.info.objective, side**3, atol=1e-7, rtol=1e-7)


def test_a_monomial_equality() -> None:
    """``min x + 2y s.t. x y = a``: ``x = sqrt(2a)``, ``y = sqrt(a/2)``."""
    x, y = cp.Variable(pos=True), cp.Variable(pos=True)
    a = cp.Parameter(pos=True, name="a")
    problem = cp.Problem(cp.Minimize(x + 2 * y), [x * y == a])
    layer = dl.Layer(problem, [a], [x, y], gp=True, backend="torch")
    assert layer.program.equalities is not None
    a_t = t(2.0, 8.0)
    x_star, y_star = layer(a_t)
    (x_star - 3 * y_star).sum().backward()
    ad = a_t.detach()
    torch.testing.assert_close(x_star.detach(), (2 * ad).sqrt(), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(y_star.detach(), (ad / 2).sqrt(), atol=1e-8, rtol=1e-8)
    expected = 1 / (2 * ad).sqrt() - 3 / (4 * (ad / 2).sqrt())
    torch.testing.assert_close(a_t.grad, expected, atol=1e-7, rtol=1e-7)


def test_a_parameter_that_is_an_exponent_enters_as_itself() -> None:
    """``min x^q + x``: the reduction reads ``q`` as itself (``q * w``), not its log, so ``q`` may
    be negative; ``x* = (-1/q)^(1/(q-1))``."""
    x = cp.Variable(pos=True)
    q = cp.Parameter(name="q")
    problem = cp.Problem(cp.Minimize(x**q + x))
    assert problem.is_dgp(dpp=True)
    layer = dl.Layer(problem, [q], [x], gp=True, backend="torch")
    assert layer.program.parameter_signs == (None,)
    q_t = t(-1.0, -2.0, -0.5)
    (x_star,) = layer(q_t)
    x_star.sum().backward()

    def closed(q):
        return (-1 / q) ** (1 / (q - 1))

    qd = q_t.detach()
    torch.testing.assert_close(x_star.detach(), closed(qd), atol=1e-8, rtol=1e-8)
    expected = torch.func.vmap(torch.func.grad(closed))(qd)
    torch.testing.assert_close(q_t.grad, expected, atol=1e-7, rtol=1e-7)


def test_a_parameter_both_logged_and_an_exponent() -> None:
    """``min q x^q + 1/x``: ``q`` enters as ``log q`` and as ``q``; ``q^2 x^(q-1) = x^-2`` gives
    ``x* = q^(-2/(q+1))``."""
    x = cp.Variable(pos=True)
    q = cp.Parameter(pos=True, name="q")
    problem = cp.Problem(cp.Minimize(q * x**q + 1 / x))
    layer = dl.Layer(problem, [q], [x], gp=True, backend="torch")
    assert layer.program.parameter_signs == ("pos",)
    q_t = t(2.0, 0.5, 3.0)
    (x_star,) = layer(q_t)
    x_star.sum().backward()

    def closed(q):
        return q ** (-2 / (q + 1))

    qd = q_t.detach()
    torch.testing.assert_close(x_star.detach(), closed(qd), atol=1e-8, rtol=1e-8)
    expected = torch.func.vmap(torch.func.grad(closed))(qd)
    torch.testing.assert_close(q_t.grad, expected, atol=1e-7, rtol=1e-7)


def test_a_kink_in_log_space_smoothed_and_finished() -> None:
    """``min max(x, a/x)``: in log space ``max(w, log a - w)``, a kink, which the solution sits
    on: ``x* = sqrt(a)``. The smoothed program takes the width ``mu`` as its last parameter."""
    x = cp.Variable(pos=True)
    a = cp.Parameter(pos=True, name="a")
    problem = cp.Problem(cp.Minimize(cp.maximum(x, a / x)))
    layer = dl.Layer(problem, [a], [x], gp=True, backend="torch")
    program = layer.program
    assert program.kinks is not None and program.smoothed is not None
    assert program.smoothed.parameter_names == ("a", "smoothing width")
    assert program.smoothed.output_transform is EXP
    # The smoothed objective at mu -> 0 is the log of max(x, a/x) at the declared a.
    u = torch.tensor([math.log(2.0)], dtype=F64)
    a0, tiny = torch.tensor(9.0, dtype=F64), torch.tensor(1e-9, dtype=F64)
    torch.testing.assert_close(
        program.smoothed.objective((a0, tiny), u), torch.tensor(math.log(4.5), dtype=F64)
    )
    residuals, margins = program.kinks((a0,), torch.tensor([math.log(3.0)], dtype=F64))
    # log 3 = log 9 - log 3: on the kink
    assert float(residuals.abs().max()) < 1e-12 and float(margins.abs().max()) < 1e-12
    a_t = t(4.0, 9.0)
    (x_star,) = layer(a_t)
    x_star.sum().backward()
    root = a_t.detach().sqrt()
    torch.testing.assert_close(x_star.detach(), root, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(a_t.grad, 0.5 / root, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# against cvxpylayers and CVXPY's solution map


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_readme_example_matches_cvxpylayers_and_finite_differences(backend: str) -> None:
    problem, parameters, variables = _readme_gp()
    assert problem.is_dgp(dpp=True)
    params = [t(v) for v in README_VALUES]
    weights = [torch.tensor(w, dtype=F64) for w in (1.0, -2.0, 3.0)]
    layer = dl.Layer(problem, parameters, variables, gp=True, backend=backend)
    outs, grads = _outputs_and_grads(layer, params, weights)
    reference = dl.Layer(problem, parameters, variables, gp=True, backend="cvxpylayers")
    r_outs, r_grads = _outputs_and_grads(reference, params, weights)
    for o, r in zip(outs, r_outs):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, r_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    solution = _cvxpy_solution(problem, parameters, variables, README_VALUES)
    for o, s in zip(outs, solution):
        torch.testing.assert_close(o, torch.as_tensor(s, dtype=F64), atol=1e-7, rtol=1e-7)
    fd = _finite_differences(
        problem, parameters, variables, list(README_VALUES), [w.numpy() for w in weights]
    )
    torch.testing.assert_close(
        torch.stack(grads), torch.tensor(fd, dtype=F64), atol=1e-5, rtol=1e-5
    )


def test_vector_variables_batched_parameters_and_finite_differences() -> None:
    """``min sum(A / X) s.t. prod(X) <= b``, ``A`` a vector parameter, ``X`` a vector variable;
    a batch of two ``A`` with one shared ``b``."""
    X = cp.Variable(3, pos=True, name="X")
    A = cp.Parameter(3, pos=True, name="A")
    b = cp.Parameter(pos=True, name="b")
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(A, 1 / X))), [cp.prod(X) <= b])
    layer = dl.Layer(problem, [A, b], [X], gp=True, backend="torch")
    A_t = torch.tensor([[1.0, 2.0, 3.0], [0.5, 4.0, 1.5]], dtype=F64, requires_grad=True)
    b_t = t(2.0)
    (X_star,) = layer(A_t, b_t)
    assert X_star.shape == (2, 3)
    w = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    (X_star * w).sum().backward()
    # Closed form: X_i proportional to A_i with prod(X) = b.
    Ad = A_t.detach()
    expected = Ad * (b_t.detach() / Ad.prod(-1, keepdim=True)) ** (1 / 3)
    torch.testing.assert_close(X_star.detach(), expected, atol=1e-7, rtol=1e-7)
    h = 1e-4
    for k in range(2):
        values = [Ad[k].numpy(), 2.0]
        grad_A = np.zeros(3)
        for i in range(3):
            plus, minus = values[0].copy(), values[0].copy()
            plus[i] += h
            minus[i] -= h
            (xp,) = _cvxpy_solution(problem, [A, b], [X], [plus, 2.0])
            (xm,) = _cvxpy_solution(problem, [A, b], [X], [minus, 2.0])
            grad_A[i] = float(w.numpy() @ (xp - xm)) / (2 * h)
        torch.testing.assert_close(
            A_t.grad[k], torch.tensor(grad_A, dtype=F64), atol=1e-5, rtol=1e-5
        )
    (xp,) = _cvxpy_solution(problem, [A, b], [X], [Ad[0].numpy(), 2.0 + h])
    (xm,) = _cvxpy_solution(problem, [A, b], [X], [Ad[0].numpy(), 2.0 - h])
    (xp1,) = _cvxpy_solution(problem, [A, b], [X], [Ad[1].numpy(), 2.0 + h])
    (xm1,) = _cvxpy_solution(problem, [A, b], [X], [Ad[1].numpy(), 2.0 - h])
    fd_b = (float(w.numpy() @ (xp - xm)) + float(w.numpy() @ (xp1 - xm1))) / (2 * h)
    torch.testing.assert_close(b_t.grad, torch.tensor(fd_b, dtype=F64), atol=1e-5, rtol=1e-5)


def test_batched_parameters_match_one_call_per_problem() -> None:
    problem, parameters, variables = _readme_gp()
    layer = dl.Layer(problem, parameters, variables, gp=True, backend="torch")
    a = torch.tensor([2.0, 1.0, 3.0], dtype=F64)
    b = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    c = torch.tensor(0.5, dtype=F64)  # shared
    batched = layer(a, b, c)
    assert all(o.shape == (3,) for o in batched)
    for k in range(3):
        solution = _cvxpy_solution(problem, parameters, variables, [float(a[k]), float(b[k]), 0.5])
        for o, s in zip(batched, solution):
            torch.testing.assert_close(o[k], torch.as_tensor(s, dtype=F64), atol=1e-7, rtol=1e-7)


def test_a_subset_of_the_variables_as_outputs() -> None:
    problem, parameters, (x, y, z) = _readme_gp()
    params = [t(v) for v in README_VALUES]
    full = dl.Layer(problem, parameters, [x, y, z], gp=True, backend="torch")
    sub = dl.Layer(problem, parameters, [z, x], gp=True, backend="torch")
    assert sub.program.variable_names == ("z", "x", "y")  # listed first, then the rest
    assert sub.program.source[2] == (z, x, y)
    weights = [torch.tensor(2.0, dtype=F64), torch.tensor(-1.0, dtype=F64)]
    f_outs, f_grads = _outputs_and_grads(
        full, params, [weights[1], torch.zeros((), dtype=F64), weights[0]]
    )
    s_outs, s_grads = _outputs_and_grads(sub, params, weights)
    assert len(s_outs) == 2
    torch.testing.assert_close(s_outs[0], f_outs[2])
    torch.testing.assert_close(s_outs[1], f_outs[0])
    for g, r in zip(s_grads, f_grads):
        torch.testing.assert_close(g, r, atol=1e-8, rtol=1e-8)
    # cvxpylayers solves the same subset (all variables, gp=True) and drops the others.
    ref = dl.Layer(problem, parameters, [z, x], gp=True, backend="cvxpylayers")
    r_outs, r_grads = _outputs_and_grads(ref, params, weights)
    for o, r in zip(s_outs, r_outs):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)
    for g, r in zip(s_grads, r_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_the_drop_in_with_the_torch_backend() -> None:
    problem, parameters, variables = _readme_gp()
    params = [t(v) for v in README_VALUES]
    weights = [torch.tensor(w, dtype=F64) for w in (0.5, 1.0, -1.5)]
    layer = CvxpyLayer(
        problem, parameters=parameters, variables=variables, gp=True, backend="torch"
    )
    assert layer.backend_name == "torch"
    outs, grads = _outputs_and_grads(layer, params, weights)
    default = CvxpyLayer(problem, parameters=parameters, variables=variables, gp=True)
    assert default.backend_name == "cvxpylayers"
    d_outs, d_grads = _outputs_and_grads(default, params, weights)
    for o, r in zip(outs, d_outs):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, d_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_the_default_backend_is_cvxpylayers_on_the_declaration_with_gp() -> None:
    problem, a, x = _x_plus_a_over_x()
    layer = dl.Layer(problem, [a], [x], gp=True)
    assert layer.backend_name == "cvxpylayers" and layer.backward == "native"
    assert "log-log convex" in layer.reason
    compiled = layer.backend.compiled(layer.program, layer.options.get("layer_options"))
    assert compiled.layer.ctx.gp  # cvxpylayers got the original problem with gp=True
    a_t = t(2.0, 9.0)
    (x_star,) = layer(a_t)
    x_star.sum().backward()
    assert layer.info.gradient == "native (cvxpylayers)"
    root = a_t.detach().sqrt()
    torch.testing.assert_close(x_star.detach(), root, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a_t.grad, 0.5 / root, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.info.objective, 2 * root, atol=1e-6, rtol=1e-6)
    # Its answer, in log space, can also be differentiated by declopt's implicit backward.
    implicit = dl.Layer(problem, [a], [x], gp=True, backend="cvxpylayers", backward="implicit")
    a2 = t(2.0, 9.0)
    (x2,) = implicit(a2)
    x2.sum().backward()
    assert implicit.info.gradient == "implicit"
    torch.testing.assert_close(a2.grad, 0.5 / root, atol=1e-5, rtol=1e-5)


def test_prefer_torch_keeps_a_log_log_program_on_torch() -> None:
    problem, a, x = _x_plus_a_over_x()
    layer = dl.Layer(problem, [a], [x], gp=True, backend=dl.backends.Auto(prefer="torch"))
    assert layer.backend_name == "torch"


def test_the_cone_backend_refuses_a_log_log_program() -> None:
    problem, a, x = _x_plus_a_over_x()
    with pytest.raises(ValueError, match=r"log-log \(gp=True\).*backend='torch' or 'cvxpylayers'"):
        dl.Layer(problem, [a], [x], gp=True, backend="cone")


# ---------------------------------------------------------------------------------------------
# inputs, starts, custom solvers, transforms


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_parameter_that_is_not_positive_is_a_value_error_naming_it(bad: float) -> None:
    problem, parameters, variables = _readme_gp()
    layer = dl.Layer(problem, parameters, variables, gp=True, backend="torch")
    with pytest.raises(ValueError, match=r"parameter 'b' must be positive.*batch index \(1,\)"):
        layer(t(2.0), torch.tensor([1.0, bad], dtype=F64), t(0.5))


def test_a_custom_solver_answers_in_output_space() -> None:
    """A custom forward returns ``x`` (the outputs); the layer takes its log before checking it,
    and its ``vjp`` sees outputs and upstream gradients in output space too."""
    problem, a, x = _x_plus_a_over_x()
    seen = {}

    class Solver:
        def __call__(self, a):
            return (a.sqrt(),)

        def vjp(self, params, outputs, grads):
            seen["outputs"], seen["grads"] = outputs[0], grads[0]
            return (grads[0] * 0.5 / params[0].sqrt(),)

    a_t = t(4.0, 9.0)
    layer = dl.Layer(problem, [a], [x], gp=True, solver=Solver(), backward="implicit")
    (x_star,) = layer(a_t)
    assert bool(layer.info.converged.all())  # the log of the answer satisfies the KKT conditions
    torch.testing.assert_close(x_star.detach(), torch.tensor([2.0, 3.0], dtype=F64))
    (3 * x_star).sum().backward()
    torch.testing.assert_close(a_t.grad, 3 * 0.5 / a_t.detach().sqrt())

    native = dl.Layer(problem, [a], [x], gp=True, solver=Solver())
    assert native.backward == "native"
    a2 = t(4.0, 9.0)
    (x2,) = native(a2)
    (3 * x2).sum().backward()
    torch.testing.assert_close(seen["outputs"], torch.tensor([2.0, 3.0], dtype=F64))
    torch.testing.assert_close(seen["grads"], torch.full((2,), 3.0, dtype=F64))
    torch.testing.assert_close(a2.grad, 3 * 0.5 / a2.detach().sqrt())


def test_an_initializer_in_output_space_is_taken_as_its_log() -> None:
    problem, a, x = _x_plus_a_over_x()
    starts = []

    def start(a):
        starts.append(a)
        return (a.sqrt(),)  # the exact solution, in output space

    layer = dl.Layer(problem, [a], [x], gp=True, backend="torch", initializers=[start])
    (x_star,) = layer(t(16.0))
    assert starts
    torch.testing.assert_close(x_star.detach(), torch.tensor(4.0, dtype=F64))
    # _pack maps the initializer's x to u = log x.
    from declopt.inputs import prepare_inputs
    from declopt.layer import _Call

    call = _Call(layer, prepare_inputs(layer.program, (torch.tensor(16.0, dtype=F64),)))
    packed = call._pack(start(torch.tensor(16.0, dtype=F64)), "initializer")
    torch.testing.assert_close(packed, torch.tensor([[math.log(4.0)]], dtype=F64))


def test_second_derivatives_and_torch_func_through_exp() -> None:
    """The exp is on the autograd graph: double backward, jacrev and jvp see it."""
    problem, a, x = _x_plus_a_over_x()
    layer = dl.Layer(problem, [a], [x], gp=True, backend="torch")
    a_t = t(4.0)
    (x_star,) = layer(a_t)
    (g,) = torch.autograd.grad(x_star, a_t, create_graph=True)
    (h,) = torch.autograd.grad(g, a_t)
    torch.testing.assert_close(g.detach(), torch.tensor(0.25, dtype=F64), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(h, torch.tensor(-0.25 * 4.0**-1.5, dtype=F64), atol=1e-7, rtol=1e-7)
    values = torch.tensor([1.0, 4.0], dtype=F64)
    jac = torch.func.jacrev(lambda v: layer(v)[0])(values)
    torch.testing.assert_close(jac, torch.diag(0.5 / values.sqrt()), atol=1e-8, rtol=1e-8)
    _, tangent = torch.func.jvp(lambda v: layer(v)[0], (values,), (torch.ones(2, dtype=F64),))
    torch.testing.assert_close(tangent, 0.5 / values.sqrt(), atol=1e-8, rtol=1e-8)


def test_a_copied_layer_compiles_the_log_log_program_again() -> None:
    problem, a, x = _x_plus_a_over_x()
    layer = dl.Layer(problem, [a], [x], gp=True, backend="torch")
    copied = copy.deepcopy(layer)
    assert copied.program.log_log and copied.program.output_transform is EXP
    (x_star,) = copied(t(9.0, grad=False))
    torch.testing.assert_close(x_star, torch.tensor(3.0, dtype=F64), atol=1e-9, rtol=1e-9)


def test_gp_with_dual_variables_as_outputs_stays_source_only() -> None:
    x = cp.Variable(pos=True)
    a = cp.Parameter(pos=True)
    constraint = x >= a
    problem = cp.Problem(cp.Minimize(x), [constraint])
    layer = dl.Layer(problem, [a], [x, constraint.dual_variables[0]], gp=True)
    assert layer.backend_name == "cvxpylayers"
    assert not layer.program.has_functions and layer.program.log_log
    with pytest.raises(dl.DeclarationError, match="dual variables"):
        dl.Layer(problem, [a], [x, constraint.dual_variables[0]], gp=True, backend="torch")
