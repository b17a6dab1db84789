"""Per-problem statuses on the torch backend: a failing member is named with its cause, and the
other members of its batch are unaffected."""

from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

import declopt as dl
from declopt.diagnostics import Status

F64 = torch.float64


def _lp() -> dl.Layer:
    """``min c.x s.t. x >= 0``: unbounded where some ``c_i < 0``."""
    x, c = cp.Variable(2), cp.Parameter(2)
    return dl.Layer(cp.Problem(cp.Minimize(c @ x), [x >= 0]), [c], [x], backend="torch")


def _interval() -> dl.Layer:
    """``min |y - a|^2 s.t. 1 <= y <= a``: infeasible where some ``a_i < 1``."""
    y, a = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [y >= 1, y <= a])
    return dl.Layer(problem, [a], [y], backend="torch")


@pytest.mark.parametrize(
    ("make", "data", "bad", "status"),
    [
        (_lp, [[1.0, 2.0], [-1.0, 1.0], [0.5, 0.5]], 1, Status.UNBOUNDED),
        (_interval, [[2.0, 3.0], [0.5, 2.0], [3.0, 3.0]], 1, Status.INFEASIBLE),
    ],
    ids=["unbounded", "infeasible"],
)
def test_a_failing_member_is_named_with_its_cause_and_the_others_are_unaffected(
    make: object, data: list, bad: int, status: Status
) -> None:
    layer = make()
    batch = torch.tensor(data, dtype=F64)
    with pytest.warns(dl.NonConvergenceWarning, match=status.name.lower()) as record:
        (u,) = layer(batch)
    messages = [str(w.message) for w in record if w.category is dl.NonConvergenceWarning]
    assert f"[({bad},)]" in messages[0]
    want = [Status.SOLVED.name] * len(data)
    want[bad] = status.name
    assert layer.info.status_names == want
    good = [i for i in range(len(data)) if i != bad]
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.NonConvergenceWarning)
        (alone,) = layer(batch[good])
    torch.testing.assert_close(u[good], alone, atol=1e-12, rtol=0)


def test_on_failure_raise_carries_the_status() -> None:
    strict = dl.Layer(_lp().program, backend="torch", on_failure="raise")
    with pytest.raises(dl.SolverError, match="unbounded at batch indices"):
        strict(torch.tensor([[1.0, 2.0], [-1.0, 1.0]], dtype=F64))


def test_an_iteration_cap_is_reported_as_such() -> None:
    x, u = cp.Parameter(3), cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.sum(cp.exp(u - x)) - u))
    layer = dl.Layer(problem, [x], [u], backend="torch", max_iter=1, on_failure="ignore")
    layer(torch.randn(4, 3, dtype=F64) * 5)
    assert (layer.info.status == int(Status.ITERATION_LIMIT)).any()
    assert set(layer.info.status_names) <= {"SOLVED", "ITERATION_LIMIT"}


def test_a_backend_that_reports_no_cause_gives_not_converged() -> None:
    info = dl.LayerInfo(
        "custom",
        "test",
        converged=torch.tensor([True, False]),
        iterations=torch.zeros(2, dtype=torch.int64),
        objective=torch.zeros(2),
        kkt_residual=torch.zeros(2),
    )
    assert info.status_names == ["SOLVED", "NOT_CONVERGED"]


def test_scipy_names_an_unbounded_member_too() -> None:
    problem, parameters, variables = _lp().program.source
    layer = dl.Layer(problem, parameters, variables, backend="scipy", on_failure="ignore")
    layer(torch.tensor([[1.0, 2.0], [-1.0, 1.0]], dtype=F64))
    assert layer.info.status_names == ["SOLVED", "UNBOUNDED"]


def test_cvxpylayers_names_infeasible_and_unbounded_members_from_the_solver() -> None:
    problem, parameters, variables = _interval().program.source
    layer = dl.Layer(problem, parameters, variables, backend="cvxpylayers", on_failure="ignore")
    layer(torch.tensor([[2.0, 3.0], [0.5, 2.0]], dtype=F64))
    assert layer.info.status_names == ["SOLVED", "INFEASIBLE"]
    problem, parameters, variables = _lp().program.source
    layer = dl.Layer(problem, parameters, variables, backend="cvxpylayers", on_failure="ignore")
    layer(torch.tensor([[1.0, 2.0], [-1.0, 1.0]], dtype=F64))
    assert layer.info.status_names == ["SOLVED", "UNBOUNDED"]


def test_positive_parametrization_keeps_a_learned_alpha_positive() -> None:
    from torch import nn
    from torch.nn.utils import parametrize

    pool = dl.nn.RobustPool("huber", alpha=nn.Parameter(torch.tensor(0.5, dtype=F64)))
    parametrize.register_parametrization(pool, "alpha", dl.nn.Positive())
    torch.testing.assert_close(pool.alpha.detach(), torch.tensor(0.5, dtype=F64))
    x = torch.randn(4, 16, dtype=F64, generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.SGD(pool.parameters(), lr=1e3)  # a step far past zero
    for _ in range(2):
        optimiser.zero_grad()
        (pool(x).pow(2).sum() * 1e3).backward()
        optimiser.step()
    assert float(pool.alpha) > 0 and pool.parametrizations.alpha.original.grad is not None


def test_a_negative_learned_alpha_names_the_positive_parametrization() -> None:
    from torch import nn

    pool = dl.nn.RobustPool("huber", alpha=nn.Parameter(torch.tensor(0.5, dtype=F64)))
    with torch.no_grad():
        pool.alpha.fill_(-0.1)
    with pytest.raises(dl.InputError, match=r"declopt\.nn\.Positive"):
        pool(torch.randn(2, 8, dtype=F64))
    assert callable(pool.compile) and pool.compiled is False


def test_a_cvxpylayers_batch_whose_members_all_fail_stays_on_the_graph() -> None:
    problem, parameters, variables = _interval().program.source
    layer = dl.Layer(problem, parameters, variables, backend="cvxpylayers", on_failure="ignore")
    a = torch.tensor([[0.5, 2.0], [0.2, 0.3]], dtype=F64, requires_grad=True)
    (u,) = layer(a)
    assert layer.info.status_names == ["INFEASIBLE", "INFEASIBLE"]
    u.sum().backward()  # failed members: zero outputs, zero gradients
    torch.testing.assert_close(a.grad, torch.zeros_like(a))


def test_cvxpylayers_batches_with_failing_members_leave_no_threads_behind() -> None:
    """diffcp's ThreadPool of a batch with an infeasible member was left running (held by the
    exception's reference cycle): with the cyclic collector off, +15 threads per call."""
    import gc
    import threading
    import time

    problem, parameters, variables = _interval().program.source
    layer = dl.Layer(
        problem, parameters, variables, backend="cvxpylayers", on_failure="ignore", n_jobs=2
    )
    a = torch.tensor([[2.0, 3.0], [0.5, 2.0], [3.0, 4.0], [0.2, 5.0]], dtype=F64)
    layer(a)  # imports and first-call set-up threads, if any, before the count
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        before = threading.active_count()
        for _ in range(4):
            with torch.no_grad():
                layer(a)
            a_grad = a.clone().requires_grad_()
            (u,) = layer(a_grad)
            u.sum().backward()
        assert layer.info.status_names == ["SOLVED", "INFEASIBLE", "SOLVED", "INFEASIBLE"]
        deadline = time.monotonic() + 5.0  # closed pools' threads finish on their own
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
    finally:
        if enabled:
            gc.enable()
