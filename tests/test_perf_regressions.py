"""Guards on the fast paths: they must keep compiling, and agree with the general formulas."""

from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch
import torch._dynamo

import declopt as dl
from declopt import compiling, implicit
from declopt.derivatives import Derivatives
from declopt.implicit import implicit_vjp
from declopt.linalg import scalar_solve, solve_symmetric
from declopt.program import BatchedParams


@pytest.fixture
def recording_backend(monkeypatch: pytest.MonkeyPatch) -> list:
    """``maybe_compile`` through TorchDynamo with a backend that records every graph it gets
    (and runs it eagerly: no C++ build), and a recompilation limit of 2 to keep the test short."""
    graphs: list = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "BACKEND", record)
    with torch._dynamo.config.patch(recompile_limit=2):
        yield graphs
    torch._dynamo.reset()


def _scaled_square(c: float):
    # One factory: every objective it makes shares one code object, as declarations do.
    return lambda x, u: (c * (u - x[0]) ** 2).sum()


def test_compiled_derivatives_past_dynamos_recompile_limit_still_compile(
    recording_backend: list,
) -> None:
    # TorchDynamo caches per code object; Derivatives made by one factory used to share theirs,
    # so that past the limit (8; 2 here) new declarations silently ran eagerly.
    x, u = torch.randn(3, 4), torch.randn(3, 1)
    count = 5
    for k in range(count):
        derivatives = Derivatives(_scaled_square(1.0 + k), (0,), compile=True)
        derivatives.value((x,), u)
    assert len(recording_backend) == count


def _objective(x: tuple[torch.Tensor, ...], u: torch.Tensor) -> torch.Tensor:
    data, alpha = x
    z = u - data
    return (alpha * torch.sqrt(alpha * alpha + z * z)).sum() + (alpha * u * u).sum()


@pytest.mark.parametrize("shared_alpha", [True, False])
def test_one_variable_vjp_matches_the_general_formula(
    shared_alpha: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = dl.Program(("x", "alpha"), ((7,), ()), ("y",), ((1,),), _objective)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, 7, generator=g, dtype=torch.float64)
    alpha = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    in_dims = (0, None)
    if not shared_alpha:
        alpha, in_dims = alpha.expand(5).clone(), (0, 0)
    params = BatchedParams((data, alpha), in_dims, 5)
    u = torch.randn(5, 1, generator=g, dtype=torch.float64)
    v = torch.randn(5, 1, generator=g, dtype=torch.float64)
    fast, fast_report = implicit_vjp(program, params, u, v)
    monkeypatch.setattr(implicit, "_expandable", lambda *args: False)
    general, general_report = implicit_vjp(program, params, u, v)
    for a, b in zip(fast, general):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fast_report.multiplier_residual, general_report.multiplier_residual)
    # only the wanted gradients are formed
    partial, _ = implicit_vjp(program, params, u, v, wanted=(False, True))
    assert partial[0] is None
    torch.testing.assert_close(partial[1], general[1])


def test_one_variable_report_is_solve_symmetrics() -> None:
    h = torch.tensor([[2.0], [-3.0], [0.0], [1e-45]], dtype=torch.float32)
    v = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float32)
    _, want = solve_symmetric(h.unsqueeze(-1), v)
    got = scalar_solve(h, v)[1]
    assert got.method == want.method
    for name in ("singular", "second_order_ok", "residual"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))


def test_layer_forms_only_the_gradients_autograd_asks_for() -> None:
    x = torch.randn(4, 30, dtype=torch.float64) * 3
    alpha = torch.nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
    pool = dl.nn.RobustPool("welsch", alpha=alpha)
    pool(x).sum().backward()  # x needs no gradient
    want = alpha.grad.clone()
    alpha.grad = None
    leaf = x.clone().requires_grad_(True)
    pool(leaf).sum().backward()
    torch.testing.assert_close(alpha.grad, want)
    assert leaf.grad is not None


def test_compiled_constrained_layer_compiles_without_falling_back(
    recording_backend: list,
) -> None:
    """``compile=True`` on a constrained declaration (m > 1): the dense Hessians are taken eagerly
    (vmapped probes inside jvp used to fail Dynamo's fake tensors for every constrained problem,
    and the layer silently fell back to eager after a warning)."""
    x, u = cp.Parameter(4), cp.Variable(4)
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(u - x) + cp.sum(cp.exp(u))), [cp.sum(u) == 1, u >= -1]
    )
    layer = dl.Layer(problem, [x], [u], backend="torch", compile=True)
    X = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "torch.compile failed ...; eagerly"
        (U,) = layer(X)
        U.sum().backward()
    assert bool(layer.info.converged.all()) and len(recording_backend) > 0
    torch.testing.assert_close(U.sum(-1), torch.ones(3, dtype=torch.float64))
