"""Model zoo by name, for any channel count, image size and class count.

``cnn4`` follows Table A.1 (BatchNorm); ``cnn4_gn`` and ``small_cnn`` use GroupNorm, which has no
running statistics and so batches under ``torch.func.vmap`` (the population trainer uses them).
``width`` scales the channel counts of the CNNs so the same architecture fits a 2-core demo.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _flat_dim(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]


def mlp(in_channels: int, image_size: int, num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: got {kind!r}; allowed: ['batch', 'group', 'none']")


def cnn4(in_channels: int, image_size: int, num_classes: int, width: float = 1.0, norm: str = "batch") -> nn.Module:
    """Table A.1's 4-layer CNN (the PDF table is garbled; rebuilt with 'same' padding and an
    adaptive 2x2 pool before the classifier so it fits 28x28 grey and 32x32 RGB alike)."""
    c = lambda n: max(4, int(round(n * width)))  # noqa: E731
    features = nn.Sequential(
        nn.Conv2d(in_channels, c(32), 5, padding=2), nn.ReLU(),
        nn.Conv2d(c(32), c(64), 3, padding=1), _norm(norm, c(64)), nn.ReLU(),
        nn.Conv2d(c(64), c(64), 3, padding=1), _norm(norm, c(64)), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c(64), c(64), 5, padding=2), nn.ReLU(),
        nn.Conv2d(c(64), c(128), 3, padding=1), _norm(norm, c(128)), nn.ReLU(),
        nn.Conv2d(c(128), c(128), 3, padding=1), _norm(norm, c(128)), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
    )  # fmt: skip
    flat = _flat_dim(features, in_channels, image_size)
    hidden = c(1024)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def small_cnn(in_channels: int, image_size: int, num_classes: int, width: int = 32) -> nn.Module:
    """DomainBed's MNIST_CNN shape (4 conv layers with GroupNorm, global average pool), narrower
    by default (DomainBed uses width 64/128) so it trains on 2 CPU cores."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, w),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(), nn.GroupNorm(8, 2 * w),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, 2 * w),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, 2 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes),
    )  # fmt: skip


def lenet(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
    )  # fmt: skip
    flat = _flat_dim(features, in_channels, image_size)
    return nn.Sequential(
        features, nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )  # fmt: skip


def jocor(in_channels: int, image_size: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """JoCoR-Net (Table A.1): 3x3 conv-BN stacks, average pool, FC to the classes."""
    c = lambda n: max(4, int(round(n * width)))  # noqa: E731
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.LeakyReLU(0.01)]  # noqa: E731
    layers = (
        block(in_channels, c(128)) + block(c(128), c(128)) + block(c(128), c(128)) + [nn.MaxPool2d(2), nn.Dropout(0.25)]
        + block(c(128), c(256)) + block(c(256), c(256)) + block(c(256), c(256)) + [nn.MaxPool2d(2), nn.Dropout(0.25)]
        + block(c(256), c(196)) + block(c(196), c(196))
        + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c(196), num_classes)]
    )  # fmt: skip
    return nn.Sequential(*layers)


def _torchvision(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if name.startswith("resnet"):
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    elif name.startswith("vgg"):
        if in_channels != 3:
            model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        if image_size < 32:  # five 2x2 pools leave nothing of a 28x28 image: drop the last
            model.features = model.features[:-1]
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp2": lambda c, s, k, **kw: mlp(c, s, k, (256,), **kw),
    "mlp3": lambda c, s, k, **kw: mlp(c, s, k, (256, 256), **kw),
    "mlp_itl": lambda c, s, k, **kw: mlp(c, s, k, (1024, 256), **kw),  # ITL's MLP 1024-256-10
    "cnn4": cnn4,
    "cnn4_gn": lambda c, s, k, **kw: cnn4(c, s, k, norm="group", **kw),
    "small_cnn": small_cnn,
    "lenet": lenet,
    "jocor": jocor,
    "resnet18": lambda c, s, k: _torchvision("resnet18", c, s, k),
    "resnet50": lambda c, s, k: _torchvision("resnet50", c, s, k),
    "vgg11": lambda c, s, k: _torchvision("vgg11", c, s, k),
}
MODEL_NAMES = tuple(MODELS)
# Architectures whose forward pass has no running statistics, so a population batches under vmap.
VMAP_FRIENDLY = ("mlp2", "mlp3", "mlp_itl", "cnn4_gn", "small_cnn", "lenet")


def build_model(name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, seed: int | None = None, **kwargs) -> nn.Module:
    """Build a model by name; ``seed`` makes its initialisation reproducible."""
    if name not in MODELS:
        raise KeyError(f"model: got {name!r}; allowed: {list(MODEL_NAMES)}")
    if seed is None:
        return MODELS[name](in_channels, image_size, num_classes, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](in_channels, image_size, num_classes, **kwargs)
