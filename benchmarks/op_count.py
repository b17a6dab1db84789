"""How many aten operations one forward+backward of a declared layer executes.

Eager PyTorch pays a fixed dispatch cost per operation (microseconds), so for small problems the
operation count *is* the run time. Two declarations, float64, torch backend, implicit backward,
batch 3, one thread; counted with ``TorchDispatchMode`` (every aten call, views included):

    box QP     min ½ ‖u‖² + qᵀu   s.t.  0 <= u <= 1          (4 variables, q a parameter)
    L1 ball    min ½ ‖u − x‖²     s.t.  ‖u‖₁ <= 1           (5 variables, x a parameter)

The first call of each layer warms caches (compiled derivative functions); the second is counted.
Also reported: the most frequent operations and how often the constraint Jacobian is formed
(calls of the ``jacrev``/``jacfwd`` vmapped constraint map are not visible as aten ops, so the
count of ``aten.bmm``/``mm`` is shown instead as a rough proxy).

``--pooling`` counts instead the *full-size passes* of robust pooling (B = 8, C = 128, n = 1024,
float32): operations that read or write a tensor of the data's size, views and reductions' small
outputs aside. At that size every pass is a trip through memory (~0.2-0.8 ms on one CPU thread,
the floor of an eager kernel), so the count of passes, not of operations, is the run time; both
``RobustPool`` and the same penalty declared through ``dl.Layer(backend="torch")``, forward and
backward apart.

Run: ``python benchmarks/op_count.py`` (``--pooling``). Benchmarks report; they never gate CI.
"""

from __future__ import annotations

import argparse
import collections
import warnings
from collections.abc import Callable, Sequence

import cvxpy as cp
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import declopt as dl


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class CountPasses(TorchDispatchMode):
    """Counts the operations that touch a tensor of at least ``size`` elements (views aside)."""

    VIEWS = frozenset(
        {
            "view",
            "expand",
            "reshape",
            "unsqueeze",
            "squeeze",
            "permute",
            "transpose",
            "select",
            "slice",
            "detach",
            "alias",
            "_unsafe_view",
            "t",
            "as_strided",
        }
    )

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).split(".")[-1]
        if name not in self.VIEWS:
            flat = [
                *args,
                *(kwargs or {}).values(),
                *(out if isinstance(out, (tuple, list)) else (out,)),
            ]
            if any(isinstance(t, torch.Tensor) and t.numel() >= self.size for t in flat):
                self.counts[name] += 1
        return out


def box_qp() -> tuple[dl.Layer, Callable[[], tuple[torch.Tensor, ...]]]:
    n = 4
    q = cp.Parameter(n)
    u = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u) + q @ u), [u >= 0, u <= 1])
    layer = dl.Layer(problem, [q], [u], backend="torch")
    generator = torch.Generator().manual_seed(0)

    def inputs() -> tuple[torch.Tensor, ...]:
        # Scaled so that some bounds are active and some are not.
        data = 2 * torch.randn(3, n, generator=generator, dtype=torch.float64)
        return (data.requires_grad_(),)

    return layer, inputs


def l1_ball() -> tuple[dl.Layer, Callable[[], tuple[torch.Tensor, ...]]]:
    n = 5
    x = cp.Parameter(n)
    u = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [cp.norm1(u) <= 1])
    layer = dl.Layer(problem, [x], [u], backend="torch")
    generator = torch.Generator().manual_seed(1)

    def inputs() -> tuple[torch.Tensor, ...]:
        data = 2 * torch.randn(3, n, generator=generator, dtype=torch.float64)
        return (data.requires_grad_(),)

    return layer, inputs


CASES = {"box QP (B=3, m=4)": box_qp, "L1 ball (B=3, m=5)": l1_ball}


def count(layer: dl.Layer, inputs: Callable[[], tuple[torch.Tensor, ...]]) -> CountOps:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the first call warms caches; the second is counted
            args = inputs()
            with CountOps() as counter:
                (out,) = layer(*args)
                out.backward(torch.ones_like(out))
    return counter


def pooling_passes(top: int) -> None:
    """The full-size passes of ``RobustPool`` and of the declared penalty, per penalty."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import declared_pool

    x0 = torch.randn(8, 128, 1024, generator=torch.Generator().manual_seed(0))
    print("| penalty | layer | forward passes | backward passes | most frequent (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for penalty in ("quadratic", "pseudo_huber", "huber", "welsch"):
        layers = {
            "RobustPool": dl.nn.RobustPool(penalty, alpha=1.0),
            "declared": declared_pool(penalty, x0.shape[-1], starts=False),
        }
        for name, layer in layers.items():
            for _ in range(2):  # the first call declares and warms caches; the second counts
                x = x0.clone().requires_grad_(True)
                with CountPasses(x0.numel()) as forward:
                    y = layer(x)
                with CountPasses(x0.numel()) as backward:
                    y.sum().backward()
            both = forward.counts + backward.counts
            most = ", ".join(f"{op} {k}" for op, k in both.most_common(top))
            print(
                f"| {penalty} | {name} | {sum(forward.counts.values())} | "
                f"{sum(backward.counts.values())} | {most} |"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8, help="most frequent operations to list")
    parser.add_argument(
        "--pooling", action="store_true", help="full-size passes of robust pooling instead"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.pooling:
        pooling_passes(args.top)
        return
    print("| declaration | aten ops (forward+backward) | most frequent |")
    print("|---|---|---|")
    for name, make in CASES.items():
        counter = count(*make())
        total = sum(counter.counts.values())
        top = ", ".join(
            f"{op.split('.')[-1]} {k}" for op, k in counter.counts.most_common(args.top)
        )
        print(f"| {name} | {total} | {top} |")


if __name__ == "__main__":
    main()
