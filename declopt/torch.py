"""``from declopt.torch import CvxpyLayer``: a drop-in for ``cvxpylayers.torch.CvxpyLayer`` (1.2).

Same constructor (``problem, parameters, variables, solver=None, gp=False, verbose=False,
canon_backend=None, solver_args=None``), same call (``layer(*params, solver_args=None,
warm_start=False)``), the same ``ValueError`` messages for bad declarations and bad tensors, and
diffcp's ``SolverError`` when a problem of the batch is infeasible or unbounded. It is a
:class:`declopt.Layer` on the ``"cvxpylayers"`` backend (cvxpylayers' forward and native
backward) by default; ``backend="torch"`` (or any registered name) and every other ``dl.Layer``
keyword stay available. README, "Coming from cvxpylayers", lists the differences that remain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cvxpy as cp
from torch import Tensor

from declopt.errors import SolverError
from declopt.layer import Layer

__all__ = ["CvxpyLayer"]


class CvxpyLayer(Layer):
    """``cvxpylayers.torch.CvxpyLayer`` built on :class:`declopt.Layer`.

    ``problem, parameters, variables, solver, gp, verbose, canon_backend, solver_args``: as in
    cvxpylayers 1.2. ``variables`` may list a subset of the problem's variables and
    dual variables of its constraints (``c.dual_variables[0]``). ``solver`` names a
    cvxpylayers solver (``None``/``"DIFFCP"``: diffcp; ``"MOREAU"``, ... are passed to
    cvxpylayers); ``cp.SCS`` / ``cp.CLARABEL`` / ``cp.ECOS`` are also accepted and
    select diffcp's cone solver (``solver_args["solve_method"]``); a cvxpylayers custom solver
    (a ``cvxpylayers.interfaces.SolverInterface``) is passed to cvxpylayers as it is.

    Args:
        backend: ``"cvxpylayers"`` (default, what cvxpylayers does), ``"torch"``, ``"auto"``...
        on_failure: ``"raise"`` (default: like cvxpylayers, a problem that fails raises diffcp's
            ``SolverError``), ``"warn"`` or ``"ignore"`` (declopt's per-problem reporting).
        **options: any other :class:`declopt.Layer` keyword.
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: list[cp.Parameter],
        variables: list[cp.Variable],
        solver: Any = None,
        gp: bool = False,
        verbose: bool = False,
        canon_backend: str | None = None,
        solver_args: dict[str, Any] | None = None,
        *,
        backend: Any = "cvxpylayers",
        on_failure: str = "raise",
        **options: Any,
    ) -> None:
        _validate_problem(problem, parameters, variables, gp, check_dpp=backend == "cvxpylayers")
        layer_options = dict(options.pop("layer_options", None) or {})
        if verbose:
            layer_options["verbose"] = True
        if canon_backend is not None:
            layer_options["canon_backend"] = canon_backend
        if solver is not None and str(solver).upper() == "DIFFCP":
            solver = None
        takes_cvxpylayers_options = backend == "cvxpylayers"
        if takes_cvxpylayers_options and _is_solver_interface(solver):
            # cvxpylayers' own custom-solver API: the object goes to its CvxpyLayer(solver=).
            layer_options["solver"] = solver
            solver = None
        if takes_cvxpylayers_options:
            options.setdefault("on_solver_error", "raise")
            if layer_options:
                options["layer_options"] = layer_options
            if solver_args:
                options["solver_args"] = dict(solver_args)
        elif layer_options or solver_args:
            raise ValueError(
                "solver_args / verbose / canon_backend are cvxpylayers options; "
                f"backend={backend!r} takes its own options as keywords (e.g. max_iter=)"
            )
        self._cvxpylayers_solver = "DIFFCP" if solver is None else solver
        super().__init__(
            problem,
            list(parameters),
            list(variables),
            backend=backend,
            solver=solver,
            on_failure=on_failure,
            gp=gp,
            **options,
        )
        if self.backend is not None and hasattr(self.backend, "compiled"):
            # cvxpylayers canonicalises at construction, and raises its errors there.
            self.backend.compiled(self.program, self.options.get("layer_options"))

    def forward(  # type: ignore[override]
        self,
        *params: Tensor,
        solver_args: dict[str, Any] | None = None,
        warm_start: bool = False,
    ) -> tuple[Tensor, ...]:
        takes_starts = getattr(self.backend, "takes_starts", False)
        if warm_start and not takes_starts and self._cvxpylayers_solver != "MOREAU":
            raise ValueError(
                "warm_start=True is only supported with solver='MOREAU'. "
                f"Current solver is '{self._cvxpylayers_solver}'."
            )
        _validate_params(self.program.source[1], params)  # type: ignore[index]
        try:
            # MOREAU's warm start is a speed hint declopt's cvxpylayers backend does not pass on
            # (it splits batches to isolate failures); backends that take starting points
            # (torch, scipy) start from the previous call's solution.
            return super().forward(
                *params, solver_args=solver_args, warm_start=warm_start and takes_starts
            )
        except SolverError as error:  # declopt's on_failure="raise": diffcp's type, as cvxpylayers
            raise _solver_error(str(error)) from error


def _is_solver_interface(solver: Any) -> bool:
    """Whether ``solver`` is a cvxpylayers custom solver (``SolverInterface``)."""
    try:
        from cvxpylayers.interfaces.base import SolverInterface
    except ImportError:  # an older cvxpylayers without the custom-solver API
        return False
    return isinstance(solver, SolverInterface)


def _solver_error(message: str) -> Exception:
    try:
        from diffcp.cone_program import SolverError as DiffcpSolverError
    except ImportError:  # pragma: no cover - diffcp is a dependency of cvxpylayers
        return SolverError(message)
    return DiffcpSolverError(message)


def _validate_problem(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    variables: Sequence[cp.Variable],
    gp: bool,
    check_dpp: bool,
) -> None:
    """cvxpylayers 1.2's checks (``utils.parse_args._validate_problem``), in its order and with
    its messages; the DPP check only where cvxpylayers solves (the torch backend takes any
    declaration)."""
    if check_dpp:
        if gp:
            if not problem.is_dpp("dgp"):
                raise ValueError("Problem must be DPP for geometric programming.")
        elif not problem.is_dpp():
            raise ValueError("Problem must be DPP.")
    if not set(problem.parameters()) == set(parameters):
        raise ValueError("The layer's parameters must exactly match problem.parameters")
    if not isinstance(parameters, list | tuple):
        raise ValueError("The layer's parameters must be provided as a list or tuple")
    if not isinstance(variables, list | tuple):
        raise ValueError("The layer's variables must be provided as a list or tuple")
    primal = set(problem.variables())
    duals = {dv.id for c in problem.constraints for dv in c.dual_variables}
    for v in variables:
        if v not in primal and v.id not in duals:
            raise ValueError(
                f"Variable {v} must be a subset of problem.variables or a constraint dual variable"
            )


def _validate_params(parameters: Sequence[cp.Parameter], values: Sequence[Any]) -> None:
    """cvxpylayers 1.2's ``LayersContext.validate_params``: one tensor per parameter, each with
    the declared shape or one leading batch dim, all batch sizes equal."""
    if len(values) != len(parameters):
        raise ValueError(
            f"A tensor must be provided for each CVXPY parameter; "
            f"received {len(values)} tensors, expected {len(parameters)}",
        )
    batch_sizes = []
    for i, (value, param) in enumerate(zip(values, parameters)):
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) == len(param.shape):
            if shape != param.shape:
                raise ValueError(
                    f"Invalid parameter shape for parameter {i}. "
                    f"Expected: {param.shape}, Got: {value.shape}",
                )
            batch_sizes.append(0)
        elif len(shape) == len(param.shape) + 1:
            if shape[1:] != param.shape:
                shape_str = ", ".join(map(str, param.shape))
                raise ValueError(
                    f"Invalid parameter shape for parameter {i}. "
                    f"Expected batched shape: (batch_size, {shape_str}), "
                    f"Got: {value.shape}",
                )
            batch_sizes.append(shape[0])
        else:
            raise ValueError(
                f"Invalid parameter dimensionality for parameter {i}. "
                f"Expected {len(param.shape)} or {len(param.shape) + 1} dimensions, "
                f"Got: {len(shape)} dimensions",
            )
    nonzero = [b for b in batch_sizes if b > 0]
    if nonzero and not all(b == nonzero[0] for b in nonzero):
        raise ValueError(
            f"Inconsistent batch sizes. Expected all batched parameters to have "
            f"the same batch size, but got: {batch_sizes}",
        )
