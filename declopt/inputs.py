"""Checking and batching the tensors handed to a layer.

A parameter of declared shape ``S`` accepts a tensor of shape ``(*batch, *S)``. Batch shapes of all
parameters broadcast to one batch shape; parameters without batch dims are shared by every problem
(they enter ``vmap`` with ``in_dim=None`` and are never copied).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from declopt.errors import InputError
from declopt.program import BatchedParams, Program


@dataclass(frozen=True)
class PreparedInputs:
    """The inputs of one call, flattened to ``B = prod(batch_shape)`` problems."""

    tensors: tuple[Tensor, ...]  # as given (converted to the common dtype/device), with batch dims
    params: BatchedParams  # flat batch for the backends and the backward
    batch_shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def rebatch(
        self,
        program: Program,
        tensors: Sequence[Tensor],
        per_problem: Sequence[bool] | None = None,
    ) -> BatchedParams:
        """:attr:`params` again from ``tensors`` shaped like :attr:`tensors` (e.g. the same
        tensors with their autograd graph, for a differentiable backward). Tensors flagged in
        ``per_problem`` are expanded over the batch even without batch dims, so that their
        gradient comes back per problem."""
        return _flatten(program, tensors, self.batch_shape, per_problem)

    def gradients(
        self,
        program: Program,
        grads: Sequence[Tensor | None],
        per_problem: Sequence[bool] | None = None,
    ) -> tuple[Tensor | None, ...]:
        """Gradients of the flat :attr:`params` back to the shapes of :attr:`tensors` (summed over
        the dims each tensor was broadcast along); ``(*batch, *shape)`` for ``per_problem``."""
        flags = per_problem or (False,) * len(grads)
        out: list[Tensor | None] = []
        for shape, tensor, grad, flag in zip(program.parameter_shapes, self.tensors, grads, flags):
            if grad is not None and grad.dim() > len(shape):
                grad = grad.reshape(*self.batch_shape, *shape)
                if not flag:
                    grad = grad.sum_to_size(tensor.shape)
            out.append(grad)
        return tuple(out)


def prepare_inputs(program: Program, args: Sequence[object]) -> PreparedInputs:
    """Validate ``args`` against the declaration and flatten their batch dims.

    Raises:
        InputError: wrong count, wrong trailing shape, batch shapes that do not broadcast,
            NaN/Inf entries, a sign that violates the parameter's declared attribute or a
            ``symmetric=True`` parameter's tensor that is not symmetric; the message
            names the parameter (and batch index) and the fix.
    """
    names = program.parameter_names
    if len(args) != len(names):
        raise InputError(
            f"the layer takes {len(names)} parameter tensor(s) ({', '.join(names)}) in the order "
            f"of `parameters`, got {len(args)}"
        )
    dtype, device = _common_dtype_device(args)
    tensors = tuple(torch.as_tensor(a, device=device).to(dtype=dtype) for a in args)
    labels = [_label(name, i) for i, name in enumerate(names)]
    batch_shapes = []
    for label, shape, tensor in zip(labels, program.parameter_shapes, tensors):
        ndim = len(shape)
        if tensor.dim() < ndim or tuple(tensor.shape[tensor.dim() - ndim :]) != shape:
            raise InputError(
                f"parameter {label} has declared shape {shape}; pass a tensor of shape "
                f"(*batch, {', '.join(map(str, shape))}{',' if len(shape) == 1 else ''}), "
                f"got {tuple(tensor.shape)}"
            )
        batch_shapes.append(tensor.shape[: tensor.dim() - ndim])
    try:
        batch_shape = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError:
        listing = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(names, batch_shapes))
        raise InputError(
            f"the batch shapes of the parameters do not broadcast ({listing}); leading dims "
            "beyond each parameter's declared shape are batch dims and must broadcast"
        ) from None
    for label, sign, tensor, bshape in zip(labels, _signs(program), tensors, batch_shapes):
        _check_values(label, sign, tensor, len(bshape))
    for label, symmetric, tensor, bshape in zip(
        labels, program.parameter_symmetric, tensors, batch_shapes
    ):
        if symmetric:
            _check_symmetric(label, tensor, len(bshape))

    params = _flatten(program, tensors, batch_shape)
    return PreparedInputs(tensors, params, batch_shape, dtype, device)


def _flatten(
    program: Program,
    tensors: Sequence[Tensor],
    batch_shape: torch.Size,
    per_problem: Sequence[bool] | None = None,
) -> BatchedParams:
    """``(*batch_i, *shape_i)`` tensors to a flat batch of ``prod(batch_shape)`` problems; a tensor
    without batch dims stays shared (``in_dim None``, never copied) unless ``per_problem``."""
    size = math.prod(batch_shape)
    flags = per_problem or (False,) * len(tensors)
    values, in_dims = [], []
    for shape, tensor, flag in zip(program.parameter_shapes, tensors, flags):
        if tensor.dim() == len(shape) and not flag:
            values.append(tensor)
            in_dims.append(None)
        else:
            full = tensor.expand(*batch_shape, *shape)
            values.append(full.reshape(size, *shape))
            in_dims.append(0)
    return BatchedParams(tuple(values), tuple(in_dims), size)


def _common_dtype_device(args: Sequence[object]) -> tuple[torch.dtype, torch.device]:
    """The floating dtype the inputs promote to (tensors and NumPy arrays; Python numbers do not
    decide, as in torch's own promotion) and the first tensor's device."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    for t in tensors:
        if t.is_complex():
            raise InputError("complex parameters are not supported; pass real tensors")
    arrays = [a for a in args if isinstance(a, np.ndarray | np.generic)]
    if any(np.iscomplexobj(a) for a in arrays):
        raise InputError("complex parameters are not supported; pass real arrays")
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    floating += [
        torch.from_numpy(np.asarray(a)).dtype for a in arrays if np.asarray(a).dtype.kind == "f"
    ]
    dtype = floating[0] if floating else torch.get_default_dtype()
    for d in floating[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype, device


def _signs(program: Program) -> Sequence[str | None]:
    signs = program.parameter_signs
    return (
        signs
        if len(signs) == len(program.parameter_names)
        else [None] * len(program.parameter_names)
    )


_GENERATED_NAME = re.compile(r"param\d+")
"""CVXPY's name for a parameter declared without one."""


def _label(name: str, position: int) -> str:
    """How messages name a parameter: its name, and its position in the call where the name is
    CVXPY's generated one (``'param273'`` alone does not say which argument it is)."""
    if _GENERATED_NAME.fullmatch(name):
        return f"{name!r} (argument {position} of the call)"
    return repr(name)


def _check_values(label: str, sign: str | None, tensor: Tensor, batch_ndim: int) -> None:
    # One reduction decides the common case; the elementwise check only runs to locate a culprit
    # (a huge but finite tensor whose sum overflows passes the second check).
    finite = None if bool(torch.isfinite(tensor.sum())) else torch.isfinite(tensor)
    if finite is not None and not bool(finite.all()):
        raise InputError(
            f"parameter {label} contains NaN or Inf at {_first_bad(finite, batch_ndim)}; "
            "declopt solves only problems with finite data"
        )
    if sign == "nonneg" and bool((tensor < 0).any()):
        raise InputError(
            f"parameter {label} is declared nonneg but is negative at "
            f"{_first_bad(tensor >= 0, batch_ndim)}; if it is a learned hyperparameter, keep it "
            "positive by construction: torch.nn.utils.parametrize.register_parametrization("
            "module, name, declopt.nn.Positive())"
        )
    if sign == "pos" and bool((tensor <= 0).any()):
        raise InputError(
            f"parameter {label} must be positive (a log-log program, gp=True, takes its log) but "
            f"is zero or negative at {_first_bad(tensor > 0, batch_ndim)}; if it is a learned "
            "hyperparameter, keep it positive by construction: "
            "torch.nn.utils.parametrize.register_parametrization(module, name, "
            "declopt.nn.Positive())"
        )
    if sign == "nonpos" and bool((tensor > 0).any()):
        raise InputError(
            f"parameter {label} is declared nonpos but is positive at "
            f"{_first_bad(tensor <= 0, batch_ndim)}"
        )


SYMMETRY_TOLERANCE = 100.0
"""A ``symmetric=True`` parameter's tensor may differ from its transpose by this many units of
its dtype's epsilon, relative to its largest entry (per matrix): rounding of an ``A + A.T`` or
``A @ A.T`` computed in that dtype passes, a matrix that is not symmetric does not."""


def _check_symmetric(label: str, tensor: Tensor, batch_ndim: int) -> None:
    if not tensor.is_floating_point():
        return
    gap = (tensor - tensor.transpose(-1, -2)).abs()
    scale = tensor.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1.0)
    ok = gap <= SYMMETRY_TOLERANCE * torch.finfo(tensor.dtype).eps * scale
    if not bool(ok.all()):
        raise InputError(
            f"parameter {label} is declared symmetric but is not symmetric at "
            f"{_first_bad(ok, batch_ndim)} (|P - P^T| = {float(gap.max()):.3g}); pass a symmetric "
            "matrix, e.g. (P + P.transpose(-1, -2)) / 2"
        )


def _first_bad(ok: Tensor, batch_ndim: int) -> str:
    """``"batch index (i, j), entry (k,)"`` of the first entry where ``ok`` is False."""
    index = tuple(int(i) for i in (~ok).nonzero()[0])
    batch, entry = index[:batch_ndim], index[batch_ndim:]
    where = f"entry {entry}" if entry else "its value"
    return f"batch index {batch}, {where}" if batch_ndim else where
