"""Batched tensor primitives chosen by their measured CPU cost.

At DDN sizes (a batch of 64 matrices of 50 x 50, say) eager torch on the CPU spends more on
the shape of a kernel and on fresh allocations than on flops: a batched matrix-vector product
written with a one-column right operand runs 4x slower than the same product with a one-row
left operand, and a temporary the size of the batched matrix costs as much as the pass over it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bmv(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` for ``M (B|1, r, c)`` and ``v (B|1, c)`` or ``(B|1, c, k)``.

    Computed as rows, ``(v^T M^T)^T``: batched products whose left operand has one (or ``k``)
    rows run as matrix-vector kernels, 2-4x faster than a right operand of one column (64 x 50
    x 50, float64: 47 against 206 us) and than a broadcast multiply-and-sum, whose ``(B, r, c)``
    temporary cost 1.3 ms per product inside a solver loop. A shared ``M`` is one matrix
    product over the whole batch (broadcasting it in ``matmul`` would copy it ``B`` times)."""
    if M.shape[0] == 1 and v.shape[0] != 1:
        if v.dim() == 2:
            return v @ M[0].mT
        return (v.mT @ M[0].mT).mT
    if v.shape[0] != M.shape[0]:
        v = v.expand(M.shape[0], *v.shape[1:])
    if v.dim() == 2:
        return torch.bmm(v.unsqueeze(-2), M.mT).squeeze(-2)
    return torch.bmm(v.mT, M.mT).mT


def bmtv(M: Tensor, v: Tensor) -> Tensor:
    """``M^T v`` (as :func:`bmv`)."""
    return bmv(M.mT, v)


def abs_max(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """``t.abs().amax(dim)`` without the ``abs`` copy: two reductions over ``t`` instead of a
    fresh tensor of its size (batched matrices are megabytes at DDN batch sizes, and a fresh
    allocation that large costs more than the pass itself on the CPU)."""
    return torch.maximum(t.amax(dim), -t.amin(dim))
