"""``dl.Layer``: a declared optimisation problem as a differentiable ``nn.Module``.

Same signature as ``cvxpylayers.torch.CvxpyLayer(problem, parameters, variables)``: calling the
layer with one tensor per parameter returns a tuple with one tensor per variable. The forward is
solved by a backend (or a user's solver); the backward always comes from the declaration through
the implicit function theorem (:mod:`declopt.implicit`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import cvxpy as cp
import torch
from torch import Tensor, nn

from declopt import backends
from declopt.derivatives import BatchedObjective
from declopt.diagnostics import BackwardInfo, LayerInfo, escalate, first_indices, status_summary
from declopt.errors import GradientWarning, NonConvergenceWarning, SolverError
from declopt.frontend import compile_layer
from declopt.implicit import implicit_jvp, implicit_vjp
from declopt.inputs import PreparedInputs, prepare_inputs
from declopt.kkt.point import KKTPoint, kkt_point
from declopt.kkt.tolerances import (
    Tolerances,
    exact_tolerances,
    gradient_scale,
    problem_scale,
    table,
)
from declopt.linalg import LinearSolver
from declopt.policies import (
    Backward,
    Degenerate,
    Implicit,
    Native,
    SolverVJP,
    backward_strategy,
    check_report,
    degenerate_policy,
)
from declopt.program import BatchedParams, Program

Solver = Callable[..., Sequence[Tensor]]
"""A custom forward: called with the parameter tensors (batch dims included, detached), returns one
tensor per variable of shape ``(*batch, *variable_shape)``.

A solver whose answers are exact up to rounding (a closed form, a 1-D solver run to a few ulps)
says so with an attribute ``exact = True``: its solutions' kinks and bounds are then decided within
:data:`~declopt.kkt.tolerances.EXACT_ULPS` ulps of the problem's scale
(:func:`declopt.kkt.tolerances.exact_tolerances`) instead of the band sized for iterative solvers,
so an entry that merely lies close to a tie keeps its own derivative.

It may also bring its own backward, a method ``solver.vjp(params, outputs, grads)``: ``params`` the
tensors it was called with (detached), ``outputs`` what it returned and ``grads`` the upstream
gradients, one per variable, shaped ``(*batch, *variable_shape)``; it returns one gradient (or
``None``) per parameter, shaped like that parameter or like its broadcast ``(*batch, *shape)``
(the layer sums over broadcast dims). A layer uses it with ``backward="native"`` (or
``dl.SolverVJP()``), the default for a solver that has one; ``backward="implicit"`` differentiates
the declaration instead.
"""


class Layer(nn.Module):
    """A differentiable layer whose output solves a declared optimisation problem.

    Args:
        problem: the declaration, a ``cvxpy.Problem`` (convex or not: non-DCP expressions are
            fine) or a :class:`~declopt.program.Program` of torch functions.
        parameters: the ``cp.Parameter`` inputs, in the order the layer is called with; must be
            exactly the parameters of ``problem``.
        variables: the ``cp.Variable`` outputs, in the order they are returned: some or all of
            the problem's variables (the others are solved for and dropped) and dual variables
            of its constraints (``constraint.dual_variables[0]``, CVXPY's sign: ``>= 0`` for
            ``<=`` constraints; returned by the cvxpylayers backend, with its gradients).
        backend: ``"auto"`` (default; or ``dl.backends.Auto(prefer=...)``), ``"torch"`` or any
            registered backend name.
        solver: optional custom forward (see :data:`Solver`); replaces the backend. The backward
            comes from the declaration, or from the solver's own ``vjp`` if it has one. A string
            (``"SCS"``, ``cp.CLARABEL``, ``"ECOS"``; or a cvxpylayers solver such as
            ``"MOREAU"``) is a solver *name*: the cvxpylayers backend solves with it.
        initializers: callables like ``solver`` that return starting points; the torch backend
            solves from each of them (and from zero) and keeps the lowest objective.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when problems do not converge.
        on_gradient_issue: the same for singular/indefinite KKT systems in the backward.
        verify: check a custom solver's answer (KKT conditions) eagerly; default ``True``.
        backward: a strategy (:class:`~declopt.policies.Implicit`,
            :class:`~declopt.policies.Native`, :class:`~declopt.policies.SolverVJP`) or its name,
            ``"implicit"`` or ``"native"`` (the backend's own backward, or a custom solver's
            ``vjp``); default: the backend's ``default_backward`` attribute, ``"native"`` for a
            custom solver with a ``vjp``, else ``"implicit"``. ``layer.info.backward`` is filled
            by the implicit backward only.
        degenerate: a :class:`~declopt.policies.Degenerate` (the side of the one-sided derivative
            at a weakly active inequality, and whether to warn or raise), or ``"warn"``
            (default: active side, warning), ``"raise"``, ``"active"``, ``"inactive"``.
        linear_solver: a :class:`~declopt.linalg.LinearSolver` for the implicit backward's KKT
            systems and the torch backend's polish and finish (default: dense up to 128
            variables, Krylov above); ``dense_max=`` is sugar for its threshold.
        compile: run the derivative passes of the solver and of the backward under
            ``torch.compile`` (fused kernels; the first call of each dtype pays seconds of
            compilation, later calls are several times faster). Stored as ``layer.compiled``
            (``nn.Module.compile`` stays the module method).
        **options: passed to the backend (e.g. ``method="lbfgs"``, ``max_iter=100``);
            ``gp=True`` declares a log-log convex program (CVXPY's DGP; compiled through its
            log-space reduction, see :func:`declopt.frontend.compile_log_log`: every backend
            that takes a compiled program solves it, cvxpylayers the declaration itself).

    Calling ``layer(*tensors, solver_args=None, warm_start=False)``: ``solver_args`` (a dict) is
    merged over the layer's ``solver_args=`` option for this call (backends that take it:
    cvxpylayers); ``warm_start=True`` starts every problem from the previous call's solution
    instead of zero (backends that take starting points: torch, scipy; ignored when the number of
    problems changed).
    Parameter ``i`` takes shape ``(*batch_i, *shape_i)``; the batch
    shapes broadcast to ``batch``; returns one tensor per variable, shape ``(*batch, *var_shape)``,
    with the inputs' dtype and device. ``layer.info`` then describes every problem of the call.
    """

    def __init__(
        self,
        problem: cp.Problem | Program,
        parameters: Sequence[cp.Parameter] = (),
        variables: Sequence[cp.Variable] = (),
        *,
        backend: str | backends.Auto = "auto",
        solver: Solver | str | None = None,
        initializers: Sequence[Solver] = (),
        on_failure: str = "warn",
        on_gradient_issue: str = "warn",
        verify: bool = True,
        backward: str | Backward | None = None,
        degenerate: str | Degenerate = "warn",
        linear_solver: LinearSolver | None = None,
        compile: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self.on_failure = check_report("on_failure", on_failure)
        self.on_gradient_issue = check_report("on_gradient_issue", on_gradient_issue)
        solver, backend = _solver_name(solver, backend, options)
        self._declaration: tuple[Any, ...] | None = None
        if isinstance(problem, Program):
            self.program = problem
            self.num_outputs = len(problem.variable_shapes)
        else:
            gp = bool(options.pop("gp", False))
            self._declaration = (problem, tuple(parameters), tuple(variables), gp)
            self.program = compile_layer(problem, parameters, variables, gp=gp)
            self.num_outputs = len(variables)  # the compiled program may solve for more
        if solver is not None and not self.program.has_functions:
            raise self.program.frontend_error  # a custom forward is checked on the declaration
        self.solver = solver
        if solver is None:
            self.backend, self.reason = backends.select(backend, self.program)
        else:
            self.backend, self.reason = None, "a custom solver was given"
        has_vjp = callable(getattr(solver, "vjp", None))
        if backward is None:
            default = getattr(self.backend, "default_backward", "implicit")
            backward = "native" if has_vjp else default
        strategy = backward_strategy(backward, custom_solver=solver is not None)
        if isinstance(strategy, SolverVJP) and not has_vjp:
            raise ValueError("the custom solver has no vjp method; use backward='implicit'")
        if isinstance(strategy, Native) and not getattr(self.backend, "native_backward", False):
            raise ValueError(
                f"backend {self.backend_name!r} cannot differentiate its own forward; "
                "use backward='implicit'"
            )
        _check_source_only(self.program, strategy)
        self.backward_strategy = strategy
        self.degenerate = degenerate_policy(degenerate)
        dense_max = options.pop("dense_max", None)
        if linear_solver is None:
            linear_solver = LinearSolver() if dense_max is None else LinearSolver("auto", dense_max)
        elif dense_max is not None:
            raise ValueError("give either linear_solver= or dense_max=, not both")
        self.linear_solver = linear_solver
        self.compiled = bool(compile)
        accepted = () if self.backend is None else backends.option_names(self.backend) or ()
        if "compile" in accepted:
            options.setdefault("compile", self.compiled)
        if "linear_solver" in accepted:
            options.setdefault("linear_solver", linear_solver)
        if self.backend is not None:
            backends.check_options(self.backend, options)
        elif options:
            raise ValueError(
                f"options {', '.join(map(repr, sorted(options)))} are for a backend; a layer with "
                "a custom solver takes none"
            )
        self.initializers = tuple(initializers)
        self.verify = verify
        self.options = options
        self.info: LayerInfo | None = None
        self._last_solution: Tensor | None = None  # (B, m), the start of warm_start=True

    @property
    def backend_name(self) -> str:
        return "custom" if self.backend is None else self.backend.name

    def __getstate__(self) -> dict[str, Any]:
        """Pickle / ``deepcopy`` / ``torch.save``: a CVXPY declaration travels as itself and is
        compiled again on load (its torch functions are closures); the backend travels by its
        registered name; ``info`` (the last call's diagnostics) stays behind."""
        state = dict(self.__dict__)
        if self._declaration is not None:
            state["program"] = None
        if self.backend is not None:
            state["backend"] = self.backend.name
        state["info"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Layer:
        """A deep copy shares the CVXPY declaration (copying it would give its leaves new ids,
        which CVXPY's compiled caches do not follow) and compiles it again."""
        if self._declaration is not None:
            problem, parameters, variables, _ = self._declaration
            for obj in (self._declaration, problem, *parameters, *variables):
                memo[id(obj)] = obj
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._declaration is not None and self.program is None:
            problem, parameters, variables, gp = self._declaration
            # A copied problem keeps CVXPY's compilation cache, keyed by the original leaves' ids.
            cache = getattr(problem, "_cache", None)
            if cache is not None and hasattr(cache, "invalidate"):
                cache.invalidate()
            self.program = compile_layer(problem, parameters, variables, gp=gp)
        if isinstance(self.backend, str):
            self.backend = backends.get(self.backend)

    @property
    def backward(self) -> str:
        """The backward strategy's name: ``"implicit"`` or ``"native"``."""
        return "implicit" if isinstance(self.backward_strategy, Implicit) else "native"

    # Under torch.compile(model) the layer is one graph break: Dynamo cannot trace solvers with
    # data-dependent control flow (nor CVXPY); the layer's own compile=True still applies.
    @torch.compiler.disable
    def forward(
        self, *params: Tensor, solver_args: dict[str, Any] | None = None, warm_start: bool = False
    ) -> tuple[Tensor, ...]:
        options = _call_options(self, solver_args)
        if warm_start:
            if not getattr(self.backend, "takes_starts", False):
                raise ValueError(
                    f"warm_start=True needs a backend that starts from given points (torch, "
                    f"scipy); backend {self.backend_name!r} starts from its own"
                )
            options = {**options, _WARM_START: True}
        if isinstance(self.backward_strategy, Native):
            if torch._C._are_functorch_transforms_active():
                raise NotImplementedError(
                    f"torch.func transforms (vmap, grad, jacrev, jacfwd, jvp) through backend "
                    f"{self.backend_name!r} with its own (native) backward are not supported; "
                    "declare the layer with backward='implicit' (declopt's implicit backward on "
                    "that backend's solution), which supports them"
                )
            # The backend's own backward has no graph of its own: differentiating its gradients
            # again must raise, not give None.
            params = tuple(
                _SecondOrderGuard.apply(p) if isinstance(p, Tensor) and p.requires_grad else p
                for p in params
            )
            inputs = prepare_inputs(self.program, params)
            call = _Call(self, inputs, options)
            if inputs.params.size == 0:  # nothing to solve
                call.empty()
                m = self.program.num_variables
                u = torch.zeros(0, m, dtype=inputs.dtype, device=inputs.device)
            else:
                u = call.solve(differentiable=True)
            outputs = call.outputs(_on_the_graph(u, inputs.tensors))
        else:
            *outputs, call = _LayerFunction.apply(self, options, *params)
        self.info = call.info
        self.info.gradient = _gradient_name(self)
        # The solved variables become the outputs here, on the autograd graph (a log-log
        # program's exp): every backward differentiates the solved variables themselves.
        return self.program.to_outputs(outputs[: self.num_outputs])

    def extra_repr(self) -> str:
        names = ", ".join(self.program.parameter_names)
        outs = ", ".join(self.program.variable_names)
        return f"({names}) -> ({outs}), backend={self.backend_name!r}"


class _Call:
    """Everything one call needs in its forward and backward; also holds its ``LayerInfo`` and
    the KKT point of its solutions (shared by the diagnostics and the backward)."""

    def __init__(
        self, layer: Layer, inputs: PreparedInputs, options: dict[str, Any] | None = None
    ) -> None:
        self.layer = layer
        options = dict(layer.options if options is None else options)
        self.warm_start = bool(options.pop(_WARM_START, False))
        self.options = options
        self.program = layer.program
        self.inputs = inputs
        self.info: LayerInfo | None = None
        self.u: Tensor | None = None
        self.status: Tensor | None = None
        self.point: KKTPoint | None = None
        self.multipliers: tuple[Tensor | None, Tensor | None] = (None, None)
        params = inputs.params
        self.detached = BatchedParams(
            tuple(v.detach() for v in params.values), params.in_dims, params.size
        )
        # A custom solver exact up to rounding (``solver.exact``) has its kinks and bounds decided
        # within a few ulps, not the band sized for iterative solvers.
        exact = getattr(layer.solver, "exact", False) is True
        self.tolerances: Tolerances | None = exact_tolerances(inputs.dtype) if exact else None

    def solve(self, differentiable: bool = False) -> Tensor:
        """The packed solutions ``(B, m)``; fills in ``self.info`` and ``self.point``.

        With ``differentiable=True`` the backend is asked for a forward that carries its own
        autograd graph (``backward="native"``).
        """
        layer, program = self.layer, self.program
        if layer.solver is not None:
            u, converged, iterations, f, kkt = self._custom_solve()
        else:
            u, converged, iterations, f, kkt = self._backend_solve(differentiable)
        batch = self.inputs.batch_shape
        sign = -1.0 if program.maximize else 1.0

        def shaped(
            value: Tensor | Callable[[], Tensor], scale: float = 1.0, exp: bool = False
        ) -> Any:
            def done(t: Tensor) -> Tensor:
                t = scale * t
                return (t.exp() if exp else t).reshape(batch)

            if callable(value):
                return lambda: done(value())
            return done(value)

        self.info = LayerInfo(
            backend=layer.backend_name,
            reason=layer.reason,
            converged=converged.reshape(batch),
            iterations=iterations.reshape(batch),
            # A log-log program's objective is the log of the declared one.
            objective=shaped(f, sign, exp=program.log_log),
            kkt_residual=shaped(kkt),
            status=None if self.status is None else self.status.reshape(batch),
        )
        if program.is_constrained and self.point is not None:
            self._constraint_info(self.point)
        self._report_failures()
        return u

    def empty(self) -> None:
        """``self.info`` for a call with no problems (an empty batch): nothing to solve."""
        batch = self.inputs.batch_shape
        flags = torch.zeros(batch, dtype=torch.bool, device=self.inputs.device)
        values = torch.zeros(batch, dtype=self.inputs.dtype, device=self.inputs.device)
        self.info = LayerInfo(
            backend=self.layer.backend_name,
            reason=self.layer.reason,
            converged=flags,
            iterations=torch.zeros(batch, dtype=torch.int64, device=self.inputs.device),
            objective=values,
            kkt_residual=values.clone(),
        )

    def _backend_solve(self, differentiable: bool) -> tuple[Tensor, ...]:
        layer, program, inputs = self.layer, self.program, self.inputs
        size = inputs.params.size
        first = torch.zeros(size, program.num_variables, dtype=inputs.dtype, device=inputs.device)
        previous = getattr(layer, "_last_solution", None)
        if self.warm_start and previous is not None and previous.shape == first.shape:
            first = previous.to(dtype=inputs.dtype, device=inputs.device)
        starts = [first]
        starts += [self._pack(init(*inputs.tensors), "initializer") for init in layer.initializers]
        extra = {"differentiable": True} if differentiable else {}
        solution = layer.backend.solve(
            program, inputs.params, starts=starts, **extra, **self.options
        )
        u = solution.u
        layer._last_solution = u.detach()
        self.status = solution.status
        lam_h, lam_g = solution.eq_multipliers, solution.ineq_multipliers
        self.multipliers = (lam_h, lam_g)
        point = solution.point
        if point is None and (program.is_constrained or program.kinks is not None):
            with torch.no_grad():
                point = kkt_point(
                    program, self.detached, u.detach(), eq_multipliers=lam_h, ineq_multipliers=lam_g
                )
        self.point = point
        if solution.kkt_residual is not None:
            kkt = solution.kkt_residual.detach()
        elif point is not None:
            kkt = point.residual
        else:
            objective = BatchedObjective.of(program, self.detached)
            kkt = objective.grad(u.detach()).abs().amax(-1)
        return u, solution.converged, solution.iterations, solution.objective.detach(), kkt

    def _custom_solve(self) -> tuple[Any, ...]:
        layer, inputs = self.layer, self.inputs
        size = inputs.params.size
        u = self._pack(layer.solver(*inputs.tensors), "solver")
        iterations = torch.zeros(size, dtype=torch.int64, device=u.device)
        if layer.verify:
            f, kkt, converged = self._verify(u)
            return u, converged, iterations, f, kkt
        # Trusted solver: diagnostics are computed only if someone reads them.
        converged = torch.ones(size, dtype=torch.bool, device=u.device)
        lazy = _Lazy(lambda: self._verify(u)[:2])
        return u, converged, iterations, lazy.first, lazy.second

    def _verify(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(objective, kkt_residual, converged)`` of a custom solver's answer: the KKT point
        with least-squares multipliers (kept for the backward) where there are constraints or
        kinks; else stationarity relative to the curvature along ``u``."""
        program, params = self.program, self.detached
        with torch.no_grad():
            if program.is_constrained or program.kinks is not None:
                self.point = kkt_point(program, params, u, tolerances=self.tolerances)
                return self.point.objective, self.point.residual, self.point.converged
            objective = BatchedObjective.of(program, params, self.layer.compiled)
            f, g = objective.value_and_grad(u)
            scale = problem_scale(params, u)
            # Unconstrained: |D_u f| in the unit of the curvature times the scale (a gradient
            # that rounding alone leaves at an exact optimum where f = 0 must still pass).
            probe = torch.ones_like(u) * scale.unsqueeze(-1)
            curvature = objective.hvp(u, probe).abs().amax(-1)
            unit = torch.maximum(gradient_scale(f, g, scale), curvature)
            stationarity = g.abs().amax(-1)
            converged = stationarity <= table(u.dtype).converged * unit
            return f, stationarity, converged & torch.isfinite(f)

    def _constraint_info(self, point: KKTPoint) -> None:
        """Active set, multipliers and one-sidedness of the solutions, into ``self.info``."""
        batch = self.inputs.batch_shape
        p, q = point.sizes.p, point.sizes.q
        info = self.info
        info.active = point.active.reshape(*batch, q)
        info.one_sided = point.weakly_active.any(-1).reshape(batch)
        info.eq_multipliers = point.eq_multipliers.reshape(*batch, p)
        info.ineq_multipliers = point.ineq_multipliers.reshape(*batch, q)

    def _pack(self, values: Sequence[Tensor] | Tensor, what: str) -> Tensor:
        """Solver/initializer output ``(*batch, *shape)`` (broadcastable, in output space:
        :meth:`Program.from_outputs` maps it to the solved variables) -> ``(B, m)``."""
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
            (value,) = program.from_outputs((value,))
            flat.append(value.reshape(inputs.params.size, -1))
        return torch.cat(flat, dim=-1)

    def _report_failures(self) -> None:
        info, policy = self.info, self.layer.on_failure
        if policy == "ignore" or info.all_converged:
            return
        advice = getattr(self.layer.backend, "advice", None)
        after = (
            "The other problems are unaffected; layer.info.status has every problem's status."
            if policy == "warn"
            else "on_failure='warn' returns the batch instead, with every problem's status in "
            "layer.info.status."
        )
        message = (
            f"{int((~info.converged).sum())} of {info.converged.numel()} problem(s) did not "
            f"converge (backend {info.backend!r}); first batch indices: "
            f"{first_indices(~info.converged)}: {status_summary(info.status, advice)}; max KKT "
            f"residual {float(info.kkt_residual[~info.converged].max()):.3g}. {after}"
        )
        escalate(policy, message, NonConvergenceWarning, stacklevel=6)

    def outputs(self, u: Tensor) -> tuple[Tensor, ...]:
        """The packed solutions ``(B, m)`` as one tensor per variable, ``(*batch, *shape)``."""
        batch = self.inputs.batch_shape
        return tuple(v.reshape((*batch, *v.shape[1:])) for v in self.program.unpack(u))

    def _packed(self, per_variable: Sequence[Tensor | None], like: Tensor) -> Tensor:
        """One tensor per variable ``(*batch, *shape)`` (``None``: zero) as ``(B, m)``."""
        size = self.inputs.params.size
        parts = [
            like.new_zeros(size, math.prod(shape)) if t is None else t.reshape(size, -1)
            for t, shape in zip(per_variable, self.program.variable_shapes)
        ]
        return torch.cat(parts, -1)

    def vjp(
        self,
        tensors: Sequence[Tensor],
        outputs: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        wanted: Sequence[bool],
        per_problem: Sequence[bool] | None = None,
    ) -> tuple[Tensor | None, ...]:
        """Implicit gradients of the call's (converted) parameter tensors (``per_problem``: those
        come back ``(*batch, *shape)``, one gradient per problem, rather than summed).

        Under ``create_graph=True`` (grad mode on in the backward) the VJP is built from
        differentiable operations of the parameters and of the solutions, which carry their own
        graph back through this layer: second derivatives follow (the KKT point, multipliers
        included, is recomputed on that graph). Otherwise it runs detached, on the forward's
        KKT point.
        """
        differentiable = torch.is_grad_enabled()
        if not differentiable:
            tensors = tuple(t.detach() for t in tensors)
            outputs = tuple(t.detach() for t in outputs)
        params = self.inputs.rebatch(self.program, tensors, per_problem)
        u = self._packed(outputs, outputs[0])
        grad_u = self._packed(grads, u)
        layer = self.layer
        strategy = layer.backward_strategy
        linear_solver = getattr(strategy, "linear_solver", None) or layer.linear_solver
        lam_h, lam_g = (None, None) if differentiable else self.multipliers
        with torch.set_grad_enabled(differentiable):
            grads_flat, report = implicit_vjp(
                self.program,
                params,
                u,
                grad_u,
                point=None if differentiable else self.point,
                eq_multipliers=lam_h,
                ineq_multipliers=lam_g,
                side=layer.degenerate.side,
                linear_solver=linear_solver,
                compile=layer.compiled and not differentiable,
                wanted=tuple(wanted),
                tolerances=self.tolerances,
            )
        self._backward_info(report)
        self._report_non_finite(grads_flat, params)
        return self.inputs.gradients(self.program, grads_flat, per_problem)

    def _report_non_finite(self, grads: Sequence[Tensor | None], params: BatchedParams) -> None:
        """A ``GradientWarning`` (per ``on_gradient_issue``) naming the problems whose implicit
        gradient has a NaN or an infinity: derivatives that overflowed (an entry whose square
        exceeds the dtype's range) or a system beyond repair; never a silent NaN."""
        if self.layer.on_gradient_issue == "ignore" or any(
            g is not None and _under_vmap(g) for g in grads
        ):
            return  # under vmap a per-problem test is data-dependent control flow
        bad = torch.zeros(params.size, dtype=torch.bool, device=self.inputs.device)
        shared = False
        for grad, dim in zip(grads, params.in_dims):
            # One reduction decides the common case (a huge finite sum that overflows is then
            # looked at entrywise, and passes).
            if grad is None or bool(torch.isfinite(grad.sum())):
                continue
            if dim == 0:
                bad = bad | ~torch.isfinite(grad.reshape(params.size, -1)).all(-1)
            else:
                shared = shared or not bool(torch.isfinite(grad).all())
        if not (shared or bool(bad.any())):
            return
        where = (
            f"{int(bad.sum())} problem(s), first batch indices "
            f"{first_indices(bad.reshape(self.inputs.batch_shape))}"
            if bool(bad.any())
            else "a parameter shared by the batch"
        )
        message = (
            f"implicit backward: the gradient is not finite (NaN or Inf) for {where}: its "
            "derivatives overflowed (data beyond the dtype's range when squared) or the KKT "
            "system could not be solved; rescale the data or use float64. See layer.info.backward."
        )
        escalate(self.layer.on_gradient_issue, message, GradientWarning, stacklevel=5)

    def jvp(self, tensors: Sequence[Tensor], tangents: Sequence[Tensor | None]) -> tuple:
        """Forward-mode tangents of the outputs (the KKT solve of the backward, transposed)."""
        params = self.inputs.params
        flat_tangents = self.inputs.rebatch(
            self.program,
            [torch.zeros_like(t) if d is None else d for t, d in zip(tensors, tangents)],
        ).values
        u = self.u
        du = implicit_jvp(
            self.program,
            params,
            u,
            flat_tangents,
            point=self.point,
            side=self.layer.degenerate.side,
            linear_solver=getattr(self.layer.backward_strategy, "linear_solver", None)
            or self.layer.linear_solver,
            tolerances=self.tolerances,
        )
        return self.outputs(du)

    def _backward_info(self, report: Any) -> None:
        batch = self.inputs.batch_shape
        linear = report.linear

        def shaped(t: Tensor) -> Tensor:
            return t.detach().reshape(batch)

        info = BackwardInfo(
            method=linear.method,
            singular=shaped(linear.singular),
            second_order_ok=shaped(linear.second_order_ok),
            residual=shaped(linear.residual),
            one_sided=shaped(report.one_sided),
            sign_violation=shaped(report.sign_violation),
            multiplier_residual=shaped(report.multiplier_residual),
        )
        if self.info is not None:
            self.info.backward = info
        self._report_gradient_issues(info)

    def solver_vjp(
        self, tensors: Sequence[Tensor], outputs: Sequence[Tensor], grads: Sequence[Tensor | None]
    ) -> tuple[Tensor | None, ...]:
        """Gradients of the parameters from the custom solver's ``vjp`` (see :data:`Solver`)."""
        batch = self.inputs.batch_shape
        grads_out = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads))
        tensors = tuple(t.detach() for t in tensors)
        outputs = tuple(o.detach() for o in outputs)
        if self.program.output_transform is not None:
            # The solver works in output space: its answers and the gradients of them (the
            # gradient of u = inverse(output) pulled back to the output).
            outputs = self.program.to_outputs(outputs)
            inverse = self.program.output_transform.inverse
            grads_out = tuple(
                torch.func.vjp(inverse, o)[1](g)[0] for o, g in zip(outputs, grads_out)
            )
        result = tuple(self.layer.solver.vjp(tensors, outputs, grads_out))
        if len(result) != len(tensors):
            raise SolverError(
                f"the custom solver's vjp returned {len(result)} gradient(s); the layer has "
                f"{len(tensors)} parameter(s) ({', '.join(self.program.parameter_names)})"
            )
        shaped = []
        for name, grad, tensor in zip(self.program.parameter_names, result, tensors):
            if grad is not None and grad.shape != tensor.shape:
                try:
                    grad = grad.sum_to_size(tensor.shape)
                except RuntimeError:
                    raise SolverError(
                        f"the custom solver's vjp returned shape {tuple(grad.shape)} for "
                        f"parameter {name!r}; expected {tuple(tensor.shape)} or its broadcast "
                        f"{(*batch, *tensor.shape[tensor.dim() - len(batch) :])}"
                    ) from None
            shaped.append(grad)
        return tuple(shaped)

    def _report_gradient_issues(self, info: BackwardInfo) -> None:
        degenerate = self.layer.degenerate
        if bool(info.one_sided.any()) and degenerate.report != "ignore":
            message = (
                f"implicit backward: {int(info.one_sided.sum())} problem(s) have a weakly active "
                f"inequality (active with a ~zero multiplier), so the derivative is one-sided; "
                f"first batch indices: {first_indices(info.one_sided)}. It was computed treating "
                f"them as {degenerate.side}; choose the side with degenerate='active' or "
                "'inactive', or dl.Degenerate(side=..., report='ignore') (see "
                "declopt.implicit.SIDES)."
            )
            escalate(degenerate.report, message, GradientWarning, stacklevel=4)
        policy = self.layer.on_gradient_issue
        bad = info.singular | ~info.second_order_ok | info.sign_violation
        if policy == "ignore" or not bool(bad.any()):
            return
        message = (
            f"implicit backward: {int(info.singular.sum())} singular and "
            f"{int((~info.second_order_ok).sum())} not-strict-minimum KKT system(s) and "
            f"{int(info.sign_violation.sum())} wrong-sign multiplier(s) among "
            f"{bad.numel()} problem(s); first batch indices: {first_indices(bad)}. Singular "
            "systems use the minimum-norm least-squares gradient. See layer.info.backward."
        )
        escalate(policy, message, GradientWarning, stacklevel=4)


def _under_vmap(t: Tensor) -> bool:
    """Whether ``t`` is a tensor batched by ``torch.func.vmap`` (a level of it is active)."""
    return bool(torch._C._functorch.is_batchedtensor(t))


_DIFFCP_SOLVE_METHODS = {"SCS": "SCS", "ECOS": "ECOS", "CLARABEL": "Clarabel"}
"""Solver names diffcp solves with itself (``solver_args["solve_method"]``), in its spelling."""


def _solver_name(
    solver: Solver | str | None, backend: str | backends.Auto, options: dict[str, Any]
) -> tuple[Solver | None, str | backends.Auto]:
    """A solver *name* (a string) routes to the cvxpylayers backend: diffcp's own cone solvers
    become ``solver_args["solve_method"]``, other names (``"MOREAU"``, ``"DIFFCP"``, ...) go to
    ``cvxpylayers.torch.CvxpyLayer(solver=)``. A callable stays a custom forward."""
    if not isinstance(solver, str):
        return solver, backend
    if backend not in ("auto", "cvxpylayers") and not isinstance(backend, backends.Auto):
        raise ValueError(
            f"solver={solver!r} names a cvxpylayers solver, but backend={backend!r}; drop "
            "backend= or pass backend='cvxpylayers' (a callable solver= is a custom forward)"
        )
    method = _DIFFCP_SOLVE_METHODS.get(solver.upper())
    if method is not None:
        options["solver_args"] = {"solve_method": method, **(options.get("solver_args") or {})}
    elif solver.upper() != "DIFFCP":
        options["layer_options"] = {"solver": solver, **(options.get("layer_options") or {})}
    return None, "cvxpylayers"


_WARM_START = "__warm_start__"
"""Key of the call options that asks this call to start from the previous call's solution."""


def _call_options(layer: Layer, solver_args: dict[str, Any] | None) -> dict[str, Any]:
    """The backend options of one call: call-time ``solver_args`` merged over the layer's."""
    if solver_args is None:
        return layer.options
    if "solver_args" not in getattr(layer.backend, "call_options", ()):
        raise ValueError(
            f"backend {layer.backend_name!r} takes no solver_args; pass its options to "
            "dl.Layer(...) instead (solver_args is for backend='cvxpylayers')"
        )
    merged = {**(layer.options.get("solver_args") or {}), **solver_args}
    return {**layer.options, "solver_args": merged}


def _check_source_only(program: Program, strategy: Backward) -> None:
    """A source-only program has no declaration in torch to differentiate implicitly."""
    if program.has_functions or not isinstance(strategy, Implicit):
        return
    raise ValueError(
        "backward='implicit' needs the torch front end, which cannot compile this declaration "
        f"({program.frontend_error}); use the backend's own backward (backward='native', the "
        "default for cvxpylayers)"
    )


def _gradient_name(layer: Layer) -> str:
    """``LayerInfo.gradient``: which backward differentiates the layer's outputs."""
    strategy = layer.backward_strategy
    if isinstance(strategy, SolverVJP):
        return "solver_vjp"
    if isinstance(strategy, Native):
        return f"native ({layer.backend_name})"
    return "implicit"


def _on_the_graph(u: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``u`` attached to the inputs' graph when the backend left it without one (an empty batch,
    or a batch whose every member failed: their outputs are zeros), so that ``backward()`` runs
    and gives those members zero gradients instead of raising."""
    if u.requires_grad or not torch.is_grad_enabled():
        return u
    leaves = [t for t in tensors if t.requires_grad]
    if not leaves:
        return u
    return u + sum(t.sum() * 0 for t in leaves)


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


class _LayerFunction(torch.autograd.Function):
    """A layer call as one autograd Function of the user's parameter tensors.

    ``forward(layer, options, *params) -> (*outputs, call)``: checks and batches the inputs,
    solves (no graph) and returns one tensor per variable and the call's state (:class:`_Call`:
    its KKT point, ``LayerInfo``). ``backward`` is the implicit VJP (or a custom solver's ``vjp``),
    differentiable under ``create_graph=True``; ``jvp`` the implicit tangent; ``vmap`` folds a
    vmapped dim into the layer's own batch dims, so ``torch.func`` transforms compose with it.
    """

    @staticmethod
    def forward(layer: Layer, options: dict[str, Any], *params: Any) -> tuple[Any, ...]:
        inputs = prepare_inputs(layer.program, params)
        call = _Call(layer, inputs, options)
        if inputs.params.size == 0:
            call.empty()
            m = layer.program.num_variables
            u = torch.zeros(0, m, dtype=inputs.dtype, device=inputs.device)
        else:
            u = call.solve()
        call.u = u
        return (*call.outputs(u), call)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        _, _, *params = inputs
        *outputs, call = output
        ctx.call = call
        ctx.tensors = call.inputs.tensors  # converted copies, no graph: for jvp
        # The converted inputs are functions of the user's tensors: the backward differentiates
        # with respect to those, and converts its gradients back to each one's dtype.
        ctx.save_for_backward(*(p if isinstance(p, Tensor) else None for p in params), *outputs)
        ctx.num_params = len(params)
        # Under vmap the Function is set up with vmapped views of the folded call's tensors.
        ctx.above_vmap = _above_a_vmap(params, call.inputs.tensors)
        ctx.output_shapes = [o.shape for o in outputs]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        raw, outputs = saved[: ctx.num_params], saved[ctx.num_params :]
        needs = ctx.needs_input_grad[2:]
        grads = grads[: len(outputs)]
        if all(g is None for g in grads):
            return (None, None, *(None for _ in raw))
        if call.inputs.params.size == 0:  # no problems: every gradient is zero (and connected)
            zeros = (
                torch.zeros_like(t) if need and isinstance(t, Tensor) else None
                for t, need in zip(raw, needs)
            )
            return (None, None, *zeros)
        inputs = call.inputs
        tensors = tuple(
            t.to(dtype=inputs.dtype, device=inputs.device) if isinstance(t, Tensor) else c
            for t, c in zip(raw, inputs.tensors)
        )
        if ctx.above_vmap:
            # vmap(grad(f)): these tensors are vmapped views of the folded call; _VJP's vmap rule
            # unfolds them to the call's own batch.
            flat = _VJP.apply(call, len(tensors), len(outputs), *tensors, *outputs, *grads)
        elif isinstance(call.layer.backward_strategy, SolverVJP):
            flat = call.solver_vjp(tensors, outputs, grads)
            if torch.is_grad_enabled():  # create_graph: the custom vjp has no graph of its own
                flat = tuple(
                    None if g is None or not isinstance(t, Tensor) else _FirstOrderOnly.apply(g, t)
                    for g, t in zip(flat, raw)
                )
        else:
            flat = call.vjp(tensors, outputs, grads, needs)
        out = []
        for t, g, need in zip(raw, flat, needs):
            out.append(g.to(t.dtype) if need and g is not None and isinstance(t, Tensor) else None)
        return (None, None, *out)

    @staticmethod
    def jvp(ctx: Any, _layer: Any, _options: Any, *tangents: Tensor | None) -> tuple[Any, ...]:
        call: _Call = ctx.call
        if isinstance(call.layer.backward_strategy, SolverVJP):
            raise NotImplementedError(
                "forward-mode AD through a layer with a custom solver vjp; use "
                "backward='implicit' for torch.func.jvp / jacfwd"
            )
        inputs = call.inputs
        tangents = tuple(
            None if d is None else d.to(dtype=inputs.dtype, device=inputs.device) for d in tangents
        )
        if inputs.params.size == 0:
            return (*call.outputs(call.u), None)
        if ctx.above_vmap:  # vmap(jvp(f)): unfold through _JVP's rule
            result = _JVP.apply(call, *tangents)
            if [r.shape for r in result] != list(ctx.output_shapes):
                raise NotImplementedError(_NESTED)
            return (*result, None)
        with torch.no_grad():
            return (*call.jvp(ctx.tensors, tangents), None)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], layer: Layer, options: dict[str, Any], *params: Any
    ) -> tuple:
        moved = _fold_vmapped(layer.program, in_dims[2:], params, info.batch_size)
        *outputs, call = _LayerFunction.apply(layer, options, *moved)
        return (*outputs, call), (*(0 for _ in outputs), None)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes a custom solver's VJP through; differentiating it again is an error that says
    what to do (never a silent ``None`` or zero second derivative)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, anchor: Tensor) -> Tensor:
        # ``anchor``: the parameter the gradient belongs to, so that the result is on its graph.
        return grad.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "second derivatives through a layer whose backward is native (a custom solver's "
            "vjp, or the backend's own, e.g. cvxpylayers' diffcp); declare the layer with "
            "backward='implicit' for double backward, Hessians and meta-gradients"
        )


class _SecondOrderGuard(torch.autograd.Function):
    """Identity on a parameter; under ``create_graph`` its gradient (from a backend's native
    backward, which has no graph) goes through :class:`_FirstOrderOnly`."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return grad
        return _FirstOrderOnly.apply(grad, ctx.saved_tensors[0])


def _above_a_vmap(given: Sequence[Any], physical: Sequence[Any]) -> bool:
    """Whether ``given`` are vmapped views (other logical shapes) of the call's tensors."""
    return any(
        isinstance(t, Tensor) and isinstance(p, Tensor) and t.shape != p.shape
        for t, p in zip(given, physical)
    )


_NESTED = (
    "this nesting of torch.func transforms (vmap over jacrev / jacfwd / hessian) is not "
    "supported through a declopt layer; vmap over grad, vjp and jvp is, and so is jacrev / "
    "jacfwd / hessian over a vmap (the layer batches by itself: differentiate the batched call)"
)


class _VJP(torch.autograd.Function):
    """The implicit VJP of one (folded) call as a Function of ``(params, outputs, grads)``, so
    that a derivative taken inside ``torch.func.vmap`` (per-sample gradients) reaches the call
    unfolded: the vmap rule moves the vmapped dims back into the call's batch, and a parameter
    the vmap shares gets one gradient per vmapped instance."""

    @staticmethod
    def forward(call: _Call, num_params: int, num_outputs: int, *args: Any) -> tuple[Any, ...]:
        tensors, outputs = args[:num_params], args[num_params : num_params + num_outputs]
        grads = args[num_params + num_outputs :]
        wanted = [isinstance(t, Tensor) for t in tensors]
        return call.vjp(tensors, outputs, grads, wanted)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *_: Any) -> tuple[None, ...]:
        raise NotImplementedError(
            "second derivatives of a declopt layer inside torch.func.vmap are not supported; "
            "take them outside the vmap (the layer batches by itself)"
        )

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], call: _Call, n: int, k: int, *args: Any
    ) -> tuple[Any, Any]:
        tensors, outputs, grads = args[:n], args[n : n + k], args[n + k :]
        p_dims, o_dims, g_dims = (
            in_dims[3 : 3 + n],
            in_dims[3 + n : 3 + n + k],
            in_dims[3 + n + k :],
        )
        size = info.batch_size
        wanted = [isinstance(t, Tensor) for t in tensors]
        if all(d is None for d in (*p_dims, *o_dims)):
            if _above_a_vmap(tensors, call.inputs.tensors):
                raise NotImplementedError(_NESTED)

            # Only the cotangents are mapped (jacrev's basis): the VJP is linear in them.
            def one(*gs: Any) -> tuple[Any, ...]:
                return call.vjp(tensors, outputs, gs, wanted)

            result = torch.func.vmap(one, in_dims=tuple(g_dims))(*grads)
            return result, tuple(None if r is None else 0 for r in result)
        program = call.program
        folded = _fold_vmapped(program, p_dims, tensors, size)
        shared = [isinstance(t, Tensor) and d is None for t, d in zip(tensors, p_dims)]

        def lead(t: Any, d: Any) -> Any:
            if t is None:
                return None
            return t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)

        result = call.vjp(
            folded,
            [lead(o, d) for o, d in zip(outputs, o_dims)],
            [lead(g, d) for g, d in zip(grads, g_dims)],
            wanted,
            per_problem=shared,
        )
        out = []
        for t, g, d, flag in zip(tensors, result, p_dims, shared):
            if g is None or not isinstance(t, Tensor):
                out.append(None)
            elif flag:  # (V, *rest of the batch, *shape) -> one gradient per instance
                out.append(g.sum_to_size(size, *t.shape))
            else:
                physical = t.movedim(d, 0)
                out.append(g.reshape(physical.shape))
        return tuple(out), tuple(None if g is None else 0 for g in out)


class _JVP(torch.autograd.Function):
    """The implicit tangent of one (folded) call as a Function of the parameter tangents, so that
    forward mode inside ``torch.func.vmap`` reaches the call unfolded (see :class:`_VJP`)."""

    @staticmethod
    def forward(call: _Call, *tangents: Any) -> tuple[Tensor, ...]:
        return call.jvp(call.inputs.tensors, tangents)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], call: _Call, *tangents: Any) -> tuple[Any, Any]:
        dims = in_dims[1:]
        size = info.batch_size
        physical = call.inputs.tensors
        if all(
            t is None or (t.movedim(d, 0).shape[1:] if d is not None else t.shape) == p.shape
            for t, d, p in zip(tangents, dims, physical)
        ):
            # Only the tangents are mapped here (jacfwd's basis) while the call was folded by a
            # vmap further out: a nesting the unfolding cannot follow.
            raise NotImplementedError(_NESTED)
        folded = _fold_vmapped(call.program, dims, tangents, size)
        folded = [
            t.expand(size, *t.shape) if isinstance(t, Tensor) and d is None else f
            for t, f, d in zip(tangents, folded, dims)
        ]
        try:
            result = call.jvp(physical, folded)
        except RuntimeError as error:  # tangents of a transform nested inside the vmap
            raise NotImplementedError(_NESTED) from error
        return result, tuple(0 for _ in result)


def _fold_vmapped(
    program: Program, in_dims: Sequence[int | None], params: Sequence[Any], size: int
) -> list[Any]:
    """The vmapped dim of every parameter moved to the front as one more (leading) batch dim,
    with singleton dims after it so that it lines up across parameters whose own batch dims
    differ in number; parameters vmap does not map stay as they are (broadcast)."""
    batch_ndims = [
        (p.dim() - (d is not None) - len(shape)) if isinstance(p, Tensor) else 0
        for p, d, shape in zip(params, in_dims, program.parameter_shapes)
    ]
    widest = max(batch_ndims, default=0)
    moved = []
    for p, d, ndim in zip(params, in_dims, batch_ndims):
        if d is None or not isinstance(p, Tensor):
            moved.append(p)
            continue
        p = p.movedim(d, 0)
        moved.append(p.reshape(size, *([1] * (widest - ndim)), *p.shape[1:]))
    return moved
