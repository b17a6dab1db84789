"""Benchmark: time and memory of robust pooling against n (the seed paper's figure 6).

Gould, Hartley and Campbell, *Deep Declarative Networks*, section 4.4, figure 6: the forward and
backward time and the memory of a robust pooling layer against the pooled length ``n``, one line
per penalty, for batch 1, 128 channels and a ``sqrt(n) x sqrt(n)`` feature map (pooling is over
its ``n`` entries). This script draws that figure for declopt, for every penalty (quadratic,
pseudo-Huber, Huber, Welsch, truncated quadratic; alpha = 1) and two implementations:

* ``robust_pool``: ``dl.nn.RobustPool(penalty)`` (eager): an exact 1-D solver forward, the
  implicit backward of the declaration.
* ``declared``: the same problem declared in CVXPY with ``dl.penalties`` and solved by
  ``dl.Layer(..., backend="torch")`` (``_common.declared_pool``): the generic batched
  Newton/L-BFGS forward, the implicit backward.

with mean and max pooling (``x.mean(-1)``, ``x.amax(-1)``) as floors. Input: ``x: (1, 128, n)``
float32, standard normal with 10% of the entries multiplied by 10; one torch thread.

Forward starts (the paper: L-BFGS from two starts, the better kept, for the nonconvex
penalties; the quadratic in closed form). ``RobustPool``: quadratic the mean (closed form);
pseudo-Huber and Huber safeguarded Newton from a subsampled median (convex: one start); Welsch
Newton/majorise-minimise from the mean and from the median, the lower objective kept (the
paper's rule); truncated quadratic its exact global minimum (a sweep over the sorted
breakpoints, no starts). ``declared``: the torch backend's ``method="auto"`` (Newton for this one
variable; ``--method lbfgs`` for the paper's L-BFGS) from zero for the convex penalties, and
from zero, the mean and the median (best of three) for the nonconvex ones.

Method:

* **Time**: each repetition makes a fresh leaf ``x``, times ``y = layer(x)`` (gradient
  recording on, as in training: the forward a backward follows) and then ``y.backward(v)``
  (fixed ``v``) separately; medians over the repetitions. On the CPU the clock is the
  process's CPU time (``time.process_time``, one thread), which preemption by other processes
  on a shared machine does not inflate (wall-clock medians are in the CSV too); on CUDA, wall
  time with synchronisation. One untimed call first (declarations, caches), then ``--warmup``
  untimed calls, fewer where a call is slow; repetitions are cut to fit about ``--budget``
  seconds per cell, at least 3 (or ``--reps`` if fewer). glibc keeps freed memory and the heap
  is pre-grown, as in a long-running process (``_common.keep_freed_memory``).
* **Peak memory** (``peak_mb``) of one forward+backward: the largest total of torch tensors
  allocated during the call and alive at once (activations, saved tensors, solver temporaries,
  the gradient of ``x``; not the input). On CPU torch keeps no allocator statistics and
  ``tracemalloc`` does not see its allocations, so the call runs under ``torch.profiler`` with
  ``profile_memory=True`` and the peak is the largest running sum of the allocator's signed
  ``[memory]`` events (``_common.TensorPeak``); on CUDA ``torch.cuda.max_memory_allocated``.
  Median of three calls (one where a call takes over a second).
  ``rss_mb`` is the growth of the resident set during the call (``/proc``, every allocation
  including NumPy's, page-granular and blind to reused freed memory): a cross-check, noisier.
* **Limits**: the declared truncated quadratic's nonsmooth finish forms dense kink systems whose
  size grows as ``n^2`` per problem (at n = 4096 it asks for 51 GB); it is measured up to
  ``--declared-tq-max-n`` (default 256; cells above are left out of the CSV and the figure).

Examples::

    python benchmarks/consumption.py                  # n = 16 ... 4096 (a few minutes)
    python benchmarks/consumption.py --quick          # n = 16, 256, 4096, 3 repetitions
    python benchmarks/consumption.py --n 64 1024 --layers robust_pool --out /tmp/c.csv
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported

from _common import (
    PENALTIES,
    ResidentPeak,
    TensorPeak,
    declared_pool,
    keep_freed_memory,
    outlier_data,
    prefault_heap,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LAYERS = ["robust_pool", "declared"]
FLOORS = ["mean", "max"]
SHORT = {
    "quadratic": "Q",
    "pseudo_huber": "PH",
    "huber": "H",
    "welsch": "W",
    "truncated_quadratic": "TQ",
    "mean": "mean",
    "max": "max",
}
COLUMNS = [
    "layer",
    "penalty",
    "n",
    "batch",
    "channels",
    "alpha",
    "fwd_ms",
    "bwd_ms",
    "fwd_wall_ms",
    "bwd_wall_ms",
    "reps",
    "peak_mb",
    "rss_mb",
    "first_s",
    "converged",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` shrinks the sizes and repetitions."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", nargs="+", type=int, default=[16, 64, 256, 1024, 4096], dest="sizes")
    p.add_argument("--penalties", nargs="+", default=PENALTIES, choices=PENALTIES)
    p.add_argument("--layers", nargs="+", default=LAYERS, choices=LAYERS)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=9, help="timed repetitions at most (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per cell")
    p.add_argument("--method", default="auto", help="the declared layers' torch-backend method")
    p.add_argument("--declared-tq-max-n", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--out", type=Path, default=RESULTS / "consumption.csv")
    p.add_argument("--figure", type=Path, help="PNG path (default: the CSV's, .png)")
    p.add_argument("--quick", action="store_true", help="n = 16, 256, 4096; 3 repetitions")
    p.add_argument("--replot", action="store_true", help="redraw --out's rows; measure nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.warmup = [16, 256, 4096], 3, 1
    if args.figure is None:
        args.figure = args.out.with_suffix(".png")
    return args


# ------------------------------------------------------------------------------------------------
# Layers


def build(layer: str, penalty: str, n: int, args: argparse.Namespace) -> Callable | None:
    """The pooling callable ``x (B, C, n) -> (B, C)``, or ``None`` for a cell not measured."""
    import torch

    import declopt as dl

    if layer == "floor":
        return (lambda x: x.mean(-1)) if penalty == "mean" else (lambda x: x.amax(-1))
    if layer == "robust_pool":
        return dl.nn.RobustPool(penalty, alpha=args.alpha).to(torch.device(args.device))
    if penalty == "truncated_quadratic" and n > args.declared_tq_max_n:
        return None
    return declared_pool(penalty, n, args.alpha, method=args.method)


def cells(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(layer, penalty) pairs in table order: the floors first."""
    out = [("floor", f) for f in FLOORS]
    return out + [(layer, p) for layer in args.layers for p in args.penalties]


# ------------------------------------------------------------------------------------------------
# Measurement


class Clock:
    """CPU time and wall time of a block; on CUDA both wait for the device first."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.cuda = device.startswith("cuda")

    def now(self) -> tuple[float, float]:
        self.sync()
        return time.process_time(), time.perf_counter()

    def since(self, start: tuple[float, float]) -> tuple[float, float]:
        """(primary, wall) seconds: CPU time on the CPU, wall time on CUDA."""
        cpu, wall = self.now()
        return (wall - start[1]) if self.cuda else (cpu - start[0]), wall - start[1]


def measure(
    pool: Callable, layer: str, penalty: str, n: int, args: argparse.Namespace
) -> dict[str, object]:
    """One row: median forward and backward times, peak memory of one forward+backward."""
    import torch

    from declopt.errors import NonConvergenceWarning

    x0, v = outlier_data(args.batch, args.channels, n, seed=n)
    x0, v = x0.to(args.device), v.to(args.device)
    clock = Clock(args.device)
    converged = True

    def step() -> tuple[tuple[float, float], tuple[float, float]]:
        nonlocal converged
        x = x0.detach().requires_grad_(True)
        start = clock.now()
        y = pool(x)
        forward = clock.since(start)
        start = clock.now()
        y.backward(v)
        backward = clock.since(start)
        converged = converged and bool(torch.isfinite(y).all())
        return forward, backward

    def fwd_bwd() -> None:
        x = x0.detach().requires_grad_(True)
        pool(x).backward(v)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded: non-convergence goes in the CSV
        start = time.perf_counter()
        step()  # declarations, first-call caches
        first = time.perf_counter() - start
        peak = rss = None
        if not args.no_memory:
            # After the first call: its one-off caches (CVXPY compilation, derivative graphs)
            # are no part of a call's working memory.
            # The median of 3 where a call is cheap: a call now and then allocates 24 KB less
            # (a lazily kept buffer), which is most of a 40 KB cell at n = 16.
            tries = 3 if first < 1.0 else 1
            peaks = []
            for _ in range(tries):
                gc.collect()  # garbage of earlier calls is not freed inside the measured one
                peaks.append(TensorPeak().measure(fwd_bwd, args.device))
            peak = None if None in peaks else statistics.median(peaks)
            resident = ResidentPeak()
            rss = resident.measure(fwd_bwd) if resident.ok and args.device == "cpu" else None
        # Cheap cells get the full warm-up and repetitions; slow ones what fits the budget.
        warmup = min(args.warmup, int(1.0 / max(first, 1e-9)))
        reps = max(min(3, args.reps), min(args.reps, int(args.budget / max(first, 1e-9))))
        # Pre-grow the heap past a few times the call's working set (malloc_trim above gave it
        # back): touching 512 MB for every tiny cell would dominate a small run.
        prefault_heap(min(1 << 29, max(1 << 24, 4 * (peak or 1 << 27))))
        for _ in range(warmup):
            step()
        times = [step() for _ in range(reps)]
    # RobustPool's solver warns where a row did not converge; the declared layer does too
    # (and keeps the last call's report in layer.info).
    converged = converged and not any(issubclass(w.category, NonConvergenceWarning) for w in caught)
    info = getattr(getattr(getattr(pool, "layer", None), "info", None), "converged", None)
    if isinstance(info, torch.Tensor):
        converged = converged and bool(info.all())
    return {
        "layer": layer,
        "penalty": penalty,
        "n": n,
        "batch": args.batch,
        "channels": args.channels,
        "alpha": args.alpha,
        "fwd_ms": 1e3 * statistics.median(t[0][0] for t in times),
        "bwd_ms": 1e3 * statistics.median(t[1][0] for t in times),
        "fwd_wall_ms": 1e3 * statistics.median(t[0][1] for t in times),
        "bwd_wall_ms": 1e3 * statistics.median(t[1][1] for t in times),
        "reps": reps,
        "peak_mb": None if peak is None else peak / 2**20,
        "rss_mb": None if rss is None else rss / 2**20,
        "first_s": first,
        "converged": converged,
    }


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Every (layer, penalty, n) of ``args``; returns the rows (also logged as they come)."""
    import torch

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    for layer, penalty in cells(args):
        for n in args.sizes:
            pool = build(layer, penalty, n, args)
            if pool is None:
                log(f"  {layer:12s} {penalty:20s} n={n:5d}  skipped (--declared-tq-max-n)")
                continue
            row = measure(pool, layer, penalty, n, args)
            rows.append(row)
            log(
                f"  {layer:12s} {penalty:20s} n={n:5d}  fwd {row['fwd_ms']:9.3f} ms  "
                f"bwd {row['bwd_ms']:8.3f} ms  peak {_num(row['peak_mb'], '.3f')} MB  "
                f"({row['reps']} reps)"
            )
    return rows


# ------------------------------------------------------------------------------------------------
# Output


def _num(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """The rows, one per (layer, penalty, n), columns :data:`COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def read_csv(path: Path) -> list[dict[str, object]]:
    """Rows written by :func:`write_csv`, with numbers as numbers (empty cells ``None``)."""
    ints, texts = {"n", "batch", "channels", "reps"}, {"layer", "penalty"}
    rows: list[dict[str, object]] = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, object] = {}
            for key, value in raw.items():
                if key in texts:
                    row[key] = value
                elif key == "converged":
                    row[key] = value == "True"
                elif value == "":
                    row[key] = None
                else:
                    row[key] = int(value) if key in ints else float(value)
            rows.append(row)
    return rows


def tables(rows: list[dict[str, object]]) -> str:
    """Markdown tables: forward ms, backward ms and peak MB, rows (layer, penalty), columns n."""
    sizes = sorted({int(r["n"]) for r in rows})  # type: ignore[arg-type]
    keys = list(dict.fromkeys((r["layer"], r["penalty"]) for r in rows))
    by = {(r["layer"], r["penalty"], r["n"]): r for r in rows}
    out = []
    for column, title, spec in (
        ("fwd_ms", "forward, ms (CPU time, median)", ".3g"),
        ("bwd_ms", "backward, ms (CPU time, median)", ".3g"),
        ("peak_mb", "peak tensor memory of forward+backward, MB", ".3g"),
    ):
        out.append(f"\n{title}\n")
        out.append("| layer | penalty | " + " | ".join(f"n={n}" for n in sizes) + " |")
        out.append("|---|---|" + "---:|" * len(sizes))
        for layer, penalty in keys:
            values = [by.get((layer, penalty, n), {}).get(column) for n in sizes]
            cells_ = [_num(v, spec) for v in values]
            out.append(f"| {layer} | {SHORT[str(penalty)]} | " + " | ".join(cells_) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, object]], path: Path, title: str = "") -> None:
    """The paper's two panels: time (forward solid, backward dashed) and peak memory against
    n, log-log, one colour per penalty, floors in grey; RobustPool filled circles, the declared
    layers open squares."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a benchmark machine
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    colours = dict(zip(PENALTIES, plt.get_cmap("tab10").colors))
    greys = {"mean": "0.55", "max": "0.3"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    keys = list(dict.fromkeys((r["layer"], r["penalty"]) for r in rows))
    sizes = sorted({int(r["n"]) for r in rows})  # type: ignore[arg-type]
    for layer, penalty in keys:
        series = sorted(
            (r for r in rows if r["layer"] == layer and r["penalty"] == penalty),
            key=lambda r: r["n"],
        )
        n = [r["n"] for r in series]
        floor = layer == "floor"
        colour = greys[str(penalty)] if floor else colours[str(penalty)]
        marker = "" if floor else ("o" if layer == "robust_pool" else "s")
        face = "none" if layer == "declared" else colour
        style = {"color": colour, "marker": marker, "markerfacecolor": face, "markersize": 5}
        ax_t.plot(n, [r["fwd_ms"] for r in series], "-", **style)
        ax_t.plot(n, [r["bwd_ms"] for r in series], "--", **style)
        memory = [(r["n"], r["peak_mb"]) for r in series if r["peak_mb"] is not None]
        if memory:
            ax_m.plot(*zip(*memory), "-", **style)
    panels = (
        (ax_t, "time per call, ms (forward solid, backward dashed)"),
        (ax_m, "peak tensor memory of forward+backward, MB"),
    )
    for ax, label in panels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("n (pooled elements; feature map sqrt(n) x sqrt(n))")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    present = {str(p) for _, p in keys}
    handles = [
        Line2D([], [], color=colours[p], lw=2, label=SHORT[p]) for p in PENALTIES if p in present
    ]
    handles += [
        Line2D([], [], color=greys[f], lw=2, label=f"{f} pool") for f in FLOORS if f in present
    ]
    style_handles = [
        Line2D([], [], color="k", ls="-", label="forward"),
        Line2D([], [], color="k", ls="--", label="backward"),
        Line2D([], [], color="k", marker="o", ls="", label="RobustPool"),
        Line2D([], [], color="k", marker="s", ls="", markerfacecolor="none", label="dl.Layer"),
    ]
    # One legend under both panels: inside either it hides the lines at small n.
    fig.legend(handles=handles + style_handles, loc="lower center", ncol=len(handles) + 4)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(rows: list[dict[str, object]], version: str = "") -> str:
    first = rows[0] if rows else {"batch": "?", "channels": "?", "alpha": "?"}
    torch_ = f", torch {version}" if version else ""
    alpha = first.get("alpha")
    alpha_ = f"{alpha:g}" if isinstance(alpha, float) else "?"
    return (
        f"declopt robust pooling, batch {first['batch']}, {first['channels']} channels, float32, "
        f"alpha = {alpha_}, one thread{torch_} (after Gould et al., DDN, fig. 6)"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Measure, print the tables, write the CSV and the figure; returns the rows."""
    import torch

    args = parse_args(argv)
    if args.replot:
        rows = read_csv(args.out)
        print(tables(rows))
        plot(rows, args.figure, title=_title(rows))
        return rows
    setting = (
        f"batch {args.batch}, {args.channels} channels, float32, alpha = {args.alpha:g}, "
        f"{args.threads} thread(s), {args.device}, torch {torch.__version__}"
    )
    print(f"{setting}; n = {', '.join(map(str, args.sizes))}", flush=True)
    start = time.perf_counter()
    rows = run(args, log=lambda line: print(line, flush=True))
    print(tables(rows))
    write_csv(rows, args.out)
    plot(rows, args.figure, title=_title(rows, torch.__version__))
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{args.out}, {args.figure} written ({minutes:.1f} min)")
    if any(not r["converged"] for r in rows):
        print("note: some cells had rows that did not converge (column 'converged')")
    return rows


if __name__ == "__main__":
    main()
