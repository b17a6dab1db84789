"""The one table of tolerances: every "is this zero?" that declopt asks, in one place.

Every tolerance is *relative*: a number from :func:`table` (it follows the dtype) times a scale of
the problem it judges, never an absolute ``1 + |u|``. So scaling all data of a declaration by
``s`` (which scales a homogeneous problem's solution by ``s`` too) changes no decision, whatever the
units (tested from ``1e-8`` to ``1e8``; docs/design.md, "Tolerances").

Scales:

* :func:`problem_scale` ``(B,)``: the largest ``|entry|`` of a problem's parameters and solution,
  the unit of ``u`` for the solvers (steps, smoothing widths, identification).
* :func:`solution_scale` ``(B,)``: the largest ``|entry|`` of the solution itself, the unit of the
  activity tests at a returned solution (distance to a bound, kink margins).
* a row's scale: ``|D_u c_i|_inf * problem_scale``: the change of constraint ``c_i`` over one unit
  of ``u``, so ``|c_i| / (|D_u c_i| scale)`` is the distance to its boundary in units of ``u``.
* the gradient scale: ``max(|D_u f|_inf, |f| / problem_scale)``, the unit of stationarity and of
  multipliers times their rows' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import Tensor

from declopt.program import BatchedParams

_FLOAT64_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances for one dtype (multiply by the matching scale, see the module).

    Attributes:
        activity: a returned solution sits on an inequality's boundary or on a kink when it is
            within this (times its scale) of it: ``1.5e-8`` in float64 (the accuracy of the
            external conic solvers, which stop there) and 64 ulps (``7.6e-6``) in float32 (exact
            forwards put solutions on their kinks to a few ulps; ``sqrt(eps) = 3.4e-4`` would
            also count entries that merely lie that close, and change their derivative by O(1)).
        identification: the torch solver's active-set guess from an augmented-Lagrangian iterate,
            which is only ``~sqrt(eps)`` accurate: ``sqrt(eps)``.
        multiplier: a multiplier is ~zero (its inequality weakly active, the derivative
            one-sided) or of the wrong sign beyond this, relative to the gradient scale: the same
            number as ``activity`` (in float32 a multiplier of 1e-4 of the gradient is no
            rounding error).
        converged: a KKT point is accepted as a solution when every relative residual piece is
            within this: ``sqrt(eps)``.
        floor: the rounding floor of a residual (nothing below it is worth another Newton step):
            64 ulps.
        resolution: an answer accurate to this (relative to the problem's scale) cannot tell a
            kink margin below it from zero: ``0`` for exact forwards, the widened activity for an
            external solver's answer (:func:`for_accuracy`). Without it a solution that is
            itself that small (a 2-norm's apex, returned ``1e-11`` off it by an interior point)
            would be judged by its own size and its kink missed.
        kink_activity: the band of kink margins where it differs from ``activity`` (see
            :attr:`kinks`).
    """

    activity: float
    identification: float
    multiplier: float
    converged: float
    floor: float
    resolution: float = 0.0
    kink_activity: float | None = None

    @property
    def kinks(self) -> float:
        """The activity band of kink margins (relative to the solution's scale): ``activity``
        unless an exact answer narrows it (:func:`exact_tolerances`)."""
        return self.activity if self.kink_activity is None else self.kink_activity


@cache
def table(dtype: torch.dtype) -> Tolerances:
    """The tolerances of ``dtype``."""
    eps = torch.finfo(dtype).eps
    activity = min(eps**0.5, max(64 * eps, _FLOAT64_EPS**0.5))
    return Tolerances(
        activity=activity,
        identification=eps**0.5,
        multiplier=activity,
        converged=eps**0.5,
        floor=64 * eps,
    )


EXACT_ULPS = 8
"""An exact forward's margins are zero to this many ulps of the problem's scale: a margin is a
difference of terms up to that size (``|y - x_i| - alpha``, ``r - |x_i|``), rounded a few times."""


@cache
def exact_tolerances(dtype: torch.dtype) -> Tolerances:
    """The tolerances of ``dtype`` for answers exact up to rounding (a custom solver that says so,
    ``solver.exact = True``: the closed-form projections, robust pooling's 1-D solvers).

    Such an answer puts a solution *on* its kinks to a few ulps, so a kink margin beyond
    :data:`EXACT_ULPS` ulps of the problem's scale is a real distance: the default band (64 ulps
    of ``|u|`` in float32, ``1.5e-8`` in float64, sized for iterative solvers) would count
    entries that merely lie that close as tied and give them the tied piece's derivative
    (measured: an L-inf sphere projection of float32 ``8 x 1024`` normal data held an entry
    ``0.9999948`` against the radius 1 as tied in 4 of 80 batches, derivative 0 instead of 1).
    Inequality rows keep the default band: they are reductions (``|u|_1 - r`` over 512 entries
    rounds by far more than a few ulps).
    """
    band = EXACT_ULPS * torch.finfo(dtype).eps
    return replace(table(dtype), resolution=band, kink_activity=band)


SOLVER_MARGIN = 10.0
"""An external solver's answer is trusted to this many times its stopping tolerance: SCS and
Clarabel stop on residual *norms* against the size of the largest term, so single entries (a
multiplier, a distance to a bound) are off by up to a few times ``eps`` (measured: SCS at
``eps = 1e-8`` returned multipliers of ``4e-8`` at weakly active bounds)."""


def for_accuracy(dtype: torch.dtype, accuracy: float) -> Tolerances:
    """The tolerances of ``dtype`` for an answer accurate to ``accuracy`` (relative; a conic
    solver's stopping tolerance): activity and multiplier tests are widened to
    :data:`SOLVER_MARGIN` times it, so that a bound the solver leaves ``1e-9`` away with a
    ``1e-8`` multiplier counts as weakly active, as an exact solver's ``0`` and ``0`` do."""
    base = table(dtype)
    width = max(base.activity, SOLVER_MARGIN * float(accuracy))
    return Tolerances(
        activity=width,
        identification=base.identification,
        multiplier=max(base.multiplier, width),
        converged=base.converged,
        floor=base.floor,
        resolution=width,
    )


def problem_scale(params: BatchedParams, u: Tensor) -> Tensor:
    """``(B,)``: the largest ``|entry|`` of every problem's parameters and of ``u: (B, m)``
    (1 where all are zero): the unit of ``u`` that relative tolerances multiply."""
    data = params.data_scale.to(device=u.device, dtype=u.dtype).expand(u.shape[0])
    scale = torch.maximum(u.detach().abs().amax(-1), data) if u.shape[-1] else data
    return torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))


def solution_scale(u: Tensor, fallback: Tensor) -> Tensor:
    """``(B,)``: the largest ``|u|`` entry of each solution (``fallback`` where ``u = 0``): the
    unit of activity tests at a returned solution. Exact forwards and the solvers' polish put a
    solution on its active bounds and kinks to a few ulps *of u*; parameters much larger than
    the solution (data projected onto a small set) must not widen the test."""
    size = u.detach().abs().amax(-1) if u.shape[-1] else torch.zeros_like(fallback)
    return torch.where((size > 0) & torch.isfinite(size), size, fallback)


def on_kink(
    margins: Tensor, u: Tensor, scale: Tensor, tolerance: float, resolution: float = 0.0
) -> Tensor:
    """``(B, K)``: kink margins within ``tolerance`` of :func:`solution_scale`, or within
    ``resolution`` of the problem's ``scale`` (an inexact answer's resolution,
    :attr:`Tolerances.resolution`): the one rule of "the solution sits on this kink", for the
    KKT point and the backward's quick test."""
    bound = torch.maximum(tolerance * solution_scale(u, scale), resolution * scale)
    return margins.abs() <= bound.unsqueeze(-1)


def gradient_scale(objective: Tensor, grad_f: Tensor, scale: Tensor) -> Tensor:
    """``(B,)``: ``max(|D_u f|_inf, |f| / scale)``, the unit of stationarity (``f`` per ``u``);
    ``tiny`` where both vanish."""
    size = grad_f.abs().amax(-1) if grad_f.shape[-1] else torch.zeros_like(objective)
    size = torch.maximum(size, objective.abs() / scale)
    return size.clamp_min(torch.finfo(grad_f.dtype).tiny)
