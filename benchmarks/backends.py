"""The same convex declarations through every backend: time and gradient agreement.

For each problem (Huber pooling n=64 and L2-ball projection d=256 at batch 128; a QP with 50
variables, 25 inequalities and 10 equalities at batch 64, every input per problem, and the same
QP with Q, G and A shared by the batch, as learned layer weights are, q, h and b per problem;
cvxpylayers' README example ``0.5 |A x - b|_1, x >= 0`` at batch 64; when named with
``--cases``, the simplex and L1-ball projections d=256 at batch 128) and
each backend, the median CPU time of the forward pass and of forward+backward (the backends
called in turn, round by round, so that load drifting on a shared machine moves them alike), as
a ratio to the torch backend, and the largest difference of the solution and of the gradient
(with respect to every data tensor) to the torch backend's (relative to its largest entry).
One thread everywhere: ``torch.set_num_threads(1)`` and diffcp's ``n_jobs=1``. Float64.

Rows:
    torch                  declopt's batched torch backend, implicit backward.
    cone                   declopt's cone backend (CVXPY's canonicalisation, batched
                           interior point in torch, float64), implicit backward.
    cvxpylayers            declopt's cvxpylayers backend (SCS eps 1e-8, exact/LSMR derivative),
                           native backward.
    cvxpylayers/implicit   the same forward, declopt's implicit backward.
    cvxpylayers defaults   ``cvxpylayers.torch.CvxpyLayer`` as shipped (SCS eps 1e-4, LSQR).
    scipy                  per-problem SciPy (+ Newton polish), implicit backward; timed on the
                           first ``--scipy-batch`` problems and scaled to the full batch.
    qpth                   QP cases only: ``qpth.qp.QPFunction`` (batched primal-dual interior
                           point in torch) with its defaults, silenced (``verbose=-1``).
    proxsuite              QP cases only: ProxSuite's ``proxsuite.torch.qplayer.QPFunction``
                           (ProxQP per problem, serial) with its defaults, ``-1e20 <= G w <= h``.
    cone / qpth, ...       QP cases: the cone backend's time over each peer's, from the rows
                           above (below 1: the cone backend is faster).

The peers get the Hessian ``Q'Q``, formed inside the timed call from the same ``Q`` tensor (so
their gradients are with respect to ``Q``, like declopt's), and the same q, G, h, A, b; shared
tensors are expanded to the batch (qpth averages, rather than sums, the gradient of a tensor
passed unbatched). Both are optional (``n/a (<package> not installed)`` otherwise):
``pip install "declopt[bench]"`` brings ProxSuite; qpth pins ``numpy<2`` in its metadata (it
runs with NumPy 2), so install it without its dependencies: ``pip install --no-deps qpth``.

Run: ``python benchmarks/backends.py`` (about five minutes; ``--repeats 1`` for a quick look;
``--cases qp qp-shared`` for the QP rows only, about a minute). Benchmarks report; they never
gate CI.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cvxpy as cp
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported

from _common import keep_freed_memory, prefault_heap

import declopt as dl

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    """A declaration and one batch of data for it."""

    name: str
    problem: cp.Problem
    parameters: list[cp.Parameter]
    variables: list[cp.Variable]
    data: list[Tensor]
    batched: list[bool]  # which data tensors carry the batch dim (the others are shared)
    qp_layout: bool = False  # data are (Q, q, G, h, A, b) of 0.5||Q w||^2 + q'w: the peers run

    @property
    def batch(self) -> int:
        return next(t.shape[0] for t, b in zip(self.data, self.batched) if b)

    def subset(self, k: int) -> list[Tensor]:
        return [t[:k] if b else t for t, b in zip(self.data, self.batched)]


def huber_pooling(batch: int = 128, n: int = 64) -> Case:
    x, alpha, y = cp.Parameter(n), cp.Parameter(pos=True), cp.Variable()
    problem = cp.Problem(cp.Minimize(cp.sum(dl.penalties.huber(y - x, alpha))))
    data = [2 * torch.randn(batch, n, dtype=F64), torch.tensor(1.0, dtype=F64)]
    return Case(f"Huber pooling n={n}", problem, [x, alpha], [y], data, [True, False])


def ball_projection(batch: int = 128, d: int = 256) -> Case:
    p, r, z = cp.Parameter(d), cp.Parameter(pos=True), cp.Variable(d)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z, 2) <= r])
    data = [torch.randn(batch, d, dtype=F64) / d**0.5 * 2, torch.tensor(1.0, dtype=F64)]
    return Case(f"L2-ball projection d={d}", problem, [p, r], [z], data, [True, False])


def simplex_projection(batch: int = 128, d: int = 256) -> Case:
    """``min |x - p|^2, x >= 0, sum(x) = 1`` (sparsemax): one equality row over every column."""
    p, x = cp.Parameter(d), cp.Variable(d)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0, cp.sum(x) == 1])
    data = [torch.randn(batch, d, dtype=F64) / d**0.5 * 3]
    return Case(f"simplex projection d={d}", problem, [p], [x], data, [True])


def l1_ball_projection(batch: int = 128, d: int = 256) -> Case:
    """``min |x - p|^2, |x|_1 <= 1``: an L1 budget row over every column."""
    p, x = cp.Parameter(d), cp.Variable(d)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [cp.norm(x, 1) <= 1])
    data = [torch.randn(batch, d, dtype=F64) / d**0.5 * 3]
    return Case(f"L1-ball projection d={d}", problem, [p], [x], data, [True])


def qp(batch: int = 64, nv: int = 50, ni: int = 25, ne: int = 10, shared: bool = False) -> Case:
    """min 0.5||Q w||^2 + q'w s.t. G w <= h, A w == b; ``shared``: one Q, G, A for the batch."""
    Q, q = cp.Parameter((nv, nv)), cp.Parameter(nv)
    G, h = cp.Parameter((ni, nv)), cp.Parameter(ni)
    A, b = cp.Parameter((ne, nv)), cp.Parameter(ne)
    w = cp.Variable(nv)
    objective = 0.5 * cp.sum_squares(Q @ w) + q @ w
    problem = cp.Problem(cp.Minimize(objective), [G @ w <= h, A @ w == b])
    lead = () if shared else (batch,)  # the matrices' batch dim
    Qv = torch.randn(*lead, nv, nv, dtype=F64) / nv**0.5 + torch.eye(nv, dtype=F64)
    Gv, Av = torch.randn(*lead, ni, nv, dtype=F64), torch.randn(*lead, ne, nv, dtype=F64)
    w0 = 0.3 * torch.randn(batch, nv, dtype=F64)  # strictly feasible point
    hv = (Gv @ w0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, ni, dtype=F64)
    bv = (Av @ w0.unsqueeze(-1)).squeeze(-1)
    data = [Qv, 3 * torch.randn(batch, nv, dtype=F64), Gv, hv, Av, bv]
    name = f"QP {nv} var, {ni} ineq, {ne} eq" + (", shared Q, G, A" if shared else "")
    batched = [not shared, True, not shared, True, not shared, True]
    return Case(name, problem, [Q, q, G, h, A, b], [w], data, batched, qp_layout=True)


def l1_regression(batch: int = 64) -> Case:
    """cvxpylayers' README example, ``0.5 |A x - b|_1, x >= 0`` with ``A`` 3 x 2."""
    A, b, x = cp.Parameter((3, 2)), cp.Parameter(3), cp.Variable(2)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    data = [torch.randn(batch, 3, 2, dtype=F64), torch.randn(batch, 3, dtype=F64)]
    return Case("cvxpylayers README L1, A 3x2", problem, [A, b], [x], data, [True, True])


def weighted_ball_projection(batch: int = 16, d: int = 256) -> Case:
    """``min |s * z - q|^2 / 2, |z|_2 <= 1`` (``q = s * p``: the projection of ``p`` in the
    diagonal metric ``s^2``, written DPP): the Lagrangian's Hessian is ``diag(s^2)`` plus the
    norm's curvature along its row, with as many distinct eigenvalues as weights (MINRES needs
    as many products; the null-space diagonal is exact)."""
    q, s, z = cp.Parameter(d), cp.Parameter(d, pos=True), cp.Variable(d)
    objective = 0.5 * cp.sum_squares(cp.multiply(s, z) - q)
    problem = cp.Problem(cp.Minimize(objective), [cp.norm(z, 2) <= 1])
    weights = (torch.rand(batch, d, dtype=F64) * 10 + 0.1).sqrt()
    data = [weights * torch.randn(batch, d, dtype=F64), weights]
    return Case(f"weighted L2-ball projection d={d}", problem, [q, s], [z], data, [True, True])


CASES: dict[str, Callable[[], Case]] = {
    "huber": huber_pooling,
    "ball": ball_projection,
    "qp": qp,
    "qp-shared": functools.partial(qp, shared=True),
    "l1": l1_regression,
    "simplex": simplex_projection,
    "l1-ball": l1_ball_projection,
    "weighted-ball": weighted_ball_projection,
}
DEFAULT_CASES = ("huber", "ball", "qp", "qp-shared", "l1")
"""The cases a plain run takes; ``simplex`` and ``l1-ball`` (the torch backend needs 14-19 s
per call on them) and ``weighted-ball`` run when named."""


Runner = Callable[[Sequence[Tensor]], tuple[Tensor, ...]]


def declopt_runner(case: Case, backend: str, **options: object) -> Runner | str:
    """A layer call, or why the backend cannot take the problem (``"n/a (...)"``)."""
    try:
        layer = dl.Layer(case.problem, case.parameters, case.variables, backend=backend, **options)
    except ValueError as error:
        reason = "issue 3" if "constrained" in str(error) else str(error)[:40]
        return f"n/a ({reason})"
    return lambda data: layer(*data)


def cvxpylayers_default_runner(case: Case) -> Runner:
    """``CvxpyLayer`` with its own defaults (single-threaded, like everything here)."""
    from cvxpylayers.torch import CvxpyLayer

    layer = CvxpyLayer(case.problem, parameters=case.parameters, variables=case.variables)

    def run(data: Sequence[Tensor]) -> tuple[Tensor, ...]:
        args = {"n_jobs_forward": 1}
        if torch.is_grad_enabled() and any(t.requires_grad for t in data):
            args["n_jobs_backward"] = 1
        return tuple(layer(*data, solver_args=args))

    return run


def _qp_inputs(case: Case, data: Sequence[Tensor]) -> list[Tensor]:
    """Q'Q (formed here, so gradients flow to Q), q, G, h, A, b, shared tensors expanded.

    Expanded because qpth, handed an unbatched tensor, returns the batch *mean* of its gradient
    (``dQs.mean(0)``), 1/batch of the gradient of the loss; expanded, autograd sums.
    """
    batch = next(t.shape[0] for t, b in zip(data, case.batched) if b)  # data may be a subset
    full = [t if b else t.expand(batch, *t.shape) for t, b in zip(data, case.batched)]
    Q, q, G, h, A, b = full
    return [Q.mT @ Q, q, G, h, A, b]


def qpth_runner(case: Case) -> Runner | str:
    """``qpth.qp.QPFunction`` with its defaults (batched PDIPM, eps 1e-12, 20 iterations)."""
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return "n/a (qpth not installed)"
    solve = QPFunction(verbose=-1)  # -1: no "inaccurate solution" message

    def run(data: Sequence[Tensor]) -> tuple[Tensor, ...]:
        H, q, G, h, A, b = _qp_inputs(case, data)
        return (solve(H, q, G, h, A, b),)

    return run


def proxsuite_runner(case: Case) -> Runner | str:
    """ProxSuite's ``QPFunction`` with its defaults (eps 1e-9, structural feasibility, serial)."""
    try:
        from proxsuite.torch.qplayer import QPFunction
    except ImportError:
        return "n/a (proxsuite not installed)"
    solve = QPFunction()

    def run(data: Sequence[Tensor]) -> tuple[Tensor, ...]:
        H, q, G, h, A, b = _qp_inputs(case, data)
        lower = torch.full_like(h, -1e20)  # ProxSuite's infinity; G w <= h is -inf <= G w <= h
        return (solve(H, q, A, b, G, lower, h)[0],)

    return run


def forward_backward(
    run: Runner, data: Sequence[Tensor], backward: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """One call: the outputs and, with ``backward``, the gradients of ``sum(v * outputs)``
    (fixed ``v``) with respect to every data tensor."""
    inputs = [t.detach().clone().requires_grad_(backward) for t in data]
    outputs = run(inputs)
    if not backward:
        return [o.detach() for o in outputs], []
    g = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outputs)
    return [o.detach() for o in outputs], list(torch.autograd.grad(loss, inputs))


def median_times(
    runs: dict[str, Runner], data: Sequence[Tensor], backward: bool, repeats: int
) -> dict[str, float]:
    """Median CPU seconds of one call of each runner (``time.process_time``: one thread
    everywhere, and CPU time moves less than wall time with other tenants' load), the runners
    called in turn ``repeats`` times (interleaved, so that load drifting over the run moves
    every runner alike)."""
    for run in runs.values():
        forward_backward(run, data, backward)  # warm-up: builds, first-call costs
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            forward_backward(run, data, backward)
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _ratio(r: float) -> str:
    return f"{r:.0f}x" if r >= 10 else f"{r:.2g}x"


def max_relative_difference(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    return max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(got, want)
    )


Row = tuple[str, str, str, str, str, str]


def bench(case: Case, repeats: int, scipy_batch: int) -> list[Row]:
    runners: dict[str, Runner | str] = {
        "torch": declopt_runner(case, "torch"),
        "cone": declopt_runner(case, "cone"),
        "cvxpylayers": declopt_runner(case, "cvxpylayers", n_jobs=1),
        "cvxpylayers/implicit": declopt_runner(case, "cvxpylayers", n_jobs=1, backward="implicit"),
        "cvxpylayers defaults": cvxpylayers_default_runner(case),
        "scipy": declopt_runner(case, "scipy"),
    }
    if case.qp_layout:
        runners["qpth"] = qpth_runner(case)
        runners["proxsuite"] = proxsuite_runner(case)
    # Solutions and gradients are compared on the first scipy_batch problems, where every
    # backend ran, with respect to the same data tensors (for the peers: Q, not Q'Q).
    small = case.subset(scipy_batch)
    results = {
        name: forward_backward(run, small, backward=True)
        for name, run in runners.items()
        if not isinstance(run, str)
    }
    reference = results.get("torch")
    seconds_of: dict[tuple[str, bool], float] = {}
    ready = {name: run for name, run in runners.items() if not isinstance(run, str)}
    batched = {name: run for name, run in ready.items() if name != "scipy"}
    for backward in (False, True):
        for name, seconds in median_times(batched, case.data, backward, repeats).items():
            seconds_of[name, backward] = seconds
        if "scipy" in ready:  # one problem at a time: time a few, scale to the batch
            few = median_times({"scipy": ready["scipy"]}, small, backward, 1)["scipy"]
            seconds_of["scipy", backward] = few * case.batch / scipy_batch
    rows = []
    for name, run in runners.items():
        if isinstance(run, str):
            rows.append((case.name, name, run, run, run, run))
            continue
        timed = []
        for backward in (False, True):
            seconds = seconds_of[name, backward]
            base = seconds_of.get(("torch", backward))
            ratio = _ratio(seconds / base) if base else "n/a"
            timed.append(f"{seconds * 1e3:9.1f} ms  {ratio:>7}")
        if reference is None or name == "torch":
            diffs = ["-", "-"]
        else:
            diffs = [
                f"{max_relative_difference(got, want):.1e}"
                for got, want in zip(results[name], reference)
            ]
        rows.append((case.name, name, *timed, *diffs))
    # The cone backend against each peer that ran, in one row: issue 16's targets read here.
    peers = [p for p in ("qpth", "proxsuite") if (p, True) in seconds_of]
    if peers and ("cone", True) in seconds_of:
        cells = [
            ", ".join(f"{seconds_of['cone', b] / seconds_of[p, b]:.2f}x" for p in peers)
            for b in (False, True)
        ]
        rows.append((case.name, "cone / " + ", cone / ".join(peers), *cells, "-", "-"))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--scipy-batch", type=int, default=8, help="problems scipy is timed on")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(DEFAULT_CASES),
        help="problems to run",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Freed memory kept for reuse, as in a long-running training process (as the other scripts
    # do): a fresh process would time page faults of every new large tensor, for every layer.
    keep_freed_memory()
    prefault_heap()
    warnings.simplefilter("ignore")  # diffcp's NumPy-2 deprecation noise, SCS "inaccurate"
    header = (
        *("problem", "backend", "forward (x torch)", "fwd+bwd (x torch)"),
        *("sol diff", "grad diff"),
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    # Every case is built, in one order from one seed, so that its data do not depend on
    # --cases. (Not a seed per case: seed 0 before the ball's p makes the fixed v of
    # forward_backward parallel to p, and the gradient with respect to p vanishes.)
    torch.manual_seed(0)
    cases = {key: make() for key, make in CASES.items()}
    for key in args.cases:
        for row in bench(cases[key], args.repeats, args.scipy_batch):
            print("| " + " | ".join(row) + " |", flush=True)
    print(
        "\nsol diff, grad diff: max |x - x_torch| / max |x_torch| over all outputs, and the same "
        "for the gradients with respect to every data tensor, on the first "
        f"{args.scipy_batch} problems of each batch; scipy times scaled from those problems."
    )


if __name__ == "__main__":
    main()
