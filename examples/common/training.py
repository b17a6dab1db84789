"""The training loop shared by the examples: epochs, evaluation, checkpoints, progress bars.

One :class:`Run` is one model trained on one configuration; :func:`fit` trains it for its epochs,
evaluates after each, appends a row of metrics to its history, and (on rank 0) saves a checkpoint
that :func:`fit` can resume from. Metrics are computed on predictions gathered from every process,
so they are exactly those of a single-process run over the whole test set.
"""

from __future__ import annotations

import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import declopt as dl
from common.distributed import Context, all_reduce_sum, gather_rows, parameters_identical, unwrap

CHECKPOINT_VERSION = 1
SOLVER_WARNINGS = (dl.NonConvergenceWarning, dl.GradientWarning)
"""declopt's per-call warnings, summarised once per epoch instead of once per batch."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (unreadable, or from another configuration)."""


# ------------------------------------------------------------------------------------------------
# Reproducibility and progress


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all processes use the same seed: DDP starts from rank 0's
    weights anyway, and the samplers shard the data)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    """A tqdm bar over ``iterable`` when ``enabled`` and stderr is a terminal; else ``iterable``.

    Bars in a log file are noise, so they switch off by themselves when output is redirected.
    """
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# Data loading


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``0..n-1``: evaluation shards without padding (a
    :class:`DistributedSampler` repeats examples to even out the shards, which skews metrics)."""

    def __init__(self, n: int, ctx: Context) -> None:
        self.indices = list(range(ctx.rank, n, ctx.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(
    train: Dataset, test: Dataset, batch_size: int, ctx: Context, seed: int, workers: int = 0
) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Shuffled, sharded training batches and sequential, sharded test batches.

    ``batch_size`` is per process (the effective batch is ``batch_size * world_size``). Training
    drops the last incomplete batch when there is at least one full one: BatchNorm cannot train
    on a batch of a single example, and a remainder of one would be exactly that.
    """
    sampler = DistributedSampler(
        train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(sampler) >= batch_size,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
    test_loader = DataLoader(
        test,
        batch_size=batch_size,
        sampler=ShardSampler(len(test), ctx),
        num_workers=workers,
        pin_memory=pin,
    )
    return train_loader, test_loader, sampler


# ------------------------------------------------------------------------------------------------
# One epoch


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    ctx: Context,
    *,
    max_steps: int | None = None,
    show_progress: bool = True,
    desc: str = "train",
) -> float:
    """One pass of SGD over ``loader``; returns the mean cross-entropy over all processes' examples.

    ``model(inputs) -> logits (B, C)``; the loader yields ``(inputs, targets (B,))``.
    ``max_steps`` stops the epoch early (smoke tests, throughput checks).
    """
    model.train()
    total = torch.zeros(2, dtype=torch.float64)  # (sum of losses, number of examples)
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    for step, (inputs, targets) in enumerate(
        progress(loader, enabled=show_progress and ctx.is_main, desc=desc, total=steps)
    ):
        if step >= steps:
            break
        inputs = inputs.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += torch.tensor([float(loss.detach()) * len(targets), len(targets)])
    loss_sum, count = all_reduce_sum(total, ctx).tolist()
    return loss_sum / count if count else math.nan


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, ctx: Context, *, show_progress: bool = True
) -> tuple[Tensor, Tensor]:
    """Logits ``(N, C)`` (float32, CPU) and targets ``(N,)`` of the whole test set, all ranks."""
    model.eval()
    logits, targets = [], []
    for inputs, target in progress(loader, enabled=show_progress and ctx.is_main, desc="test"):
        logits.append(model(inputs.to(ctx.device, non_blocking=True)).float())
        targets.append(target.to(ctx.device))
    if logits:
        local_logits, local_targets = torch.cat(logits), torch.cat(targets)
    else:  # more processes than test batches: this rank contributes nothing
        classes = _num_outputs(model, loader)
        local_logits = torch.zeros(0, classes, device=ctx.device)
        local_targets = torch.zeros(0, dtype=torch.int64, device=ctx.device)
    return gather_rows(local_logits, ctx), gather_rows(local_targets.long(), ctx)


def _num_outputs(model: nn.Module, loader: DataLoader) -> int:
    last = [m for m in unwrap(model).modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


# ------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, loaded with ``weights_only=True``."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(error).__name__}: {error}. Delete it (or run "
            "without --resume) to start this run from scratch."
        ) from error
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of these examples")
    return state


# ------------------------------------------------------------------------------------------------
# A whole run


@dataclass
class Run:
    """One configuration to train: model (wrapped for DDP), data, optimisation and bookkeeping.

    ``evaluate(logits, targets) -> {metric: value}`` turns gathered test predictions into the
    metrics of one epoch (prefixed ``test_`` in the history). ``config`` identifies the run: a
    checkpoint from a different ``config`` is refused on resume.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_loader: DataLoader
    test_loader: DataLoader
    train_sampler: DistributedSampler
    evaluate: Callable[[Tensor, Tensor], dict[str, float]]
    epochs: int
    config: dict[str, Any]
    checkpoint: Path | None = None
    max_steps: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(
    run: Run,
    ctx: Context,
    *,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train ``run`` for its epochs (continuing from its checkpoint with ``resume``).

    Returns the history: one dict per epoch with ``epoch``, ``train_loss``, ``test_<metric>``,
    ``test_examples`` (how many test predictions were gathered), ``lr`` and ``seconds``. Under
    DDP the run ends by checking that every process holds identical parameters
    (``ranks_identical`` in the last row); a mismatch raises.
    """
    start = 0
    if resume and run.checkpoint is not None and run.checkpoint.is_file():
        start = _restore(run, ctx)
        log(f"[{run.name}] resumed from {run.checkpoint} at epoch {start}")
    for epoch in range(start, run.epochs):
        began = time.perf_counter()
        run.train_sampler.set_epoch(epoch)
        lr = run.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings(record=True) as caught:
            for category in SOLVER_WARNINGS:
                warnings.simplefilter("always", category)
            loss = train_epoch(
                run.model,
                run.train_loader,
                run.optimizer,
                ctx,
                max_steps=run.max_steps,
                show_progress=show_progress,
                desc=f"{run.name} epoch {epoch + 1}/{run.epochs}",
            )
            if run.scheduler is not None:
                run.scheduler.step()
            logits, targets = predict(run.model, run.test_loader, ctx, show_progress=show_progress)
        for line in summarize_warnings(caught):
            log(f"[{run.name}] epoch {epoch + 1}: {line}")
        metrics = {f"test_{k}": v for k, v in run.evaluate(logits, targets).items()}
        row = {"epoch": epoch + 1, "train_loss": loss, **metrics}
        row.update(test_examples=len(targets), lr=lr)
        row["seconds"] = time.perf_counter() - began
        run.history.append(row)
        log(f"[{run.name}] " + " ".join(_format(k, v) for k, v in row.items()))
        if ctx.is_main and run.checkpoint is not None:
            save_checkpoint(run.checkpoint, _state(run, epoch + 1))
    if ctx.distributed:
        identical = parameters_identical(run.model, ctx)
        if run.history:
            run.history[-1]["ranks_identical"] = identical
        if not identical:
            raise RuntimeError(f"[{run.name}] parameters differ across processes after training")
    return run.history


def summarize_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """One line per solver warning category: how many, and the first message; other warnings
    are passed on to the usual filters.

    Solver warnings (a few rows of a robust pooling not converged, a singular KKT system) come
    once per batch with varying counts; a per-epoch summary keeps the log readable.
    """
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for w in caught:
        if not issubclass(w.category, SOLVER_WARNINGS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        name = w.category.__name__
        counts[name] = counts.get(name, 0) + 1
        first.setdefault(name, str(w.message).splitlines()[0])
    return [f"{counts[n]} x {n}, first: {first[n]}" for n in counts]


def _state(run: Run, epoch: int) -> dict[str, Any]:
    return {
        "config": run.config,
        "epoch": epoch,
        "model": unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
        "history": run.history,
    }


def _restore(run: Run, ctx: Context) -> int:
    """Load ``run.checkpoint`` into ``run`` (every rank reads it); returns the next epoch."""
    state = load_checkpoint(run.checkpoint, map_location=ctx.device)
    if state["config"] != run.config:
        changed = sorted(
            k
            for k in set(state["config"]) | set(run.config)
            if state["config"].get(k) != run.config.get(k)
        )
        raise CheckpointError(
            f"{run.checkpoint} was written by a run with different settings ({', '.join(changed)});"
            " use another --out-dir or drop --resume"
        )
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"] is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.history[:] = state["history"]
    return int(state["epoch"])


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"
