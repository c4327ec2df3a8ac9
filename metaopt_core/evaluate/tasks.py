"""The data of the evaluator's cells: a label-noise cell (:func:`noise_task`), leave-one-domain-out
cells (:func:`domain_tasks`) and the cells an :class:`EvaluationConfig` describes (:func:`build_tasks`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from metaopt_core.config import ConfigError, DataSpec, NoiseSpec

if TYPE_CHECKING:
    from metaopt_core.evaluate.config import EvaluationConfig


@dataclass
class Task:
    """The data of one evaluation condition.

    ``train``: what the model is fitted on (noisy labels / the source domains).
    ``select``: held-out split *from the training distribution* (noisy labels / source-domain
    validation), the only thing early stopping and lr tuning may look at.
    ``test``: clean labels / the held-out domain; reported, never used to choose anything.
    """

    dataset: str
    condition: str
    train: Any  # ImageData
    select: Any
    test: Any
    num_classes: int
    kind: Literal["noise", "domains"] = "noise"
    select_fraction: float | None = None  # noise tasks: share of the noisy training split held out
    fingerprint: str = ""

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


def _concat(parts: Sequence, name: str):
    from metaopt_core.data.sources import ImageData

    return ImageData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes, name, ids=torch.cat([p.ids for p in parts]))


def noise_condition(noise: NoiseSpec | Mapping) -> str:
    """Display label of a noise setting: 'symmetric 80%', 'asymmetric 40%' or 'clean'."""
    noise = noise if isinstance(noise, NoiseSpec) else NoiseSpec.model_validate(noise)
    if noise.kind == "none" or noise.rate == 0:
        return "clean"
    return f"{noise.kind} {noise.rate * 100:g}%"


def noise_task(data: DataSpec | Mapping | Any, noisy_val_fraction: float = 0.1, name: str | None = None) -> Task:
    """A label-noise cell from a ``DataSpec`` (or an already prepared label-noise dataset).

    The prepared ``train`` split (noisy labels) is split again, seeded by the data seed, into the
    training part and a *noisy* selection split of ``noisy_val_fraction``; the clean ``val``
    split is the test set.
    """
    from metaopt_core.data.prepare import PreparedData, prepare, split_indices

    prepared = data if isinstance(data, PreparedData) else prepare(data)
    if prepared.domains:
        raise ValueError(f"noise_task: dataset {prepared.spec.get('source')!r} has domains {prepared.domains}; use domain_tasks")
    if not 0.0 < noisy_val_fraction < 1.0:
        raise ValueError(f"noisy_val_fraction: got {noisy_val_fraction!r}; allowed: a number in (0, 1)")
    noisy = prepared.splits["train"]
    train_index, select_index = split_indices(len(noisy), noisy_val_fraction, int(prepared.spec.get("seed", 0)))
    return Task(
        dataset=name or str(prepared.spec.get("source", noisy.name)),
        condition=noise_condition(prepared.spec.get("noise", {"kind": "none", "rate": 0.0})),
        train=noisy.subset(train_index),
        select=noisy.subset(select_index),
        test=prepared.splits["val"],
        num_classes=prepared.num_classes,
        kind="noise",
        select_fraction=noisy_val_fraction,
        fingerprint=prepared.fingerprint,
    )


def domain_tasks(data: DataSpec | Mapping | Any, held_out: Sequence[str] | None = None, name: str | None = None, whole_domain: bool = False) -> list[Task]:
    """Leave-one-domain-out cells: for each held-out domain, train on the other domains' train
    splits (concatenated), select on their val splits (training-domain validation) and test on
    the held-out domain's train ("in") split, as DomainBed reports it, or on all of its examples
    (``whole_domain``: nothing of it is used for anything else).

    ``held_out``: domain names (e.g. ``mnist5k-rot75``, or the suffix ``rot75``); default all.
    """
    from metaopt_core.data.prepare import PreparedData, prepare

    prepared = data if isinstance(data, PreparedData) else prepare(data)
    if len(prepared.domains) < 2:
        raise ValueError(
            f"domain_tasks: dataset {prepared.spec.get('source')!r} has domains {prepared.domains}; need at least 2 "
            "(set domains: rotated | colored, or use a folder: source)"
        )
    dataset = name or str(prepared.spec.get("source", "data"))
    chosen = list(prepared.domains) if held_out is None else [_resolve_domain(d, prepared.domains, dataset) for d in held_out]
    tasks = []
    for target in chosen:
        sources = [d for d in prepared.domains if d != target]
        tasks.append(
            Task(
                dataset=dataset,
                condition=f"held-out {_short_domain(target, dataset)}",
                train=_concat([prepared.splits[f"{d}/train"] for d in sources], f"{dataset}-without-{target}/train"),
                select=_concat([prepared.splits[f"{d}/val"] for d in sources], f"{dataset}-without-{target}/val"),
                test=_concat([prepared.splits[f"{target}/train"], prepared.splits[f"{target}/val"]], f"{dataset}-{target}")
                if whole_domain
                else prepared.splits[f"{target}/train"],
                num_classes=prepared.num_classes,
                kind="domains",
                fingerprint=prepared.fingerprint,
            )
        )
    return tasks


def _short_domain(domain: str, dataset: str) -> str:
    return domain[len(dataset) + 1 :] if domain.startswith(dataset + "-") else domain


def _resolve_domain(name: str, domains: Sequence[str], dataset: str) -> str:
    for domain in domains:
        if name in (domain, _short_domain(domain, dataset)):
            return domain
    raise ValueError(f"held_out: got {name!r}; allowed: {list(domains)} (or without the '{dataset}-' prefix)")


def build_tasks(config: EvaluationConfig) -> list[Task]:
    """Prepare the config's datasets and turn them into cells' data."""
    if config.task == "domains":
        return [task for spec in config.data_specs() for task in domain_tasks(spec, config.held_out)]
    tasks = [noise_task(spec, config.noisy_val_fraction) for spec in config.data_specs()]
    keys = [(t.dataset, t.condition) for t in tasks]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"datasets x noise: duplicate (dataset, noise) cell(s) {duplicates}")
    return tasks
