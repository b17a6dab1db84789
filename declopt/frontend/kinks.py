"""Kink-site builders shared by the nonsmooth atoms (see docs/design.md, 'Kinks').

A site is a smooth *residual* that vanishes on a kink, with a *margin* measuring the distance to
it (``inf`` where the site cannot be on one). When a solution sits on a kink (``|margin| ~ 0``)
the implicit backward adds ``residual = 0`` as one more active equality, so the declaration is
differentiated along the piece it sits on. The builders work on ``(R, n)`` *rows*: one row per
atom-output entry, ``n`` the entries it depends on nonsmoothly.

Ties are represented by an entry chosen at a ``chooser`` (the rows at the reference point when
one is given, else the rows themselves): at an exact tie the extremum itself is an arbitrary
member of the tied set, so the rows keep their meaning only if the representative is pinned.

Scope: a site registers where the atom's value depends on it locally; an explicit ``abs`` nested
inside ``max`` registers its own zeros too (over-constraining entries at zero that are not
maximisers): write ``norm(e, "inf")`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")


def unit_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, else ``-1`` (piecewise constant: no derivative)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def ties(rows: Tensor, chooser: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Entries tied with the extremum of each row: residual ``x_j - x_rep``, margin the residual
    itself (``inf`` for the representative ``rep``, the extremum of ``chooser``)."""
    pick = chooser.argmax(-1, keepdim=True) if largest else chooser.argmin(-1, keepdim=True)
    residual = rows - rows.gather(-1, pick)
    chosen = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, pick, True)
    margin = torch.where(chosen, torch.full_like(residual, INF), residual)
    return residual, margin


def boundary_ties(rows: Tensor, chooser: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """Ties across the boundary between the ``b`` largest entries of each row and the rest
    (``1 <= b < n``): the kink is ``v_b = v_{b+1}`` (sorted values). Residual ``x_j - x_rep``
    with ``rep`` the ``b``-th largest entry of ``chooser``; margin ``max(|x_j - x_rep|, v_b -
    v_{b+1})``: an entry tied with ``rep`` is on a kink only while the tie straddles the boundary
    (a tie among the ``b`` largest, or among the rest, does not change the sum)."""
    rep = torch.topk(chooser, b, dim=-1).indices[..., b - 1 : b]
    top = torch.topk(rows, b + 1, dim=-1).values
    gap = (top[..., b - 1 : b] - top[..., b : b + 1]).clamp(min=0)
    residual = rows - rows.gather(-1, rep)
    chosen = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, rep, True)
    margin = torch.maximum(residual.abs(), gap)
    return residual, torch.where(chosen, torch.full_like(margin, INF), margin)


def prefix_ties(rows: Tensor, chooser: Tensor) -> tuple[Tensor, Tensor]:
    """Ties inside each prefix (``cummax``): ``(R, n, n)`` sites ``[r, i, j]``, entry ``j <= i``
    tied with the maximiser of ``rows[r, :i+1]`` (``inf`` margin for ``j > i`` and the
    maximiser itself). A prefix whose maximiser is also the next prefix's registers nothing:
    the next one repeats its sites (duplicate rows would make the KKT systems singular)."""
    n = rows.shape[-1]
    rep = torch.cummax(chooser, dim=-1).indices  # (R, n): maximiser of each prefix
    best = rows.gather(-1, rep)  # (R, n)
    residual = rows.unsqueeze(-2) - best.unsqueeze(-1)  # [r, i, j] = x_j - x_rep(i)
    j = torch.arange(n, device=rows.device)
    later = j.view(1, 1, n) > j.view(1, n, 1)
    chosen = j.view(1, 1, n) == rep.unsqueeze(-1)
    repeated = torch.cat(
        [rep[..., 1:] == rep[..., :-1], torch.zeros_like(rep[..., :1], dtype=torch.bool)], -1
    )
    skip = later | chosen | repeated.unsqueeze(-1)
    margin = torch.where(skip, torch.full_like(residual, INF), residual.abs())
    return residual, margin
