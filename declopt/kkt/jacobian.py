"""The Jacobian ``D_u c`` of a batch's KKT rows, with kink rows kept as index sets.

The rows ``c = [h; g; kinks]`` of a declaration have two kinds of Jacobian rows: the
constraints' (dense, few) and the kink sites' (many: one per entry of ``abs(u)``, per tie of
``max(u)``), each of which is ``value_0 e_{i_0} + value_1 e_{i_1}`` when the front end can say so
(:attr:`~declopt.program.Program.kink_rows`). :class:`RowJacobian` keeps the first kind dense and
the second as ``(index, value)`` pairs, so that the products, row norms and least-squares fits
the KKT core needs cost ``O(B (k_d m + K))`` instead of ``O(B K m)``: at ``d = 1024`` an L1-sphere
projection holds ~1,020 kink rows, and its dense Jacobian alone was 8 x 1,020 x 1,024 floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.batched import bmtv, bmv


@dataclass
class RowJacobian:
    """``D_u c: (B, k, m)`` as dense rows stacked over two-entry rows.

    Attributes:
        dense: ``(B, k_d, m)`` the first ``k_d`` rows.
        index: ``(B, k_s, 2)`` long, the coordinates of each later row's two entries.
        value: ``(B, k_s, 2)`` their values (a one-entry row has a zero second value).
    """

    dense: Tensor
    index: Tensor
    value: Tensor

    @classmethod
    def of_dense(cls, jac: Tensor) -> RowJacobian:
        """A Jacobian with every row dense, ``jac: (B, k, m)``."""
        batch = jac.shape[0]
        index = torch.zeros(batch, 0, 2, dtype=torch.long, device=jac.device)
        return cls(jac, index, jac.new_zeros(batch, 0, 2))

    @property
    def m(self) -> int:
        return self.dense.shape[-1]

    @property
    def k(self) -> int:
        return self.dense.shape[1] + self.index.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype

    @property
    def device(self) -> torch.device:
        return self.dense.device

    def norms(self) -> Tensor:
        """``(B, k)`` each row's largest absolute entry."""
        top = self.dense.abs().amax(-1) if self.m else self.dense.new_zeros(self.dense.shape[:2])
        return torch.cat([top, self.value.abs().amax(-1)], -1)

    def magnitudes(self) -> RowJacobian:
        """``|A|``: every entry's absolute value (the sizes of the rows' terms)."""
        return RowJacobian(self.dense.abs(), self.index, self.value.abs())

    def term_sizes(self, w: Tensor) -> Tensor:
        """``(B, k)``: ``|A| |w|``, the sizes of each row's terms ``A_ij w_j`` summed: what a
        row's value at ``w`` rounds by (an L2 norm over 1,024 even entries: 1, where its largest
        entry times the largest ``|w|`` is 0.001)."""
        return self.magnitudes().matvec(w.abs())

    def matvec(self, w: Tensor) -> Tensor:
        """``(B, k)``: ``A w`` for ``w: (B, m)``."""
        top = bmv(self.dense, w)
        batch, k_s, _ = self.index.shape
        # Explicit sizes: an empty batch has no -1 to infer.
        entries = w.gather(1, self.index.reshape(batch, 2 * k_s)).reshape(batch, k_s, 2)
        return torch.cat([top, (self.value * entries).sum(-1)], -1)

    def rmatvec(self, z: Tensor) -> Tensor:
        """``(B, m)``: ``A^T z`` for ``z: (B, k)``."""
        k_d = self.dense.shape[1]
        out = bmtv(self.dense, z[:, :k_d])
        if self.index.shape[1] == 0:
            return out
        batch = z.shape[0]
        k_s = self.index.shape[1]
        weighted = (self.value * z[:, k_d:].unsqueeze(-1)).reshape(batch, 2 * k_s)
        return out.scatter_add(1, self.index.reshape(batch, 2 * k_s), weighted)

    def masked(self, mask: Tensor) -> RowJacobian:
        """The rows outside ``mask: (B, k)`` set to zero."""
        k_d = self.dense.shape[1]
        mask = mask.to(self.dtype)
        return RowJacobian(
            self.dense * mask[:, :k_d].unsqueeze(-1),
            self.index,
            self.value * mask[:, k_d:].unsqueeze(-1),
        )

    def rows(self, rows: Tensor, row_mask: Tensor) -> Tensor:
        """``(B, r, m)`` dense: the rows ``rows: (B, r)`` of each problem (zero where
        ``row_mask`` is False), the two-entry ones scattered into place."""
        batch, r = rows.shape
        k_d, m = self.dense.shape[1], self.m
        out = self.dense.new_zeros(batch, r, m)
        if k_d:
            top = self.dense.gather(1, rows.clamp(max=k_d - 1).unsqueeze(-1).expand(-1, -1, m))
            out = torch.where((rows < k_d).unsqueeze(-1), top, out)
        if self.index.shape[1]:
            later = (rows - k_d).clamp(min=0, max=self.index.shape[1] - 1).unsqueeze(-1)
            index = self.index.gather(1, later.expand(-1, -1, 2))
            value = self.value.gather(1, later.expand(-1, -1, 2))
            value = value * (rows >= k_d).unsqueeze(-1).to(value.dtype)
            out = out.scatter_add(2, index, value)
        return out * row_mask.unsqueeze(-1).to(out.dtype)

    def to_dense(self) -> Tensor:
        """``(B, k, m)`` every row dense."""
        batch = self.dense.shape[0]
        later = self.dense.new_zeros(batch, self.index.shape[1], self.m)
        return torch.cat([self.dense, later.scatter_add(2, self.index, self.value)], 1)

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> RowJacobian:
        return RowJacobian(
            self.dense.to(device=device, dtype=dtype),
            self.index.to(device=device),
            self.value.to(device=device, dtype=dtype),
        )

    def select(self, index: Tensor) -> RowJacobian:
        """The problems ``index`` (a 1-D long tensor) of the batch."""
        return RowJacobian(self.dense[index], self.index[index], self.value[index])

    def index_copy(self, index: Tensor, sub: RowJacobian) -> RowJacobian:
        """These rows with the problems ``index`` replaced by ``sub``'s (same layout)."""
        return RowJacobian(
            self.dense.index_copy(0, index, sub.dense.to(self.dtype)),
            self.index.index_copy(0, index, sub.index),
            self.value.index_copy(0, index, sub.value.to(self.dtype)),
        )

    def where(self, take: Tensor, other: RowJacobian) -> RowJacobian:
        """Per problem, these rows where ``take: (B,)``, else ``other``'s."""
        t = take.view(-1, 1, 1)
        return RowJacobian(
            torch.where(t, self.dense, other.dense),
            torch.where(t, self.index, other.index),
            torch.where(t, self.value, other.value),
        )
