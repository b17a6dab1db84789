"""Benchmark: ``dl.nn.SphereProjection`` / ``BallProjection`` against ``F.normalize`` (issue 3).

For p in {1, 2, inf}, sphere and ball, ``x: (batch, d)`` float32 (``randn``, scaled so that rows
fall on both sides of the ball), one thread:

* **f+b**: forward+backward ``proj(x).backward(v)`` with the default closed-form backward
  (``backward="native"``: the solver's ``vjp``), next to ``F.normalize(x, dim=-1)`` forward and
  backward on the same tensors (the floor); ``x`` column: the ratio. ``impl`` columns: the same
  with ``backward="implicit"`` (the declaration differentiated by the implicit backward), only
  for ``d`` in ``--implicit-sizes`` (slow: dense KKT systems up to 256 variables, MINRES on
  Hessian-vector products above).
* **|dg|**, **|dg|64**: the largest difference between the implicit and the closed-form
  gradient, relative to the largest gradient entry, in float32 and in float64 (same data).
* **bwd**: the backward alone (forward untimed), closed-form and implicit, next to the bare
  closed-form vector-Jacobian product (``declopt.nn.projections.vjp_*`` on precomputed
  ``x, r, y, v``): ``bwd x`` is the layer's backward over that formula (the layer's bookkeeping).
* **generic** (``--skip-generic`` to leave out): the same declarations solved by the generic
  torch backend, ``dl.Layer(problem, [x, r], [u], backend="torch")``, forward+backward at the
  small ``--generic-sizes``, with the fraction of problems that converged and the largest
  distance to the exact projection. Non-convergence is reported, not hidden.

Method: medians over ``--reps`` repetitions of the process's CPU time (``time.process_time``,
one torch thread; on a shared machine wall-clock medians of sub-millisecond calls mostly measure
preemption), every measured call interleaved with the floor in the same loop so that ratios are
side by side. glibc malloc keeps freed memory and the heap is pre-grown (see
``benchmarks/robust_pooling.py``). Target at d = 1024: closed-form f+b <= 10x the floor.

Examples::

    python benchmarks/projections.py                       # everything (a few minutes)
    python benchmarks/projections.py --sizes 1024 --skip-generic --implicit-sizes
    python benchmarks/projections.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from _common import keep_freed_memory, prefault_heap

P_VALUES = ["1", "2", "inf"]
TARGET = 10.0  # closed-form f+b / normalize f+b at batch 8, d = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--p", nargs="+", default=P_VALUES, choices=P_VALUES)
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 1024, 4096])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--implicit-sizes", nargs="*", type=int, default=[64, 256, 1024])
    p.add_argument("--generic-sizes", nargs="*", type=int, default=[16])
    p.add_argument("--skip-generic", action="store_true")
    p.add_argument("--reps", type=int, default=31, help="timed repetitions (median)")
    p.add_argument("--slow-reps", type=int, default=5, help="repetitions of slow configurations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    return p.parse_args(argv)


def median_cpu(fns: dict[str, Callable[[], float | None]], reps: int) -> dict[str, float]:
    """Interleaved CPU-time medians (ms). A function may return its own timing (seconds)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.process_time()
            own = fn()
            times[key].append(own if own is not None else time.process_time() - start)
    return {k: statistics.median(t) * 1e3 for k, t in times.items()}


def data(torch, batch: int, d: int, dtype=None):
    """Rows at three scales around the unit ball of every norm (inside and outside)."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(batch, d, generator=gen)
    scale = torch.tensor([0.02 / d**0.5, 0.3 / d**0.5, 1.0, 3.0]).repeat(batch)[:batch]
    v = torch.randn(batch, d, generator=gen)
    return (x * scale.unsqueeze(-1)).to(dtype or torch.float32), v.to(dtype or torch.float32)


def measure(torch, dl, name: str, p: float, sphere: bool, d: int, args) -> dict:
    from declopt.nn import projections

    cls = dl.nn.SphereProjection if sphere else dl.nn.BallProjection
    native, implicit = cls(p), cls(p, backward="implicit")
    x0, v = data(torch, args.batch, d)
    r = torch.ones(())

    def floor() -> None:
        x = x0.detach().requires_grad_(True)
        torch.nn.functional.normalize(x, dim=-1).backward(v)

    def fb(proj) -> Callable[[], None]:
        def run() -> None:
            x = x0.detach().requires_grad_(True)
            proj(x).backward(v)

        return run

    def bwd(proj) -> Callable[[], float]:
        def run() -> float:
            x = x0.detach().requires_grad_(True)
            y = proj(x)
            start = time.process_time()
            y.backward(v)
            return time.process_time() - start

        return run

    with torch.no_grad():
        y0 = native(x0)
    formula = projections._VJPS[p]

    def exact() -> None:
        formula(x0, r.reshape(1), y0, v, sphere)

    fns: dict[str, Callable[[], float | None]] = {
        "floor": floor,
        "fb": fb(native),
        "bwd": bwd(native),
        "exact": exact,
    }
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    med = median_cpu(fns, args.reps)
    row = {"proj": name, "d": d, **{f"{k}_ms": t for k, t in med.items()}}
    if d in args.implicit_sizes:
        slow = {"floor": floor, "ifb": fb(implicit), "ibwd": bwd(implicit)}
        fb(implicit)()  # first call: declaration, caches
        slow_med = median_cpu(slow, args.slow_reps)
        row |= {"ifb_ms": slow_med["ifb"], "ibwd_ms": slow_med["ibwd"]}
        row["ifb_ratio"] = slow_med["ifb"] / slow_med["floor"]
        for dtype, key in ((torch.float32, "max_grad_diff"), (torch.float64, "max_grad_diff64")):
            grads = []
            for proj in (native, implicit):
                x = x0.to(dtype).detach().clone().requires_grad_(True)
                proj(x).backward(v.to(dtype))
                grads.append(x.grad)
            row[key] = float((grads[1] - grads[0]).abs().max() / grads[0].abs().max())
    row["fb_ratio"] = med["fb"] / med["floor"]
    row["bwd_ratio"] = med["bwd"] / med["exact"]
    return row


def measure_generic(torch, dl, name: str, p: float, sphere: bool, d: int, args) -> dict:
    from declopt.nn.projections import declaration

    problem, params, variables = declaration(p, d, sphere)
    layer = dl.Layer(problem, params, variables, backend="torch", on_failure="ignore")
    exact = (dl.nn.SphereProjection if sphere else dl.nn.BallProjection)(p)
    x0, v = data(torch, args.batch, d)
    r = torch.ones(())

    def floor() -> None:
        x = x0.detach().requires_grad_(True)
        torch.nn.functional.normalize(x, dim=-1).backward(v)

    def fb() -> None:
        x = x0.detach().requires_grad_(True)
        layer(x, r)[0].backward(v)

    start = time.process_time()
    fb()
    first = time.process_time() - start
    med = median_cpu({"floor": floor, "fb": fb}, args.slow_reps)
    with torch.no_grad():
        (u,) = layer(x0, r)
    return {
        "proj": name,
        "d": d,
        "floor_ms": med["floor"],
        "generic_fb_ms": med["fb"],
        "generic_ratio": med["fb"] / med["floor"],
        "first_s": first,
        "converged": float(layer.info.converged.float().mean()),
        "max_error": float((u - exact(x0)).abs().max()),
    }


def fmt(value: float | None, width: int, precision: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{precision}f}"


HEADER = (
    f"{'projection':10s} {'d':>5s} | {'floor':>7s} | {'f+b ms':>7s} {'x':>5s} | "
    f"{'impl ms':>8s} {'x':>7s} | {'bwd ms':>7s} {'exact':>7s} {'bwd x':>5s} | "
    f"{'impl bwd':>8s} | {'|dg|':>7s} {'|dg|64':>7s}"
)


def format_row(r: dict) -> str:
    diffs = [r.get("max_grad_diff"), r.get("max_grad_diff64")]
    diff_text = " ".join(f"{'-':>7s}" if d is None else f"{d:7.1e}" for d in diffs)
    return (
        f"{r['proj']:10s} {r['d']:5d} | {r['floor_ms']:7.3f} | {r['fb_ms']:7.3f} "
        f"{r['fb_ratio']:5.1f} | {fmt(r.get('ifb_ms'), 8, 2)} {fmt(r.get('ifb_ratio'), 7, 1)} | "
        f"{r['bwd_ms']:7.3f} {r['exact_ms']:7.3f} {r['bwd_ratio']:5.1f} | "
        f"{fmt(r.get('ibwd_ms'), 8, 2)} | {diff_text}"
    )


GENERIC_HEADER = (
    f"{'projection':10s} {'d':>5s} | {'floor':>7s} | {'generic f+b ms':>14s} {'x':>8s} | "
    f"{'first s':>7s} | {'converged':>9s} | {'max |u - exact|':>15s}"
)


def format_generic(r: dict) -> str:
    return (
        f"{r['proj']:10s} {r['d']:5d} | {r['floor_ms']:7.3f} | {r['generic_fb_ms']:14.1f} "
        f"{r['generic_ratio']:8.0f} | {r['first_s']:7.2f} | {r['converged']:9.0%} | "
        f"{r['max_error']:15.2e}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    import declopt as dl

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    prefault_heap()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), float32, batch {args.batch}, "
        f"median of {args.reps} reps ({args.slow_reps} for implicit/generic), CPU time, "
        f"load average {os.getloadavg()[0]:.1f} at start\n"
        "floor = F.normalize fwd+bwd; x = ratio to the floor; exact = the bare closed-form VJP; "
        "|dg| = max |implicit - closed-form gradient| / max |closed-form gradient| (|dg|64: the "
        "same in float64)\n"
    )
    rows: list[dict] = []
    configs = [
        (f"{'sphere' if sphere else 'ball'} L{p}", float(p), sphere)
        for sphere in (True, False)
        for p in args.p
    ]
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, p, sphere in configs:
            for d in args.sizes:
                row = measure(torch, dl, name, p, sphere, d, args)
                rows.append(row)
                print(format_row(row), flush=True)
        if not args.skip_generic and args.generic_sizes:
            print("\nGeneric torch backend on the same declarations (forward + implicit backward):")
            print(GENERIC_HEADER + "\n" + "-" * len(GENERIC_HEADER), flush=True)
            for name, p, sphere in configs:
                for d in args.generic_sizes:
                    row = measure_generic(torch, dl, name, p, sphere, d, args)
                    rows.append(row)
                    print(format_generic(row), flush=True)
    target = [r for r in rows if r.get("d") == 1024 and "fb_ratio" in r]
    if target:
        print(f"\nTarget at d = 1024: closed-form f+b <= {TARGET:g}x F.normalize f+b")
        for r in target:
            verdict = "ok" if r["fb_ratio"] <= TARGET else "MISSED"
            print(f"  {r['proj']:10s} {r['fb_ms']:7.3f} ms {r['fb_ratio']:5.1f}x  {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
