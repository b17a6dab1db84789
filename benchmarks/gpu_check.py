"""End-to-end GPU check of the training examples (a few minutes on one GPU).

1. Robust pooling forward+backward time against mean (and max) pooling, at PointNet's global
   pooling size: ``(batch 24, 1024 channels, 1024 points)`` float32 (the paper's batch size).
2. PointNet training throughput (samples/s) per pooling at batch 24 (``examples/modelnet40.py``'s
   model, random point clouds: data loading is not what is measured).
3. ResNet-18 training throughput (samples/s) per projection head at batch 256, 224x224
   (``examples/imagenet.py``'s model; ``--skip-resnet`` to leave it out).
4. The cone backend on a QP (50 variables, 25 inequalities, 10 equalities, every input per
   problem) at batch 64 and 1024, forward+backward, float64 and float32 (``working_dtype=None``),
   against qpth's batched interior point on the same device when qpth is installed.

    python benchmarks/gpu_check.py                      # on the GPU, about 3-5 minutes
    python benchmarks/gpu_check.py --device cpu --quick # smoke mode: tiny sizes, seconds

Ratios are measured in one run on one machine; nothing here is a test threshold. Prints Markdown
tables and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from imagenet import build_model  # noqa: E402
from modelnet40 import POOLINGS, PointNet, make_pooling  # noqa: E402

import declopt as dl  # noqa: E402

PROJECTIONS = ("none", "l2_sphere", "l1_sphere", "linf_sphere", "l2_ball", "l1_ball", "linf_ball")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# 1. Pooling forward + backward


def pooling_fns(compile: bool, device: torch.device) -> dict[str, Callable[[Tensor], Tensor]]:
    """Pool ``(B, C, n) -> (B, C)``: mean, max and every robust penalty (alpha = 1)."""
    fns: dict[str, Callable[[Tensor], Tensor]] = {
        "mean": lambda x: x.mean(-1),
        "max": lambda x: x.amax(-1),
    }
    for name in POOLINGS[1:]:
        fns[name] = dl.nn.RobustPool(name, alpha=1.0, dim=-1).to(device)
        if compile:
            pool = dl.nn.RobustPool(name, alpha=1.0, dim=-1, compile=True)
            fns[f"{name} (compiled)"] = pool.to(device)
    return fns


def bench_pooling(
    shape: Sequence[int], device: torch.device, repeats: int, compile: bool
) -> list[dict[str, Any]]:
    """Forward+backward seconds per pooling on standard normal data of ``shape``."""
    torch.manual_seed(0)
    data = torch.randn(*shape, device=device)
    rows = []
    for name, pool in pooling_fns(compile, device).items():
        x = data.clone().requires_grad_(True)

        def step(pool: Callable[[Tensor], Tensor] = pool, x: Tensor = x) -> None:
            x.grad = None
            pool(x).sum().backward()

        try:
            ms, error = 1e3 * timed(step, device, repeats, warmup=2), ""
        except Exception as e:  # one failing penalty must not cost the rest
            ms, error = float("nan"), f"{type(e).__name__}: {e}"[:200]
        rows.append({"pooling": name, "ms": ms, "error": error})
    mean = rows[0]["ms"]
    for row in rows:
        row["x_mean"] = row["ms"] / mean
    return rows


# ------------------------------------------------------------------------------------------------
# 2. and 3. Training throughput


def throughput(
    model: nn.Module, inputs: Tensor, targets: Tensor, steps: int, device: torch.device
) -> float:
    """Training samples per second of SGD steps on one fixed batch (after one warm-up step,
    which also pays for first-call work: declaring the layer, compiling)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    seconds = timed(step, device, steps, warmup=1)
    return inputs.shape[0] / seconds


def bench_training(
    key: str,
    names: Sequence[str],
    make_model: Callable[[str], nn.Module],
    inputs: Tensor,
    targets: Tensor,
    steps: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """``{key: name, "samples_per_s": ..., "error": ...}`` per name: ``make_model(name)`` trained
    on the batch ``(inputs, targets)``, one model after the other."""
    rows = []
    for name in names:
        model = make_model(name).to(device)
        rows.append({key: name, **guarded(throughput, model, inputs, targets, steps, device)})
    return rows


def bench_pointnet(
    batch: int, points: int, device: torch.device, steps: int, compile: bool, width: Sequence[int]
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    inputs = torch.rand(batch, points, 3, device=device) * 2 - 1
    targets = torch.randint(0, 40, (batch,), device=device)

    def make_model(pooling: str) -> nn.Module:
        return PointNet(40, make_pooling(pooling, 1.0, compile), mlp=width)

    return bench_training("pooling", POOLINGS, make_model, inputs, targets, steps, device)


def bench_resnet(
    batch: int, size: int, device: torch.device, steps: int, projections: Sequence[str]
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)

    def make_model(projection: str) -> nn.Module:
        return build_model(1000, projection)

    return bench_training("projection", projections, make_model, inputs, targets, steps, device)


# ------------------------------------------------------------------------------------------------
# 4. The cone backend on a QP


def qp_data(batch: int, device: torch.device, nv: int = 50, ni: int = 25, ne: int = 10) -> Any:
    """``(problem, parameters, variables, data)`` of ``min 0.5 |Q w|^2 + q'w, G w <= h, A w = b``
    with a strictly feasible point, every input per problem (float64 on ``device``)."""
    import cvxpy as cp

    Q, q = cp.Parameter((nv, nv)), cp.Parameter(nv)
    G, h = cp.Parameter((ni, nv)), cp.Parameter(ni)
    A, b = cp.Parameter((ne, nv)), cp.Parameter(ne)
    w = cp.Variable(nv)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Q @ w) + q @ w), [G @ w <= h, A @ w == b])
    kw = {"dtype": torch.float64, "device": device}
    Qv = torch.randn(batch, nv, nv, **kw) / nv**0.5 + torch.eye(nv, **kw)
    Gv, Av = torch.randn(batch, ni, nv, **kw), torch.randn(batch, ne, nv, **kw)
    w0 = 0.3 * torch.randn(batch, nv, **kw)
    hv = (Gv @ w0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, ni, **kw)
    bv = (Av @ w0.unsqueeze(-1)).squeeze(-1)
    data = [Qv, 3 * torch.randn(batch, nv, **kw), Gv, hv, Av, bv]
    return problem, [Q, q, G, h, A, b], [w], data


def bench_cone_qp(
    batches: Sequence[int], device: torch.device, repeats: int, size: dict[str, int]
) -> list[dict[str, Any]]:
    """Forward+backward ms of the cone backend (float64; float32 computing in float32) and of
    qpth (float64), per batch size."""
    rows = []
    for batch in batches:
        problem, params, variables, data = qp_data(batch, device, **size)
        runs: dict[str, Callable[[], Any]] = {}
        for label, dtype, working in (
            ("cone float64", torch.float64, torch.float64),
            ("cone float32", torch.float32, None),
        ):
            layer = dl.Layer(problem, params, variables, backend="cone", working_dtype=working)
            inputs = [t.to(dtype).requires_grad_() for t in data]

            def run(layer: dl.Layer = layer, inputs: list[Tensor] = inputs) -> None:
                (w,) = layer(*inputs)
                torch.autograd.grad(w.sum(), inputs)

            runs[label] = run
        try:
            from qpth.qp import QPFunction

            inputs = [t.clone().requires_grad_() for t in data]

            def run_qpth(inputs: list[Tensor] = inputs) -> None:
                Q, q, G, h, A, b = inputs
                w = QPFunction(verbose=-1)(Q.mT @ Q, q, G, h, A, b)
                torch.autograd.grad(w.sum(), inputs)

            runs["qpth float64"] = run_qpth
        except ImportError:
            rows.append(
                {"batch": batch, "solver": "qpth", "ms": float("nan"), "error": "not installed"}
            )
        for label, run in runs.items():
            try:
                ms = 1e3 * timed(run, device, repeats, warmup=1)
                rows.append({"batch": batch, "solver": label, "ms": ms, "error": ""})
            except Exception as error:  # reported, not fatal
                message = f"{type(error).__name__}: {error}"[:200]
                rows.append({"batch": batch, "solver": label, "ms": float("nan"), "error": message})
    return rows


def guarded(fn: Callable[..., float], *args: Any) -> dict[str, Any]:
    """``{"samples_per_s": fn(*args)}``, or the error: one failing variant (e.g. a solver's
    LinAlgError) must not cost the rest of a one-shot GPU session."""
    try:
        return {"samples_per_s": fn(*args), "error": ""}
    except Exception as error:  # reported in the table and the JSON
        return {"samples_per_s": float("nan"), "error": f"{type(error).__name__}: {error}"[:200]}


# ------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table of ``rows``; ``columns`` are ``(key, header, format)``."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def section(
    report: dict[str, Any],
    key: str,
    settings: dict[str, Any],
    rows: list[dict[str, Any]],
    title: str,
    columns: Sequence[tuple[str, str, str]],
) -> None:
    """Record one benchmark's ``settings`` and ``rows`` as ``report[key]`` and print ``title``
    and its table (``columns``, then the error column: a failed variant is a row, not a crash)."""
    report[key] = {**settings, "rows": rows}
    print(f"\n{title}")
    print(table(rows, [*columns, ("error", "error", "")]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test on any device")
    p.add_argument("--compile", action="store_true", help="also robust pooling under torch.compile")
    p.add_argument("--skip-resnet", action="store_true", help="leave out the ResNet-18 part")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: CUDA is not available; use --device cpu (with --quick for a smoke test)"
        )
    if args.quick:  # tiny: checks that everything runs, measures nothing
        pool_shape, pn = (4, 32, 64), {"batch": 4, "points": 64, "width": (16, 32), "steps": 2}
        rn = {"batch": 4, "size": 32, "steps": 1, "projections": ("none", "l2_sphere")}
        repeats = 1
    else:
        pool_shape, pn = (24, 1024, 1024), {"batch": 24, "points": 1024, "steps": 10}
        pn["width"] = (64, 64, 64, 128, 1024)
        rn = {"batch": 256, "size": 224, "steps": 3, "projections": PROJECTIONS}
        repeats = 10
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; declopt {dl.__version__}")
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
    }
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("once", dl.NonConvergenceWarning)
        warnings.simplefilter("once", dl.GradientWarning)
        rows = bench_pooling(pool_shape, device, repeats, args.compile)
        section(
            report,
            "pooling",
            {"shape": list(pool_shape)},
            rows,
            f"pooling forward+backward, x: {tuple(pool_shape)} float32",
            [("pooling", "pooling", ""), ("ms", "ms", ".2f"), ("x_mean", "x mean", ".1f")],
        )
        rows = bench_pointnet(
            pn["batch"], pn["points"], device, pn["steps"], args.compile, pn["width"]
        )
        section(
            report,
            "pointnet",
            pn,
            rows,
            f"PointNet training, batch {pn['batch']} x {pn['points']} points",
            [("pooling", "pooling", ""), ("samples_per_s", "samples/s", ".1f")],
        )
        if not args.skip_resnet:
            rows = bench_resnet(rn["batch"], rn["size"], device, rn["steps"], rn["projections"])
            section(
                report,
                "resnet18",
                rn,
                rows,
                f"ResNet-18 training, batch {rn['batch']} x {rn['size']}x{rn['size']}",
                [("projection", "projection", ""), ("samples_per_s", "samples/s", ".1f")],
            )
        qp: dict[str, Any] = {"batches": (4,), "size": {"nv": 6, "ni": 3, "ne": 1}}
        if not args.quick:
            qp = {"batches": (64, 1024), "size": {"nv": 50, "ni": 25, "ne": 10}}
        rows = bench_cone_qp(qp["batches"], device, repeats, qp["size"])
        section(
            report,
            "cone_qp",
            qp,
            rows,
            f"cone backend QP {qp['size']}, forward+backward",
            [("batch", "batch", "d"), ("solver", "solver", ""), ("ms", "ms", ".1f")],
        )
    report["seconds"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ntotal {report['seconds']:.0f} s; written to {args.out}")
    return report


if __name__ == "__main__":
    main()
