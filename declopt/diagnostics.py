"""Per-problem diagnostics of the last call of a layer (``layer.info``), and how a layer reports
what needs the user's attention (warn or raise)."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.errors import SolverError


class Status(enum.IntEnum):
    """What became of one problem of a call (``layer.info.status`` holds these codes).

    ``SOLVED``: a KKT point to tolerance. ``INFEASIBLE``: the constraints could not be met (the
    torch backend: a violation its augmented Lagrangian could not reduce with the largest
    penalty). ``UNBOUNDED``: the objective kept decreasing without bound (the solution ran off
    to ``|u| > 1e6`` times the data's scale). ``ITERATION_LIMIT``: the solver stopped short.
    ``NUMERICAL``: non-finite values (outside a domain, overflow). ``NOT_CONVERGED``: a backend
    that reports no cause said it failed.
    """

    SOLVED = 0
    INFEASIBLE = 1
    UNBOUNDED = 2
    ITERATION_LIMIT = 3
    NUMERICAL = 4
    NOT_CONVERGED = 5

    @property
    def advice(self) -> str:
        """What to do about a problem with this status."""
        return _ADVICE[self]


_ADVICE = {
    Status.SOLVED: "",
    Status.INFEASIBLE: "check that the constraints can hold together for these parameters",
    Status.UNBOUNDED: "bound the variables or make the objective coercive",
    Status.ITERATION_LIMIT: "raise max_iter= or give initializers= closer to the solution",
    Status.NUMERICAL: "check the parameters' scale and that the solution lies inside the atoms' "
    "domains (log, entr, sqrt: give initializers= inside them)",
    Status.NOT_CONVERGED: "see the backend's message; check feasibility and boundedness",
}


def status_summary(status: Tensor, advice: Mapping[Status, str] | None = None) -> str:
    """``"infeasible at [(1,)] (check ...); unbounded at [(3,)] (...)"`` for the failed problems
    of a batch-shaped ``status`` tensor; ``advice`` replaces :attr:`Status.advice` where a
    backend knows better (its own options: a cone solver's tolerance, not ``initializers=``)."""
    parts = []
    for code in Status:
        if code is Status.SOLVED:
            continue
        mask = status == int(code)
        if bool(mask.any()):
            name = code.name.lower().replace("_", " ")
            hint = (advice or {}).get(code, code.advice)
            parts.append(f"{name} at batch indices {first_indices(mask)} ({hint})")
    return "; ".join(parts)


@dataclass
class BackwardInfo:
    """What the implicit backward met, per problem (tensors have the call's batch shape).

    Attributes:
        method: ``"eigh"`` (dense KKT solve: the Schur complement, Bunch-Kaufman or the
            eigendecomposition), or matrix-free: ``"cg"`` (no rows held), ``"minres"``,
            ``"diagonal"`` (a diagonal model of a separable Hessian, checked against the true
            one), ``"projected"`` (a diagonal read in the held rows' null space: exact where the
            Hessian's other part lies in the rows' span, the L2 sphere and ball) or
            ``"diagonal+minres"`` / ``"projected+minres"`` (MINRES for the problems the model
            missed).
        singular: the KKT system was singular; the minimum-norm least-squares solution was used.
        second_order_ok: the Hessian is positive definite on the null space of the active
            constraints, i.e. the solution is a strict local minimum.
        residual: relative residual of the linear solve.
        one_sided: some inequality was weakly active: the derivative is one-sided (the layer's
            ``degenerate=`` chose the side).
        sign_violation: an active inequality had a multiplier of the wrong sign.
        multiplier_residual: ``max |D_u f - A^T lambda|`` with the multipliers used.
    """

    method: str
    singular: Tensor
    second_order_ok: Tensor
    residual: Tensor
    one_sided: Tensor
    sign_violation: Tensor
    multiplier_residual: Tensor


class LayerInfo:
    """Diagnostics of one forward call; per-problem tensors have the call's batch shape.

    Attributes:
        backend: name of the backend (or ``"custom"`` for a user solver) that ran.
        reason: why that backend was chosen.
        converged: bool, the problem was solved to tolerance.
        iterations: iterations spent (summed over starting points; 0 for custom solvers).
        objective: objective value at the returned solution (of the declaration as written, so a
            ``Maximize`` problem reports its maximum).
        kkt_residual: ``max |D_u L|`` at the returned solution.
        backward: filled in by the implicit backward pass, ``None`` until then.
        gradient: which backward differentiates this call: ``"implicit"`` (declopt's, from the
            declaration), ``"native (cvxpylayers)"`` (the backend's own: diffcp for
            cvxpylayers) or ``"solver_vjp"`` (a custom solver's ``vjp``).
        active: ``(*batch, q)`` constrained problems only (not filled for custom solvers run with
            ``verify=False``): inequalities active at the solution.
        one_sided: ``(*batch)`` constrained problems only: some active inequality has a ~zero
            multiplier, so the derivative there is one-sided.
        eq_multipliers, ineq_multipliers: ``(*batch, p)``, ``(*batch, q)`` multipliers in the seed
            convention (``D_u f = lambda^T D_u [h; g]``, ``lambda_g <= 0``).
        status: ``(*batch)`` int64 codes of :class:`Status` (``SOLVED`` where converged; the
            backend's cause where it reports one, else ``NOT_CONVERGED``).

    ``objective`` and ``kkt_residual`` may be computed on first access (for custom solvers that
    are not verified eagerly), so that a layer pays for diagnostics only when they are read.
    """

    def __init__(
        self,
        backend: str,
        reason: str,
        converged: Tensor,
        iterations: Tensor,
        objective: Tensor | Callable[[], Tensor],
        kkt_residual: Tensor | Callable[[], Tensor],
        backward: BackwardInfo | None = None,
        status: Tensor | None = None,
    ) -> None:
        self.backend = backend
        self.reason = reason
        self.converged = converged
        self.iterations = iterations
        self._objective = objective
        self._kkt_residual = kkt_residual
        self.backward = backward
        self.active: Tensor | None = None
        self.one_sided: Tensor | None = None
        self.eq_multipliers: Tensor | None = None
        self.ineq_multipliers: Tensor | None = None
        self.gradient: str | None = None
        unsolved = torch.full_like(converged, int(Status.NOT_CONVERGED), dtype=torch.int64)
        given = unsolved if status is None else status.to(torch.int64).reshape(converged.shape)
        self.status = torch.where(converged, int(Status.SOLVED), given)

    @property
    def status_names(self) -> list:
        """:attr:`status` as nested lists of :class:`Status` names (``"SOLVED"``, ...)."""

        def name(codes: object) -> object:
            if isinstance(codes, list):
                return [name(c) for c in codes]
            return Status(codes).name

        return name(self.status.tolist())

    @property
    def objective(self) -> Tensor:
        if callable(self._objective):
            self._objective = self._objective()
        return self._objective

    @property
    def kkt_residual(self) -> Tensor:
        if callable(self._kkt_residual):
            self._kkt_residual = self._kkt_residual()
        return self._kkt_residual

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in (
                "backend",
                "reason",
                "converged",
                "iterations",
                "objective",
                "kkt_residual",
                "backward",
                "gradient",
            )
        )
        return f"LayerInfo({fields})"


def first_indices(mask: Tensor, count: int = 5) -> list[tuple[int, ...]]:
    """Batch indices of the first ``count`` True entries of ``mask``."""
    return [tuple(int(i) for i in row) for row in mask.nonzero()[:count]]


def escalate(policy: str, message: str, category: type[Warning], stacklevel: int) -> None:
    """Raise :class:`~declopt.errors.SolverError` (``policy="raise"``) or warn with ``category``."""
    if policy == "raise":
        raise SolverError(message)
    warnings.warn(message, category, stacklevel=stacklevel)
