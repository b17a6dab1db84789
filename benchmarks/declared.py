"""Benchmark: declared layers against hand-written ones and the floors, in one table.

Every row times three things on the same tensors, interleaved in one loop (one torch thread,
medians of the process's CPU time, forward + backward):

* **floor**: the cheapest op that does the job's data movement: mean pooling for robust pooling,
  ``F.normalize`` for the projections, the closed-form projection (with autograd through it) for
  the L2 ball;
* **hand-written**: declopt's special-purpose node: ``dl.nn.RobustPool`` (its own exact forward),
  ``dl.nn.SphereProjection`` / ``BallProjection`` with the closed-form backward;
* **declared**: the same problem declared in CVXPY and solved by ``dl.Layer(..., backend=
  "torch")`` (robust pooling, the L2 ball), or the projection's declaration differentiated by the
  implicit backward (``backward="implicit"``, the hand-written exact forward kept).

The targets of the performance work are printed beside the ratios. For the declared truncated
quadratic the ``gap`` column is the largest objective excess over RobustPool's global minimiser
(a local minimiser, not a timing problem); for the implicit projections ``|dg|`` (float64) and
``|dg32|`` (float32) are the largest gradient differences from the closed form, relative to the
largest entry.

Examples::

    python benchmarks/declared.py            # the issue's sizes (several minutes)
    python benchmarks/declared.py --quick    # n = 64 and 1024 only, fewer repeats (about 1 min)
    python benchmarks/declared.py --quick --compiled  # also compile=True (compiles per shape)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import declared_pool, keep_freed_memory, prefault_heap
from projections import median_cpu

import declopt as dl
from declopt.nn import projections

PENALTIES = ("quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic")
POOL_TARGETS = {"declared / hand": 1.5, "declared / floor": 15.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n = 64, 1024 and fewer repeats")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 1024, 4096], help="pooled n")
    p.add_argument("--penalties", nargs="+", default=list(PENALTIES), choices=PENALTIES)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median)")
    p.add_argument(
        "--tq-sizes", nargs="*", type=int, default=[64], help="n for the declared TQ (slow)"
    )
    p.add_argument("--projection-sizes", nargs="*", type=int, default=[1024, 4096])
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time RobustPool and the declared layer with compile=True (pooling, batch 1)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.projection_sizes = [64, 1024], 3, [1024]
    return args


def _fb(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x = x0.detach().requires_grad_(True)
        fn(x).sum().backward()

    return run


def row(name: str, times: dict[str, float], **extra: object) -> dict:
    compiled = {
        f"{k} / floor": times[k] / times["floor"]
        for k in ("hand compiled", "declared compiled")
        if k in times
    }
    return {
        "case": name,
        **times,
        "declared / hand": times["declared"] / times["hand"],
        "declared / floor": times["declared"] / times["floor"],
        "hand / floor": times["hand"] / times["floor"],
        **compiled,
        **extra,
    }


def pooling_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for n in args.sizes:
        x0 = torch.randn(8, 128, n)
        for penalty in args.penalties:
            if penalty == "truncated_quadratic" and n not in args.tq_sizes:
                continue
            pool = dl.nn.RobustPool(penalty, alpha=1.0)
            layer = declared_pool(penalty, n, starts=False)  # the declaration alone
            fns = {
                "floor": _fb(lambda x: x.mean(-1), x0),
                "hand": _fb(pool, x0),
                "declared": _fb(layer, x0),
            }
            if args.compiled and penalty != "truncated_quadratic":
                fns.update(_compiled_pair(penalty, n, x0))
            for fn in fns.values():
                fn()
            reps = 1 if penalty == "truncated_quadratic" else args.reps
            extra: dict[str, object] = {}
            with torch.no_grad():
                y_hand = pool(x0)
                y_decl = layer(x0)
            if penalty == "truncated_quadratic":

                def objective(y: torch.Tensor, x0: torch.Tensor = x0) -> torch.Tensor:
                    z = y.unsqueeze(-1) - x0
                    return (0.5 * torch.minimum(z * z, torch.ones(()))).sum(-1)

                gap = (objective(y_decl) - objective(y_hand)).max()
                extra["gap"] = float(gap)
            else:
                extra["|dy|"] = float((y_decl - y_hand).abs().max())
            rows.append(row(f"pool {penalty} n={n}", median_cpu(fns, reps), **extra))
            print(format_row(rows[-1]), flush=True)
    return rows


def _compiled_pair(penalty: str, n: int, x0: torch.Tensor) -> dict[str, Callable[[], None]]:
    """RobustPool and the declared layer with ``compile=True``, warmed up (compiled) here."""
    fns = {
        "hand compiled": _fb(dl.nn.RobustPool(penalty, alpha=1.0, compile=True), x0),
        "declared compiled": _fb(declared_pool(penalty, n, starts=False, compile=True), x0),
    }
    for fn in fns.values():
        for _ in range(3):
            fn()
    return fns


def batch_one_row(args: argparse.Namespace) -> dict:
    x0 = torch.randn(16)
    pool = dl.nn.RobustPool("huber", alpha=1.0)
    layer = declared_pool("huber", 16, starts=False)
    fns = {
        "floor": _fb(lambda x: x.mean(-1), x0),
        "hand": _fb(pool, x0),
        "declared": _fb(layer, x0),
    }
    if args.compiled:
        fns.update(_compiled_pair("huber", 16, x0))
    for fn in fns.values():
        for _ in range(5):
            fn()
    out = row("batch 1, huber n=16", median_cpu(fns, 10 * args.reps), target="declared <= 1 ms")
    print(format_row(out), flush=True)
    return out


def l2_ball_row(args: argparse.Namespace) -> dict:
    x0 = torch.randn(128, 256, dtype=torch.float64) * 0.1
    r = torch.ones((), dtype=torch.float64)
    problem, params, variables = projections.declaration(2.0, 256, sphere=False)
    layer = dl.Layer(problem, params, variables, backend="torch")
    ball = dl.nn.BallProjection(2.0)
    fns = {
        "floor": _fb(lambda x: projections.project_l2(x, r, False), x0),
        "hand": _fb(ball, x0),
        "declared": _fb(lambda x: layer(x, r)[0], x0),
    }
    for fn in fns.values():
        fn()
    with torch.no_grad():
        diff = float((layer(x0, r)[0] - ball(x0)).abs().max())
    out = row("L2 ball d=256 B=128 f64", median_cpu(fns, args.reps), **{"|dy|": diff})
    out["target"] = "declared / floor <= 20"
    print(format_row(out), flush=True)
    return out


def implicit_projection_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for d in args.projection_sizes:
        x0 = torch.randn(8, d)
        for p in (1.0, 2.0, float("inf")):
            native = dl.nn.SphereProjection(p)
            implicit = dl.nn.SphereProjection(p, backward="implicit")
            fns = {
                "floor": _fb(lambda x: F.normalize(x, dim=-1), x0),
                "hand": _fb(native, x0),
                "declared": _fb(implicit, x0),
            }
            for fn in fns.values():
                fn()
            errors = {}
            for name, dtype in (("|dg|", torch.float64), ("|dg32|", torch.float32)):
                grads = []
                for proj in (native, implicit):
                    x = x0.detach().to(dtype).clone().requires_grad_(True)
                    proj(x).sum().backward()
                    grads.append(x.grad)
                errors[name] = float((grads[1] - grads[0]).abs().max() / grads[0].abs().max())
            out = row(f"sphere L{p:g} implicit d={d}", median_cpu(fns, args.reps), **errors)
            out["target"] = "declared / floor <= 10"
            rows.append(out)
            print(format_row(out), flush=True)
    return rows


HEADER = (
    f"{'case':34s} {'floor ms':>9s} {'hand ms':>9s} {'declared ms':>11s} | "
    f"{'decl/hand':>9s} {'decl/floor':>10s} {'hand/floor':>10s} | notes"
)


def format_row(r: dict) -> str:
    notes = [f"{k} {r[k]:.2g}" for k in ("|dy|", "|dg|", "|dg32|", "gap") if k in r]
    if "declared compiled" in r:
        notes.append(
            f"compiled: hand {r['hand compiled']:.2f} ms ({r['hand compiled / floor']:.1f}x), "
            f"declared {r['declared compiled']:.2f} ms ({r['declared compiled / floor']:.1f}x)"
        )
    if "target" in r:
        notes.append(str(r["target"]))
    return (
        f"{r['case']:34s} {r['floor']:9.3f} {r['hand']:9.2f} {r['declared']:11.2f} | "
        f"{r['declared / hand']:9.2f} {r['declared / floor']:10.1f} {r['hand / floor']:10.1f} | "
        + ", ".join(notes)
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same data every run (the TQ gap depends on it)
    keep_freed_memory()
    prefault_heap()
    warnings.simplefilter("ignore")  # non-convergence is in the table (gap, |dy|), not stderr
    print(f"torch {torch.__version__}, one thread, CPU-time medians, forward + backward")
    print(
        "pooling: B=8, C=128, float32; targets: declared/hand <= "
        f"{POOL_TARGETS['declared / hand']}, declared/floor <= {POOL_TARGETS['declared / floor']}"
    )
    print(HEADER)
    rows = pooling_rows(args)
    rows.append(batch_one_row(args))
    rows.append(l2_ball_row(args))
    rows += implicit_projection_rows(args)
    return rows


if __name__ == "__main__":
    main()
