"""The command line and the outer loop that the training examples share.

Both examples take the same training and run flags (:func:`add_training_args`,
:func:`add_run_args`) next to their own data and model flags; a flag left unset is ``None`` until
:func:`fill_defaults` takes its value from the example's ``FULL`` or ``QUICK`` table. ``main`` then
reads, in either example::

    with cli.session(args.device, args.threads) as (ctx, log):
        with cli.exit_on(DatasetError):
            data = load_data(args, ctx)
        for config in grid:
            run = build_run(args, data, config, ctx)  # model, optimizer, scheduler -> make_run
            results.append({**config, **cli.train(run, args, ctx, log)})
            write_results(...)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
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


def positive_int(text: str) -> int:
    """An argparse ``type``: a positive integer, else a usage error naming the value."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


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
    ``--workers`` and ``--threads``. ``full`` and ``quick`` are the example's tables of defaults,
    quoted in the help; ``lr_help`` and ``workers_help`` must state their defaults when those are
    ``None``."""
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
    quick_threads = f"; --quick: {quick['threads']}" if quick.get("threads") else ""
    train.add_argument(
        "--threads",
        type=positive_int,
        help="torch's CPU threads per process (default: torch's, one per core; under torchrun "
        f"the cores shared out{quick_threads})",
    )


def add_run_args(parser: argparse.ArgumentParser, *, quick_help: str, runs_root: Path) -> None:
    """The "run" group: ``--quick``, ``--out-dir``, ``--resume``, ``--overwrite``,
    ``--no-progress``. ``runs_root`` holds the numbered run folders (:func:`results_folder`)."""
    run = parser.add_argument_group("run")
    run.add_argument("--quick", action="store_true", help=quick_help)
    add_out_dir_arg(run, "--out-dir", runs_root)
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out-dir (default: the latest run folder) from their "
        "checkpoints",
    )
    add_overwrite_arg(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------------
# Results folders: a run never overwrites an earlier one's files


RUN_FOLDER = re.compile(r"run-(\d+)$")
"""Run folders under the runs root: ``run-001``, ``run-002``, ..."""


class FolderError(ValueError):
    """A results folder that cannot be used as asked (it holds an earlier run, say)."""


def add_out_dir_arg(parser: Any, flag: str, runs_root: Path) -> None:
    """``flag`` (``--out-dir``, ``--out``): the results folder, ``None`` unless given."""
    parser.add_argument(
        flag,
        type=Path,
        help=f"results folder; refused if it holds an earlier run's results (see --overwrite) "
        f"(default: a new numbered folder {runs_root}/run-NNN)",
    )


def add_overwrite_arg(parser: Any) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's results in the given results folder",
    )


def latest_run(root: Path) -> Path | None:
    """The highest-numbered ``run-NNN`` folder of ``root``, or ``None``."""
    runs = _run_numbers(root)
    return root / runs[max(runs)] if runs else None


def new_run(root: Path) -> Path:
    """Create and return ``root/run-NNN``, one past the highest number there.

    ``mkdir`` without ``exist_ok`` claims a number atomically: two runs started at the same time
    never share a folder (the second moves on to the next number)."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"run-{max(_run_numbers(root), default=0) + 1:03d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another run claimed this number first: take the next
            continue


def _run_numbers(root: Path) -> dict[int, str]:
    if not root.is_dir():
        return {}
    return {
        int(m.group(1)): p.name
        for p in root.iterdir()
        if p.is_dir() and (m := RUN_FOLDER.match(p.name))
    }


def earlier_results(folder: Path, patterns: Sequence[str]) -> list[Path]:
    """The files in ``folder`` matching ``patterns`` (globs): what an earlier run left there."""
    if not folder.is_dir():
        return []
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def results_folder(
    given: Path | None,
    runs_root: Path,
    patterns: Sequence[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    check_only: bool = False,
) -> Path:
    """Where a run writes its results, such that it never overwrites an earlier run by accident.

    * No folder given: a new ``runs_root/run-NNN`` (with ``resume``: the latest one, whose
      checkpoints the run continues; a new one if there is none).
    * A folder given: used as is, unless it holds files matching ``patterns`` (an earlier run's
      results or checkpoints). Then ``resume`` continues that run and ``overwrite`` deletes those
      files first (only those: nothing else in the folder is touched); otherwise
      :class:`FolderError` says what to do.

    ``check_only`` raises the same errors but creates and deletes nothing (for a check before a
    long computation; a numbered folder is then claimed only by the call that writes).
    """
    if resume and overwrite:
        raise FolderError("--resume continues the earlier run, --overwrite replaces it: not both")
    if given is None:
        if check_only:
            return runs_root
        if resume and (latest := latest_run(runs_root)) is not None:
            return latest
        return new_run(runs_root)
    found = earlier_results(given, patterns)
    if found and not resume:
        if not overwrite:
            names = ", ".join(str(p.relative_to(given)) for p in found[:4])
            more = f" and {len(found) - 4} more" if len(found) > 4 else ""
            raise FolderError(
                f"{given} already holds the results of an earlier run ({names}{more}); "
                "choose another folder, or pass --overwrite to replace them"
                + (", or --resume to continue it" if any(p.suffix == ".pt" for p in found) else "")
                + f" (without a folder, each run goes to a new {runs_root}/run-NNN)"
            )
        if check_only:
            return given
        for path in found:
            path.unlink()
    if not check_only:
        given.mkdir(parents=True, exist_ok=True)
    return given


def prepare_out_dir(
    args: argparse.Namespace, ctx: Context, runs_root: Path, patterns: Sequence[str]
) -> None:
    """Resolve ``args.out_dir`` with :func:`results_folder` (on rank 0, shared with the others)
    and set ``args.standin_dir``, where a generated stand-in data set is cached: beside the run
    folders when none was given (so that later runs reuse it), else in ``--out-dir``."""
    standin_root = runs_root if args.out_dir is None else args.out_dir
    with exit_on(FolderError):
        args.out_dir = distributed.from_main(
            ctx,
            partial(results_folder, resume=args.resume, overwrite=args.overwrite),
            args.out_dir,
            runs_root,
            patterns,
        )
    args.standin_dir = standin_root / "standin"


def standin_folder(args: argparse.Namespace, description: str) -> Path:
    """The cache folder of the stand-in data set that ``description`` describes (its settings):
    ``STANDIN_DIR/<hash of description>``, one folder per settings. Were all stand-ins cached in
    one folder, a run with other stand-in settings (``--quick`` after a plain run, say) would
    delete and rewrite the data set that an earlier or concurrent run reads."""
    return args.standin_dir / hashlib.sha1(description.encode()).hexdigest()[:12]


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
def session(device: str, threads: int | None = None) -> Iterator[tuple[Context, Log]]:
    """This process's :class:`Context` (joining the process group under ``torchrun``) and a log
    that prints on rank 0 only; the process group is torn down on the way out. ``threads`` (when
    given) sets torch's CPU threads, after :func:`distributed.setup` has shared the cores out,
    until the session ends (``main()`` called from a notebook leaves the caller's setting)."""
    before = torch.get_num_threads()
    ctx = distributed.setup(device)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield ctx, (print if ctx.is_main else _quiet)
    finally:
        distributed.teardown(ctx)
        torch.set_num_threads(before)


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
    ``OUT_DIR/<name>/checkpoint.pt`` (``OUT_DIR`` resolved by :func:`prepare_out_dir`)."""
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
