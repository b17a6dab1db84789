"""A positive scalar hyperparameter of a module: fixed (a buffer) or learnable (nn.Parameter)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def register_positive_scalar(module: nn.Module, name: str, value: float | Tensor) -> None:
    """Set ``module.<name>`` to ``value``: an ``nn.Parameter`` stays learnable, anything else
    becomes a buffer. Raises ``ValueError`` unless ``value`` is a positive scalar."""
    if not isinstance(value, Tensor):
        # float64, cast to each input's dtype on use: a float32 buffer would leak its rounding
        # into float64 results (radius 1.7 -> 1.7000000477).
        value = torch.tensor(float(value), dtype=torch.float64)
    if value.dim() != 0 or not bool(value > 0):
        raise ValueError(f"{name} must be a positive scalar, got {value}")
    if isinstance(value, nn.Parameter):
        setattr(module, name, value)
    else:
        module.register_buffer(name, value)


class Positive(nn.Module):
    """A parametrization that keeps a learnable hyperparameter positive by construction:
    ``value = softplus(raw)``, for ``torch.nn.utils.parametrize.register_parametrization``::

        pool = dl.nn.RobustPool("huber", alpha=nn.Parameter(torch.tensor(0.5)))
        torch.nn.utils.parametrize.register_parametrization(pool, "alpha", dl.nn.Positive())

    The optimiser then updates ``raw`` freely and ``alpha`` never leaves ``(0, inf)`` (a plain
    ``nn.Parameter`` pushed below zero makes the next call raise ``InputError``).
    """

    def forward(self, raw: Tensor) -> Tensor:
        return torch.nn.functional.softplus(raw)

    def right_inverse(self, value: Tensor) -> Tensor:
        # softplus^-1(v) = log(expm1(v)), written stably for large v.
        return value + torch.log(-torch.expm1(-value))
