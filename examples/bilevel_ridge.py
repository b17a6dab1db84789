"""Bilevel hyperparameter optimisation: tune the ridge penalty mu by K-fold cross-validation.

The lower level is the K ridge problems of K-fold cross-validation, declared once in CVXPY and
solved as one batch by a ``dl.Layer``::

    b_k(mu) = argmin_b  0.5 * ||X_k b - y_k||^2 + 0.5 * mu * ||b_pen||^2        k = 1..K

(``X_k, y_k`` the training rows of fold k; ``b_pen`` every coefficient but the intercept). The upper
level minimises the held-out loss CV(mu) = 1/(2n) * sum_k ||V_k b_k(mu) - z_k||^2 (``V_k, z_k`` the
rows held out from fold k, n the number of samples) over mu, with the hypergradient dCV/dmu obtained
by backpropagation through the layer (implicit function theorem). Two upper-level methods: the
source paper's plain gradient descent on mu (step 0.1), and a safeguarded secant-Newton method on
log mu. A brute-force reference (dense log-grid of CV(mu) in numpy, refined by a bounded scalar
minimiser) shows where the optimum really is.

Run: python examples/bilevel_ridge.py  (see --help; under a minute with the defaults). Results
(``results.md`` and ``bilevel_ridge_<dataset>.png``) go to a new numbered folder
``runs/bilevel_ridge/run-NNN``, or to ``--out`` (refused if it holds an earlier run's results,
unless ``--overwrite``); the files written are printed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import minimize_scalar
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported from elsewhere

from common import cli

import declopt as dl

DATASETS = ("iris", "diabetes")
METHODS = ("gd", "secant")
BACKENDS = ("torch", "cone", "cvxpylayers")

PAPER = {
    "iris": {"mu": 345.0, "cv": 0.7194, "iterations": "~1e6 (GD)"},
    "diabetes": {"mu": 210.147, "cv": 0.901, "iterations": "several thousand (GD)"},
}
"""The source paper's reported optima (plain gradient descent, step 0.1, from mu0 = 0.1, 800)."""

MU_FLOOR = 1e-12
"""Gradient descent may overshoot below zero; mu is a nonneg parameter, so keep it just above."""

MAX_LOG_STEP = 2.0
"""Trust radius of the secant method in log mu (a factor e^2 ~ 7.4 per iteration): far from the
optimum CV is nearly flat in log mu, so an unguarded secant step could jump arbitrarily far."""

MIN_LOG_STEP = 1e-12
"""The secant method stops when its step in log mu falls below this: beyond the accuracy of mu."""

RUNS_ROOT = Path("runs/bilevel_ridge")
"""Without ``--out`` every run writes to a new numbered folder ``run-NNN`` here."""

RESULT_PATTERNS = ("results.md", "bilevel_ridge_*.png")
"""The files that mark a folder as holding an earlier run (``cli.results_folder``)."""

GRID = np.logspace(-6, 8, 1401)
"""Brute-force grid of mu (100 points per decade, far beyond both paper starts)."""

Oracle = Callable[[float], tuple[float, float]]
"""``mu -> (CV(mu), dCV/dmu)``: what an upper-level method sees of the lower level."""


# ----------------------------------------------------------------------------------------------
# Protocol and data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """How the data are turned into K ridge problems and one validation loss.

    The defaults reproduce the source paper's optima (see examples/README.md): contiguous folds,
    no intercept, features z-scored on the whole data set, raw targets.
    """

    dataset: str
    folds: int = 5
    shuffle: bool = False
    seed: int = 0
    intercept: bool = False

    def describe(self) -> str:
        order = f"shuffled (seed {self.seed})" if self.shuffle else "contiguous (data-set order)"
        target = "class label 0/1/2 as a number" if self.dataset == "iris" else "raw target"
        intercept = "unpenalised intercept" if self.intercept else "no intercept"
        return (
            f"{self.dataset}: K={self.folds} folds, {order}; features z-scored on all samples "
            f"(population std); {target}; {intercept}; lower level "
            "0.5*||X_k b - y_k||^2 + 0.5*mu*||b||^2 (sum over training rows); "
            "CV = 1/(2n) * sum of held-out squared errors over all n samples"
        )


@dataclass(frozen=True)
class Folds:
    """The K folds as padded float64 arrays, ready to batch.

    Folds may differ in size by one row; every fold is padded to the largest with zero rows, which
    add nothing to a sum of squares (the intercept column is zero there too), so padding is exact.

    Targets are stored divided by ``target_scale`` (their standard deviation) and the held-out
    weights multiplied by its square, so CV and dCV/dmu come out in the data's own units. Ridge
    solutions are linear in y, so this changes neither CV(mu) nor mu*; it only keeps the lower
    level O(1) for conic solvers, whose absolute tolerances left the cvxpylayers backend's
    solutions off by ~1e-2 (relative) on the raw diabetes target (~150).

    Attributes:
        X_train: ``(K, n_train, d)`` training features (+ a ones column when there is an intercept).
        y_train: ``(K, n_train)`` training targets / ``target_scale``.
        X_val: ``(K, n_val, d)`` held-out features.
        y_val: ``(K, n_val)`` held-out targets / ``target_scale``.
        w_val: ``(K, n_val)`` weight of each held-out squared error: ``target_scale**2 / (2n)``,
            0 on padding rows.
        penalised: number of leading coefficients the ridge penalty applies to (``d`` or ``d-1``).
        target_scale: the divisor of the targets; coefficients are in units of y / target_scale.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    w_val: np.ndarray
    penalised: int
    target_scale: float

    @property
    def num_coefficients(self) -> int:
        return self.X_train.shape[-1]


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, p)`` z-scored on all samples (population std), raw targets ``(n,)``.

    Iris is a classification set; as in the paper, its class label 0/1/2 is the regression target.
    """
    from sklearn import datasets  # deferred: only the data loading needs scikit-learn

    if name == "iris":
        X, y = datasets.load_iris(return_X_y=True)
    elif name == "diabetes":
        # scaled=True (sklearn's default) only rescales columns, which z-scoring undoes.
        X, y = datasets.load_diabetes(return_X_y=True)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
    X = (X - X.mean(0)) / X.std(0)
    return X.astype(np.float64), y.astype(np.float64)


def make_folds(X: np.ndarray, y: np.ndarray, protocol: Protocol) -> Folds:
    """Split ``X (n, p)``, ``y (n,)`` into K train/held-out pairs (sklearn's ``KFold``), padded."""
    from sklearn.model_selection import KFold

    n = len(y)
    if protocol.intercept:
        X = np.hstack([X, np.ones((n, 1))])
    seed = protocol.seed if protocol.shuffle else None
    splits = list(KFold(protocol.folds, shuffle=protocol.shuffle, random_state=seed).split(X))
    train = _pad([tr for tr, _ in splits])
    val = _pad([va for _, va in splits])
    # Index -1 on padding rows, then zero them: padded rows contribute nothing anywhere.
    keep_train, keep_val = (train >= 0).astype(np.float64), (val >= 0).astype(np.float64)
    scale = float(y.std())
    return Folds(
        X_train=X[train] * keep_train[..., None],
        y_train=y[train] / scale * keep_train,
        X_val=X[val] * keep_val[..., None],
        y_val=y[val] / scale * keep_val,
        w_val=keep_val * scale**2 / (2 * n),
        penalised=X.shape[1] - int(protocol.intercept),
        target_scale=scale,
    )


def _pad(indices: Sequence[np.ndarray]) -> np.ndarray:
    """Index arrays of unequal length -> ``(K, longest)`` int array, padded with -1."""
    out = np.full((len(indices), max(len(i) for i in indices)), -1, dtype=np.int64)
    for k, idx in enumerate(indices):  # setup only, once per data set
        out[k, : len(idx)] = idx
    return out


# ----------------------------------------------------------------------------------------------
# Brute-force reference (numpy, no layer)
# ----------------------------------------------------------------------------------------------


def ridge_numpy(folds: Folds, mu: np.ndarray) -> np.ndarray:
    """Closed-form ridge coefficients ``(*mu.shape, K, d)`` (units of y / ``target_scale``)."""
    mu = np.asarray(mu, dtype=np.float64)
    Xt = folds.X_train.swapaxes(-1, -2)
    gram, rhs = Xt @ folds.X_train, (Xt @ folds.y_train[..., None])[..., 0]  # (K,d,d), (K,d)
    penalty = np.diag((np.arange(folds.num_coefficients) < folds.penalised).astype(np.float64))
    lhs = gram + mu[..., None, None, None] * penalty  # (*mu, K, d, d)
    rhs = np.broadcast_to(rhs, lhs.shape[:-1])[..., None]
    return np.linalg.solve(lhs, rhs)[..., 0]


def cv_numpy(folds: Folds, mu: np.ndarray | float) -> np.ndarray:
    """CV(mu) for every entry of ``mu`` (any shape), computed directly from the closed form."""
    beta = ridge_numpy(folds, np.asarray(mu, dtype=np.float64))  # (*mu, K, d)
    residual = (folds.X_val @ beta[..., None])[..., 0] - folds.y_val  # (*mu, K, n_val)
    return (folds.w_val * residual**2).sum((-1, -2))


@dataclass(frozen=True)
class Reference:
    """The brute-force optimum: ``mu``, ``cv = CV(mu)`` and ``curvature = CV''(mu)``."""

    mu: float
    cv: float
    curvature: float
    on_grid_edge: bool

    def gd_time_constant(self, step: float) -> float:
        """Iterations per e-fold of the error of gradient descent with ``step`` near ``mu``."""
        return 1.0 / (step * self.curvature)


def brute_force(folds: Folds, grid: np.ndarray = GRID) -> Reference:
    """Minimise CV on a dense log-grid of mu, then refine in log mu between the grid neighbours."""
    values = cv_numpy(folds, grid)
    i = int(np.argmin(values))
    if i in (0, len(grid) - 1):  # no interior minimum on the grid: report the edge as is
        return Reference(float(grid[i]), float(values[i]), math.nan, on_grid_edge=True)
    result = minimize_scalar(
        lambda t: float(cv_numpy(folds, math.exp(t))),
        bounds=(math.log(grid[i - 1]), math.log(grid[i + 1])),
        method="bounded",
        options={"xatol": 1e-12},
    )
    mu = math.exp(result.x)
    h = 1e-3 * mu  # rounding (~eps CV / h^2) and truncation both stay below 1e-7 of CV'' here
    cv_minus, cv_mid, cv_plus = cv_numpy(folds, np.array([mu - h, mu, mu + h]))
    curvature = float((cv_plus - 2 * cv_mid + cv_minus) / h**2)
    return Reference(mu, float(result.fun), curvature, on_grid_edge=False)


# ----------------------------------------------------------------------------------------------
# The lower level as one declared layer
# ----------------------------------------------------------------------------------------------


def ridge_problem(
    n_train: int, d: int, penalised: int
) -> tuple[cp.Problem, list[cp.Parameter], cp.Variable]:
    """One fold's ridge problem in DPP form: parameters ``[X (n_train, d), y (n_train,), mu]``.

    DPP (so that cvxpylayers accepts it) needs every parameter to enter affinely or multiply a
    parameter-free expression: ``X @ b`` and ``mu * sum_squares(b)`` both qualify.
    """
    X = cp.Parameter((n_train, d), name="X")
    y = cp.Parameter(n_train, name="y")
    mu = cp.Parameter(nonneg=True, name="mu")
    b = cp.Variable(d, name="b")
    penalty = cp.sum_squares(b if penalised == d else b[:penalised])
    objective = 0.5 * cp.sum_squares(X @ b - y) + 0.5 * mu * penalty
    problem = cp.Problem(cp.Minimize(objective))
    assert problem.is_dpp(), "the ridge declaration must stay DPP for the cvxpylayers backend"
    return problem, [X, y, mu], b


class Hypergradient:
    """``mu -> (CV(mu), dCV/dmu)`` through one ``dl.Layer`` that solves all K folds as a batch.

    The training data are a batched parameter ``(K, n_train, d)``; mu is a shared scalar, so its
    gradient is summed over the folds by the layer — exactly dCV/dmu.
    """

    def __init__(self, folds: Folds, backend: str = "torch") -> None:
        _, n_train, d = folds.X_train.shape  # (K, n_train, d)
        problem, parameters, b = ridge_problem(n_train, d, folds.penalised)
        # A wrong lower-level solution would silently corrupt the hypergradient: fail loudly.
        self.layer = dl.Layer(problem, parameters, [b], backend=backend, on_failure="raise")
        self.X_train, self.y_train = _tensor(folds.X_train), _tensor(folds.y_train)
        self.X_val, self.y_val, self.w_val = map(_tensor, (folds.X_val, folds.y_val, folds.w_val))

    def coefficients(self, mu: torch.Tensor) -> torch.Tensor:
        """``(K, d)`` ridge coefficients of every fold for a scalar tensor ``mu``."""
        (beta,) = self.layer(self.X_train, self.y_train, mu)
        return beta

    def cv(self, beta: torch.Tensor) -> torch.Tensor:
        """CV loss (scalar) of the fold coefficients ``beta (K, d)`` on the held-out rows."""
        residual = (self.X_val @ beta.unsqueeze(-1)).squeeze(-1) - self.y_val  # (K, n_val)
        return (self.w_val * residual.square()).sum()

    def __call__(self, mu: float) -> tuple[float, float]:
        m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
        loss = self.cv(self.coefficients(m))
        (grad,) = torch.autograd.grad(loss, m)
        return float(loss.detach()), float(grad)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Upper-level methods
# ----------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """One upper-level run: ``mu[i]``, ``cv[i]``, ``grad[i]`` at iterate i (``mu[0]`` = start)."""

    method: str
    mu0: float
    mu: list[float] = field(default_factory=list)
    cv: list[float] = field(default_factory=list)
    grad: list[float] = field(default_factory=list)
    converged: bool = False
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        """Upper-level iterations: hypergradient evaluations after the one at the start."""
        return max(len(self.mu) - 1, 0)

    def record(self, mu: float, cv: float, grad: float) -> None:
        self.mu.append(mu)
        self.cv.append(cv)
        self.grad.append(grad)


def stationarity(mu: float, cv: float, grad: float) -> float:
    """Scale-free stationarity |dCV/dlog mu| / CV: the relative change in CV per relative mu."""
    return abs(mu * grad) / max(abs(cv), 1e-300)


def gradient_descent(
    oracle: Oracle, mu0: float, step: float, tol: float, max_iter: int, bar: tqdm | None = None
) -> Trace:
    """The paper's method: ``mu <- max(mu - step * dCV/dmu, MU_FLOOR)`` until stationary."""
    trace = Trace("gd", mu0)
    mu = mu0
    for _ in range(max_iter + 1):
        cv, grad = oracle(mu)
        trace.record(mu, cv, grad)
        _tick(bar, mu, cv)
        if stationarity(mu, cv, grad) <= tol:
            trace.converged = True
            break
        if trace.iterations == max_iter:
            break
        mu = max(mu - step * grad, MU_FLOOR)
    return trace


def secant_log_mu(
    oracle: Oracle, mu0: float, tol: float, max_iter: int, bar: tqdm | None = None
) -> Trace:
    """Safeguarded secant-Newton on ``t = log mu`` for a root of ``h(t) = dCV/dt = mu dCV/dmu``.

    Newton's step ``-h / h'`` with ``h'`` from the last two iterates (secant), clipped to
    ``MAX_LOG_STEP``; a full trust step downhill when the secant slope is not positive (CV is not
    convex in log mu everywhere). Once ``h < 0`` at some ``lo`` and ``h > 0`` at some ``hi > lo``
    the interval brackets a local minimum; steps that would leave it bisect it instead, so the
    method cannot diverge or climb to a maximum.
    """
    trace = Trace("secant", mu0)
    t, lo, hi = math.log(mu0), -math.inf, math.inf
    previous: tuple[float, float] | None = None
    for _ in range(max_iter + 1):
        mu = math.exp(t)
        cv, grad = oracle(mu)
        trace.record(mu, cv, grad)
        _tick(bar, mu, cv)
        h = mu * grad
        if stationarity(mu, cv, grad) <= tol:
            trace.converged = True
            break
        if h < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        step = _secant_step(t, h, previous)
        if not lo < t + step < hi:  # the step leaves the bracket: bisect it
            step = 0.5 * (lo + hi) - t
        if abs(step) < MIN_LOG_STEP:
            trace.converged = True
            break
        if trace.iterations == max_iter:
            break
        previous, t = (t, h), t + step
    return trace


def _secant_step(t: float, h: float, previous: tuple[float, float] | None) -> float:
    """Newton step in log mu with the secant slope, or a full trust step downhill."""
    downhill = -math.copysign(MAX_LOG_STEP, h)
    if previous is None:
        return downhill
    slope = (h - previous[1]) / (t - previous[0])
    if slope <= 0:
        return downhill
    return max(-MAX_LOG_STEP, min(MAX_LOG_STEP, -h / slope))


def _tick(bar: tqdm | None, mu: float, cv: float) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(mu=f"{mu:.6g}", cv=f"{cv:.6g}", refresh=False)


# ----------------------------------------------------------------------------------------------
# Experiment, table, figure
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Upper-level settings shared by every run."""

    methods: tuple[str, ...] = METHODS
    starts: tuple[float, ...] = (0.1, 800.0)
    step: float = 0.1
    tol: float = 1e-9
    max_iter: int = 300
    progress: bool = True


def run_method(oracle: Oracle, method: str, mu0: float, settings: Settings, label: str) -> Trace:
    """One upper-level run from ``mu0``, timed, with a progress bar."""
    bar = tqdm(
        total=settings.max_iter + 1,
        desc=f"{label} {method} mu0={mu0:g}",
        leave=False,
        disable=not settings.progress,
    )
    start = time.perf_counter()
    if method == "gd":
        trace = gradient_descent(oracle, mu0, settings.step, settings.tol, settings.max_iter, bar)
    elif method == "secant":
        trace = secant_log_mu(oracle, mu0, settings.tol, settings.max_iter, bar)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    trace.seconds = time.perf_counter() - start
    bar.close()
    return trace


@dataclass(frozen=True)
class DatasetResult:
    """Everything one data set produced: its protocol, the reference and every run."""

    protocol: Protocol
    reference: Reference
    traces: list[Trace]


def run_dataset(protocol: Protocol, settings: Settings, backend: str) -> DatasetResult:
    """The brute-force reference and every (method, start) run on one data set."""
    folds = make_folds(*load_dataset(protocol.dataset), protocol)
    reference = brute_force(folds)
    oracle = Hypergradient(folds, backend=backend)
    traces = [
        run_method(oracle, method, mu0, settings, protocol.dataset)
        for method in settings.methods
        for mu0 in settings.starts
    ]
    return DatasetResult(protocol, reference, traces)


def results_table(results: Sequence[DatasetResult]) -> str:
    """A markdown table: every run, then the brute-force optimum and the paper per data set."""
    lines = [
        "| data set | method | mu0 | iterations | converged | mu | CV(mu) | mu/mu* - 1 "
        "| time (s) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for result in results:
        name, ref = result.protocol.dataset, result.reference
        for tr in result.traces:
            lines.append(
                f"| {name} | {tr.method} | {tr.mu0:g} | {tr.iterations} | "
                f"{'yes' if tr.converged else 'no'} | {tr.mu[-1]:#.7g} | {tr.cv[-1]:#.7g} | "
                f"{tr.mu[-1] / ref.mu - 1:+.1e} | {tr.seconds:.2f} |"
            )
        edge = " (grid edge!)" if ref.on_grid_edge else ""
        lines.append(
            f"| {name} | brute force (numpy){edge} | | | | {ref.mu:#.7g} | {ref.cv:#.7g} | 0 | |"
        )
        paper = PAPER[name]
        lines.append(
            f"| {name} | paper (GD, step 0.1) | 0.1, 800 | {paper['iterations']} | | "
            f"{paper['mu']:g} | {paper['cv']:g} | {paper['mu'] / ref.mu - 1:+.1e} | |"
        )
    return "\n".join(lines)


def report(results: Sequence[DatasetResult], settings: Settings, backend: str) -> str:
    """The protocol of every data set, why GD is slow there, and the results table."""
    notes = [f"backend={backend}, tol={settings.tol:g}, max_iter={settings.max_iter}", ""]
    for result in results:
        ref = result.reference
        notes.append(f"- protocol {result.protocol.describe()}")
        notes.append(
            f"- {result.protocol.dataset}: CV''(mu*) = {ref.curvature:.3g}, so GD with step "
            f"{settings.step:g} shrinks its distance to mu* by a factor e every "
            f"{ref.gd_time_constant(settings.step):.3g} iterations near mu*"
        )
    return "\n".join([*notes, "", results_table(results), ""])


def plot_curves(name: str, reference: Reference, traces: Sequence[Trace], path: Path) -> None:
    """CV and mu against iteration for every run (like the paper's figures 4 and 5)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI machines
    import matplotlib.pyplot as plt

    fig, (ax_cv, ax_mu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tr in traces:
        steps = np.arange(1, len(tr.mu) + 1)  # iteration + 1: the start sits at 1 on a log axis
        style = "-" if tr.method == "gd" else "o--"
        label = f"{tr.method}, mu0={tr.mu0:g}"
        ax_cv.plot(steps, tr.cv, style, ms=3, label=label)
        ax_mu.plot(steps, tr.mu, style, ms=3, label=label)
    ax_cv.axhline(reference.cv, color="k", lw=0.8, ls=":", label=f"brute force {reference.cv:.6g}")
    ax_mu.axhline(reference.mu, color="k", lw=0.8, ls=":", label=f"brute force {reference.mu:.6g}")
    for ax, ylabel in ((ax_cv, "CV loss"), (ax_mu, "mu")):
        ax.set_xscale("log")
        ax.set_xlabel("upper-level iteration + 1")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_mu.set_yscale("log")
    fig.suptitle(f"Bilevel ridge on {name}: K-fold CV loss and mu")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", nargs="+", choices=DATASETS, default=list(DATASETS), help="data set(s)"
    )
    parser.add_argument("--K", type=int, default=5, help="number of folds")
    parser.add_argument("--shuffle", action="store_true", help="shuffle before splitting")
    parser.add_argument("--seed", type=int, default=0, help="fold shuffling seed (--shuffle)")
    parser.add_argument("--intercept", action="store_true", help="add an unpenalised intercept")
    parser.add_argument(
        "--mu0", nargs="+", type=float, default=[0.1, 800.0], help="starting value(s) of mu"
    )
    parser.add_argument(
        "--method", nargs="+", choices=METHODS, default=list(METHODS), help="upper-level method(s)"
    )
    parser.add_argument("--step", type=float, default=0.1, help="gradient-descent step")
    parser.add_argument(
        "--tol", type=float, default=1e-9, help="stop when |dCV/dlog mu| / CV <= tol"
    )
    parser.add_argument("--max-iter", type=int, default=300, help="upper-level iterations per run")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="torch", help="declopt backend of the layer"
    )
    cli.add_out_dir_arg(parser, "--out", RUNS_ROOT)
    cli.add_overwrite_arg(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every data set; print and save the report; save one figure per data set."""
    args = parse_args(argv)
    if args.backend not in dl.backends.available():
        print(
            f"error: backend {args.backend!r} is not registered in this declopt installation "
            f"(registered: {', '.join(dl.backends.available())}); use --backend torch",
            file=sys.stderr,
        )
        return 2
    settings = Settings(
        methods=tuple(args.method),
        starts=tuple(args.mu0),
        step=args.step,
        tol=args.tol,
        max_iter=args.max_iter,
        progress=not args.quiet,
    )
    # Refuse a folder holding an earlier run now, not after the minute of computing.
    with cli.exit_on(cli.FolderError):
        cli.results_folder(
            args.out, RUNS_ROOT, RESULT_PATTERNS, overwrite=args.overwrite, check_only=True
        )
    threads = torch.get_num_threads()
    # Each call solves K problems with ~10 variables: thread hand-offs cost more than they save,
    # and on a busy 2-core machine two threads were 6-10x slower than one.
    torch.set_num_threads(1)
    try:
        results = [
            run_dataset(
                Protocol(name, args.K, args.shuffle, args.seed, args.intercept),
                settings,
                args.backend,
            )
            for name in args.dataset
        ]
    finally:
        torch.set_num_threads(threads)
    # The folder is claimed only now, so that a failed run leaves no empty numbered folder.
    with cli.exit_on(cli.FolderError):
        out = cli.results_folder(args.out, RUNS_ROOT, RESULT_PATTERNS, overwrite=args.overwrite)
    written = []
    for result in results:
        name = result.protocol.dataset
        written.append(out / f"bilevel_ridge_{name}.png")
        plot_curves(name, result.reference, result.traces, written[-1])
    text = report(results, settings, args.backend)
    print(text)
    written.insert(0, out / "results.md")
    written[0].write_text(text)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
