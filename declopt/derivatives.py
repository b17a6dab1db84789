"""Batched derivatives of a program's functions, taken on the *summed* batch.

Problems in a batch are independent, so the gradient of the summed objective is every problem's
gradient at once, and a Hessian-vector product of the sum applies each problem's Hessian to its own
probe vector. This is the forward-over-reverse form that DESIGN.md §4 measured fastest and that
composes with ``torch.compile``; we never ``vmap`` a per-problem ``grad``/``hessian``.

:class:`Derivatives` holds the pure functions (explicit tensor arguments, no captured tensors) for
one objective and one batching pattern, so that they can be compiled once and reused by every call
of a layer; :class:`BatchedObjective` binds them to one batch of parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from declopt.backends.base import BatchedParams
from declopt.compiling import maybe_compile
from declopt.program import Params

ObjectiveFn = Callable[[Params, Tensor], Tensor]
InDims = tuple[int | None, ...]


class Derivatives:
    """Value, gradient, Hessian products and the parameter VJP of ``f`` on a batch.

    Every method takes the parameter tensors ``values`` (batched as ``in_dims`` says) and
    ``u: (B, m)``. With ``compile=True`` the functions run under ``torch.compile`` (one fused
    kernel per pass on CPU and GPU); if compilation fails they fall back to eager with a warning.
    """

    def __init__(self, fn: ObjectiveFn, in_dims: InDims, compile: bool = False) -> None:
        mapped = vmap(fn, in_dims=(in_dims, 0))
        self.in_dims = in_dims

        def value(values: Params, u: Tensor) -> Tensor:
            return mapped(values, u)

        def summed(u: Tensor, values: Params) -> tuple[Tensor, Tensor]:
            f = mapped(values, u)
            return f.sum(), f.detach()

        gradient = grad(lambda u, values: mapped(values, u).sum())

        def value_and_grad(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            g, (_, f) = grad_and_value(summed, has_aux=True)(u, values)
            return f, g

        def hvp(values: Params, u: Tensor, v: Tensor) -> Tensor:
            return jvp(lambda uu: gradient(uu, values), (u,), (v,))[1]

        def hessian(values: Params, u: Tensor) -> Tensor:
            batch, m = u.shape
            if m == 1:
                return hvp(values, u, torch.ones_like(u)).unsqueeze(-1)
            probes = torch.eye(m, dtype=u.dtype, device=u.device).unsqueeze(1).expand(m, batch, m)
            columns = vmap(lambda e: hvp(values, u, e))(probes)  # (m, B, m): column j = H e_j
            return columns.permute(1, 2, 0)

        def param_vjp(values: Params, u: Tensor, w: Tensor) -> tuple[Tensor, ...]:
            """``-d/dx sum_b w_b . D_u f(x_b, u_b)``, one tensor per parameter."""
            # Reverse over reverse: the pullback of the gradient map x -> D_u f(x, u). (The
            # equivalent grad-of-jvp form trips torch.compile's fake tensors on some atoms.)
            _, pullback = vjp(lambda xs: gradient(u, xs), values)
            return tuple(-g for g in pullback(w)[0])

        self.value = maybe_compile(value, compile)
        self.value_and_grad = maybe_compile(value_and_grad, compile)
        self.grad = maybe_compile(lambda values, u: gradient(u, values), compile)
        self.hvp = maybe_compile(hvp, compile)
        self.hessian = maybe_compile(hessian, compile)
        self.param_vjp = maybe_compile(param_vjp, compile)


@lru_cache(maxsize=256)
def derivatives_for(fn: ObjectiveFn, in_dims: InDims, compile: bool = False) -> Derivatives:
    """One :class:`Derivatives` per (function, batching pattern, compile), reused across calls."""
    return Derivatives(fn, in_dims, compile)


class BatchedObjective:
    """:class:`Derivatives` bound to one batch of parameters.

    All methods take ``u: (B, m)``; gradients are ``(B, m)``, Hessians ``(B, m, m)``.
    """

    def __init__(self, fn: ObjectiveFn, params: BatchedParams, compile: bool = False) -> None:
        self.derivatives = derivatives_for(fn, params.in_dims, compile)
        self.values = params.values

    def value(self, u: Tensor) -> Tensor:
        return self.derivatives.value(self.values, u)

    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(f (B,), grad (B, m))``."""
        return self.derivatives.value_and_grad(self.values, u)

    def grad(self, u: Tensor) -> Tensor:
        return self.derivatives.grad(self.values, u)

    def hvp(self, u: Tensor, v: Tensor) -> Tensor:
        """``H_b v_b`` for every problem ``b``; ``v: (B, m)``."""
        return self.derivatives.hvp(self.values, u, v)

    def hessian(self, u: Tensor) -> Tensor:
        """Dense per-problem Hessians ``(B, m, m)`` from ``m`` probe vectors."""
        return self.derivatives.hessian(self.values, u)

    def param_vjp(self, u: Tensor, w: Tensor) -> tuple[Tensor, ...]:
        """``-d/dx sum_b w_b . D_u f(x_b, u_b)``: the implicit gradient of every parameter."""
        return self.derivatives.param_vjp(self.values, u, w)
