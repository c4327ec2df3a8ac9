"""ITL's data: the domains of a prepared dataset laid out for leave-one-domain-out training, and
the inner *jobs* (one per held-out domain and outer step) with their seeded data subsets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from metaopt_core.data.prepare import PreparedData, prepare
from metaopt_core.data.sources import ImageData
from metaopt_core.meta.itl.config import ITLConfig


@dataclass
class DomainSet:
    """The domains of a prepared dataset laid out for leave-one-domain-out training: all train
    splits concatenated (each domain a contiguous range), the val splits kept per domain."""

    names: list[str]
    x: Tensor
    y: Tensor
    ranges: list[tuple[int, int]]
    val: list[ImageData]
    num_classes: int
    fingerprint: str
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (x, y)

    @classmethod
    def from_prepared(cls, data: PreparedData) -> DomainSet:
        if len(data.domains) < 2:
            raise ValueError(f"data: got domains {data.domains}; leave-one-domain-out needs at least 2")
        xs, ys, ranges, val, start = [], [], [], [], 0
        for name in data.domains:
            train_split, val_split = data.domain(name)
            xs.append(train_split.x)
            ys.append(train_split.y)
            ranges.append((start, start + len(train_split)))
            start += len(train_split)
            val.append(val_split)
        return cls(list(data.domains), torch.cat(xs), torch.cat(ys), ranges, val, data.num_classes, data.fingerprint)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def tensors_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(x, y) on ``device``, copied once per device and kept (a GPU step reuses them)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.x.to(device), self.y.to(device))
        return self._on_device[key]

    def index(self, domain: str | int) -> int:
        """Position of a domain given by index, full name, or name without the source prefix."""
        if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool):
            if 0 <= int(domain) < len(self.names):
                return int(domain)
            raise ValueError(f"held_out_domain: got index {domain}; allowed: 0..{len(self.names) - 1}")
        for position, name in enumerate(self.names):
            if domain == name or name.endswith("-" + str(domain)):
                return position
        raise ValueError(f"held_out_domain: got {domain!r}; allowed: {self.names} (or their suffixes, or an index)")

    def train_indices(self, domain: int) -> Tensor:
        start, end = self.ranges[domain]
        return torch.arange(start, end)

    def source_indices(self, held_out: int) -> Tensor:
        return torch.cat([self.train_indices(d) for d in range(len(self.names)) if d != held_out])


_PREPARED_CACHE: dict[str, DomainSet] = {}


def domain_set(config: ITLConfig, data: PreparedData | DomainSet | None = None) -> DomainSet:
    """The config's domains: ``data`` if given (the pipeline passes the prepared artifact), else
    prepared here (cached per data spec within the process)."""
    if isinstance(data, DomainSet):
        return data
    if isinstance(data, PreparedData):
        return DomainSet.from_prepared(data)
    if data is not None:
        raise TypeError(f"data: got {type(data).__name__}; allowed: PreparedData, DomainSet or None")
    key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
    if key not in _PREPARED_CACHE:
        if len(_PREPARED_CACHE) >= 2:
            _PREPARED_CACHE.clear()
        _PREPARED_CACHE[key] = DomainSet.from_prepared(prepare(config.data))
    return _PREPARED_CACHE[key]


def job_seeds(seed: int, step: int, domain: int) -> tuple[int, int, int]:
    """(initial weights, minibatch order, data subsets) seeds of the inner job holding ``domain``
    out at outer step ``step``: fresh every step, independent of which machine computes it."""
    init_seed, data_seed, subset_seed = np.random.SeedSequence([seed, step, domain, 0x171]).generate_state(3)
    return int(init_seed), int(data_seed), int(subset_seed)


@dataclass
class InnerJob:
    """Everything one leave-one-domain-out inner training needs (indices into ``DomainSet.x``)."""

    domain: int
    name: str
    source: Tensor  # train indices of the other domains
    check: Tensor  # subset of source: convergence check and the hypergradient's inner loss
    target: Tensor  # subset of the held-out domain's train split: the outer objective M
    init_seed: int
    data_seed: int


def make_job(config: ITLConfig, data: DomainSet, step: int, domain: int) -> InnerJob:
    init_seed, data_seed, subset_seed = job_seeds(config.seed, step, domain)
    generator = torch.Generator().manual_seed(subset_seed)
    source = data.source_indices(domain)
    target = data.train_indices(domain)
    inner_n = config.hypergrad.inner_examples or len(source)
    outer_n = config.hypergrad.outer_examples or len(target)
    check = source[torch.randperm(len(source), generator=generator)[: min(inner_n, len(source))]]
    target = target[torch.randperm(len(target), generator=generator)[: min(outer_n, len(target))]]
    return InnerJob(domain, data.names[domain], source, check, target, init_seed, data_seed)
