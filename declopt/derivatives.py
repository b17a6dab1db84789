"""Batched derivatives of a program's functions, taken on the *summed* batch.

Problems in a batch are independent, so the gradient of the summed objective is every problem's
gradient at once, and a Hessian-vector product of the sum applies each problem's Hessian to its own
probe vector. This is the forward-over-reverse form that DESIGN.md §4 measured fastest and that
composes with ``torch.compile``; we never ``vmap`` a per-problem ``grad``/``hessian``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vmap

from declopt.backends.base import BatchedParams
from declopt.program import Params


def batched(
    fn: Callable[[Params, Tensor], Tensor], params: BatchedParams
) -> Callable[[Tensor], Tensor]:
    """``fn(x, u)`` of one problem -> ``F(U)`` on the batch, ``U: (B, m) -> (B, ...)``."""
    mapped = vmap(fn, in_dims=(params.in_dims, 0))
    values = params.values
    return lambda u: mapped(values, u)


class BatchedObjective:
    """Value, gradient, Hessian-vector products and dense Hessians of ``f`` on a batch.

    All methods take ``u: (B, m)``; gradients are ``(B, m)``, Hessians ``(B, m, m)``.
    """

    def __init__(self, fn: Callable[[Params, Tensor], Tensor], params: BatchedParams) -> None:
        self.value = batched(fn, params)
        self._grad_and_value = grad_and_value(lambda u: self._summed(u), has_aux=True)
        self._grad = grad(lambda u: self.value(u).sum())

    def _summed(self, u: Tensor) -> tuple[Tensor, Tensor]:
        values = self.value(u)
        return values.sum(), values.detach()

    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(f (B,), grad (B, m))``."""
        g, (_, f) = self._grad_and_value(u)
        return f, g

    def grad(self, u: Tensor) -> Tensor:
        return self._grad(u)

    def hvp(self, u: Tensor, v: Tensor) -> Tensor:
        """``H_b v_b`` for every problem ``b``; ``v: (B, m)``."""
        return jvp(self._grad, (u,), (v,))[1]

    def hessian(self, u: Tensor) -> Tensor:
        """Dense per-problem Hessians ``(B, m, m)`` from ``m`` probe vectors."""
        batch, m = u.shape
        if m == 1:
            return self.hvp(u, torch.ones_like(u)).unsqueeze(-1)
        probes = torch.eye(m, dtype=u.dtype, device=u.device).unsqueeze(1).expand(m, batch, m)
        columns = vmap(lambda e: self.hvp(u, e))(probes)  # (m, B, m): column j = H e_j
        return columns.permute(1, 2, 0)
