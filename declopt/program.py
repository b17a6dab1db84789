"""The intermediate representation every backend and the implicit backward work on.

A :class:`Program` is the torch form of one declared problem

    minimise_u  f(x, u)   subject to  h(x, u) = 0,  g(x, u) <= 0,

written for *one* problem on unbatched tensors: ``x`` is a tuple of parameter tensors, each with
exactly its declared shape, and ``u`` is the flat vector of all variables (length ``m``).
Batching is done by callers with :func:`torch.func.vmap`, so every function here must be
vmap-compatible (no ``.item()``, no data-dependent Python control flow).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

Shape = tuple[int, ...]
Params = tuple[Tensor, ...]
ObjectiveFn = Callable[[Params, Tensor], Tensor]
TaylorFn = Callable[..., tuple[Tensor, ...]]
ResidualFn = Callable[[Params, Tensor], Tensor]


def numel(shape: Shape) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class Program:
    """One declared optimisation problem as torch functions of (parameters, flat variables).

    Attributes:
        parameter_names: one name per parameter, used in error messages.
        parameter_shapes: the declared shape of each parameter (no batch dims).
        variable_names: one name per variable.
        variable_shapes: the declared shape of each variable; ``u`` is their row-major
            concatenation, ``m = sum(prod(shape))``.
        objective: ``f(x, u) -> ()``, the scalar objective; ``None`` for a *source-only*
            program (see ``frontend_error``).
        objective_taylor: ``(x, u, second=True, value=True) -> (f (), grad (m,), hess (m, m))``,
            the objective with its first two derivatives in ``u`` (``second=False`` leaves out
            ``hess``, ``value=False`` ``f``) in one pass from the atoms' closed-form local
            derivatives (:mod:`declopt.frontend.taylor`); ``None`` where some atom on the
            variables' path has none (derivatives then come from autograd).
        objective_quadratic: ``objective`` is a polynomial of degree at most 2 in ``u`` (the
            atoms' degree rules, :func:`declopt.frontend.atoms.base.polynomial_degree`): its
            second-order Taylor model is exact, so a Newton step's point is known without
            evaluating it. False where unknown.
        constraints_affine: every equality and inequality row is affine in ``u`` (degree at
            most 1 by the same rules): they add nothing to the Lagrangian's Hessian, which is
            then the objective's (its closed-form Taylor pass where it has one). False where
            unknown.
        equalities: ``h(x, u) -> (p,)`` with ``h = 0`` at a feasible point, or ``None``.
        inequalities: ``g(x, u) -> (q,)`` with ``g <= 0`` at a feasible point, or ``None``.
        is_convex: the declaration is DCP (convex objective over a convex set).
        is_dpp: the declaration is DPP (cvxpylayers can take it).
        parameter_signs: per parameter ``"nonneg"``, ``"nonpos"``, ``"pos"`` (strictly positive:
            a log-log program takes its log) or ``None``; checked on input.
        parameter_symmetric: per parameter, whether it is declared ``symmetric=True`` (its
            tensors must be symmetric matrices; checked on input). Empty: none is.
        maximize: the declaration maximises; ``objective`` is then its negation.
        source: ``(problem, parameters, variables)`` when compiled from CVXPY (backends that call
            CVXPY-based solvers need it), else ``None``.
        kinks: ``(x, u, reference=None) -> (residuals (K,), margins (K,))`` of the nonsmooth
            atoms' kink sites, or ``None``; with a ``reference`` point ``(m,)``, ties are
            represented by the extremum at that point. A site whose margin is ~0 holds the
            solution on a kink; the backward then adds ``residual = 0`` as one more active
            equality (docs/design.md, "Kinks").
        kink_rows: ``(x, u, reference=None) -> (residuals (K,), margins (K,), index (K, 2),
            value (K, 2))``: ``kinks`` with the residuals' exact Jacobian as index sets, row
            ``k`` being ``value[k, 0] e_{index[k, 0]} + value[k, 1] e_{index[k, 1]}``; ``None``
            unless every kink residual is linear in at most two coordinates of ``u`` (every
            site linear, its operands selections of ``u``: ``abs(u)``, ``norm1(u - x)``,
            ``max(u)``, ...).
        kinks_isolated: every kink site is an isolated point (``AtomRule.isolated_kinks``, e.g.
            the origin of a 2-norm): solvers may treat the declaration as smooth and deal with
            kinks only where a solution lands on one.
        smoothed: with kinks, the same declaration with every nonsmooth atom replaced by a smooth
            approximation of width ``mu`` (:mod:`declopt.frontend.smoothing`), taking ``mu`` (a
            scalar tensor) as one more parameter after the declared ones; the torch backend
            solves it for ``mu -> 0`` before finishing on the kinks. ``None`` without kinks.
        frontend_error: for a *source-only* program, the exception the torch front end raised
            on this declaration (an atom, cone or attribute it cannot evaluate, a dual variable,
            a ``gp=True`` problem that is not log-log convex); the program then has no torch
            functions (``objective`` etc. are ``None``), its variables are the layer's outputs
            as listed, and only a backend that solves ``source`` itself
            (``takes_source_only = True``: cvxpylayers) can take it, with its own backward.
            ``None`` for a compiled program.
        log_log: the declaration is a log-log convex program (cvxpylayers' ``gp=True``). A
            compiled one (:func:`declopt.frontend.compile_layer`) is CVXPY's log-space reduction
            (``Dgp2Dcp``) taking the *declared* parameters: its functions take the log of the
            parameters the reduction uses in log form (and the others as given), its variables
            ``u`` are the logs of the declared (positive) variables, ``objective`` is the log of
            the declared objective and the rows are the reduction's; ``output_transform`` is
            :data:`EXP`. ``source`` stays the declaration as written (cvxpylayers solves it with
            ``gp=True``).
        output_transform: the change of variables between the solved variables and what a layer
            returns, applied elementwise to every variable: outputs are
            ``output_transform.forward(v)`` for each variable ``v`` of ``u`` (:meth:`to_outputs`)
            and a point given in output space (an initializer's, a custom solver's answer) enters
            ``u`` through ``inverse`` (:meth:`from_outputs`). Backends, the KKT checks and the
            implicit backward all work on ``u``; the layer applies ``forward`` on the autograd
            graph, so gradients flow through it. ``None``: the outputs are ``u`` itself.
    """

    parameter_names: tuple[str, ...]
    parameter_shapes: tuple[Shape, ...]
    variable_names: tuple[str, ...]
    variable_shapes: tuple[Shape, ...]
    objective: ObjectiveFn | None
    objective_taylor: TaylorFn | None = field(default=None, compare=False, repr=False)
    objective_quadratic: bool = False
    constraints_affine: bool = False
    equalities: ResidualFn | None = None
    inequalities: ResidualFn | None = None
    is_convex: bool = False
    is_dpp: bool = False
    parameter_signs: tuple[str | None, ...] = field(default=())
    parameter_symmetric: tuple[bool, ...] = field(default=())
    maximize: bool = False
    source: tuple[Any, tuple[Any, ...], tuple[Any, ...]] | None = field(
        default=None, compare=False, repr=False
    )
    kinks: Callable[..., tuple[Tensor, Tensor]] | None = None
    kink_rows: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
    kinks_isolated: bool = False
    smoothed: Program | None = field(default=None, compare=False, repr=False)
    frontend_error: Exception | None = field(default=None, compare=False, repr=False)
    log_log: bool = False
    output_transform: VariableTransform | None = None

    @property
    def has_functions(self) -> bool:
        """The program has torch functions (False for a source-only program)."""
        return self.objective is not None

    @property
    def num_variables(self) -> int:
        """``m``, the length of the flat variable vector."""
        return sum(numel(s) for s in self.variable_shapes)

    @property
    def is_constrained(self) -> bool:
        return self.equalities is not None or self.inequalities is not None

    def unpack(self, u: Tensor) -> tuple[Tensor, ...]:
        """Split ``u: (*batch, m)`` into one tensor per variable, ``(*batch, *shape)``."""
        batch = u.shape[:-1]
        sizes = [numel(s) for s in self.variable_shapes]
        return tuple(
            part.reshape(*batch, *shape)
            for part, shape in zip(torch.split(u, sizes, dim=-1), self.variable_shapes)
        )

    def pack(self, variables: Sequence[Tensor], batch_ndim: int) -> Tensor:
        """Inverse of :meth:`unpack`: ``(*batch, *shape)`` tensors to ``(*batch, m)``."""
        return torch.cat([v.reshape(*v.shape[:batch_ndim], -1) for v in variables], dim=-1)

    def to_outputs(self, variables: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The layer's outputs from solved variables (:meth:`unpack`'s tensors, or the first
        few of them): ``output_transform.forward`` of each, or the variables themselves."""
        transform = self.output_transform
        if transform is None:
            return tuple(variables)
        return tuple(transform.forward(v) for v in variables)

    def from_outputs(self, values: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Inverse of :meth:`to_outputs`: values in output space (one per variable) as the
        solver's variables."""
        transform = self.output_transform
        if transform is None:
            return tuple(values)
        return tuple(transform.inverse(v) for v in values)


@dataclass(frozen=True)
class VariableTransform:
    """An elementwise change of variables ``output = forward(u)``, ``u = inverse(output)``
    (:attr:`Program.output_transform`); both are differentiable, vmap-compatible torch
    functions."""

    name: str
    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]


EXP = VariableTransform("exp", torch.exp, torch.log)
"""A log-log program's transform: the solver's variables are the logs of the outputs."""


@dataclass(frozen=True)
class BatchedParams:
    """Parameter tensors of a flat batch of ``size`` problems.

    ``values[i]`` has shape ``(size, *parameter_shapes[i])`` when ``in_dims[i] == 0`` and exactly
    ``parameter_shapes[i]`` when ``in_dims[i] is None`` (shared by the whole batch).
    """

    values: tuple[Tensor, ...]
    in_dims: tuple[int | None, ...]
    size: int

    def expand(self, repeats: int) -> BatchedParams:
        """The same problems repeated ``repeats`` times along the batch (start-major order)."""
        values = tuple(
            v if d is None else v.repeat(repeats, *([1] * (v.dim() - 1)))
            for v, d in zip(self.values, self.in_dims)
        )
        return BatchedParams(values, self.in_dims, self.size * repeats)

    @cached_property
    def data_scale(self) -> Tensor:
        """``(size,)`` (``(1,)`` when every parameter is shared) the largest ``|entry|`` of
        every problem's parameters (0 where there are none), in the parameters' own dtype:
        computed once per batch, however often the solvers ask for
        :func:`~declopt.kkt.tolerances.problem_scale`."""
        parts = []
        for value, dim in zip(self.values, self.in_dims):
            value = value.detach()
            flat = value.reshape(value.shape[0], -1) if dim == 0 else value.reshape(1, -1)
            if flat.shape[-1]:
                # max |entry| from two reductions: no |flat| written (a full pass of its own;
                # torch.aminmax is 20x slower on CPU). (size,), or (1,) for a shared parameter
                parts.append(torch.maximum(flat.amax(-1), -flat.amin(-1)))
        if not parts:
            return torch.zeros(1)
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
        return torch.stack(torch.broadcast_tensors(*(p.to(dtype) for p in parts))).amax(0)

    def select(self, index: Tensor) -> BatchedParams:
        """The sub-batch of problems ``index`` (a 1-D long tensor)."""
        values = tuple(v if d is None else v[index] for v, d in zip(self.values, self.in_dims))
        return BatchedParams(values, self.in_dims, int(index.numel()))
