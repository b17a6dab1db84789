"""``dl.Layer``: a declared optimisation problem as a differentiable ``nn.Module``.

Same signature as ``cvxpylayers.torch.CvxpyLayer(problem, parameters, variables)``: calling the
layer with one tensor per parameter returns a tuple with one tensor per variable. The forward is
solved by a backend (or a user's solver); the backward always comes from the declaration through
the implicit function theorem (:mod:`declopt.implicit`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cvxpy as cp
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from declopt import backends
from declopt.backends.torch.augmented_lagrangian import kkt_residual
from declopt.derivatives import BatchedObjective
from declopt.diagnostics import BackwardInfo, LayerInfo
from declopt.errors import GradientWarning, NonConvergenceWarning, SolverError
from declopt.frontend import compile_problem
from declopt.implicit import DEGENERATE_CHOICES, DENSE_MAX_VARIABLES, active_set, implicit_vjp
from declopt.inputs import PreparedInputs, prepare_inputs
from declopt.program import BatchedParams, Program

Solver = Callable[..., Sequence[Tensor]]
"""A custom forward: called with the parameter tensors (batch dims included, detached), returns one
tensor per variable of shape ``(*batch, *variable_shape)``.

It may also bring its own backward, a method ``solver.vjp(params, outputs, grads)``: ``params`` the
tensors it was called with (detached), ``outputs`` what it returned and ``grads`` the upstream
gradients, one per variable, shaped ``(*batch, *variable_shape)``; it returns one gradient (or
``None``) per parameter, shaped like that parameter or like its broadcast ``(*batch, *shape)``
(the layer sums over broadcast dims). A layer uses it with ``backward="native"``, the default for
a solver that has one; ``backward="implicit"`` differentiates the declaration instead.
"""

_POLICIES = ("warn", "raise", "ignore")


class Layer(nn.Module):
    """A differentiable layer whose output solves a declared optimisation problem.

    Args:
        problem: the declaration, a ``cvxpy.Problem`` (convex or not: non-DCP expressions are
            fine) or a :class:`~declopt.program.Program` of torch functions.
        parameters: the ``cp.Parameter`` inputs, in the order the layer is called with; must be
            exactly the parameters of ``problem``.
        variables: the ``cp.Variable`` outputs, in the order they are returned.
        backend: ``"auto"`` (default), ``"torch"`` or any registered backend name.
        solver: optional custom forward (see :data:`Solver`); replaces the backend. The backward
            comes from the declaration, or from the solver's own ``vjp`` if it has one.
        initializers: callables like ``solver`` that return starting points; the torch backend
            solves from each of them (and from zero) and keeps the lowest objective.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when problems do not converge.
        on_gradient_issue: the same for singular/indefinite KKT systems in the backward.
        verify: check a custom solver's answer (stationarity) eagerly; default ``True``.
        backward: ``"implicit"`` (declopt's implicit backward from the declaration) or
            ``"native"`` (the backend differentiates its own forward, e.g. cvxpylayers, or a
            custom solver's ``vjp`` is used); default: the backend's ``default_backward``
            attribute, ``"native"`` for a custom solver with a ``vjp``, else ``"implicit"``.
            ``layer.info.backward`` is filled by the implicit backward only.
        compile: run the derivative passes of the solver and of the backward under
            ``torch.compile`` (fused kernels; the first call of each dtype pays seconds of
            compilation, later calls are several times faster).
        degenerate: how a weakly active inequality (active, ~zero multiplier: the derivative is
            one-sided) enters the backward: ``"active"``, ``"inactive"``, ``"warn"`` (default:
            active + warning) or ``"raise"``; see :data:`declopt.implicit.DEGENERATE_CHOICES`.
        **options: passed to the backend (e.g. ``method="lbfgs"``, ``max_iter=100``), except
            ``dense_max`` (largest ``m`` with a dense KKT solve in the backward, default 128;
            CG/MINRES above).

    Calling ``layer(*tensors)``: parameter ``i`` takes shape ``(*batch_i, *shape_i)``; the batch
    shapes broadcast to ``batch``; returns one tensor per variable, shape ``(*batch, *var_shape)``,
    with the inputs' dtype and device. ``layer.info`` then describes every problem of the call.
    """

    def __init__(
        self,
        problem: cp.Problem | Program,
        parameters: Sequence[cp.Parameter] = (),
        variables: Sequence[cp.Variable] = (),
        *,
        backend: str = "auto",
        solver: Solver | None = None,
        initializers: Sequence[Solver] = (),
        on_failure: str = "warn",
        on_gradient_issue: str = "warn",
        verify: bool = True,
        backward: str | None = None,
        compile: bool = False,
        degenerate: str = "warn",
        **options: Any,
    ) -> None:
        super().__init__()
        for name, value in (("on_failure", on_failure), ("on_gradient_issue", on_gradient_issue)):
            if value not in _POLICIES:
                raise ValueError(f"{name} must be one of {_POLICIES}, got {value!r}")
        if isinstance(problem, Program):
            self.program = problem
        else:
            self.program = compile_problem(problem, parameters, variables)
        self.solver = solver
        if solver is None:
            self.backend, self.reason = backends.select(backend, self.program)
        else:
            self.backend, self.reason = None, "a custom solver was given"
        solver_vjp = callable(getattr(solver, "vjp", None))
        if backward is None:
            default = "native" if solver_vjp else "implicit"
            backward = getattr(self.backend, "default_backward", default)
        if backward not in ("implicit", "native"):
            raise ValueError(f"backward must be 'implicit' or 'native', got {backward!r}")
        if backward == "native" and not (
            solver_vjp or getattr(self.backend, "native_backward", False)
        ):
            if solver is not None:
                raise ValueError("the custom solver has no vjp method; use backward='implicit'")
            raise ValueError(
                f"backend {self.backend_name!r} cannot differentiate its own forward; "
                "use backward='implicit'"
            )
        if degenerate not in DEGENERATE_CHOICES:
            raise ValueError(f"degenerate must be one of {DEGENERATE_CHOICES}, got {degenerate!r}")
        self.degenerate = degenerate
        self.backward = backward
        self.compile = compile
        self.dense_max = options.pop("dense_max", DENSE_MAX_VARIABLES)
        if compile and self.backend is not None and self.backend.name == "torch":
            options = {**options, "compile": True}
        self.initializers = tuple(initializers)
        self.on_failure = on_failure
        self.on_gradient_issue = on_gradient_issue
        self.verify = verify
        self.options = options
        self.info: LayerInfo | None = None

    @property
    def backend_name(self) -> str:
        return "custom" if self.backend is None else self.backend.name

    def forward(self, *params: Tensor) -> tuple[Tensor, ...]:
        inputs = prepare_inputs(self.program, params)
        call = _Call(self, inputs)
        if self.backward == "native" and self.solver is not None:
            u = _DeclaredFunction.apply(call, True, *inputs.tensors)
        elif self.backward == "native":
            u = call.solve(differentiable=True)
        else:
            u = _DeclaredFunction.apply(call, False, *inputs.params.values)
        self.info = call.info
        batch = inputs.batch_shape
        return tuple(v.reshape((*batch, *v.shape[1:])) for v in self.program.unpack(u))

    def extra_repr(self) -> str:
        names = ", ".join(self.program.parameter_names)
        outs = ", ".join(self.program.variable_names)
        return f"({names}) -> ({outs}), backend={self.backend_name!r}"


class _Call:
    """Everything one call needs in its forward and backward; also holds its ``LayerInfo``."""

    def __init__(self, layer: Layer, inputs: PreparedInputs) -> None:
        self.layer = layer
        self.program = layer.program
        self.inputs = inputs
        self.info: LayerInfo | None = None

    def solve(self, differentiable: bool = False) -> Tensor:
        """The packed solutions ``(B, m)``; fills in ``self.info``.

        With ``differentiable=True`` the backend is asked for a forward that carries its own
        autograd graph (``backward="native"``).
        """
        layer, program, inputs = self.layer, self.program, self.inputs
        size = inputs.params.size
        sign = -1.0 if program.maximize else 1.0
        lam_h = lam_g = None
        if layer.solver is not None:
            u = self._pack(layer.solver(*inputs.tensors), "solver")
            objective = BatchedObjective(program.objective, inputs.params, layer.compile)

            def diagnose() -> tuple[Tensor, Tensor]:
                if program.is_constrained or program.kinks is not None:
                    state = active_set(program, inputs.params, u, None, None)
                    lam = torch.where(
                        state.mask(), state.multipliers, torch.zeros_like(state.multipliers)
                    )
                    residual, _ = kkt_residual(
                        program, inputs.params, u, lam, state.num_eq, program.kinks is not None
                    )
                    return objective.value(u), residual
                f, g = objective.value_and_grad(u)
                return f, g.abs().amax(-1)

            iterations = torch.zeros(size, dtype=torch.int64, device=u.device)
            if layer.verify:
                f, kkt = diagnose()
                converged = kkt <= torch.finfo(u.dtype).eps ** 0.5 * (1 + f.abs())
            else:
                # Trusted solver: diagnostics are computed only if someone reads them.
                converged = torch.ones(size, dtype=torch.bool, device=u.device)
                lazy = _Lazy(diagnose)
                f, kkt = lazy.first, lazy.second
        else:
            starts = [
                torch.zeros(size, program.num_variables, dtype=inputs.dtype, device=inputs.device)
            ]
            starts += [
                self._pack(init(*inputs.tensors), "initializer") for init in layer.initializers
            ]
            extra = {"differentiable": True} if differentiable else {}
            solution = layer.backend.solve(
                program, inputs.params, starts=starts, **extra, **layer.options
            )
            u, converged, iterations = solution.u, solution.converged, solution.iterations
            lam_h, lam_g = solution.eq_multipliers, solution.ineq_multipliers
            f = solution.objective.detach()
            if solution.kkt_residual is not None:
                kkt = solution.kkt_residual.detach()
            else:
                detached = BatchedParams(
                    tuple(v.detach() for v in inputs.params.values),
                    inputs.params.in_dims,
                    inputs.params.size,
                )
                objective = BatchedObjective(program.objective, detached)
                kkt = objective.grad(u.detach()).abs().amax(-1)
        batch = inputs.batch_shape

        def shaped(value: Tensor | Callable[[], Tensor], scale: float = 1.0) -> Any:
            if callable(value):
                return lambda: (scale * value()).reshape(batch)
            return (scale * value).reshape(batch)

        self.multipliers = (lam_h, lam_g)
        self.info = LayerInfo(
            backend=layer.backend_name,
            reason=layer.reason,
            converged=converged.reshape(batch),
            iterations=iterations.reshape(batch),
            objective=shaped(f, sign),
            kkt_residual=shaped(kkt),
        )
        # Unverified custom solvers skip the (dense) active-set analysis in the forward; the
        # backward does its own and reports one-sidedness in info.backward.
        if program.is_constrained and (layer.solver is None or layer.verify):
            self._constraint_info(u.detach(), lam_h, lam_g)
        self._report_failures()
        return u

    def _constraint_info(self, u: Tensor, lam_h: Tensor | None, lam_g: Tensor | None) -> None:
        """Active set, multipliers and one-sidedness of the solutions, into ``self.info``."""
        inputs = self.inputs
        detached = BatchedParams(
            tuple(v.detach() for v in inputs.params.values),
            inputs.params.in_dims,
            inputs.params.size,
        )
        with torch.no_grad():
            state = active_set(self.program, detached, u, lam_h, lam_g)
        batch = inputs.batch_shape
        p, q = state.num_eq, state.active.shape[-1]
        lam_h, lam_g = state.multipliers[:, :p], state.multipliers[:, p : p + q]
        self.multipliers = (lam_h, lam_g)
        info = self.info
        info.active = state.active.reshape(*batch, q)
        info.one_sided = state.weakly.any(-1).reshape(batch)
        info.eq_multipliers = lam_h.reshape(*batch, p)
        info.ineq_multipliers = lam_g.reshape(*batch, q)

    def _pack(self, values: Sequence[Tensor] | Tensor, what: str) -> Tensor:
        """Solver/initializer output ``(*batch, *shape)`` (broadcastable) -> ``(B, m)``."""
        program, inputs = self.program, self.inputs
        if isinstance(values, Tensor):
            values = (values,)
        if len(values) != len(program.variable_shapes):
            raise SolverError(
                f"the {what} returned {len(values)} tensor(s); the layer has "
                f"{len(program.variable_shapes)} variable(s) ({', '.join(program.variable_names)})"
            )
        batch = inputs.batch_shape
        flat = []
        for name, shape, value in zip(program.variable_names, program.variable_shapes, values):
            value = torch.as_tensor(value).detach().to(dtype=inputs.dtype, device=inputs.device)
            try:
                value = value.expand((*batch, *shape))
            except RuntimeError:
                raise SolverError(
                    f"the {what} returned shape {tuple(value.shape)} for variable {name!r}; "
                    f"expected {(*batch, *shape)}"
                ) from None
            flat.append(value.reshape(inputs.params.size, -1))
        return torch.cat(flat, dim=-1)

    def _report_failures(self) -> None:
        info, policy = self.info, self.layer.on_failure
        if policy == "ignore" or info.all_converged:
            return
        message = (
            f"{int((~info.converged).sum())} of {info.converged.numel()} problem(s) did not "
            f"converge (backend {info.backend!r}); first batch indices: "
            f"{_first_indices(~info.converged)}; max KKT residual "
            f"{float(info.kkt_residual[~info.converged].max()):.3g}. See layer.info; raise "
            "max_iter=, give initializers=, or check that the problem is feasible and bounded."
        )
        _escalate(policy, message, NonConvergenceWarning, stacklevel=6)

    def backward(
        self,
        values: tuple[Tensor, ...],
        u: Tensor,
        grad_u: Tensor,
        wanted: Sequence[bool] | None = None,
    ) -> tuple[Tensor | None, ...]:
        """Implicit gradients of the parameters; those not ``wanted`` may be ``None``."""
        # The derivative passes are torch.func transforms: they need no autograd graph of their
        # own, and compiled code is both faster and more reliable on detached inputs.
        values = tuple(v.detach() for v in values)
        params = BatchedParams(values, self.inputs.params.in_dims, self.inputs.params.size)
        dense_max = self.layer.dense_max
        with torch.no_grad():
            lam_h, lam_g = getattr(self, "multipliers", (None, None))
            grads, report = implicit_vjp(
                self.program,
                params,
                u,
                grad_u,
                eq_multipliers=lam_h,
                ineq_multipliers=lam_g,
                degenerate=self.layer.degenerate,
                dense_max=dense_max,
                compile=self.layer.compile,
                wanted=wanted,
            )
        batch = self.inputs.batch_shape
        linear = report.linear
        info = BackwardInfo(
            method=linear.method,
            singular=linear.singular.reshape(batch),
            second_order_ok=linear.second_order_ok.reshape(batch),
            residual=linear.residual.reshape(batch),
            one_sided=report.one_sided.reshape(batch),
            sign_violation=report.sign_violation.reshape(batch),
            multiplier_residual=report.multiplier_residual.reshape(batch),
        )
        if self.info is not None:
            self.info.backward = info
        self._report_gradient_issues(info)
        return grads

    def solver_vjp(self, tensors: tuple[Tensor, ...], u: Tensor, grad_u: Tensor) -> list:
        """Gradients of the parameters from the custom solver's ``vjp`` (see :data:`Solver`)."""
        batch = self.inputs.batch_shape
        outputs = tuple(v.reshape(*batch, *v.shape[1:]) for v in self.program.unpack(u))
        grads_out = tuple(v.reshape(*batch, *v.shape[1:]) for v in self.program.unpack(grad_u))
        grads = tuple(self.layer.solver.vjp(tensors, outputs, grads_out))
        if len(grads) != len(tensors):
            raise SolverError(
                f"the custom solver's vjp returned {len(grads)} gradient(s); the layer has "
                f"{len(tensors)} parameter(s) ({', '.join(self.program.parameter_names)})"
            )
        result = []
        for name, grad, tensor in zip(self.program.parameter_names, grads, tensors):
            if grad is not None and grad.shape != tensor.shape:
                try:
                    grad = grad.sum_to_size(tensor.shape)
                except RuntimeError:
                    raise SolverError(
                        f"the custom solver's vjp returned shape {tuple(grad.shape)} for "
                        f"parameter {name!r}; expected {tuple(tensor.shape)} or its broadcast "
                        f"{(*batch, *tensor.shape[tensor.dim() - len(batch) :])}"
                    ) from None
            result.append(grad)
        return result

    def _report_gradient_issues(self, info: BackwardInfo) -> None:
        if bool(info.one_sided.any()) and self.layer.degenerate in ("warn", "raise"):
            message = (
                f"implicit backward: {int(info.one_sided.sum())} problem(s) have a weakly active "
                f"inequality (active with a ~zero multiplier), so the derivative is one-sided; "
                f"first batch indices: {_first_indices(info.one_sided)}. It was computed treating "
                "them as active; choose the side with degenerate='active' or 'inactive' (see "
                "declopt.implicit.DEGENERATE_CHOICES)."
            )
            policy = "raise" if self.layer.degenerate == "raise" else "warn"
            _escalate(policy, message, GradientWarning, stacklevel=4)
        policy = self.layer.on_gradient_issue
        bad = info.singular | ~info.second_order_ok | info.sign_violation
        if policy == "ignore" or not bool(bad.any()):
            return
        message = (
            f"implicit backward: {int(info.singular.sum())} singular and "
            f"{int((~info.second_order_ok).sum())} not-strict-minimum KKT system(s) and "
            f"{int(info.sign_violation.sum())} wrong-sign multiplier(s) among "
            f"{bad.numel()} problem(s); first batch indices: {_first_indices(bad)}. Singular "
            "systems use the minimum-norm least-squares gradient. See layer.info.backward."
        )
        _escalate(policy, message, GradientWarning, stacklevel=4)


def _first_indices(mask: Tensor, count: int = 5) -> list[tuple[int, ...]]:
    """Batch indices of the first ``count`` True entries of ``mask``."""
    return [tuple(int(i) for i in row) for row in mask.nonzero()[:count]]


def _escalate(policy: str, message: str, category: type[Warning], stacklevel: int) -> None:
    """Raise :class:`SolverError` (``policy="raise"``) or warn with ``category``."""
    if policy == "raise":
        raise SolverError(message)
    warnings.warn(message, category, stacklevel=stacklevel)


class _Lazy:
    """Computes a pair once, on first access of either half."""

    def __init__(self, compute: Callable[[], tuple[Tensor, Tensor]]) -> None:
        self._compute = compute
        self._value: tuple[Tensor, Tensor] | None = None

    def _get(self) -> tuple[Tensor, Tensor]:
        if self._value is None:
            with torch.no_grad():
                self._value = self._compute()
        return self._value

    def first(self) -> Tensor:
        return self._get()[0]

    def second(self) -> Tensor:
        return self._get()[1]


class _DeclaredFunction(torch.autograd.Function):
    """Forward: the solver (no graph). Backward: the implicit function theorem, or the custom
    solver's own ``vjp`` when ``solver_vjp`` (then the inputs are the tensors the layer was called
    with, not the batched parameters)."""

    @staticmethod
    def forward(ctx: Any, call: _Call, solver_vjp: bool, *inputs: Tensor) -> Tensor:
        u = call.solve()
        ctx.call, ctx.solver_vjp = call, solver_vjp
        ctx.save_for_backward(u, *inputs)
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor | None, ...]:
        u, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if ctx.solver_vjp:
            grads = ctx.call.solver_vjp(tuple(inputs), u, grad_u)
        else:
            grads = ctx.call.backward(tuple(inputs), u, grad_u, needs)
        return (None, None, *(g if need else None for g, need in zip(grads, needs)))
