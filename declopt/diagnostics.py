"""Per-problem diagnostics of the last call of a layer (``layer.info``), and how a layer reports
what needs the user's attention (warn or raise)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from declopt.errors import SolverError


@dataclass
class BackwardInfo:
    """What the implicit backward met, per problem (tensors have the call's batch shape).

    Attributes:
        method: ``"eigh"`` (dense KKT solve) or ``"cg"`` (matrix-free).
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
