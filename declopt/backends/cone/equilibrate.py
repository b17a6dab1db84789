"""Ruiz equilibration of a batch of cone programs: rescale variables, rows and cost so that
every column and row of ``[P, A^T; A, 0]`` has a largest entry near 1.

The interior-point method then works in units where its static regularisation and step rules
mean the same for every problem, whatever the units of the data (Ruiz, "A scaling algorithm to
equilibrate both rows and columns norms in matrices", 2001; as OSQP and Clarabel do). Rows of one
second-order cone share one factor, so the scaled cone is the same cone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.backends.cone.cones import ConeData, Cones

__all__ = ["Equilibration", "equilibrate"]

PASSES = 15
"""Ruiz passes (each halves the log of every row's and column's distance from 1)."""

CLAMP = (1e-4, 1e4)
"""Each pass's factors stay in this range, so a zero row or a huge entry cannot run away."""


@dataclass(frozen=True)
class Equilibration:
    """``P' = c D P D``, ``q' = c D q``, ``A' = E A D``, ``b' = E b``: ``D (B|1, n)`` scales
    the variables, ``E (B|1, rows)`` the rows, ``c (B|1,)`` the cost."""

    D: Tensor
    E: Tensor
    c: Tensor

    def unscale(self, x: Tensor, s: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The original program's ``x = D x'``, ``s = s' / E``, ``z = E z' / c``."""
        return self.D * x, s / self.E, self.E * z / self.c[:, None]


def _cone_mean(v: Tensor, cones: Cones) -> Tensor:
    """``v (B, rows)`` with each second-order cone's entries replaced by their geometric mean."""
    out = v.clone()
    for index in cones.groups(v.device):
        block = v[:, index]
        out[:, index] = block.log().mean(-1, keepdim=True).exp().expand_as(block)
    return out


def equilibrate(data: ConeData) -> tuple[ConeData, Equilibration]:
    """The equilibrated batch and its scaling (shared data gets shared factors)."""
    P, q, A, b, cones = data.P, data.q, data.A, data.b, data.cones
    lead = max(A.shape[0], 1 if P is None else P.shape[0])
    n, rows = A.shape[-1], A.shape[-2]
    D = A.new_ones(lead, n)
    E = A.new_ones(lead, rows)
    low, high = CLAMP
    Ps, As = P, A
    for _ in range(PASSES):
        col = As.abs().amax(-2) if rows else A.new_zeros(lead, n)
        if Ps is not None:
            col = torch.maximum(col, Ps.abs().amax(-2))
        row = As.abs().amax(-1) if n else A.new_zeros(lead, rows)
        dcol = 1 / col.where(col > 0, torch.ones_like(col)).sqrt().clamp(low, high)
        drow = 1 / row.where(row > 0, torch.ones_like(row)).sqrt().clamp(low, high)
        drow = _cone_mean(drow, cones)
        D, E = D * dcol, E * drow
        As = E.unsqueeze(-1) * A * D.unsqueeze(-2)
        if P is not None:
            Ps = D.unsqueeze(-1) * P * D.unsqueeze(-2)
    qs = D * q
    size = qs.abs().amax(-1)
    if Ps is not None:
        size = torch.maximum(size, Ps.abs().amax(-1).mean(-1))
    c = 1 / size.where(size > 0, torch.ones_like(size)).clamp(low, high)
    Ps = None if Ps is None else c[:, None, None] * Ps
    scaled = ConeData(Ps, c[:, None] * qs, As, E * b, cones)
    return scaled, Equilibration(D, E, c)
