"""Tensor helpers shared by the atom evaluators: shapes and axes, reductions, cached constants and
index gathers. Everything here works on unbatched tensors under ``torch.func`` transforms."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor

from declopt.frontend.atoms.base import Evaluator

Shape = tuple[int, ...]


def shape_of(expr: cp.Expression) -> Shape:
    return tuple(int(d) for d in expr.shape)


def dims_of(axis: Any, ndim: int) -> tuple[int, ...]:
    """CVXPY/numpy ``axis`` (None, int or tuple) as an explicit tuple of dims."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        return (int(axis),)
    return tuple(int(a) for a in axis)


def reduction(
    expr: cp.Expression,
    fn: Callable[[Tensor, tuple[int, ...], bool], Tensor],
    flatten_if_no_axis: bool = False,
) -> Evaluator:
    """An evaluator for an axis atom: ``fn(x, dims, keepdim)`` then reshape to ``expr.shape``.

    Atoms whose numeric flattens the argument when ``axis is None`` (pnorm, norm1, norm_inf) give a
    different keepdims shape from numpy's; the final reshape makes them agree with ``expr.shape``.
    """
    arg = expr.args[0]
    shape = shape_of(expr)
    keepdims = bool(getattr(expr, "keepdims", False))
    axis = expr.axis
    if flatten_if_no_axis and axis is None:

        def f(x: Tensor) -> Tensor:
            return fn(x.reshape(-1), (0,), keepdims).reshape(shape)

        return f
    dims = dims_of(axis, arg.ndim)
    if not dims:  # a scalar argument: reducing it is the identity
        return lambda x: x.reshape(shape)

    def g(x: Tensor) -> Tensor:
        return fn(x, dims, keepdims).reshape(shape)

    return g


class TensorCache:
    """A numpy constant as a torch tensor, converted once per (dtype, device) and reused.

    The tensor must be created outside any ``torch.func`` transform: a tensor created inside
    ``grad``/``jvp`` is a wrapper of that transform's level, and caching it would leak the wrapper
    into later calls (``torch.compile`` then fails with "Cannot access data pointer of Tensor that
    doesn't have storage"). While Dynamo traces, the tensor is made in the graph and not cached.
    """

    def __init__(self, array: np.ndarray) -> None:
        with _no_functorch():
            self.base = torch.from_numpy(np.array(array))  # a private copy, on the CPU
        self.cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        t = self.cache.get(key)
        if t is not None:
            return t
        if torch.compiler.is_compiling():
            return self.base.to(dtype=dtype, device=device)
        with _no_functorch():
            t = self.base.to(dtype=dtype, device=device)
        self.cache[key] = t
        return t


def _no_functorch() -> Any:
    # torch._C._DisableFuncTorch is what torch.func itself uses to step outside its transforms.
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


class DeviceIndex:
    """A constant int64 index array, converted once per device."""

    def __init__(self, idx: np.ndarray) -> None:
        flat = np.ascontiguousarray(np.asarray(idx, dtype=np.int64).reshape(-1))
        self.tensors = TensorCache(flat)

    def __call__(self, device: torch.device) -> Tensor:
        return self.tensors.get(torch.long, device)


def flat_gather(index_map: np.ndarray, out_shape: Shape) -> Evaluator:
    """``x.reshape(-1)[index_map]``: any numpy indexing expressed on row-major flat positions."""
    idx = DeviceIndex(index_map)

    def f(x: Tensor) -> Tensor:
        return torch.index_select(x.reshape(-1), 0, idx(x.device)).reshape(out_shape)

    return f


def is_int(k: Any) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))


def basic_key(key: Any) -> tuple | None:
    """``key`` as a torch basic-indexing key, or None if torch cannot express it as a view.

    Torch has no negative slice steps and no boolean/integer-array views; those go through
    :func:`flat_gather`.
    """
    if not isinstance(key, tuple):
        key = (key,)
    out: list[Any] = []
    for k in key:
        if is_int(k):
            out.append(int(k))
        elif isinstance(k, slice):
            parts = (k.start, k.stop, k.step)
            if not all(v is None or is_int(v) for v in parts):
                return None
            if k.step is not None and int(k.step) <= 0:
                return None
            out.append(slice(*(None if v is None else int(v) for v in parts)))
        else:
            return None
    return tuple(out)


def index_map(in_shape: Shape, key: Any) -> np.ndarray:
    return np.arange(math.prod(in_shape), dtype=np.int64).reshape(in_shape)[key]


def rows_of(expr: Any, arg: cp.Expression | None = None) -> tuple[Callable[[Tensor], Tensor], int]:
    """``(to_rows, n)``: ``to_rows(x)`` lays an axis atom's argument out as ``(R, n)``, one row
    per output entry in row-major output order (axis ``None``: one row of everything), ``n`` the
    number of entries each output reduces over."""
    arg = expr.args[0] if arg is None else arg
    ndim = arg.ndim
    size = math.prod(int(d) for d in arg.shape)
    axis = getattr(expr, "axis", None)
    if axis is None or ndim == 0:
        return (lambda x: x.reshape(1, -1)), size
    axes = [a % ndim for a in dims_of(axis, ndim)]
    keep = [i for i in range(ndim) if i not in axes]
    perm = tuple(keep + axes)
    n = math.prod(int(arg.shape[i]) for i in axes)
    return (lambda x: x.permute(perm).reshape(-1, n)), n


def cumulative(op: Callable[[Tensor, int], Tensor]) -> Callable[[Any], Evaluator]:
    """Evaluator rule of a cumulative atom (cumsum, cummax, cumprod) along its ``axis``."""

    def rule(expr: Any) -> Evaluator:
        axis = expr.axis
        shape = shape_of(expr)
        if axis is None:  # numpy flattens in C order when axis is None
            return lambda x: op(x.reshape(-1), 0).reshape(shape)
        if expr.args[0].ndim == 0:
            return lambda x: x.reshape(shape)
        return lambda x: op(x, int(axis))

    return rule
