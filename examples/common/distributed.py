"""Single-process or multi-process (DistributedDataParallel) training with one code path.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the process
group uses NCCL on CUDA and Gloo on CPU. Without them everything runs in one process and every
collective below is the identity, so the examples never branch on "distributed or not".
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, writes files and saves checkpoints."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's GPU when CUDA is available, else the CPU; or ``name`` as is."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by ``torchrun`` (else a one-process context)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        if resolved.type == "cpu":
            # Several processes share the CPU: without this each would start one thread per core.
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    return Context(rank, world_size, local_rank, resolved)


def teardown(ctx: Context) -> None:
    """Leave the process group. Every DistributedDataParallel model must be freed first.

    A DDP model's C++ ``Reducer`` holds a reference to the process group. Freed after
    :func:`torch.distributed.destroy_process_group`, the Reducer drops the group's *last*
    reference, so ``~ProcessGroupGloo`` runs inside the Reducer's deallocation, with the GIL held,
    and joins Gloo's worker threads; a worker still releasing the tensors of the last collective
    needs the GIL to do so, and both wait forever (pytorch/pytorch#56297). This is how one process
    of a two-process torchrun hung at exit, after the results were written. Collecting garbage
    here frees models in reference cycles while the group is still registered; the examples drop
    their own references before they leave :func:`common.cli.session`.
    """
    if ctx.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` on its device, in DistributedDataParallel when there are several processes."""
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (its state dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: Tensor, ctx: Context) -> Tensor:
    """Elementwise sum over processes of a small tensor, in float64 (identity in one process)."""
    out = values.detach().to(device=ctx.device, dtype=torch.float64).clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def gather_rows(rows: Tensor, ctx: Context) -> Tensor:
    """Concatenate every process's ``rows: (n_rank, ...)`` along dim 0 (rank order), on the CPU.

    The processes may hold different numbers of rows: evaluation shards are not padded, so that
    every test example counts exactly once.
    """
    if not ctx.distributed:
        return rows.detach().cpu()
    rows = rows.detach().to(ctx.device).contiguous()
    count = torch.tensor([rows.shape[0]], device=ctx.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    largest = int(max(int(c) for c in counts))
    padded = rows.new_zeros((largest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    pieces = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(pieces, padded)
    return torch.cat([p[: int(c)] for p, c in zip(pieces, counts)]).cpu()


def parameters_identical(model: nn.Module, ctx: Context) -> bool:
    """Whether every process holds bit-identical parameters (what DDP promises); ``True`` alone.

    Rank 0 broadcasts its flattened parameters; every rank compares exactly and the verdicts are
    combined, so all ranks return the same answer.
    """
    if not ctx.distributed:
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in unwrap(model).parameters()]).to(ctx.device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0.0 if torch.equal(flat, reference) else 1.0], device=ctx.device)
    dist.all_reduce(mismatch, op=dist.ReduceOp.SUM)
    return bool(mismatch.item() == 0)


def on_main(ctx: Context, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on rank 0 while the other processes wait (e.g. writing a data set that they
    all read next)."""
    if ctx.is_main:
        fn(*args)
    barrier(ctx)


def from_main(ctx: Context, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` evaluated on rank 0 only, its result (or the exception it raised) broadcast
    to every process: all ranks go on with the same value, or all raise the same error. (Were
    rank 0 alone to raise, the others would wait for it in their next collective forever.)"""
    outcome: list[Any] = [None, None]
    if ctx.is_main:
        try:
            outcome[0] = fn(*args)
        except Exception as error:  # re-raised below, on every rank
            outcome[1] = error
    if ctx.distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
