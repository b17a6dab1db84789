"""ResNet-18, ImageFolder and the standard ImageNet transforms: torchvision's, or in-repo twins.

PyPI's torchvision wheels are built against one torch release each, and the one matching the
torch this project pins does not import beside it. So the examples use torchvision when ``import
torchvision`` works and otherwise these in-repo equivalents, which follow torchvision exactly where
it matters:

* :class:`ResNet` / :func:`resnet18_in_repo` — the same modules under the same names
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ..., ``fc``), the same
  initialisation, so state dicts load into ``torchvision.models.resnet18`` and back.
* :class:`FolderDataset` — ``ImageFolder``'s class order (sorted folder names), sample order (sorted
  walk), extensions, ``classes``/``class_to_idx``/``samples``/``targets``, RGB PIL loading.
* :func:`train_transform` / :func:`eval_transform` — RandomResizedCrop (torchvision's sampling of
  scale and aspect ratio, ten tries then a central crop) + horizontal flip; Resize (shorter side)
  + CenterCrop; ToTensor + Normalize. Bilinear resampling with PIL, as torchvision does on PIL
  images.

``available()`` says which one is in use; ``use_torchvision=False`` forces the in-repo path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils.data import Dataset

try:  # a torchvision built for another torch raises RuntimeError/OSError, not only ImportError
    import torchvision as _torchvision
    from torchvision import datasets as _tv_datasets
    from torchvision import models as _tv_models
    from torchvision import transforms as _tv_transforms
except Exception:
    _torchvision = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[Image.Image], Tensor]


def available() -> bool:
    """Whether torchvision imports in this environment."""
    return _torchvision is not None


def uses_torchvision(use_torchvision: bool | None) -> bool:
    """Whether a ``use_torchvision`` argument (``None``: when available) selects torchvision."""
    return available() if use_torchvision is None else (use_torchvision and available())


# ------------------------------------------------------------------------------------------------
# ResNet-18 (torchvision.models.resnet: BasicBlock, [2, 2, 2, 2])


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's ``BasicBlock``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """``(B, inplanes, H, W) -> (B, planes, H / stride, W / stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with basic blocks; ``layers=(2, 2, 2, 2)`` is ResNet-18."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        modules = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes * BasicBlock.expansion
        modules += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, num_classes)`` logits (any ``H, W >= 32``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_in_repo(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes)


def resnet18(num_classes: int = 1000, use_torchvision: bool | None = None) -> nn.Module:
    """ResNet-18 without pretrained weights: torchvision's when available, else the in-repo one."""
    if uses_torchvision(use_torchvision):
        return _tv_models.resnet18(weights=None, num_classes=num_classes)
    return resnet18_in_repo(num_classes)


# ------------------------------------------------------------------------------------------------
# ImageFolder


class FolderDataset(Dataset):
    """``root/<class>/**/<image>`` as ``(image, class index)`` pairs, like torchvision's
    ``ImageFolder``: classes are the sorted sub-folder names, samples a sorted walk of each."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(
                f"no class folders in {self.root}: expected {self.root}/<class name>/<images>"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = self._find_samples()
        self.targets = [target for _, target in self.samples]
        self.imgs = self.samples
        self.transform = transform

    def _find_samples(self) -> list[tuple[str, int]]:
        samples, empty = [], []
        for name in self.classes:
            found = []
            for folder, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                found += [
                    (os.path.join(folder, f), self.class_to_idx[name])
                    for f in sorted(files)
                    if f.lower().endswith(IMG_EXTENSIONS)
                ]
            if not found:
                empty.append(name)
            samples += found
        if empty:
            raise FileNotFoundError(
                f"no images in class folder(s) {', '.join(empty[:5])} of {self.root}; supported "
                f"extensions: {', '.join(IMG_EXTENSIONS)}"
            )
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | Image.Image, int]:
        path, target = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), target


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as an RGB PIL image; a clear error naming the file if it is not an image."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def image_folder(
    root: str | Path, transform: Transform, use_torchvision: bool | None = None
) -> Dataset:
    """torchvision's ``ImageFolder`` when available, else :class:`FolderDataset`."""
    if uses_torchvision(use_torchvision):
        return _tv_datasets.ImageFolder(str(root), transform=transform)
    return FolderDataset(root, transform)


# ------------------------------------------------------------------------------------------------
# Transforms (PIL image -> normalised float tensor (3, H, W))


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class RandomResizedCrop:
    """A random crop of ``scale`` of the area and aspect ratio in ``ratio`` (log-uniform), resized
    to ``size x size``; ten tries, then the largest central crop within ``ratio`` (torchvision)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = self.params(*image.size)
        crop = image.crop((left, top, left + w, top + h))
        return crop.resize((self.size, self.size), Image.BILINEAR)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return image


class Resize:
    """Shorter side to ``size``, aspect ratio kept (torchvision's ``Resize(int)``)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        long = int(self.size * long / short)
        new = (self.size, long) if w <= h else (long, self.size)
        return image if new == (w, h) else image.resize(new, Image.BILINEAR)


class CenterCrop:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        top = round((h - self.size) / 2.0)
        left = round((w - self.size) / 2.0)
        return image.crop((left, top, left + self.size, top + self.size))


class ToTensor:
    """PIL RGB image -> float tensor ``(3, H, W)`` in ``[0, 1]``."""

    def __call__(self, image: Image.Image) -> Tensor:
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


_IN_REPO_TRANSFORMS = SimpleNamespace(
    Compose=Compose,
    RandomResizedCrop=RandomResizedCrop,
    RandomHorizontalFlip=RandomHorizontalFlip,
    Resize=Resize,
    CenterCrop=CenterCrop,
    ToTensor=ToTensor,
    Normalize=Normalize,
)
"""The in-repo transforms under torchvision's names: either set builds the same pipelines."""


def _transforms(use_torchvision: bool | None) -> Any:
    return _tv_transforms if uses_torchvision(use_torchvision) else _IN_REPO_TRANSFORMS


def train_transform(
    size: int = 224, scale: tuple[float, float] = (0.08, 1.0), use_torchvision: bool | None = None
) -> Transform:
    """RandomResizedCrop(size, scale) + RandomHorizontalFlip + ToTensor + Normalize (ImageNet)."""
    t = _transforms(use_torchvision)
    return t.Compose(
        [
            t.RandomResizedCrop(size, scale=scale),
            t.RandomHorizontalFlip(),
            t.ToTensor(),
            t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(
    resize: int = 256, crop: int = 224, use_torchvision: bool | None = None
) -> Transform:
    """Resize(resize) + CenterCrop(crop) + ToTensor + Normalize (ImageNet)."""
    t = _transforms(use_torchvision)
    return t.Compose(
        [
            t.Resize(resize),
            t.CenterCrop(crop),
            t.ToTensor(),
            t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
