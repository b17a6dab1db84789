"""The command line and the outer loop that the training examples share.

Both examples take the same training and run flags (:func:`add_training_args`,
:func:`add_run_args`) next to their own data and model flags; a flag left unset is ``None`` until
:func:`fill_defaults` takes its value from the example's ``FULL`` or ``QUICK`` table. ``main`` then
reads, in either example::

    with cli.session(args.device) as (ctx, log):
        with cli.exit_on(DatasetError):
            data = load_data(args, ctx)
        for config in grid:
            run = build_run(args, data, config, ctx)  # model, optimizer, scheduler -> make_run
            results.append({**config, **cli.train(run, args, ctx, log)})
            write_results(...)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from common import distributed
from common.distributed import Context
from common.training import Run, fit, make_loaders

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------
# Flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default stated exactly once.

    :class:`argparse.ArgumentDefaultsHelpFormatter` appends ``(default: X)`` to every help text,
    which doubled the defaults the help already states (``(default 90) (default: None)``): a flag
    whose argparse default is ``None`` takes its value later from the example's ``FULL``/``QUICK``
    table, so its help states those values itself (:func:`table_help`). This formatter appends the
    argparse default only where the help does not mention a default, and never ``None`` (meaning
    "decided later", stated in the help) or ``False`` (an off switch: the default goes without
    saying). Lists print as on the command line (``iris diabetes``, not ``['iris', 'diabetes']``).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        # argparse %-formats the help: a literal % in the default must be escaped.
        return f"{text} (default: {show(default).replace('%', '%%')})".lstrip()


def parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows every default once (:class:`HelpFormatter`)."""
    return argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=HelpFormatter
    )


def show(value: Any) -> str:
    """A default as the user would type it: lists space-separated, ``0.5`` not ``[0.5]``."""
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def table_help(text: str, key: str, full: Mapping[str, Any], quick: Mapping[str, Any]) -> str:
    """``text`` and the flag's defaults from the example's tables: ``(default: 90; --quick: 3)``.

    For the flags whose argparse default is ``None`` because :func:`fill_defaults` sets them from
    ``FULL`` or ``QUICK`` once ``--quick`` is known."""
    values = f"default: {show(full[key])}"
    if key in quick and quick[key] != full[key]:
        values += f"; --quick: {show(quick[key])}"
    return f"{text} ({values})" if text else f"({values})"


def add_training_args(
    parser: argparse.ArgumentParser,
    full: Mapping[str, Any],
    quick: Mapping[str, Any],
    *,
    sweep_help: str,
    lr_help: str | None = None,
    optimizers: Sequence[str] = (),
    weight_decay: float,
    lr_step: int,
    lr_step_help: str,
    workers: int | None,
    workers_help: str = "DataLoader workers",
) -> None:
    """The "training" group: ``--sweep``, ``--epochs``, ``--batch-size`` (per process),
    ``--optimizer`` (when ``optimizers`` offers a choice; the first is the default), ``--lr``,
    ``--momentum``, ``--weight-decay``, ``--lr-step``, ``--max-steps``, ``--seed``, ``--device``
    and ``--workers``. ``full`` and ``quick`` are the example's tables of defaults, quoted in the
    help; ``lr_help`` and ``workers_help`` must state their defaults when those are ``None``."""
    train = parser.add_argument_group("training")
    train.add_argument("--sweep", action="store_true", help=sweep_help)
    train.add_argument(
        "--epochs", type=int, help=table_help("training epochs", "epochs", full, quick)
    )
    train.add_argument(
        "--batch-size", type=int, help=table_help("per process", "batch_size", full, quick)
    )
    if optimizers:
        train.add_argument(
            "--optimizer", choices=tuple(optimizers), default=optimizers[0], help="optimizer"
        )
    train.add_argument(
        "--lr", type=float, help=lr_help or table_help("learning rate", "lr", full, quick)
    )
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    train.add_argument("--weight-decay", type=float, default=weight_decay, help="L2 penalty")
    train.add_argument("--lr-step", type=int, default=lr_step, help=lr_step_help)
    train.add_argument(
        "--max-steps", type=int, help="at most this many steps per epoch (default: no limit)"
    )
    train.add_argument("--seed", type=int, default=0, help="weights, shuffling and stand-in")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    train.add_argument("--workers", type=int, default=workers, help=workers_help)


def add_run_args(parser: argparse.ArgumentParser, *, quick_help: str, out_dir: Path) -> None:
    """The "run" group: ``--quick``, ``--out-dir``, ``--resume``, ``--no-progress``."""
    run = parser.add_argument_group("run")
    run.add_argument("--quick", action="store_true", help=quick_help)
    run.add_argument("--out-dir", type=Path, default=out_dir, help="results folder")
    run.add_argument("--resume", action="store_true", help="continue runs from their checkpoints")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def fill_defaults(
    args: argparse.Namespace,
    full: Mapping[str, Any],
    quick: Mapping[str, Any],
    sweep: Mapping[str, Any],
) -> None:
    """Set every flag still ``None`` from ``quick`` under ``--quick``, else from ``full``; under
    ``--sweep`` the grid ``sweep`` replaces those tables' values (flags given still win)."""
    defaults = {**(quick if args.quick else full), **(sweep if args.sweep else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, keys: Sequence[str]
) -> None:
    """A usage error (exit status 2) naming the first flag of ``keys`` that is not positive."""
    for key in keys:
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive")


def check_data_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error when ``--data-dir`` is given but is not a folder."""
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} does not exist or is not a folder")


# ------------------------------------------------------------------------------------------------
# The outer loop


@contextmanager
def session(device: str) -> Iterator[tuple[Context, Log]]:
    """This process's :class:`Context` (joining the process group under ``torchrun``) and a log
    that prints on rank 0 only; the process group is torn down on the way out."""
    ctx = distributed.setup(device)
    try:
        yield ctx, (print if ctx.is_main else _quiet)
    finally:
        distributed.teardown(ctx)


def _quiet(_message: str) -> None:
    pass


@contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn ``errors`` (a malformed data folder, say) into ``SystemExit("error: ...")``: a message
    for the user rather than a traceback."""
    try:
        yield
    except errors as error:
        raise SystemExit(f"error: {error}") from None


def make_run(
    args: argparse.Namespace,
    ctx: Context,
    *,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    train: Dataset,
    test: Dataset,
    evaluate: Callable[[Tensor, Tensor], dict[str, float]],
    config: dict[str, Any],
) -> Run:
    """A :class:`Run` under the common flags: loaders of ``--batch-size`` per process with
    ``--workers`` (shuffled with ``--seed``), ``--epochs``, ``--max-steps``, and a checkpoint in
    ``OUT_DIR/<name>/checkpoint.pt``."""
    train_loader, test_loader, sampler = make_loaders(
        train, test, args.batch_size, ctx, args.seed, args.workers
    )
    return Run(
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        test_loader=test_loader,
        train_sampler=sampler,
        evaluate=evaluate,
        epochs=args.epochs,
        config=config,
        checkpoint=args.out_dir / name / "checkpoint.pt",
        max_steps=args.max_steps,
    )


def train(run: Run, args: argparse.Namespace, ctx: Context, log: Log) -> dict[str, Any]:
    """:func:`common.training.fit` under ``--resume`` and ``--no-progress``:
    ``{"history": [one row per epoch], "seconds": wall time of the run}``."""
    began = time.perf_counter()
    history = fit(run, ctx, resume=args.resume, show_progress=not args.no_progress, log=log)
    return {"history": history, "seconds": time.perf_counter() - began}
