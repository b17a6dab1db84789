"""Quick start: a declared nonconvex layer and robust pooling, forward and implicit backward.

Declares Welsch robust pooling in CVXPY as a ``dl.Layer``, solves a batch of 1024 pooling
problems with outliers, backpropagates through the solutions (implicit differentiation) and
prints the solver's diagnostics; then applies the ready-made ``dl.nn.RobustPool`` with each
penalty. Prints only (writes no files); a few seconds on a CPU.

Run: python examples/quickstart.py  (see --help)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cvxpy as cp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported from elsewhere

from common import cli

import declopt as dl


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The quick start's flags (only the random seed: the point is the code, not the options)."""
    summary, details = __doc__.split("\n\n")[:2]
    p = cli.parser(summary, epilog=details.replace("``", ""))
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the quick start; returns the exit status."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    # 1. Declare a layer in CVXPY syntax: Welsch robust pooling with a learnable scale.
    n = 64
    x = cp.Parameter(n, name="x")
    a = cp.Parameter(nonneg=True, name="alpha")
    y = cp.Variable(name="y")
    problem = cp.Problem(cp.Minimize(cp.sum(dl.penalties.welsch(y - x, a))))
    layer = dl.Layer(problem, parameters=[x, a], variables=[y])  # backend="auto" -> torch

    X = torch.randn(8, 128, n, dtype=torch.float64)
    X[..., :8] += 20.0  # 1/8 of every row are gross outliers
    X.requires_grad_(True)
    A = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (Y,) = layer(X, A)
    Y.sum().backward()  # implicit function theorem, from the declaration
    info = layer.info
    print(f"declared Welsch layer: Y {tuple(Y.shape)}, backend={info.backend!r} ({info.reason})")
    print(
        f"  converged {int(info.converged.sum())}/{info.converged.numel()}, "
        f"max KKT residual {float(info.kkt_residual.max()):.1e}, "
        f"iterations (all starts) <= {int(info.iterations.max())}"
    )
    X_grad = X.grad
    Y, X = Y.detach(), X.detach()
    print(f"  mean |Y| = {float(Y.abs().mean()):.3f} (the plain mean is {float(X.mean()):.3f})")
    # Pooling is translation-equivariant, so each row of dY/dX sums to one: 1024 rows in all.
    total = float(X_grad.sum())
    print(f"  dL/dalpha = {float(A.grad):.4f}; sum of dL/dX = {total:.4f} (1024 rows)")

    # 2. The ready-made layer: robust pooling over the last dim.
    pool = dl.nn.RobustPool("huber", alpha=1.0)
    features = torch.randn(24, 1024, 256)
    features[..., ::10] *= 10
    pooled = pool(features)
    print(f"RobustPool('huber'): {tuple(features.shape)} -> {tuple(pooled.shape)}")
    for penalty in ("quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"):
        row = dl.nn.RobustPool(penalty, alpha=1.0)(X[0, :4].detach())
        print(f"  {penalty:>20}: {[round(v, 3) for v in row.tolist()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
