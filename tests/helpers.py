"""Shared test utilities: central finite differences of a layer's output."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def central_difference_vjp(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], v: Tensor, step: float = 1e-6
) -> list[Tensor]:
    """``d/dx_i <v, fn(*inputs)>`` for every input by central differences (float64)."""
    grads = []
    for i, x in enumerate(inputs):
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for j in range(x.numel()):
            plus = [t.clone() for t in inputs]
            minus = [t.clone() for t in inputs]
            plus[i].view(-1)[j] += step
            minus[i].view(-1)[j] -= step
            with torch.no_grad():
                diff = (fn(*plus) - fn(*minus)) * v
            flat[j] = diff.sum() / (2 * step)
        grads.append(g)
    return grads


def implicit_vjp_of(fn: Callable[..., Tensor], inputs: Sequence[Tensor], v: Tensor) -> list[Tensor]:
    """``d/dx_i <v, fn(*inputs)>`` by backpropagation through ``fn``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * v).sum(), leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def batched_central_difference_vjp(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], v: Tensor, step: float = 1e-6
) -> list[Tensor]:
    """As :func:`central_difference_vjp`, with every perturbation solved in one batched call.

    ``fn`` must accept a leading batch dim on all inputs (declopt layers do), and each problem of a
    batch is solved independently, so this equals the one-at-a-time version.
    """
    rows = []
    for i, x in enumerate(inputs):
        for j in range(x.numel()):
            for sign in (1.0, -1.0):
                row = [t.clone() for t in inputs]
                row[i].view(-1)[j] += sign * step
                rows.append(row)
    stacked = [torch.stack([row[i] for row in rows]) for i in range(len(inputs))]
    with torch.no_grad():
        out = fn(*stacked)
    weighted = (out * v).reshape(len(rows), -1).sum(-1)
    diffs = (weighted[0::2] - weighted[1::2]) / (2 * step)
    grads, offset = [], 0
    for x in inputs:
        grads.append(diffs[offset : offset + x.numel()].reshape(x.shape))
        offset += x.numel()
    return grads
