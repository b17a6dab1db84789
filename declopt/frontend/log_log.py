"""Log-log convex programs (``gp=True``) as Programs of their declared parameters.

CVXPY's ``Dgp2Dcp`` reduction turns a log-log convex (DGP) problem into a convex one in log
space: each positive variable ``x`` becomes ``w`` with ``x = exp(w)``, and each parameter ``p``
it reads in log form becomes a new parameter of value ``log p``; a parameter may also occur as
itself (an exponent: ``x ** p`` becomes ``p * w``), so the reduced problem's parameters are a
mix of log-parameters and original ones. :func:`declopt.frontend.compile_layer` compiles the
reduced problem with :func:`~declopt.frontend.compile_problem`; :func:`in_declared_parameters`
here wraps every torch function of that Program so that it takes the layer's declared parameters
(``x -> (log x_i where the reduction reads log p_i, x_i where it reads p_i)``) and returns
``exp(u)`` as outputs (:data:`~declopt.program.EXP`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from declopt.program import EXP, Program, Shape

Uses = tuple[tuple[int, bool], ...]
"""Per parameter of the reduced problem: ``(i, log)``, it is ``log x_i`` (``log`` True) or
``x_i`` itself, with ``x_i`` the layer's ``i``-th declared parameter."""


def _reduced_parameters(uses: Uses, n: int) -> Callable[[Sequence[Tensor]], tuple[Tensor, ...]]:
    """``x`` (the ``n`` declared parameters, then any extra ones such as the smoothing width,
    passed through unchanged) -> the reduced problem's parameter tuple."""

    def reduced(x: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if len(x) < n:
            raise ValueError(f"expected at least {n} parameter tensors, got {len(x)}")
        logs: dict[int, Tensor] = {}
        out = []
        for i, log in uses:
            if log:
                if i not in logs:
                    logs[i] = torch.log(x[i])
                out.append(logs[i])
            else:
                out.append(x[i])
        return (*out, *x[n:])

    return reduced


def _wrap(program: Program, reduced: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]) -> dict:
    """The torch functions of ``program`` as functions of the declared parameters."""

    def of_x(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if fn is None:
            return None

        def wrapped(x: Sequence[Tensor], u: Tensor, *args: Any, **kwargs: Any) -> Any:
            return fn(reduced(x), u, *args, **kwargs)

        return wrapped

    return {
        "objective": of_x(program.objective),
        "objective_taylor": of_x(program.objective_taylor),
        "equalities": of_x(program.equalities),
        "inequalities": of_x(program.inequalities),
        "kinks": of_x(program.kinks),
        "kink_rows": of_x(program.kink_rows),
    }


def in_declared_parameters(
    program: Program,
    uses: Uses,
    *,
    parameter_names: tuple[str, ...],
    parameter_shapes: tuple[Shape, ...],
    parameter_signs: tuple[str | None, ...],
    variable_names: tuple[str, ...],
    source: tuple[Any, tuple[Any, ...], tuple[Any, ...]],
    is_convex: bool,
    is_dpp: bool,
) -> Program:
    """The compiled log-space ``program`` (of the reduced problem's parameters, in the order of
    ``uses``) as a log-log Program of the declared parameters: every function (``objective``,
    ``objective_taylor``, ``equalities``, ``inequalities``, ``kinks``, ``kink_rows`` and those of
    ``smoothed``, whose last parameter, the smoothing width, is passed through as it is) maps the
    declared parameters to the reduced ones first; the outputs are ``exp(u)``; ``source``, the
    names and signs are the declaration's."""
    n = len(parameter_names)
    reduced = _reduced_parameters(uses, n)
    common = {
        "variable_names": variable_names,
        "output_transform": EXP,
        "log_log": True,
    }
    smoothed = program.smoothed
    if smoothed is not None:
        smoothed = dataclasses.replace(
            smoothed,
            parameter_names=(*parameter_names, "smoothing width"),
            parameter_shapes=(*parameter_shapes, ()),
            **_wrap(smoothed, reduced),
            **common,
        )
    return dataclasses.replace(
        program,
        parameter_names=parameter_names,
        parameter_shapes=parameter_shapes,
        parameter_signs=parameter_signs,
        source=source,
        is_convex=is_convex,
        is_dpp=is_dpp,
        smoothed=smoothed,
        **_wrap(program, reduced),
        **common,
    )
