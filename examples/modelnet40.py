"""ModelNet40 point-cloud classification with PointNet and declarative robust pooling.

The experiment of the source paper (Gould, Hartley, Campbell, *Deep Declarative Networks*, §4.1):
PointNet's global max pooling is replaced by ``dl.nn.RobustPool`` (``argmin_y sum_i phi(y - x_i)``
per feature channel over the points) and the networks are compared when a fraction of every
cloud's points are outliers, uniform in the unit ball.

Data: the standard ``modelnet40_ply_hdf5_2048`` folder (``--data-dir``; ``ply_data_train0..4.h5``,
``ply_data_test0..1.h5`` with datasets ``data (N, 2048, 3)`` float32 and ``label (N, 1)``), or by
default a stand-in written in exactly that layout: procedurally generated surfaces of 12 shape
classes (:mod:`common.shapes`), read back by the same loader.

    python examples/modelnet40.py --quick                     # ~1 min on a laptop CPU
    python examples/modelnet40.py --pooling max huber welsch --outlier-ratio 0 0.5
    python examples/modelnet40.py --sweep --data-dir modelnet40_ply_hdf5_2048   # the paper's grid
    torchrun --nproc_per_node 4 examples/modelnet40.py --data-dir ...  # DistributedDataParallel

Each (pooling, outlier ratio) pair is one run; results go to a new numbered folder
``runs/modelnet40/run-NNN`` (printed), or to ``--out-dir`` (refused if it holds an earlier run's
results, unless ``--resume`` or ``--overwrite``): ``results.csv`` (one row per run and epoch),
``results.json``, ``table.md``, ``curves.png`` (training loss, test accuracy and test mAP per
pooling, like the paper's figure 2), ``vs_outliers.png``, and a checkpoint per run (``--resume``
continues from it; without ``--out-dir``, the latest run's).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported from elsewhere

from common import cli, distributed, reporting
from common.metrics import classification_metrics
from common.shapes import SHAPES, random_cloud, uniform_ball
from common.training import Run, seed_everything

import declopt as dl

POOLINGS = ("max", "quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic")
SWEEP_RATIOS = (0.0, 0.1, 0.2, 0.5, 0.9)
"""The outlier ratios of the paper's table."""

SPLIT_FILES = {"train": 5, "test": 2}
"""``ply_data_<split><i>.h5`` files of the real data set."""

LAYOUT = (
    "the modelnet40_ply_hdf5_2048 layout: ply_data_train0.h5 ... ply_data_train4.h5 and "
    "ply_data_test0.h5, ply_data_test1.h5, each with datasets 'data' (N, P, 3) float32 and "
    "'label' (N, 1) integer"
)


RUNS_ROOT = Path("runs/modelnet40")
"""Without ``--out-dir`` every run writes to a new numbered folder ``run-NNN`` here."""


class DatasetError(ValueError):
    """A data folder or file that is not in the ModelNet40 HDF5 layout."""


# ------------------------------------------------------------------------------------------------
# The HDF5 layout: reading


@dataclass
class PointClouds:
    """A split: ``points (N, P, 3)`` float32 and ``labels (N,)`` int64."""

    points: np.ndarray
    labels: np.ndarray


@dataclass
class ModelNet:
    train: PointClouds
    test: PointClouds
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def split_files(data_dir: Path, split: str) -> list[Path]:
    """The ``ply_data_<split><i>.h5`` files of ``data_dir`` in index order."""
    pattern = re.compile(rf"ply_data_{split}(\d+)\.h5$")
    found = [(int(m.group(1)), p) for p in data_dir.iterdir() if (m := pattern.match(p.name))]
    if not found:
        raise DatasetError(f"no ply_data_{split}*.h5 files in {data_dir}; expected {LAYOUT}")
    return [p for _, p in sorted(found)]


def read_h5(path: Path) -> PointClouds:
    """One HDF5 file of the layout, checked: clear errors name the file and what is wrong."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise DatasetError(f"{path} is not a readable HDF5 file ({error})") from error
    with f:
        for key in ("data", "label"):
            if not isinstance(f.get(key), h5py.Dataset):
                raise DatasetError(f"{path} has no dataset {key!r}; expected {LAYOUT}")
        points, labels = f["data"][()], f["label"][()]
    if points.ndim != 3 or points.shape[2] != 3 or not np.issubdtype(points.dtype, np.floating):
        raise DatasetError(
            f"{path}: 'data' has shape {points.shape} and dtype {points.dtype}; expected (N, P, 3) "
            "floating point"
        )
    if labels.shape not in ((points.shape[0],), (points.shape[0], 1)):
        raise DatasetError(
            f"{path}: 'label' has shape {labels.shape}; expected ({points.shape[0]}, 1) to match "
            f"'data' {points.shape}"
        )
    labels = labels.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise DatasetError(f"{path}: 'label' must hold non-negative integers ({labels.dtype})")
    if not np.isfinite(points).all():
        raise DatasetError(f"{path}: 'data' contains NaN or infinite coordinates")
    return PointClouds(points.astype(np.float32), labels.astype(np.int64))


def read_split(data_dir: Path, split: str) -> PointClouds:
    parts = [read_h5(p) for p in split_files(data_dir, split)]
    sizes = {p.points.shape[1] for p in parts}
    if len(sizes) > 1:
        raise DatasetError(f"{data_dir}: the {split} files hold clouds of different sizes {sizes}")
    return PointClouds(
        np.concatenate([p.points for p in parts]), np.concatenate([p.labels for p in parts])
    )


def load_modelnet(data_dir: str | Path) -> ModelNet:
    """Both splits of a ModelNet40-layout folder, and the class names (``shape_names.txt`` when
    present, else the label numbers)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data folder {data_dir} does not exist; expected {LAYOUT}")
    train, test = read_split(data_dir, "train"), read_split(data_dir, "test")
    if train.points.shape[1] != test.points.shape[1]:
        raise DatasetError(
            f"{data_dir}: train clouds have {train.points.shape[1]} points, test clouds "
            f"{test.points.shape[1]}"
        )
    largest = int(max(train.labels.max(), test.labels.max()))
    names_file = data_dir / "shape_names.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if largest >= len(names):
            raise DatasetError(
                f"{data_dir}: label {largest} but shape_names.txt names only {len(names)} classes"
            )
    else:
        names = [str(i) for i in range(largest + 1)]
    return ModelNet(train, test, names)


# ------------------------------------------------------------------------------------------------
# The HDF5 layout: writing the stand-in


@dataclass(frozen=True)
class StandIn:
    """Settings of the generated stand-in (clouds per class and split, points per cloud)."""

    classes: int = len(SHAPES)
    train_per_class: int = 64
    test_per_class: int = 16
    points: int = 2048
    seed: int = 0

    def describe(self) -> str:
        return (
            f"stand-in: {self.classes} shape classes, {self.train_per_class}/{self.test_per_class} "
            f"train/test clouds per class, {self.points} points each (seed {self.seed})"
        )


def write_h5(path: Path, points: np.ndarray, labels: np.ndarray) -> None:
    """One file of the layout: ``data (N, P, 3)`` float32, ``label (N, 1)`` uint8."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=points.astype(np.float32))
        f.create_dataset("label", data=labels.astype(np.uint8).reshape(-1, 1))


def generate_standin(out_dir: Path, settings: StandIn) -> Path:
    """Write the stand-in data set to ``out_dir`` in the ModelNet40 HDF5 layout.

    Classes are the first ``settings.classes`` shapes of :data:`common.shapes.SHAPES`, each with
    exactly ``train_per_class`` / ``test_per_class`` clouds, shuffled, split over 5 train and 2
    test files like the real set. Also writes ``shape_names.txt`` and ``{train,test}_files.txt``.
    """
    if not 2 <= settings.classes <= len(SHAPES):
        raise ValueError(f"the stand-in has 2 to {len(SHAPES)} classes, got {settings.classes}")
    names = list(SHAPES)[: settings.classes]
    rng = np.random.default_rng(settings.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, per_class in (
        ("train", settings.train_per_class),
        ("test", settings.test_per_class),
    ):
        labels = rng.permutation(np.repeat(np.arange(len(names)), per_class))
        points = np.stack([random_cloud(names[c], rng, settings.points) for c in labels])
        files = []
        for i, index in enumerate(np.array_split(np.arange(len(labels)), SPLIT_FILES[split])):
            files.append(out_dir / f"ply_data_{split}{i}.h5")
            write_h5(files[-1], points[index], labels[index])
        (out_dir / f"{split}_files.txt").write_text("".join(f"{p}\n" for p in files))
    (out_dir / "shape_names.txt").write_text("".join(f"{n}\n" for n in names))
    (out_dir / "standin.txt").write_text(settings.describe() + "\n")
    return out_dir


def ensure_standin(out_dir: Path, settings: StandIn) -> Path:
    """The stand-in folder for ``settings``, generated unless an identical one exists."""
    marker = out_dir / "standin.txt"
    if marker.is_file() and marker.read_text().strip() == settings.describe():
        return out_dir
    return generate_standin(out_dir, settings)


# ------------------------------------------------------------------------------------------------
# Outliers (as in the paper: a fraction of each cloud's points replaced, uniform in the unit ball)


def take_points(clouds: PointClouds, num_points: int) -> PointClouds:
    """The first ``num_points`` points of every cloud (the files store them in random order)."""
    available = clouds.points.shape[1]
    if num_points > available:
        raise DatasetError(f"--num-points {num_points}: the clouds have only {available} points")
    return PointClouds(clouds.points[:, :num_points], clouds.labels)


def add_outliers(clouds: PointClouds, ratio: float, seed: int) -> PointClouds:
    """A copy with ``floor(ratio * P)`` random points of every cloud replaced by outliers uniform
    in the unit ball; the same ``seed`` gives the same corruption on every run and process."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"outlier ratio must be in [0, 1], got {ratio}")
    n, p, _ = clouds.points.shape
    k = int(ratio * p)
    points = clouds.points.copy()
    if k:
        rng = np.random.default_rng(seed)
        rows = np.argsort(rng.uniform(size=(n, p)), axis=1)[:, :k]  # k distinct points per cloud
        points[np.arange(n)[:, None], rows] = uniform_ball(rng, (n, k)).astype(np.float32)
    return PointClouds(points, clouds.labels)


def as_dataset(clouds: PointClouds) -> TensorDataset:
    return TensorDataset(torch.from_numpy(clouds.points), torch.from_numpy(clouds.labels))


# ------------------------------------------------------------------------------------------------
# PointNet with a choice of global pooling


class MaxPool(nn.Module):
    """Global max pooling over ``dim`` (PointNet's original symmetric function)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(self.dim)


def make_pooling(name: str, alpha: float = 1.0, compile: bool = False) -> nn.Module:
    """``"max"`` or a robust pooling over the last dim (the points)."""
    if name == "max":
        return MaxPool(-1)
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}")
    return dl.nn.RobustPool(name, alpha=alpha, dim=-1, compile=compile)


class PointNet(nn.Module):
    """PointNet classifier (no transform nets): shared per-point MLP, global pooling, MLP head.

    Args:
        num_classes: outputs.
        pooling: maps features ``(B, C, N)`` to ``(B, C)``.
        mlp: widths of the shared per-point layers (1x1 convolutions + BatchNorm), ``3 -> ...``.
        head: hidden widths of the classifier after pooling.
        dropout: before the last hidden layer's BatchNorm.
    """

    def __init__(
        self,
        num_classes: int,
        pooling: nn.Module,
        mlp: Sequence[int] = (64, 64, 64, 128, 1024),
        head: Sequence[int] = (512, 256),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for i, out in enumerate(mlp):
            layers += [nn.Conv1d(width, out, 1), nn.BatchNorm1d(out)]
            # The last layer stays linear (as in the reference implementation): the pooled
            # features are signed and centred, the regime robust penalties with alpha ~ 1 expect.
            if i < len(mlp) - 1:
                layers.append(nn.ReLU())
            width = out
        self.features = nn.Sequential(*layers)
        self.pool = pooling
        blocks: list[nn.Module] = []
        for i, out in enumerate(head):
            blocks.append(nn.Linear(width, out))
            if i == len(head) - 1 and dropout > 0:
                blocks.append(nn.Dropout(dropout))
            blocks += [nn.BatchNorm1d(out), nn.ReLU()]
            width = out
        blocks.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*blocks)

    def forward(self, points: Tensor) -> Tensor:
        """``points: (B, N, 3)`` -> logits ``(B, num_classes)``."""
        features = self.features(points.transpose(1, 2))  # (B, C, N)
        return self.classifier(self.pool(features))


# ------------------------------------------------------------------------------------------------
# Command line


FULL = {
    "epochs": 60,
    "batch_size": 24,
    "num_points": 1024,
    "pooling": ["max"],
    "outlier_ratio": [0.0],
    "standin_train": 64,
    "standin_test": 16,
    "lr": 0.01,
}
"""Defaults: the reference implementation's (SGD, lr 0.01, momentum 0.9, batch 24, 60 epochs,
lr halved every 20 epochs); 1024 points per cloud as in PointNet."""

QUICK = {
    "epochs": 4,
    "batch_size": 24,
    "num_points": 128,
    "pooling": ["max", "huber"],
    "outlier_ratio": [0.5],
    "standin_train": 16,
    "standin_test": 8,
    "lr": 0.05,
}
"""``--quick``: a small stand-in and short clouds, about a minute on a laptop CPU."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.parser("PointNet with robust global pooling on ModelNet40 (or its stand-in).")
    data = p.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        type=Path,
        help="modelnet40_ply_hdf5_2048 folder (default: the stand-in, generated once into "
        f"{RUNS_ROOT}/standin/<hash of its settings>, or OUT_DIR/standin/<hash> with --out-dir)",
    )
    data.add_argument(
        "--num-points",
        type=int,
        help=cli.table_help("points per cloud", "num_points", FULL, QUICK),
    )
    data.add_argument(
        "--outlier-ratio",
        type=float,
        nargs="+",
        help=cli.table_help(
            "fraction(s) of each cloud's points replaced by outliers", "outlier_ratio", FULL, QUICK
        ),
    )
    data.add_argument("--outlier-seed", type=int, default=2809, help="outlier sampling seed")
    data.add_argument(
        "--standin-classes", type=int, default=len(SHAPES), help="stand-in shape classes"
    )
    data.add_argument(
        "--standin-train",
        type=int,
        help=cli.table_help("stand-in training clouds per class", "standin_train", FULL, QUICK),
    )
    data.add_argument(
        "--standin-test",
        type=int,
        help=cli.table_help("stand-in test clouds per class", "standin_test", FULL, QUICK),
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--pooling",
        nargs="+",
        choices=POOLINGS,
        help=cli.table_help("global pooling(s)", "pooling", FULL, QUICK),
    )
    model.add_argument("--alpha", type=float, default=1.0, help="robust penalty scale")
    model.add_argument(
        "--compile",
        action="store_true",
        help="robust pooling under torch.compile (pays off on long runs)",
    )
    model.add_argument(
        "--mlp",
        type=int,
        nargs="+",
        default=[64, 64, 64, 128, 1024],
        help="widths of the shared per-point layers",
    )
    model.add_argument(
        "--head", type=int, nargs="+", default=[512, 256], help="hidden widths of the classifier"
    )
    model.add_argument("--dropout", type=float, default=0.3, help="dropout probability")
    cli.add_training_args(
        p,
        FULL,
        QUICK,
        sweep_help=f"all poolings x outlier ratios {cli.show(SWEEP_RATIOS)} (unless given)",
        optimizers=("sgd", "adam"),
        weight_decay=0.0,
        lr_step=20,
        lr_step_help="epochs between lr halvings",
        workers=0,
    )
    cli.add_run_args(
        p,
        quick_help="about a minute on a CPU: max vs huber pooling, 50%% outliers",
        runs_root=RUNS_ROOT,
    )
    args = p.parse_args(argv)
    sweep = {"pooling": list(POOLINGS), "outlier_ratio": list(SWEEP_RATIOS)}
    cli.fill_defaults(args, FULL, QUICK, sweep)
    _check_args(p, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ("epochs", "batch_size", "num_points", "standin_train", "standin_test", "lr")
    cli.check_positive(parser, args, positive)
    if args.alpha <= 0:
        parser.error("--alpha must be positive")
    if any(not 0 <= r <= 1 for r in args.outlier_ratio):
        parser.error("--outlier-ratio values must be in [0, 1]")
    if not 2 <= args.standin_classes <= len(SHAPES):
        parser.error(f"--standin-classes must be between 2 and {len(SHAPES)}")
    cli.check_data_dir(parser, args)


def load_data(args: argparse.Namespace, ctx: distributed.Context) -> tuple[ModelNet, str]:
    """The real data set, or the stand-in (generated by rank 0 while the others wait)."""
    if args.data_dir is not None:
        return load_modelnet(args.data_dir), f"ModelNet40 HDF5 from {args.data_dir}"
    settings = StandIn(args.standin_classes, args.standin_train, args.standin_test, seed=args.seed)
    folder = cli.standin_folder(args, settings.describe())
    distributed.on_main(ctx, ensure_standin, folder, settings)
    return load_modelnet(folder), settings.describe() + f" in {folder}"


def build_run(
    args: argparse.Namespace, data: ModelNet, pooling: str, ratio: float, ctx: distributed.Context
) -> Run:
    """One (pooling, outlier ratio) configuration: corrupted data, PointNet, SGD."""
    name = f"{pooling}_outliers{ratio:g}"
    train = add_outliers(take_points(data.train, args.num_points), ratio, args.outlier_seed)
    test = add_outliers(take_points(data.test, args.num_points), ratio, args.outlier_seed + 1)
    seed_everything(args.seed)  # every pooling starts from the same weights
    model = PointNet(
        data.num_classes,
        make_pooling(pooling, args.alpha, args.compile),
        args.mlp,
        args.head,
        args.dropout,
    )
    model = distributed.wrap(model, ctx)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=0.5)
    config = {
        "pooling": pooling,
        "outlier_ratio": ratio,
        "alpha": args.alpha,
        "num_points": args.num_points,
        "batch_size": args.batch_size,
        "world_size": ctx.world_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "seed": args.seed,
        "mlp": list(args.mlp),
        "head": list(args.head),
        "data": str(args.data_dir) if args.data_dir else "standin",
    }
    return cli.make_run(
        args,
        ctx,
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train=as_dataset(train),
        test=as_dataset(test),
        evaluate=_metrics,
        config=config,
    )


def _metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    m = classification_metrics(logits, targets, ks=(1,))
    return {"accuracy": m["top1"], "mAP": m["mAP"]}


def results_table(results: list[dict[str, Any]]) -> str:
    """Final test accuracy and mAP (%), one row per pooling, two columns per outlier ratio."""
    ratios = sorted({r["outlier_ratio"] for r in results})
    poolings = [p for p in POOLINGS if any(r["pooling"] == p for r in results)]
    final = {(r["pooling"], r["outlier_ratio"]): r["history"][-1] for r in results}
    headers = ["pooling"]
    for ratio in ratios:
        headers += [f"acc % ({ratio:.0%} outl.)", f"mAP % ({ratio:.0%} outl.)"]
    rows = []
    for pooling in poolings:
        row: list[Any] = [pooling]
        for ratio in ratios:
            last = final.get((pooling, ratio))
            row += (
                [_percent(last["test_accuracy"]), _percent(last["test_mAP"])] if last else ["", ""]
            )
        rows.append(row)
    return reporting.markdown_table(headers, rows)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def write_results(args: argparse.Namespace, results: list[dict[str, Any]], source: str) -> str:
    """CSV/JSON/Markdown/figures into ``--out-dir``; returns the table."""
    out = args.out_dir
    table = results_table(results)
    reporting.write_results(out, results, ("pooling", "outlier_ratio"), table, source, args)
    curves: dict[str, dict[str, list]] = {}
    for r in results:
        group = f"{r['outlier_ratio']:.0%} outliers"
        curves.setdefault(group, {})[r["pooling"]] = r["history"]
    reporting.plot_curves(
        curves,
        [
            ("train_loss", "training loss"),
            ("test_accuracy", "test accuracy"),
            ("test_mAP", "test mAP"),
        ],
        out / "curves.png",
        "PointNet on ModelNet40" + ("" if args.data_dir else " (stand-in)"),
    )
    if len({r["outlier_ratio"] for r in results}) > 1:
        finals: dict[str, list] = {}
        for r in results:
            finals.setdefault(r["pooling"], []).append(
                (r["outlier_ratio"], r["history"][-1]["test_accuracy"])
            )
        reporting.plot_against(
            finals, "outlier ratio", "test accuracy", out / "vs_outliers.png", "final test accuracy"
        )
    return table


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every (pooling, outlier ratio) pair; returns one dict per run with its history."""
    args = parse_args(argv)
    with cli.session(args.device, args.threads) as (ctx, log):
        cli.prepare_out_dir(args, ctx, RUNS_ROOT, reporting.EARLIER_RUN)
        log(f"results folder: {args.out_dir}")
        with cli.exit_on(DatasetError):
            data, source = load_data(args, ctx)
        log(
            f"data: {source}; {len(data.train.labels)} train / {len(data.test.labels)} test "
            f"clouds, {data.num_classes} classes; {ctx.world_size} process(es) on {ctx.device}"
        )
        results = []
        for ratio in args.outlier_ratio:
            for pooling in args.pooling:
                # No reference to the run (its DDP model) outlives training: see
                # distributed.teardown for the hang at exit that a model freed later causes.
                trained = cli.train(build_run(args, data, pooling, ratio, ctx), args, ctx, log)
                results.append({"pooling": pooling, "outlier_ratio": ratio, **trained})
                if ctx.is_main:  # after every run, so that a crash keeps what is done
                    table = write_results(args, results, source)
        if ctx.is_main:
            log(reporting.done_message(table, args.out_dir))
    return results


if __name__ == "__main__":
    main()
