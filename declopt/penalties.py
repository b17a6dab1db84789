"""Robust penalty functions as elementwise CVXPY expressions (the seed paper's Q, PH, H, W, TQ).

Each ``penalty(z, alpha)`` returns an expression of ``z``'s shape. ``alpha > 0`` is a number or a
``cp.Parameter`` (declare it ``pos=True`` or ``nonneg=True``), which makes it learnable through a
layer. The convex penalties are written DCP (and DPP where CVXPY allows) so that they can also be
solved by cvxpylayers; the nonconvex ones are declarations only.

============================  ======================================  ==============
name                          phi(z)                                  convex
============================  ======================================  ==============
``quadratic``                 z^2 / 2                                 yes (DPP)
``pseudo_huber``              alpha^2 (sqrt(1 + (z/alpha)^2) - 1)     yes (DPP for a number alpha)
``huber``                     z^2/2 if abs(z) <= alpha else           yes (DPP)
                              alpha (abs(z) - alpha/2)
``welsch``                    1 - exp(-z^2 / (2 alpha^2))             no
``truncated_quadratic``       min(z^2, alpha^2) / 2                   no
============================  ======================================  ==============
"""

from __future__ import annotations

from collections.abc import Callable

import cvxpy as cp
import numpy as np

Alpha = float | cp.Parameter | cp.Expression


def quadratic(z: cp.Expression, alpha: Alpha | None = None) -> cp.Expression:
    """``z^2 / 2``; ``alpha`` is accepted for a uniform signature and ignored."""
    return 0.5 * cp.square(z)


def pseudo_huber(z: cp.Expression, alpha: Alpha = 1.0) -> cp.Expression:
    """``alpha^2 (sqrt(1 + (z/alpha)^2) - 1) = alpha * ||(z, alpha)||_2 - alpha^2``, elementwise.

    Written through a column norm of ``[z; alpha]`` so that it is DCP.
    """
    _check_alpha(alpha)
    flat = cp.vec(z, order="F") if z.ndim != 1 else z
    size = flat.shape[0] if flat.ndim else 1
    row = cp.reshape(flat, (1, size), order="F")
    stacked = cp.vstack([row, alpha * np.ones((1, size))])
    radius = cp.norm(stacked, 2, axis=0)
    value = (
        alpha * radius - cp.square(alpha)
        if isinstance(alpha, cp.Expression)
        else (alpha * radius - alpha**2)
    )
    return cp.reshape(value, z.shape, order="F") if z.ndim != 1 else value


def huber(z: cp.Expression, alpha: Alpha = 1.0) -> cp.Expression:
    """``z^2/2`` for ``|z| <= alpha``, ``alpha (|z| - alpha/2)`` beyond; half CVXPY's ``huber``."""
    _check_alpha(alpha)
    return 0.5 * cp.huber(z, alpha)


def welsch(z: cp.Expression, alpha: Alpha = 1.0) -> cp.Expression:
    """``1 - exp(-z^2 / (2 alpha^2))`` (nonconvex, bounded)."""
    _check_alpha(alpha)
    return 1 - cp.exp(-cp.square(z) / (2 * cp.square(alpha)))


def truncated_quadratic(z: cp.Expression, alpha: Alpha = 1.0) -> cp.Expression:
    """``min(z^2, alpha^2) / 2`` (nonconvex, nonsmooth at ``|z| = alpha``)."""
    _check_alpha(alpha)
    return 0.5 * cp.minimum(cp.square(z), cp.square(alpha))


PENALTIES: dict[str, Callable[[cp.Expression, Alpha], cp.Expression]] = {
    "quadratic": quadratic,
    "pseudo_huber": pseudo_huber,
    "huber": huber,
    "welsch": welsch,
    "truncated_quadratic": truncated_quadratic,
}
"""Penalties by name; :class:`declopt.nn.RobustPool` takes these names."""


def get(name: str) -> Callable[[cp.Expression, Alpha], cp.Expression]:
    """The penalty called ``name``; raises ``ValueError`` listing the known names."""
    try:
        return PENALTIES[name]
    except KeyError:
        raise ValueError(f"unknown penalty {name!r}; choose one of {sorted(PENALTIES)}") from None


def _check_alpha(alpha: Alpha) -> None:
    if isinstance(alpha, (int, float)) and not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
