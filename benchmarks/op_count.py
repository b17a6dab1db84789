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

Run: ``python benchmarks/op_count.py``. Benchmarks report; they never gate CI.
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8, help="most frequent operations to list")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
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
