"""Strategies of a layer as values: how it differentiates, and what it does at degenerate points.

Each is a small frozen dataclass handed to :class:`~declopt.layer.Layer`; the strings of earlier
versions stay as sugar (``backward="implicit"``, ``degenerate="warn"``) and are turned into these
by :func:`backward_strategy` and :func:`degenerate_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from declopt.implicit import SIDES
from declopt.linalg import LinearSolver

REPORTS = ("warn", "raise", "ignore")
"""What a layer does when something needs the user's attention: warn, raise
:class:`~declopt.errors.SolverError`, or stay silent (``layer.info`` still says)."""


@dataclass(frozen=True)
class Implicit:
    """declopt's implicit backward from the declaration (the default).

    ``linear_solver``: how its KKT system is solved; ``None`` takes the layer's
    ``linear_solver`` (which the torch backend's polish and finish use too).
    """

    linear_solver: LinearSolver | None = None


@dataclass(frozen=True)
class Native:
    """The backend differentiates its own forward (``backend="cvxpylayers"``: diffcp)."""


@dataclass(frozen=True)
class SolverVJP:
    """A custom solver's own ``vjp(params, outputs, grads)`` method (see ``dl.Layer``)."""


Backward = Implicit | Native | SolverVJP


def backward_strategy(value: str | Backward, *, custom_solver: bool) -> Backward:
    """``value`` as a strategy: ``"implicit"`` -> :class:`Implicit`, ``"native"`` ->
    :class:`SolverVJP` for a custom solver, else :class:`Native`."""
    if isinstance(value, (Implicit, Native, SolverVJP)):
        return value
    if value == "implicit":
        return Implicit()
    if value == "native":
        return SolverVJP() if custom_solver else Native()
    raise ValueError(
        f"backward must be 'implicit', 'native' or a strategy (dl.Implicit(), dl.Native(), "
        f"dl.SolverVJP()), got {value!r}"
    )


@dataclass(frozen=True)
class Degenerate:
    """A weakly active inequality (active, multiplier ~0) makes the derivative one-sided.

    Attributes:
        side: ``"active"`` keeps it as an equality (the derivative for perturbations that push
            the solution into the constraint); ``"inactive"`` drops it (perturbations that move
            the solution away from it). See :data:`declopt.implicit.SIDES`.
        report: ``"warn"`` (a :class:`~declopt.errors.GradientWarning`), ``"raise"`` or
            ``"ignore"`` when it happens (``layer.info.backward.one_sided`` says where).
    """

    side: str = "active"
    report: str = "warn"

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"Degenerate side must be one of {SIDES}, got {self.side!r}")
        if self.report not in REPORTS:
            raise ValueError(f"Degenerate report must be one of {REPORTS}, got {self.report!r}")


_DEGENERATE_SUGAR = {
    "warn": Degenerate("active", "warn"),
    "raise": Degenerate("active", "raise"),
    "active": Degenerate("active", "ignore"),
    "inactive": Degenerate("inactive", "ignore"),
}


def degenerate_policy(value: str | Degenerate) -> Degenerate:
    """``value`` as a policy: ``"warn"`` (default) and ``"raise"`` keep the active side and
    report; ``"active"`` and ``"inactive"`` pick a side silently."""
    if isinstance(value, Degenerate):
        return value
    try:
        return _DEGENERATE_SUGAR[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"degenerate must be one of {tuple(_DEGENERATE_SUGAR)} or a dl.Degenerate(side=, "
            f"report=), got {value!r}"
        ) from None


def check_report(name: str, value: str) -> str:
    """``value`` if it is one of :data:`REPORTS`, else a ``ValueError`` naming ``name``."""
    if value not in REPORTS:
        raise ValueError(f"{name} must be one of {REPORTS}, got {value!r}")
    return value
