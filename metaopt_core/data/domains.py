"""Domain-shift environments built the DomainBed way from any digit source.

The pooled images are shuffled (seeded) and environment i takes the slice ``[i::n_env]``.
RotatedMNIST rotates environment i by its angle; ColoredMNIST relabels digit < 5, flips that label
with probability 0.25 and colours the image red/green with colour = label XOR Bernoulli(e).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaopt_core.data.sources import ImageData

DEFAULT_ANGLES = (0, 15, 30, 45, 60, 75)
COLORED_ENVIRONMENTS = (0.1, 0.2, 0.9)


def _environment_slices(data: ImageData, count: int, seed: int) -> list[Tensor]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return [order[i::count] for i in range(count)]


def rotate(images: Tensor, angle: float) -> Tensor:
    """Rotate a batch counter-clockwise by ``angle`` degrees about the centre (bilinear, zero fill)."""
    if angle == 0:
        return images.clone()
    import torchvision.transforms.functional as TF  # here: importing torchvision costs ~2.5 s of CPU, every process would pay it

    return TF.rotate(images, float(angle), interpolation=TF.InterpolationMode.BILINEAR)


def rotated_domains(data: ImageData, angles=DEFAULT_ANGLES, seed: int = 0) -> list[ImageData]:
    domains = []
    for angle, index in zip(angles, _environment_slices(data, len(angles), seed)):
        part = data.subset(index, name=f"{data.name}-rot{int(angle) if float(angle).is_integer() else angle}")
        part.x = rotate(part.x, angle)
        part.meta.update(angle=float(angle), source_index=index)
        domains.append(part)
    return domains


def colored_domains(data: ImageData, environments=COLORED_ENVIRONMENTS, seed: int = 0) -> list[ImageData]:
    generator = torch.Generator().manual_seed(seed + 1)
    domains = []
    for e, index in zip(environments, _environment_slices(data, len(environments), seed)):
        digits = data.y[index]
        label = (digits < 5).long()
        label = label ^ (torch.rand(len(label), generator=generator) < 0.25).long()
        colour = label ^ (torch.rand(len(label), generator=generator) < e).long()
        grey = data.x[index].mean(1, keepdim=True)  # any channel count -> one intensity
        image = torch.cat([grey, grey], dim=1)
        image[torch.arange(len(colour)), 1 - colour] = 0.0  # channel 0 = red, 1 = green
        domains.append(ImageData(image, label, 2, f"{data.name}-colored{e}", {"environment": e, "source_index": index}, data.ids[index]))
    return domains
