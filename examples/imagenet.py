"""ImageNet classification with ResNet-18 and a declarative Lp-sphere/ball projection layer.

The experiment of the source paper (Gould, Hartley, Campbell, *Deep Declarative Networks*, §4.2):
ResNet-18's final ``fc`` becomes ``BatchNorm1d(512, affine=False) -> projection -> Linear``, where
the projection is ``dl.nn.SphereProjection(p, r)`` or ``dl.nn.BallProjection(p, r)`` (the
Euclidean projection of the 512 features onto ``{|u|_p = r}`` or ``{|u|_p <= r}``), p in
{1, 2, inf}, differentiated implicitly from its CVXPY declaration.

Data: an ImageFolder tree ``--data-dir`` with ``train/<class>/*`` and ``val/<class>/*`` (ImageNet
as the PyTorch examples lay it out), with the standard transforms (RandomResizedCrop 224 + flip;
Resize 256 + CenterCrop 224). By default, a stand-in ImageFolder tree written locally from
scikit-learn's handwritten digits (8x8, 10 classes) upscaled to coloured 40x40 RGB PNGs, with the
same transforms scaled to its size (RandomResizedCrop 32; Resize 36 + CenterCrop 32).

torchvision is used when it imports; otherwise an in-repo ResNet-18 / ImageFolder / transforms
with the same behaviour and state-dict names (:mod:`common.vision`); ``--no-torchvision`` forces
the in-repo path.

    python examples/imagenet.py --quick
    python examples/imagenet.py --projection none l1_sphere l2_sphere linf_sphere --epochs 8
    torchrun --nproc_per_node 8 examples/imagenet.py --data-dir /data/imagenet --projection l2_ball

Results go to a new numbered folder ``runs/imagenet/run-NNN`` (printed), or to ``--out-dir``
(refused if it holds an earlier run's results, unless ``--resume`` or ``--overwrite``):
``results.csv``, ``results.json``, ``table.md``, ``curves.png`` (training loss, top-1, top-5 and
mAP per projection, like the paper's figure 3), a checkpoint per run (``--resume`` continues from
them; without ``--out-dir``, the latest run's).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported from elsewhere

from common import cli, distributed, reporting, vision
from common.metrics import classification_metrics
from common.training import Run, seed_everything

import declopt as dl

PROJECTIONS = (
    "none",
    "l1_sphere",
    "l2_sphere",
    "linf_sphere",
    "l1_ball",
    "l2_ball",
    "linf_ball",
)
PAPER_RADIUS = {"l1": 250.0, "l2": 15.0, "linf": 3.0}
"""The paper's radii for the 512 batch-normalised ResNet-18 features."""

RUNS_ROOT = Path("runs/imagenet")
"""Without ``--out-dir`` every run writes to a new numbered folder ``run-NNN`` here."""

_P = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}


# ------------------------------------------------------------------------------------------------
# Data


def check_image_tree(data_dir: Path) -> None:
    """``data_dir`` must hold ``train/`` and ``val/`` class folders (the ImageNet layout)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            raise FileNotFoundError(
                f"{data_dir} has no {split}/ folder; expected {data_dir}/train/<class>/<images> "
                f"and {data_dir}/val/<class>/<images> (the ImageNet ImageFolder layout)"
            )


def generate_standin(
    out_dir: Path,
    size: int = 40,
    val_fraction: float = 0.2,
    per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Write scikit-learn's digits as an ImageFolder tree ``out_dir/{train,val}/digit_<d>/*.png``.

    Every 8x8 digit is upscaled (bicubic) to ``size x size`` and coloured: ink and paper get random
    RGB colours per image, so the three channels carry different information. ``per_class`` caps
    the images per class (before the split); ``val_fraction`` of each class goes to ``val/``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))[:per_class]
        n_val = max(1, round(val_fraction * len(index)))
        for split, chosen in (("val", index[:n_val]), ("train", index[n_val:])):
            folder = out_dir / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                _digit_image(digits.images[i], size, rng).save(folder / f"{i:05d}.png")
    return out_dir


def _digit_image(image: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    ink, paper = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.35, 3)
    gray = Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    t = np.asarray(gray, dtype=np.float64)[..., None] / 255
    return Image.fromarray(np.round(255 * (t * ink + (1 - t) * paper)).astype(np.uint8))


def standin_description(size: int, per_class: int | None, seed: int) -> str:
    """The stand-in's settings, as recorded in its ``standin.txt``."""
    return f"digits size={size} per_class={per_class} seed={seed}"


def ensure_standin(out_dir: Path, size: int, per_class: int | None, seed: int) -> Path:
    """The stand-in tree for these settings, written unless an identical one exists."""
    describe = standin_description(size, per_class, seed)
    marker = out_dir / "standin.txt"
    if marker.is_file() and marker.read_text().strip() == describe:
        return out_dir
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    generate_standin(out_dir, size=size, per_class=per_class, seed=seed)
    marker.write_text(describe + "\n")
    return out_dir


def datasets(
    data_dir: Path, crop: int, resize: int, scale: tuple[float, float], use_torchvision: bool | None
) -> tuple[Dataset, Dataset]:
    """``(train, val)`` ImageFolder datasets with the standard ImageNet transforms at ``crop``."""
    check_image_tree(data_dir)
    train = vision.image_folder(
        data_dir / "train", vision.train_transform(crop, scale, use_torchvision), use_torchvision
    )
    val = vision.image_folder(
        data_dir / "val", vision.eval_transform(resize, crop, use_torchvision), use_torchvision
    )
    if train.classes != val.classes:
        raise ValueError(
            f"{data_dir}: train/ and val/ have different class folders "
            f"({len(train.classes)} vs {len(val.classes)})"
        )
    return train, val


# ------------------------------------------------------------------------------------------------
# Model


def make_projection(name: str, radius: float | None = None) -> nn.Module:
    """``"l2_sphere"`` -> ``dl.nn.SphereProjection(2, 15)`` etc. (paper radius by default)."""
    if name not in PROJECTIONS or name == "none":
        raise ValueError(f"unknown projection {name!r}; choose from {', '.join(PROJECTIONS[1:])}")
    norm, kind = name.split("_")
    radius = PAPER_RADIUS[norm] if radius is None else radius
    cls = dl.nn.SphereProjection if kind == "sphere" else dl.nn.BallProjection
    return cls(_P[norm], radius, dim=-1)


def build_model(
    num_classes: int,
    projection: str,
    radius: float | None = None,
    use_torchvision: bool | None = None,
) -> nn.Module:
    """ResNet-18 (no pretrained weights); unless ``projection == "none"``, its ``fc`` becomes
    ``BatchNorm1d(512, affine=False) -> projection -> Linear(512, num_classes)``."""
    model = vision.resnet18(num_classes, use_torchvision)
    if projection != "none":
        features = model.fc.in_features
        model.fc = nn.Sequential(
            nn.BatchNorm1d(features, affine=False),  # no learnable scale: the radius is the scale
            make_projection(projection, radius),
            nn.Linear(features, num_classes),
        )
    return model


# ------------------------------------------------------------------------------------------------
# Command line


FULL = {
    "epochs": 90,
    "batch_size": 256,
    "lr": None,
    "projection": ["none"],
    "standin_per_class": None,
    "workers": None,
}
"""The reference implementation's defaults (SGD, lr 0.1 divided by 10 every 30 epochs, momentum
0.9, weight decay 1e-4, batch 256, 90 epochs). The lr scales with the global batch: 0.1 per 256."""

QUICK = {
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.01,
    "projection": ["none", "l2_sphere"],
    "standin_per_class": 60,
    "workers": 0,
    "threads": 1,
}
"""``--quick``: under a minute on a 2-core CPU (a 600-image stand-in, 6 epochs of 15 steps per
head), long enough to learn: top-1 65-77% for both heads after 6 epochs, against 10% chance. The
former settings (batch 16, lr 0.02, 3 epochs on 200 images) learned nothing: lr 0.02 at batch 16
is 3x the linear-scaling rule's 0.1 x 16/256, and the baseline's loss rose, while 30 steps in all
left too few for the heads (and the BatchNorm running statistics that evaluation uses) to settle.
lr 0.01 at batch 32 is the rule's 0.0125, rounded down. One thread: with two on a 2-core machine
an epoch took 1.6 s while nothing else ran but 10-47 s whenever anything did (their spin-waiting
collides; 3-5 min in all), against a steady ~3 s with one."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.parser("ResNet-18 with an Lp-sphere/ball projection on ImageNet (or its stand-in).")
    data = p.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        type=Path,
        help="ImageFolder root with train/ and val/ (default: the digits stand-in, generated "
        f"once into {RUNS_ROOT}/standin/<hash of its settings>, or OUT_DIR/standin/<hash> with "
        "--out-dir)",
    )
    data.add_argument("--image-size", type=int, help="crop size (default: 224; the stand-in: 32)")
    data.add_argument(
        "--resize",
        type=int,
        help="evaluation resize before the crop "
        "(default: IMAGE_SIZE x 256/224, i.e. 256; the stand-in: 36)",
    )
    data.add_argument(
        "--standin-per-class",
        type=int,
        help="stand-in images per class "
        f"(default: all, ~180; --quick: {QUICK['standin_per_class']})",
    )
    data.add_argument("--no-torchvision", action="store_true", help="use the in-repo equivalents")
    model = p.add_argument_group("model")
    model.add_argument(
        "--projection",
        nargs="+",
        choices=PROJECTIONS,
        help=cli.table_help("projection(s)", "projection", FULL, QUICK),
    )
    model.add_argument(
        "--radius",
        type=float,
        help="sphere/ball radius (default: the paper's, L1 250, L2 15, Linf 3)",
    )
    cli.add_training_args(
        p,
        FULL,
        QUICK,
        sweep_help="every projection (unless given)",
        lr_help=f"learning rate (default: 0.1 x global batch / 256; --quick: {QUICK['lr']})",
        weight_decay=1e-4,
        lr_step=30,
        lr_step_help="epochs between lr divisions by 10",
        workers=None,
        workers_help="DataLoader workers (default: 4, or the CPU count if fewer; the stand-in: 0; "
        f"--quick: {QUICK['workers']})",
    )
    cli.add_run_args(
        p,
        quick_help="under a minute on a 2-core CPU: no projection vs the L2 sphere, 6 epochs on "
        "600 stand-in images",
        runs_root=RUNS_ROOT,
    )
    args = p.parse_args(argv)
    cli.fill_defaults(args, FULL, QUICK, sweep={"projection": list(PROJECTIONS)})
    if args.workers is None:  # decoding 40x40 PNGs is cheap; ImageNet JPEGs are not
        args.workers = 0 if args.data_dir is None else min(4, os.cpu_count() or 1)
    if args.lr is None:  # the linear scaling rule from the reference's 0.1 at batch 256
        args.lr = 0.1 * args.batch_size * int(os.environ.get("WORLD_SIZE", "1")) / 256
    standin = args.data_dir is None
    if args.image_size is None:
        args.image_size = 32 if standin else 224
    if args.resize is None:
        args.resize = round(args.image_size * 256 / 224)
    _check_args(p, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    cli.check_positive(parser, args, ("epochs", "batch_size", "lr", "image_size", "resize"))
    if args.radius is not None and args.radius <= 0:
        parser.error("--radius must be positive")
    if args.resize < args.image_size:
        parser.error("--resize must be at least --image-size")
    cli.check_data_dir(parser, args)


def load_data(args: argparse.Namespace, ctx: distributed.Context) -> tuple[Dataset, Dataset, str]:
    """The real ImageFolder tree or the digits stand-in (written by rank 0 while others wait)."""
    use_tv = False if args.no_torchvision else None
    # The stand-in's crops keep at least a third of the digit: ImageNet's 8% would often cut it out.
    scale = (0.08, 1.0) if args.data_dir is not None else (0.35, 1.0)
    if args.data_dir is not None:
        root, source = args.data_dir, f"ImageFolder {args.data_dir}"
    else:
        root = cli.standin_folder(args, standin_description(40, args.standin_per_class, args.seed))
        distributed.on_main(ctx, ensure_standin, root, 40, args.standin_per_class, args.seed)
        source = f"stand-in: scikit-learn digits as 40x40 RGB PNGs in {root}"
    train, val = datasets(root, args.image_size, args.resize, scale, use_tv)
    if vision.uses_torchvision(use_tv):
        backend = "torchvision"
    else:
        backend = "in-repo" + ("" if args.no_torchvision else " (torchvision does not import)")
    return train, val, f"{source}; ResNet-18/ImageFolder/transforms: {backend}"


def build_run(
    args: argparse.Namespace,
    train: Dataset,
    val: Dataset,
    projection: str,
    ctx: distributed.Context,
) -> Run:
    """One projection head: ResNet-18, SGD, lr divided by 10 every ``--lr-step`` epochs."""
    use_tv = False if args.no_torchvision else None
    seed_everything(args.seed)  # every projection starts from the same weights
    model = distributed.wrap(build_model(len(train.classes), projection, args.radius, use_tv), ctx)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=0.1)
    config = {
        "projection": projection,
        "radius": args.radius,
        "batch_size": args.batch_size,
        "world_size": ctx.world_size,
        "lr": args.lr,
        "image_size": args.image_size,
        "seed": args.seed,
        "data": str(args.data_dir) if args.data_dir else f"standin{args.standin_per_class}",
    }
    return cli.make_run(
        args,
        ctx,
        name=projection,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train=train,
        test=val,
        evaluate=_metrics,
        config=config,
    )


def _metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    m = classification_metrics(logits, targets, ks=(1, 5))
    return {"top1": m["top1"], "top5": m["top5"], "mAP": m["mAP"]}


def results_table(results: list[dict[str, Any]]) -> str:
    """Final top-1, top-5 and mAP (%) and seconds per epoch, one row per projection."""
    rows = []
    for r in results:
        last = r["history"][-1]
        seconds = sum(row["seconds"] for row in r["history"]) / len(r["history"])
        rows.append(
            [
                r["projection"],
                f"{100 * last['test_top1']:.1f}",
                f"{100 * last['test_top5']:.1f}",
                f"{100 * last['test_mAP']:.1f}",
                f"{seconds:.0f}",
            ]
        )
    headers = ["projection", "top-1 %", "top-5 %", "mAP %", "s / epoch"]
    return reporting.markdown_table(headers, rows)


def write_results(args: argparse.Namespace, results: list[dict[str, Any]], source: str) -> str:
    """CSV/JSON/Markdown/figure into ``--out-dir``; returns the table."""
    out = args.out_dir
    table = results_table(results)
    reporting.write_results(out, results, ("projection",), table, source, args)
    reporting.plot_curves(
        {"": {r["projection"]: r["history"] for r in results}},
        [
            ("train_loss", "training loss"),
            ("test_top1", "top-1 accuracy"),
            ("test_top5", "top-5 accuracy"),
            ("test_mAP", "mAP"),
        ],
        out / "curves.png",
        "ResNet-18 + projection" + ("" if args.data_dir else " (digits stand-in)"),
    )
    return table


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train one ResNet-18 per projection; returns one dict per run with its history."""
    args = parse_args(argv)
    with cli.session(args.device, args.threads) as (ctx, log):
        cli.prepare_out_dir(args, ctx, RUNS_ROOT, reporting.EARLIER_RUN)
        log(f"results folder: {args.out_dir}")
        with cli.exit_on(FileNotFoundError, ValueError):
            train, val, source = load_data(args, ctx)
        log(
            f"data: {source}; {len(train)} train / {len(val)} val images, {len(train.classes)} "
            f"classes; {ctx.world_size} process(es) on {ctx.device}"
        )
        results = []
        for projection in args.projection:
            # No reference to the run (its DDP model) outlives training: see
            # distributed.teardown for the hang at exit that a model freed later causes.
            trained = cli.train(build_run(args, train, val, projection, ctx), args, ctx, log)
            results.append({"projection": projection, **trained})
            if ctx.is_main:  # after every run, so that a crash keeps what is done
                table = write_results(args, results, source)
        if ctx.is_main:
            log(reporting.done_message(table, args.out_dir))
    return results


if __name__ == "__main__":
    main()
