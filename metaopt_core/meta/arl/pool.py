"""ARL's meta-train pool: the (architecture, dataset) entries every candidate loss trains on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from metaopt_core.data.prepare import PreparedData, prepare
from metaopt_core.data.sources import ImageData
from metaopt_core.meta.arl.config import ARLConfig


@dataclass
class PoolEntry:
    name: str  # "<model>@<dataset>"
    model: str
    model_options: dict
    train: ImageData  # noisy labels
    val: ImageData  # clean labels (held back from the search: re-scoring before export)
    fingerprint: str  # of the prepared dataset
    clean: torch.Tensor | None = None  # the training split's clean labels (scoring parts are read with them)

    def generation_split(self, seed: int, select_fraction: float, score_fraction: float) -> tuple[ImageData, ImageData, ImageData]:
        """(inner training part, noisy selection part, scoring part with clean labels) of the
        training split, redrawn from ``seed`` (one per generation and entry)."""
        if self.clean is None:
            raise ValueError(f"pool entry {self.name}: the prepared dataset has no clean labels of its training split")
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        n_select, n_score = max(1, round(len(order) * select_fraction)), max(1, round(len(order) * score_fraction))
        select, score, rest = order[:n_select], order[n_select : n_select + n_score], order[n_select + n_score :]
        scored = self.train.subset(score)
        scored = ImageData(scored.x, self.clean[score], scored.num_classes, f"{self.train.name}-score", ids=scored.ids)
        return self.train.subset(rest), self.train.subset(select), scored


@dataclass
class Pool:
    entries: list[PoolEntry]

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


def build_pool(config: ARLConfig, prepared: Sequence[PreparedData] | None = None) -> Pool:
    """The pool's entries in a fixed order (dataset-major, then model). ``prepared`` are the
    datasets of ``config.dataset_specs()`` already prepared (the pipeline passes them as artifacts);
    without it they are prepared here."""
    specs = config.dataset_specs()
    if prepared is None:
        prepared = [prepare(spec) for spec in specs]
    if len(prepared) != len(specs):
        raise ValueError(f"prepared: got {len(prepared)} datasets; the pool has {len(specs)}")
    entries = []
    for spec, data in zip(specs, prepared):
        if "train" not in data.splits or "val" not in data.splits:
            raise ValueError(f"prepared dataset {spec.source!r}: needs 'train' and 'val' splits, has {sorted(data.splits)}")
        for model in config.pool.models:
            suffix = "" if not model.options else "(" + ",".join(f"{k}={v}" for k, v in sorted(model.options.items())) + ")"
            entries.append(
                PoolEntry(f"{model.name}{suffix}@{spec.source}", model.name, dict(model.options),
                          data.splits["train"], data.splits["val"], data.fingerprint, data.clean_labels)
            )  # fmt: skip
    return Pool(entries)
