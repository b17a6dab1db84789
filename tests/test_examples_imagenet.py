"""examples/imagenet.py and common/vision.py (the in-repo path: torchvision does not import
beside this project's torch), the shared metrics, and benchmarks/gpu_check.py's smoke mode."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import imagenet as inet  # noqa: E402
from common import vision  # noqa: E402
from common.metrics import mean_average_precision, topk_accuracy  # noqa: E402

RESNET18_PARAMETERS = 11_689_512
"""``sum(p.numel() for p in torchvision.models.resnet18().parameters())``."""


pytestmark = pytest.mark.usefixtures("one_thread")


def write_tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> None:
    """``root/<class>/<i>.png`` RGB images; each class's pixels are its index (for checking)."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (c, c, c)).save(root / name / f"{i}.png")


# ------------------------------------------------------------------------------------------------
# In-repo ResNet-18


def test_in_repo_resnet18_has_torchvisions_size_and_state_dict_names() -> None:
    model = vision.resnet18_in_repo(1000)
    assert sum(p.numel() for p in model.parameters()) == RESNET18_PARAMETERS
    keys = model.state_dict().keys()
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.1.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer4.0.downsample.1.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys
    assert len(keys) == 122  # torchvision's resnet18().state_dict() has 122 entries


@pytest.mark.skipif(not vision.available(), reason="torchvision does not import here")
def test_in_repo_resnet18_state_dict_loads_into_torchvisions() -> None:
    import torchvision

    ours = vision.resnet18_in_repo(10).state_dict()
    theirs = torchvision.models.resnet18(num_classes=10)
    theirs.load_state_dict(ours)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in ours.items()
    }


def test_in_repo_resnet18_classifies_small_and_large_images() -> None:
    model = vision.resnet18_in_repo(7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


# ------------------------------------------------------------------------------------------------
# In-repo ImageFolder and transforms


def test_folder_dataset_orders_classes_and_samples_like_imagefolder(tmp_path: Path) -> None:
    write_tree(tmp_path, {"b": 2, "a": 3, "c": 1})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "nested").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "nested" / "x.JPG")
    data = vision.FolderDataset(tmp_path)
    assert data.classes == ["a", "b", "c"] and data.class_to_idx == {"a": 0, "b": 1, "c": 2}
    names = [Path(p).relative_to(tmp_path).as_posix() for p, _ in data.samples]
    assert names == [
        "a/0.png",
        "a/1.png",
        "a/2.png",
        "a/nested/x.JPG",
        "b/0.png",
        "b/1.png",
        "c/0.png",
    ]
    assert data.targets == [0, 0, 0, 0, 1, 1, 2]
    image, target = data[4]
    assert image.mode == "RGB" and target == 1 and image.getpixel((0, 0)) == (0, 0, 0)


def test_folder_dataset_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vision.FolderDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        vision.FolderDataset(tmp_path)
    (tmp_path / "empty").mkdir()
    write_tree(tmp_path, {"full": 1})
    with pytest.raises(FileNotFoundError, match=r"no images in class folder.*empty"):
        vision.FolderDataset(tmp_path)


def test_corrupt_image_raises_an_error_naming_the_file(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 1})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    data = vision.FolderDataset(tmp_path)
    assert Path(data.samples[1][0]).name == "broken.png"
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        data[1]


def test_transforms_produce_normalised_tensors_of_the_crop_size() -> None:
    torch.manual_seed(0)
    image = Image.new("RGB", (50, 40), (124, 116, 104))  # ~ the ImageNet mean colour
    train = vision.train_transform(32, use_torchvision=False)(image)
    val = vision.eval_transform(36, 32, use_torchvision=False)(image)
    for x in (train, val):
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.abs().max() < 0.05  # normalised with the ImageNet mean and std


def test_resize_and_center_crop_follow_torchvision() -> None:
    image = Image.new("RGB", (300, 200))
    assert vision.Resize(256)(image).size == (384, 256)  # shorter side to 256
    assert vision.Resize(100)(Image.new("RGB", (50, 80))).size == (100, 160)
    assert vision.CenterCrop(224)(vision.Resize(256)(image)).size == (224, 224)


def test_random_resized_crop_stays_inside_the_image_with_the_area_and_ratio_asked() -> None:
    torch.manual_seed(0)
    crop = vision.RandomResizedCrop(32, scale=(0.3, 0.6), ratio=(0.75, 4 / 3))
    for _ in range(50):
        top, left, h, w = crop.params(100, 80)
        assert top >= 0 and top + h <= 80 and left >= 0 and left + w <= 100
        assert 0.28 <= h * w / 8000 <= 0.62 and 0.7 <= w / h <= 1.4
    assert crop(Image.new("RGB", (100, 80))).size == (32, 32)


# ------------------------------------------------------------------------------------------------
# Stand-in, model, metrics


def test_digits_standin_is_an_imagefolder_tree_of_rgb_pngs(tmp_path: Path) -> None:
    inet.generate_standin(tmp_path, size=40, per_class=10, seed=0)
    train, val = inet.datasets(tmp_path, 32, 36, (0.35, 1.0), use_torchvision=False)
    assert train.classes == [f"digit_{d}" for d in range(10)] == val.classes
    assert np.bincount(train.targets).tolist() == [8] * 10
    assert np.bincount(val.targets).tolist() == [2] * 10
    image = Image.open(train.samples[0][0])
    assert image.size == (40, 40) and image.mode == "RGB"
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_missing_split_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        inet.check_image_tree(tmp_path)
    with pytest.raises(SystemExit, match="no val/ folder"):
        inet.main(["--data-dir", str(tmp_path), "--no-progress", "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        inet.main(["--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("projection", inet.PROJECTIONS)
def test_projection_head_projects_batch_normalised_features(projection: str) -> None:
    torch.manual_seed(0)
    model = inet.build_model(10, projection, use_torchvision=False)
    if projection == "none":
        assert isinstance(model.fc, torch.nn.Linear)
        return
    bn, proj, linear = model.fc
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and linear.in_features == 512
    norm, kind = projection.split("_")
    p, radius = {"l1": 1, "l2": 2, "linf": float("inf")}[norm], inet.PAPER_RADIUS[norm]
    features = torch.randn(3, 512, dtype=torch.float32) * 4
    projected = proj(features)
    norms = projected.double().norm(p=p, dim=1)
    if kind == "sphere":
        torch.testing.assert_close(norms, torch.full_like(norms, radius), rtol=1e-4, atol=1e-4)
    else:
        assert (norms <= radius * (1 + 1e-4)).all()


def test_linf_head_runs_forward_and_backward_on_batch_normalised_features() -> None:
    """Many coordinates beyond the radius 3, tied at the maximum after the projection: the case
    whose forward diagnostics once made LAPACK's eigh fail to converge."""
    torch.manual_seed(0)
    _, proj, _ = inet.build_model(10, "linf_sphere", use_torchvision=False).fc
    features = (torch.randn(8, 512) * 1.5).requires_grad_(True)
    projected = proj(features)
    torch.testing.assert_close(projected.abs().amax(1), torch.full((8,), 3.0))
    projected.square().sum().backward()
    assert torch.isfinite(features.grad).all()


def test_mean_average_precision_averages_every_class_present() -> None:
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.uniform(size=(60, 8)))
    targets = torch.from_numpy(rng.integers(0, 7, 60))  # class 7 never occurs: no AP for it
    expected = np.mean(
        [average_precision_score(targets.numpy() == c, scores[:, c].numpy()) for c in range(7)]
    )
    assert mean_average_precision(scores, targets) == pytest.approx(expected)
    assert mean_average_precision(torch.eye(5), torch.arange(5)) == 1.0


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    targets = torch.tensor([2, 0, 0])
    assert topk_accuracy(scores, targets, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, targets, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, targets, 5) == 1.0


# ------------------------------------------------------------------------------------------------
# Runs


def test_tiny_training_run_decreases_the_loss_and_writes_results(tmp_path: Path) -> None:
    results = inet.main(
        [
            "--out-dir", str(tmp_path), "--standin-per-class", "5", "--batch-size", "10",
            "--epochs", "3", "--lr", "0.01", "--projection", "l2_ball", "--no-torchvision",
            "--workers", "0", "--no-progress",
        ]
    )  # fmt: skip
    history = results[0]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_examples"] == 10
    assert {"test_top1", "test_top5", "test_mAP"} <= history[-1].keys()
    for name in ("results.csv", "results.json", "table.md", "curves.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "l2_ball" / "checkpoint.pt").is_file()


def test_gpu_check_smoke_mode_runs_on_the_cpu(tmp_path: Path) -> None:
    import gpu_check

    report = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "g.json")])
    assert [r["pooling"] for r in report["pooling"]["rows"]][:2] == ["mean", "max"]
    assert len(report["pointnet"]["rows"]) == 6
    assert all(r["samples_per_s"] > 0 for r in report["resnet18"]["rows"])
    assert (tmp_path / "g.json").is_file()
