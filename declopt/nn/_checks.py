"""Input checks shared by the modules of :mod:`declopt.nn`."""

from __future__ import annotations

from torch import Tensor

from declopt.errors import InputError


def moved_to_last(x: Tensor, dim: int, module: str) -> Tensor:
    """``x`` with ``dim`` moved last, after checking that it exists and is not empty: a 0-d
    tensor or an empty ``dim`` has nothing to pool or project (an ``InputError`` naming the
    module, the shape and the fix, not torch's ``IndexError`` or a NaN)."""
    if x.dim() == 0:
        raise InputError(
            f"{module} takes a tensor with at least one dim (the one it works along, dim={dim}); "
            "got a 0-d tensor: pass x.reshape(1)"
        )
    if not -x.dim() <= dim < x.dim():
        raise InputError(f"{module}: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    if x.shape[dim] == 0:
        raise InputError(
            f"{module}: dim={dim} of x (shape {tuple(x.shape)}) is empty; there is no entry to "
            "work on"
        )
    return x.movedim(dim, -1)
