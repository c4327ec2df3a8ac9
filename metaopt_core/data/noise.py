"""Synthetic label noise: symmetric (flip to a uniformly random *other* class) and asymmetric
(pair flips, per dataset). Seeded; returns the noisy labels and the realised transition matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# clean class -> noisy class (THESIS-NOTES; the co-teaching / ARL conventions)
PAIR_FLIPS: dict[str, dict[int, int]] = {
    "mnist": {7: 1, 2: 7, 5: 6, 6: 5, 3: 8},
    # CIFAR-10: truck->automobile, bird->airplane, deer->horse, cat<->dog
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
}
# MNIST-like digit sources share the MNIST map.
for _name in ("mnist5k", "digits", "qmnist", "usps", "kmnist", "fashionmnist", "svhn"):
    PAIR_FLIPS[_name] = PAIR_FLIPS["mnist"]


def pair_flip_map(dataset: str, num_classes: int) -> dict[int, int]:
    if dataset == "cifar100":
        # next class within each block of 5 (the super-class convention of the noisy-label literature)
        return {c: (c // 5) * 5 + (c + 1) % 5 for c in range(num_classes)}
    if dataset in PAIR_FLIPS:
        return PAIR_FLIPS[dataset]
    raise KeyError(f"asymmetric noise: no pair-flip map for dataset {dataset!r}; known: {sorted(PAIR_FLIPS) + ['cifar100']}")


@dataclass
class NoisyLabels:
    labels: Tensor  # (N,) int64 noisy labels
    transition: Tensor  # (C, C) realised: T[i, j] = fraction of clean-i examples labelled j
    flipped: Tensor  # (N,) bool

    @property
    def realised_rate(self) -> float:
        return float(self.flipped.float().mean())


def realised_transition(clean: Tensor, noisy: Tensor, num_classes: int) -> Tensor:
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    counts.index_put_((clean, noisy), torch.ones(len(clean), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp_min(1.0)


def add_label_noise(
    labels: Tensor,
    kind: Literal["none", "symmetric", "asymmetric"],
    rate: float,
    num_classes: int,
    seed: int = 0,
    dataset: str = "mnist",
) -> NoisyLabels:
    """Corrupt ``labels``: each example is flipped with probability ``rate``.

    symmetric: to a uniformly random other class; asymmetric: to its pair-flip class (classes
    without a pair keep their label, as in the literature, so the overall rate is lower).
    """
    if kind not in ("none", "symmetric", "asymmetric"):
        raise ValueError(f"noise.kind: got {kind!r}; allowed: ['none', 'symmetric', 'asymmetric']")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise.rate: got {rate!r}; allowed: a number in [0, 1]")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.long()
    flip = torch.rand(len(labels), generator=generator) < rate
    noisy = labels.clone()
    if kind == "symmetric":
        offset = torch.randint(1, num_classes, (len(labels),), generator=generator)
        noisy = torch.where(flip, (labels + offset) % num_classes, labels)
    elif kind == "asymmetric":
        mapping = torch.arange(num_classes)
        for source, target in pair_flip_map(dataset, num_classes).items():
            mapping[source] = target
        noisy = torch.where(flip, mapping[labels], labels)
    flipped = noisy != labels
    return NoisyLabels(noisy, realised_transition(labels, noisy, num_classes), flipped)
