"""Batched derivatives of a program's functions, taken on the *summed* batch.

Problems in a batch are independent, so the gradient of the summed objective is every problem's
gradient at once, and a Hessian-vector product of the sum applies each problem's Hessian to its own
probe vector. This is the form that composes with ``torch.compile`` and measured fastest
(docs/design.md, "Derivatives of the declared objective"); we never ``vmap`` a per-problem
``grad``/``hessian``.

:class:`Derivatives` holds the pure functions (explicit tensor arguments, no captured tensors) for
one objective and one batching pattern, so that they can be compiled once and reused by every call
of a layer; :class:`BatchedObjective` binds them to one batch of parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev, jvp, vjp, vmap

from declopt.compiling import maybe_compile
from declopt.kkt.jacobian import RowJacobian
from declopt.kkt.tolerances import on_kink, problem_scale, table
from declopt.linalg import LinearSolveReport, kkt_minres, scalar_singular
from declopt.program import BatchedParams, Params, Program, TaylorFn

TAYLOR_MAX_M = 16
"""Largest ``m`` for which the one-pass Taylor expansion replaces autograd: its jets are dense,
``(*node, m, m)`` per node, so for many variables Hessian-vector products are cheaper."""

ObjectiveFn = Callable[[Params, Tensor], Tensor]
InDims = tuple[int | None, ...]
Wanted = tuple[bool, ...]
"""Per parameter, whether its gradient is wanted (the others are constants of the pass)."""


class Derivatives:
    """Value, gradient, Hessian products and the parameter VJP of ``f`` on a batch.

    Every method takes the parameter tensors ``values`` (batched as ``in_dims`` says) and
    ``u: (B, m)``. With ``compile=True`` the functions run under ``torch.compile`` (one fused
    kernel per pass on CPU and GPU); if compilation fails they fall back to eager with a warning.

    With ``taylor`` (:attr:`Program.objective_taylor`: value, gradient and Hessian of one problem
    from the atoms' closed-form derivatives), the Hessian, the value-gradient-Hessian triple and
    the parameter VJPs of problems with at most :data:`TAYLOR_MAX_M` variables take one pass of
    it (and the VJPs one first-order reverse pass through its gradient) instead of nested
    autograd.
    """

    def __init__(
        self,
        fn: ObjectiveFn,
        in_dims: InDims,
        compile: bool = False,
        taylor: TaylorFn | None = None,
    ) -> None:
        mapped = vmap(fn, in_dims=(in_dims, 0))
        self.in_dims = in_dims
        self.has_taylor = taylor is not None
        self.diagonal_hessian: bool | str = True
        """Which diagonal models of the Hessian Krylov KKT solves try first
        (:func:`~declopt.linalg.kkt_minres`): both (``True``), the null-space one alone
        (``"projected"``, once ``diag(H 1)`` failed its check) or none (``False``, once both
        failed: a Hessian neither describes costs one attempt per function, not per solve)."""

        def value(values: Params, u: Tensor) -> Tensor:
            return mapped(values, u)

        def summed(u: Tensor, values: Params) -> tuple[Tensor, Tensor]:
            f = mapped(values, u)
            return f.sum(), f.detach()

        gradient = grad(lambda u, values: mapped(values, u).sum())

        def value_and_grad(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            g, (_, f) = grad_and_value(summed, has_aux=True)(u, values)
            return f, g

        # Second derivatives: forward over reverse (jvp of the gradient) fuses under
        # torch.compile, but eager functorch forward mode runs many ops through Python
        # decompositions: there reverse over reverse (the gradient's pullback; H is symmetric)
        # is 3-4x faster (docs/design.md, "Derivatives of the declared objective").
        def hvp_forward(values: Params, u: Tensor, v: Tensor) -> Tensor:
            return jvp(lambda uu: gradient(uu, values), (u,), (v,))[1]

        def hvp_reverse(values: Params, u: Tensor, v: Tensor) -> Tensor:
            _, pullback = vjp(lambda uu: gradient(uu, values), u)
            return pullback(v)[0]

        def grad_and_hessian_forward(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            # The gradient is the primal output of the Hessian's jvp: no pass of its own.
            batch, m = u.shape
            if m == 1:
                g, hv = jvp(lambda uu: gradient(uu, values), (u,), (torch.ones_like(u),))
                return g, hv.unsqueeze(-1)
            probes = torch.eye(m, dtype=u.dtype, device=u.device).unsqueeze(1).expand(m, batch, m)
            g, columns = vmap(lambda e: jvp(lambda uu: gradient(uu, values), (u,), (e,)))(probes)
            return g[0], columns.permute(1, 2, 0)  # columns (m, B, m): column j = H e_j

        def gradient_twice(x: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            g = grad(fn, argnums=1)(x, u)
            return g, g

        # Per problem, reverse over reverse, vmapped over the batch: m probes of the summed batch
        # would make vmap materialise every batched matrix m times (10x slower on a QP's
        # augmented Lagrangian, docs/design.md; elementwise objectives cost the same either way).
        per_problem_hessian = vmap(jacrev(gradient_twice, argnums=1, has_aux=True), (in_dims, 0))

        def grad_and_hessian_reverse(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            if u.shape[-1] == 1:
                g, pullback = vjp(lambda uu: gradient(uu, values), u)
                return g, pullback(torch.ones_like(u))[0].unsqueeze(-1)
            hess, g = per_problem_hessian(values, u)
            return g, hess

        def hvp_eager(values: Params, u: Tensor, v: Tensor) -> Tensor:
            hv = hvp_reverse(values, u, v)
            # Some atoms' double backward is nan where their forward mode is not (e.g.
            # vector_norm at 0): then forward over reverse decides.
            return hv if bool(torch.isfinite(hv).all()) else hvp_forward(values, u, v)

        def grad_and_hessian_eager(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            g, hess = grad_and_hessian_reverse(values, u)
            if bool(torch.isfinite(hess).all()):
                return g, hess
            return grad_and_hessian_forward(values, u)

        hvp = hvp_forward if compile else hvp_eager

        def hvp_at(values: Params, u: Tensor) -> Callable[[Tensor], Tensor]:
            """``v -> H v`` at a fixed ``u``: the gradient's pullback recorded once, each product
            then a pass of it alone (~4x cheaper than :func:`hvp_eager` per product; Krylov
            solves take 10-50 at one point). Non-finite products fall back to forward mode."""
            if compile:
                return functools.partial(self.hvp, values, u)
            _, pullback = vjp(lambda uu: gradient(uu, values), u)

            def product(v: Tensor) -> Tensor:
                hv = pullback(v)[0]
                return hv if bool(torch.isfinite(hv).all()) else hvp_forward(values, u, v)

            return product

        def param_vjp(
            values: Params, u: Tensor, w: Tensor, wanted: Wanted | None = None
        ) -> tuple[Tensor | None, ...]:
            """``-d/dx sum_b w_b . D_u f(x_b, u_b)``, one tensor per parameter (``None`` where
            ``wanted`` is False: that parameter is a constant of the pass)."""
            wanted = (True,) * len(values) if wanted is None else wanted
            free = [i for i, want in enumerate(wanted) if want]

            def gradient_map(*xs: Tensor) -> Tensor:
                return gradient(u, substitute(values, free, xs))

            # Reverse over reverse: the pullback of the gradient map x -> D_u f(x, u). (The
            # equivalent grad-of-jvp form trips torch.compile's fake tensors on some atoms.)
            _, pullback = vjp(gradient_map, *(values[i] for i in free))
            return _scatter(len(values), free, tuple(-g for g in pullback(w)))

        def scalar_vjp(
            values: Params, u: Tensor, v: Tensor, wanted: Wanted
        ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
            """``m = 1``: ``(g, h, grads)``: ``g = D_u f`` and ``h = D2_uu f``, both ``(B, 1)``, and
            the implicit gradient ``-sum_b (v_b / h_b) D_x D_u f(x_b, u_b)`` of every wanted
            parameter (in order; ``v_b / h_b`` is 0 where ``h_b`` is singular, as
            :func:`declopt.linalg.solve_symmetric` does for a 1 x 1 system).

            With one variable, one reverse pass of the gradient map with a cotangent of ones gives
            ``h`` and every problem's ``D_x D_u f`` together: the Hessian and the parameter VJP
            need not be two passes. Wanted shared parameters are expanded over the batch for it.
            """
            batch = u.shape[0]
            free = [i for i, want in enumerate(wanted) if want]
            dims = tuple(0 if d == 0 or want else None for d, want in zip(in_dims, wanted))
            xs = tuple(
                x.expand(batch, *x.shape) if d is None and want else x
                for x, d, want in zip(values, in_dims, wanted)
            )
            per_problem = vmap(fn, in_dims=(dims, 0))

            def gradient_map(uu: Tensor, *free_xs: Tensor) -> Tensor:
                full = substitute(xs, free, free_xs)
                return grad(lambda u_: per_problem(full, u_).sum())(uu)

            g, pullback = vjp(gradient_map, u, *(xs[i] for i in free))
            h, *jacobians = pullback(torch.ones_like(g))
            singular = scalar_singular(h)
            scale = -(v / torch.where(singular, torch.ones_like(h), h)).masked_fill(singular, 0)
            grads = []
            for i, jac in zip(free, jacobians):
                scaled = jac * scale.reshape(-1, *([1] * (jac.dim() - 1)))
                grads.append(scaled if in_dims[i] == 0 else scaled.sum(0))
            return g, h, tuple(grads)

        expanded = None if taylor is None else vmap(taylor, in_dims=(in_dims, 0))
        # The VJPs differentiate the gradient and never read the value (the pass then skips the
        # node values no jet reads); the parameter VJPs take the gradient alone (a curvature
        # recorded on autograd's tape would double the tensors it saves).
        first_order = (
            None
            if taylor is None
            else vmap(lambda x, u: taylor(x, u, second=False, value=False)[0], in_dims=(in_dims, 0))
        )
        curvature = (
            None
            if taylor is None
            else vmap(lambda x, u: taylor(x, u, value=False), in_dims=(in_dims, 0))
        )

        def value_grad_hessian_autograd(values: Params, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            g, hess = grad_and_hessian(values, u)
            return value(values, u), g, hess

        def taylor_param_vjp(
            values: Params, u: Tensor, w: Tensor, wanted: Wanted | None = None
        ) -> tuple[Tensor | None, ...]:
            wanted = (True,) * len(values) if wanted is None else wanted
            free = [i for i, want in enumerate(wanted) if want]

            def gradient_map(*xs: Tensor) -> Tensor:
                return first_order(substitute(values, free, xs), u)  # type: ignore[misc]

            # First-order reverse through the closed-form gradient: shared parameters come out
            # summed over the batch, batched ones per problem.
            _, pullback = vjp(gradient_map, *(values[i] for i in free))
            return _scatter(len(values), free, tuple(-g for g in pullback(w)))

        def taylor_scalar_vjp(
            values: Params, u: Tensor, v: Tensor, wanted: Wanted
        ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
            free = [i for i, want in enumerate(wanted) if want]

            def gradient_map(*xs: Tensor) -> tuple[Tensor, Tensor]:
                g, h = curvature(substitute(values, free, xs), u)  # type: ignore[misc]
                return g, h[..., 0]

            # One pass: the Hessian (aux, not differentiated) is known before the pullback, so
            # the cotangent is the solve itself.
            g, pullback, h = vjp(gradient_map, *(values[i] for i in free), has_aux=True)
            singular = scalar_singular(h)
            scale = -(v / torch.where(singular, torch.ones_like(h), h)).masked_fill(singular, 0)
            return g, h, tuple(pullback(scale))

        self.value = maybe_compile(value, compile)
        self.value_and_grad = maybe_compile(value_and_grad, compile)
        self.grad = maybe_compile(lambda values, u: gradient(u, values), compile)
        self.hvp = maybe_compile(hvp, compile)
        self.hvp_at = hvp_at
        # m > 1 under compile: vmapping m probes inside jvp fails with dynamic shapes
        # ("storage_offset() on symbolic sizes", every constrained declaration), and a compiled
        # per-problem reverse Hessian measured 3x slower than eager (QP, m = 50); so only the
        # m = 1 Hessian (pooling layers) is compiled.
        scalar_hessian = maybe_compile(grad_and_hessian_forward, compile)

        def grad_and_hessian(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
            if compile and u.shape[-1] == 1:
                return scalar_hessian(values, u)
            return grad_and_hessian_eager(values, u)

        if expanded is not None:
            value_grad_hessian = _LastEvaluation(maybe_compile(expanded, compile))

            def grad_and_hessian_of(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
                if u.shape[-1] > TAYLOR_MAX_M:
                    return grad_and_hessian(values, u)
                return value_grad_hessian(values, u)[1:]

            def value_grad_hessian_of(values: Params, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                if u.shape[-1] > TAYLOR_MAX_M:
                    return value_grad_hessian_autograd(values, u)
                return value_grad_hessian(values, u)

            compiled_param_vjp = maybe_compile(param_vjp, compile)
            compiled_taylor_vjp = maybe_compile(taylor_param_vjp, compile)

            def param_vjp_of(
                values: Params, u: Tensor, w: Tensor, wanted: Wanted | None = None
            ) -> tuple[Tensor | None, ...]:
                chosen = compiled_taylor_vjp if u.shape[-1] <= TAYLOR_MAX_M else compiled_param_vjp
                return chosen(values, u, w, wanted)

            autograd_value_and_grad = self.value_and_grad

            def value_and_grad_of(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
                # One variable: the expansion's Hessian costs what its gradient does, and the
                # pass beats autograd's forward and backward.
                if u.shape[-1] == 1:
                    return value_grad_hessian(values, u)[:2]
                return autograd_value_and_grad(values, u)

            self.value_and_grad = value_and_grad_of
            self.grad_and_hessian = grad_and_hessian_of
            self.value_grad_hessian = value_grad_hessian_of
            self.param_vjp = param_vjp_of
            self.scalar_vjp = maybe_compile(taylor_scalar_vjp, compile)
        else:
            self.grad_and_hessian = grad_and_hessian
            self.value_grad_hessian = value_grad_hessian_autograd
            self.param_vjp = maybe_compile(param_vjp, compile)
            self.scalar_vjp = maybe_compile(scalar_vjp, compile)
        self.hessian = lambda values, u: self.grad_and_hessian(values, u)[1]


class _LastEvaluation:
    """``fn(values, u)`` remembering its last call: a solver's first evaluation at its start is
    often the one the starting-point check just made (``backends/starts.py``). The key is the
    identity and version of every argument tensor (held, so identities cannot be reused), and
    only calls outside autograd, on tensors that have versions, are remembered."""

    def __init__(self, fn: Callable[[Params, Tensor], tuple[Tensor, ...]]) -> None:
        self.fn = fn
        self.key: tuple | None = None
        self.result: tuple[Tensor, ...] | None = None

    @staticmethod
    def _key(values: Params, u: Tensor) -> tuple:
        return tuple((t, t._version) for t in (*values, u))

    def __call__(self, values: Params, u: Tensor) -> tuple[Tensor, ...]:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        tensors = (*values, u)
        # Inside a transform or on the graph: no memo; nor for inference tensors, which keep
        # no version counter to key on (torch.inference_mode).
        if torch.is_grad_enabled() or any(wrapped(t) or t.is_inference() for t in tensors):
            self.key = self.result = None
            return self.fn(values, u)
        key = self._key(values, u)
        same = self.key is not None and len(key) == len(self.key)
        if same and all(a is b and va == vb for (a, va), (b, vb) in zip(key, self.key)):
            return self.result  # type: ignore[return-value]
        self.key, self.result = key, self.fn(values, u)
        return self.result


def substitute(values: Params, index: list[int], replacements: tuple[Tensor, ...]) -> Params:
    """``values`` with ``values[index[k]]`` replaced by ``replacements[k]``."""
    out = list(values)
    for i, x in zip(index, replacements):
        out[i] = x
    return tuple(out)


def _scatter(size: int, index: list[int], items: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """A tuple of ``size`` entries: ``items[k]`` at ``index[k]``, ``None`` elsewhere."""
    out: list[Tensor | None] = [None] * size
    for i, x in zip(index, items):
        out[i] = x
    return tuple(out)


@lru_cache(maxsize=256)
def derivatives_for(
    fn: ObjectiveFn, in_dims: InDims, compile: bool = False, taylor: TaylorFn | None = None
) -> Derivatives:
    """One :class:`Derivatives` per (function, batching pattern, compile), reused across calls."""
    return Derivatives(fn, in_dims, compile, taylor)


@lru_cache(maxsize=256)
def kink_test_for(
    kinks: Callable[[Params, Tensor], tuple[Tensor, Tensor]],
    in_dims: InDims,
    compile: bool = False,
    activity: float | None = None,
    resolution: float = 0.0,
) -> Callable[[Params, Tensor], Tensor]:
    """``(values, u) -> (B,)``: whether problem ``b`` sits on a kink, i.e. some margin of
    ``kinks`` (a :attr:`Program.kinks`) passes :func:`~declopt.kkt.tolerances.on_kink` (the
    rule of :func:`~declopt.kkt.point.kkt_point`) with ``activity`` (default the dtype's) and
    ``resolution``.

    Compiled with the rest when asked: it evaluates the whole objective once (the margins of
    ``minimum`` and ``maximum`` are differences of their operands), a pass as costly as the
    implicit backward itself when run eagerly.
    """
    margins = vmap(lambda x, u: kinks(x, u)[1], in_dims=(in_dims, 0))

    def on_a_kink(values: Params, u: Tensor) -> Tensor:
        scale = problem_scale(BatchedParams(values, in_dims, u.shape[0]), u)
        band = table(u.dtype).kinks if activity is None else activity
        return on_kink(margins(values, u), u, scale, band, resolution).any(-1)

    return maybe_compile(on_a_kink, compile)


class BatchedObjective:
    """:class:`Derivatives` bound to one batch of parameters.

    All methods take ``u: (B, m)``; gradients are ``(B, m)``, Hessians ``(B, m, m)``.
    """

    def __init__(
        self,
        fn: ObjectiveFn,
        params: BatchedParams,
        compile: bool = False,
        taylor: TaylorFn | None = None,
        quadratic: bool = False,
        curvature: BatchedObjective | None = None,
    ) -> None:
        self.fn = fn
        self.derivatives = derivatives_for(fn, params.in_dims, compile, taylor)
        self.params = params
        self.values = params.values
        self.quadratic = quadratic
        """``fn`` is of degree at most 2 in ``u``: its second-order model is exact."""
        self.curvature = self if curvature is None else curvature
        """An objective with ``fn``'s Hessian in ``u`` (a Lagrangian's objective where every row
        is affine): Hessians and their products are taken from it, the cheaper function (and
        its closed-form Taylor pass where it has one)."""

    def value(self, u: Tensor) -> Tensor:
        return self.derivatives.value(self.values, u)

    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(f (B,), grad (B, m))``."""
        return self.derivatives.value_and_grad(self.values, u)

    def grad(self, u: Tensor) -> Tensor:
        return self.derivatives.grad(self.values, u)

    def hvp(self, u: Tensor, v: Tensor) -> Tensor:
        """``H_b v_b`` for every problem ``b``; ``v: (B, m)``."""
        source = self.curvature
        return source.derivatives.hvp(source.values, u, v)

    def hvp_at(self, u: Tensor) -> Callable[[Tensor], Tensor]:
        """``v -> H v`` at a fixed ``u: (B, m)``, for the many products of a Krylov solve."""
        source = self.curvature
        return source.derivatives.hvp_at(source.values, u)

    def kkt_krylov(
        self, u: Tensor, jac: RowJacobian, held: Tensor, rhs: Tensor
    ) -> tuple[Tensor, LinearSolveReport]:
        """:func:`~declopt.linalg.kkt_minres` with this function's Hessian at ``u``: the
        diagonal models tried as long as they work for this function (the one that answered
        is remembered; after both failed, MINRES alone)."""
        derivatives = self.curvature.derivatives  # whose Hessian the products apply
        tried = derivatives.diagonal_hessian
        solution, report = kkt_minres(self.hvp_at(u), jac, held, rhs, diagonal=tried)
        if report.method.startswith("projected"):
            derivatives.diagonal_hessian = "projected"  # diag(H 1) is wrong for this function
        elif tried and report.method == "minres":  # both models are wrong for it
            derivatives.diagonal_hessian = False
        return solution, report

    def hessian(self, u: Tensor) -> Tensor:
        """Dense per-problem Hessians ``(B, m, m)`` from ``m`` probe vectors."""
        source = self.curvature
        return source.derivatives.hessian(source.values, u)

    def grad_and_hessian(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(grad (B, m), Hessians (B, m, m))`` in the passes of the Hessian alone."""
        return self.derivatives.grad_and_hessian(self.values, u)

    def value_grad_hessian(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f (B,), grad (B, m), Hessians (B, m, m))``: one pass with a Taylor expansion."""
        return self.derivatives.value_grad_hessian(self.values, u)

    @classmethod
    def of(cls, program: Program, params: BatchedParams, compile: bool = False) -> BatchedObjective:
        """The objective of ``program`` (with its Taylor expansion where it has one)."""
        return cls(
            program.objective,
            params,
            compile,
            program.objective_taylor,
            quadratic=program.objective_quadratic,
        )

    def param_vjp(
        self, u: Tensor, w: Tensor, wanted: Wanted | None = None
    ) -> tuple[Tensor | None, ...]:
        """``-d/dx sum_b w_b . D_u f(x_b, u_b)``: the implicit gradient of every parameter
        (of the ``wanted`` ones; ``None`` for the others)."""
        if wanted is None or all(wanted):
            return self.derivatives.param_vjp(self.values, u, w)
        return self.derivatives.param_vjp(self.values, u, w, tuple(wanted))

    def scalar_vjp(
        self, u: Tensor, v: Tensor, wanted: Wanted
    ) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
        """``m = 1`` only: ``(grad (B, 1), Hessian (B, 1), implicit gradients)`` in one pass (see
        :class:`Derivatives`); ``None`` for the parameters not ``wanted``."""
        wanted = tuple(wanted)
        g, h, grads = self.derivatives.scalar_vjp(self.values, u, v, wanted)
        return g, h, _scatter(len(wanted), [i for i, want in enumerate(wanted) if want], grads)
