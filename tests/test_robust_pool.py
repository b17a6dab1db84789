"""RobustPool: values, global minima of the nonconvex penalties, and implicit gradients."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings

import declopt as dl
from declopt import derivatives
from declopt.nn import pool_solver
from tests.helpers import central_difference_vjp, implicit_vjp_of

PENALTIES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]
NUMPY_PHI = {
    "quadratic": lambda z, a: 0.5 * z**2,
    "pseudo_huber": lambda z, a: a**2 * (torch.sqrt(1 + (z / a) ** 2) - 1),
    "huber": lambda z, a: torch.where(z.abs() <= a, 0.5 * z**2, a * (z.abs() - a / 2)),
    "welsch": lambda z, a: 1 - torch.exp(-(z**2) / (2 * a**2)),
    "truncated_quadratic": lambda z, a: 0.5 * torch.clamp(z**2, max=a**2),
}


def grid_minimiser(
    penalty: str, x: torch.Tensor, alpha: float, points: int = 20001
) -> torch.Tensor:
    """Dense 1-D grid search over [min x, max x] for each row of x (rows, n) -> (rows,)."""
    lo, hi = x.min(-1).values, x.max(-1).values
    ys = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, points, dtype=x.dtype)
    values = NUMPY_PHI[penalty](ys[:, :, None] - x[:, None, :], alpha).sum(-1)  # (rows, points)
    return ys.gather(-1, values.argmin(-1, keepdim=True)).squeeze(-1)


def test_quadratic_pool_is_the_mean_with_gradient_one_over_n() -> None:
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    y = dl.nn.RobustPool("quadratic")(x)
    torch.testing.assert_close(y, x.mean(-1))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 7))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_pool_output_shape_dtype_and_dim(penalty: str) -> None:
    x = torch.randn(2, 5, 3, dtype=torch.float32)
    pool = dl.nn.RobustPool(penalty, alpha=1.0, dim=1)
    y = pool(x)
    assert y.shape == (2, 3) and y.dtype == torch.float32
    assert dl.nn.RobustPool(penalty, dim=1, keepdim=True)(x).shape == (2, 1, 3)


@pytest.mark.parametrize("penalty", ["welsch", "truncated_quadratic"])
def test_nonconvex_pool_finds_global_minimiser_of_two_clusters(penalty: str) -> None:
    g = torch.Generator().manual_seed(0)
    big = 3.0 + 0.3 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    small = -2.0 + 0.3 * torch.randn(6, 25, generator=g, dtype=torch.float64)
    x = torch.cat([small, big], -1)[:, torch.randperm(65, generator=g)]
    y = dl.nn.RobustPool(penalty, alpha=1.0)(x)
    reference = grid_minimiser(penalty, x, 1.0)
    torch.testing.assert_close(y, reference, atol=1e-3, rtol=0)
    assert (y > 2).all()  # the larger cluster, not the mean


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch"])
def test_fast_and_generic_solvers_agree(penalty: str) -> None:
    x = torch.randn(4, 6, 30, dtype=torch.float64)
    x[..., :3] *= 10
    fast = dl.nn.RobustPool(penalty, alpha=1.0)(x)
    generic = dl.nn.RobustPool(penalty, alpha=1.0, solver="generic")(x)
    torch.testing.assert_close(fast, generic, atol=1e-8, rtol=1e-8)


def test_truncated_quadratic_fast_solver_is_never_worse_than_local_search() -> None:
    # The fast solver is exact (global); the generic one is a local search from mean/median.
    x = torch.randn(4, 6, 30, dtype=torch.float64) * 2
    x[..., :3] *= 10
    fast = dl.nn.RobustPool("truncated_quadratic")(x)
    generic = dl.nn.RobustPool("truncated_quadratic", solver="generic")(x)
    phi = NUMPY_PHI["truncated_quadratic"]
    f_fast = phi(fast.unsqueeze(-1) - x, 1.0).sum(-1)
    f_generic = phi(generic.unsqueeze(-1) - x, 1.0).sum(-1)
    assert (f_fast <= f_generic + 1e-12).all()
    grid = grid_minimiser("truncated_quadratic", x.reshape(-1, 30), 1.0).reshape(4, 6)
    assert (f_fast <= phi(grid.unsqueeze(-1) - x, 1.0).sum(-1) + 1e-12).all()


@pytest.mark.parametrize("penalty", PENALTIES[1:])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(0.3, 3.0))
@example(seed=206, alpha=0.30078125)  # the truncated quadratic's tied basins (below)
def test_pool_gradients_match_central_differences(penalty: str, seed: int, alpha: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, generator=g, dtype=torch.float64) * 1.5
    a = torch.tensor(alpha, dtype=torch.float64)
    v = torch.randn(3, generator=g, dtype=torch.float64)

    layer = dl.nn.RobustPool(penalty).layer(9)

    def pool(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return layer(x, a)[0]

    if penalty in ("huber", "truncated_quadratic"):
        # Piecewise penalties: skip draws where a residual sits within the FD step of a kink.
        with torch.no_grad():
            y = pool(x, a)
        margin = ((y.unsqueeze(-1) - x).abs() - alpha).abs().min()
        if margin < 1e-4:
            return
    analytic = implicit_vjp_of(pool, [x, a], v)
    numeric = central_difference_vjp(pool, [x, a], v)
    if penalty == "truncated_quadratic" and bool(numeric[0].abs().max() > 10 * v.abs().max()):
        # The global minimiser jumps between two tied basins within the difference step (seed
        # 206, alpha 0.30078125: 6.9e4). With its inlier set fixed a pooled value moves at most
        # as fast as an input, so a difference quotient this large is that jump, not a slope.
        return
    for got, want in zip(analytic, numeric):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_learnable_alpha_receives_a_gradient() -> None:
    alpha = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    pool = dl.nn.RobustPool("welsch", alpha=alpha)
    x = torch.randn(5, 20, dtype=torch.float64)
    pool(x).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)


def test_unknown_penalty_and_bad_alpha_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown penalty 'cauchy'"):
        dl.nn.RobustPool("cauchy")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        dl.nn.RobustPool("huber", alpha=-1.0)


# ------------------------------------------------------------------------------------------------
# The fast solver: exactness, float32, edge cases, compiled kernels

CONVEX = ["pseudo_huber", "huber"]
ROBUST = ["pseudo_huber", "huber", "welsch", "truncated_quadratic"]


def objective(penalty: str, y: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sum_i phi(y - x_i)`` per row, in float64."""
    return NUMPY_PHI[penalty](y.double().unsqueeze(-1) - x.double(), alpha).sum(-1)


def outlier_rows(rows: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=dtype)
    return torch.where(torch.rand(rows, n, generator=g) < 0.1, 10 * x, x)


def brute_force_truncated_quadratic(
    x: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best objective and minimiser over every window mean of the sorted rows (float64).

    The optimum's inlier set is a window of the sorted data and its mean is the optimum; trying
    every window's mean finds it: (rows, n) -> (rows,), (rows,).
    """
    xs = x.double().sort(-1).values
    n = xs.shape[-1]
    best = torch.full((xs.shape[0],), torch.inf, dtype=torch.float64)
    argbest = torch.zeros_like(best)
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            mean = xs[:, lo:hi].mean(-1)
            value = objective("truncated_quadratic", mean, xs, alpha)
            argbest = torch.where(value < best, mean, argbest)
            best = torch.minimum(best, value)
    return best, argbest


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_truncated_quadratic_is_globally_exact_on_ties_and_breakpoint_coincidences(
    alpha: float,
) -> None:
    # Quantised data: many ties and entries exactly 2 alpha apart (coinciding breakpoints).
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float32):
        x = (torch.randint(-6, 7, (60, 17), generator=g) * 0.5).to(dtype)
        y = dl.nn.RobustPool("truncated_quadratic", alpha=alpha)(x)
        best, _ = brute_force_truncated_quadratic(x, alpha)
        assert (objective("truncated_quadratic", y, x, alpha) <= best + 1e-9).all()


def test_truncated_quadratic_exact_for_float32_far_from_zero() -> None:
    # x ~ 1e6: the float32 spacing (1/16) is a sizeable part of alpha; the window sums and the
    # breakpoint order must still be those of the float32 values themselves.
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(40, 12, generator=g, dtype=torch.float64) * 2 + 1e6).float()
    y = dl.nn.RobustPool("truncated_quadratic", alpha=1.0)(x)
    _, exact = brute_force_truncated_quadratic(x, 1.0)
    # the best float32 near the exact minimiser (which float32 may not represent)
    near = [exact.float()]
    for step in (1, 2):
        near += [near[0] + step / 16, near[0] - step / 16]
    best32 = torch.stack([objective("truncated_quadratic", c, x, 1.0) for c in near]).min(0)
    assert (objective("truncated_quadratic", y, x, 1.0) <= best32.values + 1e-9).all()


def welsch_reference(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The seed paper's rule with plain majorise-minimise (many steps, float64)."""

    def mm(y: torch.Tensor) -> torch.Tensor:
        for _ in range(3000):
            w = torch.exp(-((y.unsqueeze(-1) - x) ** 2) / (2 * alpha**2))
            y = (w * x).sum(-1) / w.sum(-1)
        return y

    y1, y2 = mm(x.mean(-1)), mm(x.median(-1).values)
    f1, f2 = objective("welsch", y1, x, alpha), objective("welsch", y2, x, alpha)
    return torch.where(f2 < f1, y2, y1)


def test_welsch_is_the_better_local_minimum_from_mean_and_median() -> None:
    g = torch.Generator().manual_seed(5)
    # two clusters of varying sizes and spreads: the two starts often reach different minima
    a = 0.5 + torch.rand(40, 1, generator=g, dtype=torch.float64)
    left = -2 + a * torch.randn(40, 15, generator=g, dtype=torch.float64)
    right = 2 + a * torch.randn(40, 20, generator=g, dtype=torch.float64)
    x = torch.cat([left, right], -1)
    y = dl.nn.RobustPool("welsch", alpha=1.0)(x)
    reference = welsch_reference(x, 1.0)
    torch.testing.assert_close(y, reference, atol=1e-7, rtol=0)


@pytest.mark.parametrize("penalty", ROBUST)
def test_float32_matches_float64_with_outliers_at_large_n(penalty: str) -> None:
    x = outlier_rows(16, 4096, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.NonConvergenceWarning)
        y32 = dl.nn.RobustPool(penalty)(x)
        y64 = dl.nn.RobustPool(penalty)(x.double())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=2e-6, rtol=2e-6)
    if penalty != "truncated_quadratic":
        # stationary: sum psi(y - x_i) is at the rounding level of its terms (sum |psi| <= n)
        yy = y64.clone().requires_grad_(True)
        objective(penalty, yy, x.double(), 1.0).sum().backward()
        assert yy.grad.abs().max() < 1e-9 * x.shape[-1]


@pytest.mark.parametrize("penalty", PENALTIES)
def test_one_entry_one_row_and_all_equal_inputs(penalty: str) -> None:
    pool = dl.nn.RobustPool(penalty)
    x = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    y = pool(x)
    torch.testing.assert_close(y, x[:, 0])
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    # a single row of many entries (no batch dims at all)
    row = outlier_rows(1, 5000, seed=7, dtype=torch.float64)[0]
    assert pool(row).shape == ()
    torch.testing.assert_close(pool(row), pool(row.expand(3, -1))[0])
    # all entries equal: that value, and the gradient spreads evenly
    x = torch.full((2, 3, 50), 1.75, dtype=torch.float64, requires_grad=True)
    y = pool(x)
    torch.testing.assert_close(y, torch.full((2, 3), 1.75, dtype=torch.float64))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 50))


@pytest.mark.parametrize("penalty", ROBUST)
def test_ties_and_duplicated_rows(penalty: str) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-3, 4, (30, 21), generator=g).double()
    y = dl.nn.RobustPool(penalty, alpha=0.75)(x)
    # permuting the entries changes nothing; every row alone gives the same answer
    perm = torch.randperm(21, generator=g)
    torch.testing.assert_close(dl.nn.RobustPool(penalty, alpha=0.75)(x[:, perm]), y)
    alone = torch.stack([dl.nn.RobustPool(penalty, alpha=0.75)(row) for row in x[:5]])
    torch.testing.assert_close(alone, y[:5])


@pytest.mark.parametrize("penalty", ROBUST)
def test_alpha_huge_gives_the_mean_and_tiny_alpha_stays_on_the_data(penalty: str) -> None:
    x = outlier_rows(8, 33, seed=9, dtype=torch.float64)
    y = dl.nn.RobustPool(penalty, alpha=1e6)(x)
    torch.testing.assert_close(y, x.mean(-1), atol=1e-6, rtol=0)
    y = dl.nn.RobustPool(penalty, alpha=1e-9)(x)
    assert torch.isfinite(y).all()
    if penalty in CONVEX:
        # the minimiser of sum |y - x_i| (alpha -> 0), here an odd count: the median
        torch.testing.assert_close(y, x.median(-1).values, atol=1e-8, rtol=0)
    elif penalty == "truncated_quadratic":
        # a global minimiser has an entry within alpha (distinct entries: any one of them)
        assert ((y.unsqueeze(-1) - x).abs().min(-1).values < 1e-9).all()


def test_rows_that_converge_at_different_speeds_match_rows_solved_alone() -> None:
    # Easy rows converge in one or two steps; the bimodal ones take longer and are compacted.
    g = torch.Generator().manual_seed(10)
    easy = torch.randn(6, 40, generator=g, dtype=torch.float64) * 0.1
    hard = torch.cat(
        [torch.randn(6, 20, generator=g, dtype=torch.float64) - 1.5, torch.randn(6, 20) + 1.5], -1
    ).double()
    x = torch.cat([easy, hard, easy], 0)
    for penalty in ("pseudo_huber", "huber", "welsch"):
        y = dl.nn.RobustPool(penalty, alpha=0.5)(x)
        alone = torch.stack([dl.nn.RobustPool(penalty, alpha=0.5)(row) for row in x])
        torch.testing.assert_close(y, alone, atol=1e-12, rtol=0)


def test_median_helper_is_torch_median() -> None:
    for n in (1, 2, 7, 64, 65):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(5, 3, n, dtype=dtype)
            torch.testing.assert_close(pool_solver.median(x), x.median(-1).values, rtol=0, atol=0)


def test_pseudo_huber_declaration_is_the_penalty() -> None:
    # RobustPool declares pseudo-Huber with cheap derivatives; it must be dl.penalties' function.
    layer = dl.nn.RobustPool("pseudo_huber").layer(6)
    x = torch.randn(6, dtype=torch.float64) * 3
    for alpha in (0.3, 1.0, 4.0):
        a = torch.tensor(alpha, dtype=torch.float64)
        for y in (-2.0, 0.1, 5.0):
            u = torch.tensor([y], dtype=torch.float64)
            value = layer.program.objective((x, a), u)
            want = NUMPY_PHI["pseudo_huber"](y - x, a).sum()
            torch.testing.assert_close(value, want)


@pytest.fixture
def aot_eager_compile(monkeypatch: pytest.MonkeyPatch):
    """The solver's ``compile=True`` through TorchDynamo with the cheap ``aot_eager`` backend (no
    C++ build; ``fullgraph=True``, so that a graph break fails). The layer's derivatives stay
    eager here: compiling them is the layer's business, tested with the layer."""

    def traced(fn, enabled):
        if not enabled:
            return fn
        return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)

    clear = (pool_solver._kernels, pool_solver._tq_kernels, derivatives.derivatives_for)
    for cache in clear:
        cache.cache_clear()
    monkeypatch.setattr(pool_solver, "maybe_compile", traced)
    monkeypatch.setattr(derivatives, "maybe_compile", lambda fn, enabled: fn)
    yield
    for cache in clear:
        cache.cache_clear()


@pytest.mark.usefixtures("aot_eager_compile")
def test_compiled_kernels_trace_whole_and_match_eager() -> None:
    # pseudo-Huber runs the same Newton kernels as Huber with other sums
    x = outlier_rows(24, 70, seed=11)
    alpha = torch.tensor(1.0)
    for penalty in ("huber", "welsch", "truncated_quadratic"):
        eager = pool_solver.solve_pool(penalty, x, alpha, compile=False)
        compiled = pool_solver.solve_pool(penalty, x, alpha, compile=True)
        torch.testing.assert_close(compiled, eager)
    # through the layer: the same value and gradient
    x = outlier_rows(12, 30, seed=12, dtype=torch.float64)
    out = []
    for compile in (False, True):
        leaf = x.clone().requires_grad_(True)
        y = dl.nn.RobustPool("welsch", compile=compile)(leaf)
        y.sum().backward()
        out.append((y, leaf.grad))
    torch.testing.assert_close(out[1], out[0])


def test_fixed_alpha_is_a_constant_of_the_declaration() -> None:
    x = outlier_rows(4, 30, seed=13, dtype=torch.float64)
    fixed = dl.nn.RobustPool("welsch", alpha=0.75)
    learnable = dl.nn.RobustPool(
        "welsch", alpha=torch.nn.Parameter(torch.tensor(0.75, dtype=torch.float64))
    )
    out = []
    for pool in (fixed, learnable):
        leaf = x.clone().requires_grad_(True)
        y = pool(leaf)
        y.sum().backward()
        out.append((y, leaf.grad))
    torch.testing.assert_close(out[0], out[1])
    assert fixed.layer(30, 0.75).program.parameter_names == ("x",)
    # the buffer can change: the pool re-declares with the new value
    fixed.alpha.fill_(1.25)
    torch.testing.assert_close(fixed(x), dl.nn.RobustPool("welsch", alpha=1.25)(x))


def _huber_root_by_bisection(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The minimiser of sum_i huber(y - x_i) per row: the root of the monotone sum of
    clamp(y - x_i, -alpha, alpha) by bisection (float64, 200 halvings)."""
    lo, hi = x.amin(-1), x.amax(-1)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        g = (mid.unsqueeze(-1) - x).clamp(-alpha, alpha).sum(-1)
        lo, hi = torch.where(g < 0, mid, lo), torch.where(g < 0, hi, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize(
    ("row", "alpha"), [([1.3, 1.0], 0.3), ([1.5, 1.0], 0.3), ([2.1, 1.0], 0.6)]
)
def test_huber_newton_does_not_cycle_between_its_bracket_ends(row: list, alpha: float) -> None:
    # From the median, Newton's step lands exactly on the other end of the bracket (one kink to
    # the next) and back: it must bisect instead, and converge.
    x = torch.tensor([row], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.NonConvergenceWarning)
        y = dl.nn.RobustPool("huber", alpha=alpha)(x)
    torch.testing.assert_close(y, _huber_root_by_bisection(x, alpha), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huber_pooling_of_quantised_data_converges_to_the_minimiser(dtype: torch.dtype) -> None:
    # Pixel-like data (k / 255) with alpha a few quanta: kinks everywhere at exact spacings.
    g = torch.Generator().manual_seed(0)
    for n in (2, 4, 16):
        x = torch.randint(0, 256, (512, n), generator=g).to(torch.float64) / 255
        with warnings.catch_warnings():
            warnings.simplefilter("error", dl.NonConvergenceWarning)
            y = dl.nn.RobustPool("huber", alpha=0.05)(x.to(dtype))
        want = _huber_root_by_bisection(x, 0.05)

        # Compare objectives: with two entries more than 2 alpha apart the minimisers form an
        # interval (the objective is flat between the kinks).
        def objective(y: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            z = (y.double().unsqueeze(-1) - x).abs()
            return torch.where(z <= 0.05, 0.5 * z * z, 0.05 * (z - 0.025)).sum(-1)

        tol = 1e-14 if dtype == torch.float64 else 1e-6
        assert float((objective(y) - objective(want)).max()) <= tol * n


@pytest.mark.parametrize("module", ["pool", "sphere"])
def test_nothing_to_pool_or_project_is_an_input_error(module: str) -> None:
    make = (
        (lambda: dl.nn.RobustPool("huber"))
        if module == "pool"
        else (lambda: dl.nn.SphereProjection(2))
    )
    with pytest.raises(dl.InputError, match="is empty"):
        make()(torch.zeros(3, 0))
    with pytest.raises(dl.InputError, match="0-d tensor"):
        make()(torch.tensor(1.0))
    with pytest.raises(dl.InputError, match="out of range"):
        type(make())(*(("huber",) if module == "pool" else (2,)), dim=2)(torch.zeros(3, 4))


@pytest.mark.parametrize("learnable", [False, True])
def test_an_empty_batch_gets_zero_gradients(learnable: bool) -> None:
    alpha = torch.nn.Parameter(torch.tensor(1.0)) if learnable else 1.0
    x = torch.zeros(0, 5, requires_grad=True)
    dl.nn.RobustPool("huber", alpha=alpha)(x).sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 5)
    if learnable:
        assert float(alpha.grad) == 0.0


def test_the_quadratic_ignores_a_learnable_alpha() -> None:
    alpha = torch.nn.Parameter(torch.tensor(2.0))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = dl.nn.RobustPool("quadratic", alpha=alpha)(x)
    torch.testing.assert_close(y, x.mean(-1))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.25))


def test_huber_gradients_take_one_side_at_the_threshold() -> None:
    """On |y - x_i| = alpha the slope's derivative and the curvature take the same (inside)
    side: fixed and learnable alpha agree, and a flat minimum the forward leaves at its end
    y = x_0 + alpha gets that piece's derivative (central differences of the forward: [1, 0],
    d/dalpha = 1)."""
    x = torch.tensor([0.0, 5.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    dl.nn.RobustPool("huber", alpha=alpha)(x).backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert float(alpha.grad) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 6, (400, 3), generator=g).to(torch.float64)
    grads = []
    for learnable in (False, True):
        x = data.clone().requires_grad_(True)
        a = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64)) if learnable else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dl.GradientWarning)
            dl.nn.RobustPool("huber", alpha=a)(x).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_welsch_leaves_a_symmetric_start_that_is_a_local_maximum() -> None:
    # Mean and median both sit at 0, between two clusters, where the objective has a local
    # maximum (curvature < 0): the forward must still return a local minimum (one of +-0.968).
    x = torch.tensor([-1.0, -1, -1, 0, 1, 1, 1], dtype=torch.float64)
    alpha = 0.45
    y = dl.nn.RobustPool("welsch", alpha=alpha)(x)

    def objective(t: torch.Tensor) -> torch.Tensor:
        return (1 - torch.exp(-((t - x) ** 2) / (2 * alpha**2))).sum()

    assert float(objective(y)) < float(objective(torch.tensor(0.0, dtype=torch.float64))) - 1
    h = torch.autograd.functional.hessian(objective, y.detach().clone())
    assert float(h) > 0
    assert abs(float(y)) == pytest.approx(0.9678, abs=1e-3)


def test_a_non_finite_gradient_is_reported() -> None:
    # float32: 1 / alpha^2 overflows in the derivatives; the NaN gradient must come with a
    # warning that says so.
    x = torch.tensor([0.1, -0.2, 0.05, 0.3, 1e20], requires_grad=True)
    y = dl.nn.RobustPool("welsch", alpha=1e-20)(x)
    with pytest.warns(dl.GradientWarning, match="not finite"):
        y.backward()


@pytest.mark.parametrize("penalty", ["welsch", "pseudo_huber", "huber"])
def test_an_outlier_whose_square_overflows_has_no_influence(penalty: str) -> None:
    # float32: (y - 1e20)^2 overflows, but the outlier's weight in the derivatives is exactly
    # zero (welsch), or its slope is bounded: the gradient is the one without it, and finite
    # (the curvature's products are taken scale by scale, never the overflowing square times
    # a vanishing weight: 0 * inf was NaN here).
    inliers = [0.1, -0.2, 0.05, 0.3]
    x = torch.tensor([*inliers, 1e20], requires_grad=True)
    dl.nn.RobustPool(penalty, alpha=1.0)(x).backward()
    reference = torch.tensor(inliers, dtype=torch.float64, requires_grad=True)
    with_outlier = torch.cat([reference, torch.tensor([1e20], dtype=torch.float64)])
    dl.nn.RobustPool(penalty, alpha=1.0)(with_outlier).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[:4].double(), reference.grad, rtol=1e-4, atol=1e-6)
    assert x.grad[4] == 0
