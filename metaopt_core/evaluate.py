"""Meta-test protocol: train base models with each loss, report accuracies and average ranks.

One *cell* is (dataset, condition, architecture): a condition is a label-noise setting
("symmetric 80%") or, for domain shift, the held-out domain. Every (loss x cell x seed) run trains
a fresh model with :func:`metaopt_core.train.fit` and is scored three ways:

- **accuracy at convergence**: clean test accuracy after the last epoch (the ARL protocol: there
  is no clean validation set to early-stop on);
- **accuracy with noisy-validation early stopping**: the epoch with the best accuracy on a
  *selection* split drawn from the training distribution (noisy labels / source domains) is kept,
  and its clean test accuracy reported (ARL Table 3.3);
- **early-stop gap**: early-stopped minus converged accuracy (ARL Table 3.6).

Losses are compared by mean +- std over seeds and by Demsar (2006) average ranks: within each cell
the losses are ranked by mean accuracy (1 = best, ties share the average rank), then ranks are
averaged over cells. A run whose loss went non-finite is *diverged* and scores chance (1/C) at
convergence; early stopping may still keep an epoch completed before the divergence. Seeds vary
the model initialisation and the minibatch order; the data (subset, noisy labels, splits) is fixed
by the ``DataSpec``'s own seed, so every loss and seed sees the same noisy labels.

Learning rate (``lr_protocol``): ``fixed`` trains every loss at one lr (the ARL chapter's
protocol); ``tuned`` trains each (loss, cell) at every lr of a grid and keeps the lr with the best
mean last-epoch accuracy on the selection split (DomainBed's training-domain validation), so a
loss's gradient scale and its learning rate are chosen together. The header of every table says
which protocol produced it.

Three entry points: :func:`evaluate` (a whole :class:`EvaluationConfig`, also the CLI
``python -m metaopt_core.evaluate --config ...``), :func:`compare_losses` (a dict of losses over
ready-made :class:`Task` cells, what the meta-learners call) and
:func:`evaluate_domain_generalisation` (leave-one-domain-out cells).
"""

from __future__ import annotations

import copy
import inspect
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from metaopt_core.config import ConfigError, DataSpec, NoiseSpec, StrictModel

LrProtocol = Literal["fixed", "tuned"]
LR_PROTOCOLS = ("fixed", "tuned")
OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
# What a caller may pass as a loss: a registry name, a module (deep-copied per run) or a
# zero-argument factory returning a fresh module.
LossLike = str | nn.Module | Callable[[], nn.Module]
ProgressCallback = Callable[[dict], None]
DEFAULT_LR_GRID = (0.1, 0.03, 0.01, 0.003, 0.001)
METRICS = ("converged", "early_stop", "gap")


# ----------------------------------------------------------------------------------------------
# statistics: mean +- std, Demsar average ranks, early-stopping selection


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 denominator; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: got no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def rank_with_ties(scores: Sequence[float], higher_is_better: bool = True) -> list[float]:
    """Ranks 1..n of ``scores`` (1 = best); tied scores share the average of the ranks they span.

    Scores are compared after rounding to 10 decimals so that means of identical accuracies that
    were summed in a different order still tie.
    """
    keyed = [round(float(s), 10) * (-1 if higher_is_better else 1) for s in scores]
    order = sorted(range(len(keyed)), key=lambda i: keyed[i])
    ranks = [0.0] * len(keyed)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and keyed[order[end + 1]] == keyed[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1  # average of the 1-based positions start..end
        for position in range(start, end + 1):
            ranks[order[position]] = shared
        start = end + 1
    return ranks


def average_ranks(cell_scores: Mapping[Any, Mapping[str, float]], higher_is_better: bool = True) -> dict[str, float]:
    """Demsar (2006) average ranks: rank the methods within every cell, then average over cells.

    ``cell_scores``: cell -> {method: score}. Every cell must score the same methods.
    """
    if not cell_scores:
        raise ValueError("average_ranks: got no cells")
    cells = list(cell_scores)
    methods = list(cell_scores[cells[0]])
    totals = dict.fromkeys(methods, 0.0)
    for cell in cells:
        scores = cell_scores[cell]
        if set(scores) != set(methods):
            raise ValueError(f"average_ranks: cell {cell!r} scores {sorted(scores)}, expected {sorted(methods)}")
        for method, rank in zip(methods, rank_with_ties([scores[m] for m in methods], higher_is_better)):
            totals[method] += rank
    return {method: total / len(cells) for method, total in totals.items()}


def early_stop_index(select_accuracies: Sequence[float], usable: int | None = None) -> int | None:
    """Index of the epoch with the best selection accuracy among the first ``usable`` epochs
    (all if None); the earliest such epoch on ties. None when no epoch is usable."""
    candidates = list(select_accuracies)[: len(select_accuracies) if usable is None else usable]
    if not candidates:
        return None
    best = max(candidates)
    return candidates.index(best)


# ----------------------------------------------------------------------------------------------
# tasks: one cell's data


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

    return ImageData(
        torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes, name
    )


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


def domain_tasks(data: DataSpec | Mapping | Any, held_out: Sequence[str] | None = None, name: str | None = None) -> list[Task]:
    """Leave-one-domain-out cells: for each held-out domain, train on the other domains' train
    splits (concatenated), select on their val splits (training-domain validation) and test on
    the held-out domain's train ("in") split, as DomainBed reports it.

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
                test=prepared.splits[f"{target}/train"],
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


# ----------------------------------------------------------------------------------------------
# losses: name / module / factory -> a fresh module per run


@dataclass(frozen=True)
class TwoStageForward:
    """Forward correction with an *estimated* transition matrix (the thesis's FW competitor):
    stage 1 trains the same architecture with CE on the noisy labels, the anchor-point estimate
    of T is read from its softmax on the training inputs, stage 2 trains a fresh model with
    ``ForwardCorrectedCrossEntropy(T)``."""

    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, transition_matrix: torch.Tensor) -> nn.Module:
        from metaopt_core.losses.registry import get_loss

        return get_loss("forward", transition_matrix=transition_matrix, **dict(self.kwargs))


def loss_factory(value: LossLike, kwargs: Mapping[str, Any] | None = None) -> Callable[[], nn.Module] | TwoStageForward:
    """Turn a loss given by name, module or factory into something that yields a fresh module per
    run. ``forward`` without ``transition_matrix`` becomes the two-stage recipe."""
    kwargs = dict(kwargs or {})
    if isinstance(value, str):
        from metaopt_core.losses.registry import get_loss

        if value.strip().lower() == "forward" and "transition_matrix" not in kwargs:
            return TwoStageForward(kwargs)
        get_loss(value, **kwargs)  # fail now (unknown name / argument), not in the middle of a sweep
        return lambda: get_loss(value, **kwargs)
    if kwargs:
        raise TypeError(f"loss kwargs: only a loss given by name takes kwargs, got {type(value).__name__} with {sorted(kwargs)}")
    if isinstance(value, TwoStageForward):
        return value
    if isinstance(value, nn.Module):
        return lambda: copy.deepcopy(value)
    if callable(value):
        try:
            parameters = [] if isinstance(value, type) else list(inspect.signature(value).parameters.values())
        except (TypeError, ValueError):  # no introspectable signature (a builtin): trust the caller
            parameters = []
        required = [
            p.name
            for p in parameters
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if required:
            raise TypeError(f"loss factory {value!r}: must take no arguments, takes {required}")
        return value
    raise TypeError(f"loss: got {type(value).__name__}; allowed: a get_loss name, an nn.Module or a zero-argument factory")


# ----------------------------------------------------------------------------------------------
# configuration


class LossSpec(StrictModel):
    """One loss of the comparison: a ``get_loss`` name with kwargs, or a learned white-box loss
    (``white_box``: a ``TaylorLoss.to_dict()`` document, or ``path``: a JSON file holding one).
    A plain string is shorthand for ``{name: <string>}``."""

    name: str | None = None
    kwargs: dict[str, Any] = {}
    white_box: dict[str, Any] | None = None
    path: str | None = None
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> "LossSpec":
        given = [f for f in ("name", "white_box", "path") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'name', 'white_box', 'path'; got {given or 'none'}")
        if self.name is not None:
            from metaopt_core.losses.registry import list_losses, loss_parameters

            try:
                if self.name.strip().lower() == "forward" and "transition_matrix" not in self.kwargs:
                    unknown = sorted(set(self.kwargs) - set(loss_parameters("forward")))
                    if unknown:
                        raise TypeError(f"forward: unknown parameter(s) {unknown}; accepted: {sorted(loss_parameters('forward'))}")
                else:
                    loss_factory(self.name, self.kwargs)
            except KeyError:
                raise ValueError(f"unknown loss {self.name!r}; allowed: {list_losses()}") from None
            except (TypeError, ValueError) as error:
                raise ValueError(str(error)) from None
        elif self.kwargs:
            raise ValueError("'kwargs' only applies to a loss given by 'name'")
        else:
            self.white_box_doc()  # a bad document or path fails at load time
        return self

    def white_box_doc(self) -> dict:
        """The learned loss's JSON document (read from ``path`` if given)."""
        from metaopt_core.losses.taylor import TaylorLoss

        if self.path is not None:
            path = Path(self.path)
            if not path.is_file():
                raise ValueError(f"path: {str(path)!r} is not a file (expected a TaylorLoss JSON document)")
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"path: {str(path)!r} is not valid JSON ({error})") from None
        else:
            doc = dict(self.white_box or {})
        try:
            TaylorLoss.from_dict(doc)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a white-box Taylor loss ({{'family': 'taylor', 'params': [...], ...}}): {error}") from None
        return doc

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if self.name is not None:
            args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "transition_matrix")
            return f"{self.name.strip().lower()}({args})" if args else self.name.strip().lower()
        return Path(self.path).stem if self.path else "learned"

    def factory(self) -> Callable[[], nn.Module] | TwoStageForward:
        if self.name is not None:
            return loss_factory(self.name, self.kwargs)
        from metaopt_core.losses.taylor import TaylorLoss

        doc = self.white_box_doc()
        return lambda: TaylorLoss.from_dict(doc)


class ArchitectureSpec(StrictModel):
    """A ``build_model`` name with optional constructor kwargs (e.g. ``{name: small_cnn, kwargs:
    {width: 8}}``). A plain string is shorthand for ``{name: <string>}``."""

    name: str
    kwargs: dict[str, Any] = {}
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from metaopt_core.models import MODEL_NAMES

        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; allowed: {list(MODEL_NAMES)}")
        return value

    @model_validator(mode="after")
    def _kwargs_accepted(self) -> "ArchitectureSpec":
        if self.kwargs:  # the zoo's constructors take **kwargs: only building tells what they accept
            try:
                self.build(1, 28, 10, seed=0)
            except TypeError as error:
                raise ValueError(f"kwargs {self.kwargs} not accepted by model {self.name!r}: {error}") from None
        return self

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def build(self, in_channels: int, image_size: int, num_classes: int, seed: int) -> nn.Module:
        from metaopt_core.models import build_model

        return build_model(self.name, in_channels, image_size, num_classes, seed=seed, **self.kwargs)


class EvaluationConfig(StrictModel):
    """Meta-test run: every loss x dataset x condition x architecture x seed.

    ``task: noise``: each dataset is crossed with every entry of ``noise`` (or, if ``noise`` is
    not given, uses its own ``noise``). ``task: domains``: datasets must have domains; each
    domain in ``held_out`` (default: all) is held out in turn.
    """

    algorithm: Literal["evaluate"] = "evaluate"
    task: Literal["noise", "domains"] = "noise"
    losses: list[LossSpec] = Field(min_length=1)
    datasets: list[DataSpec] = Field(min_length=1)
    noise: list[NoiseSpec] | None = None
    held_out: list[str] | None = None
    architectures: list[ArchitectureSpec] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerName = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_protocol: LrProtocol = "fixed"
    lr: float = Field(0.01, gt=0.0)
    lr_grid: list[float] = Field(list(DEFAULT_LR_GRID), min_length=1)
    noisy_val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    device: str | None = None

    @field_validator("datasets", mode="before")
    @classmethod
    def _dataset_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"source": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("lr_grid")
    @classmethod
    def _positive_grid(cls, value: list[float]) -> list[float]:
        bad = [v for v in value if not v > 0]
        if bad:
            raise ValueError(f"learning rates must be > 0; got {bad}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct; got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluationConfig":
        labels = [spec.display for spec in self.losses]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"losses: duplicate label(s) {duplicates}; give each a distinct 'label'")
        archs = [spec.display for spec in self.architectures]
        duplicates = sorted({a for a in archs if archs.count(a) > 1})
        if duplicates:
            raise ValueError(f"architectures: duplicate label(s) {duplicates}; give each a distinct 'label'")
        for index, spec in enumerate(self.datasets):
            has_domains = spec.domains != "none" or spec.source.startswith("folder:")
            if self.task == "noise" and has_domains:
                raise ValueError(f"datasets.{index}: task 'noise' needs a dataset without domains; set task: domains")
            if self.task == "domains" and not has_domains:
                raise ValueError(f"datasets.{index}: task 'domains' needs domains: rotated | colored or a folder: source")
            if self.noise is not None and "noise" in spec.model_fields_set:
                raise ValueError(f"datasets.{index}.noise: set noise once in the top-level 'noise' list, not per dataset")
        if self.task == "domains" and self.noise is not None:
            raise ValueError("noise: only for task 'noise' (domain tasks have no synthetic label noise here)")
        if self.task == "noise" and self.held_out is not None:
            raise ValueError("held_out: only for task 'domains'")
        return self

    def data_specs(self) -> list[DataSpec]:
        """The datasets to prepare, each crossed with the ``noise`` list when given."""
        if self.task == "domains" or self.noise is None:
            return list(self.datasets)
        return [spec.model_copy(update={"noise": noise}) for spec in self.datasets for noise in self.noise]

    def train_settings(self) -> dict:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "lr_protocol": self.lr_protocol,
            "lr": self.lr,
            "lr_grid": list(self.lr_grid),
        }


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class RunRecord:
    """One trained model. Accuracies are fractions in [0, 1]; ``history`` has one row per epoch
    (``select_acc``: selection split, ``test_acc``: test split)."""

    loss: str
    dataset: str
    condition: str
    architecture: str
    seed: int
    lr: float
    converged_acc: float
    early_stop_acc: float
    early_stop_epoch: int | None  # 1-based; None when no epoch completed before divergence
    final_select_acc: float
    diverged: bool
    selected: bool = True  # tuned protocol: False for runs at an lr that was not chosen
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return self.early_stop_acc - self.converged_acc


@dataclass
class CellSummary:
    """One loss in one cell, over seeds (selected lr only)."""

    loss: str
    dataset: str
    condition: str
    architecture: str
    lr: float
    seeds: list[int]
    converged_mean: float
    converged_std: float
    early_stop_mean: float
    early_stop_std: float
    gap_mean: float
    gap_std: float
    diverged: int
    lr_scores: dict[str, float] = field(default_factory=dict)  # tuned: lr -> mean last-epoch select acc

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.dataset, self.condition, self.architecture)

    def metric(self, name: str) -> tuple[float, float]:
        if name not in METRICS:
            raise ValueError(f"metric: got {name!r}; allowed: {list(METRICS)}")
        return getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")


def _cell_label(cell: tuple[str, str, str]) -> str:
    return " · ".join(cell)


@dataclass
class EvaluationResult:
    """Everything a meta-test produced: the settings (protocol, training, data), per-(loss, cell)
    summaries over seeds, average ranks per metric, and every run with its per-epoch history.
    ``to_dict``/``from_dict`` round-trip through JSON; ``to_markdown`` renders the tables."""

    settings: dict
    losses: list[str]
    cells: list[tuple[str, str, str]]
    summaries: list[CellSummary]
    ranks: dict[str, dict[str, float]]  # "converged" | "early_stop" -> loss -> average rank
    runs: list[RunRecord]
    seconds: float = 0.0

    def summary(self, loss: str, cell: tuple[str, str, str]) -> CellSummary:
        for item in self.summaries:
            if item.loss == loss and item.cell == tuple(cell):
                return item
        raise KeyError(f"no summary for loss {loss!r} in cell {cell!r}")

    def diverged_runs(self, loss: str) -> int:
        return sum(s.diverged for s in self.summaries if s.loss == loss)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "losses": list(self.losses),
            "cells": [list(c) for c in self.cells],
            "summaries": [asdict(s) for s in self.summaries],
            "ranks": self.ranks,
            "runs": [asdict(r) for r in self.runs],
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, doc: Mapping) -> "EvaluationResult":
        return cls(
            settings=dict(doc["settings"]),
            losses=list(doc["losses"]),
            cells=[tuple(c) for c in doc["cells"]],
            summaries=[CellSummary(**s) for s in doc["summaries"]],
            ranks={k: dict(v) for k, v in doc["ranks"].items()},
            runs=[RunRecord(**r) for r in doc["runs"]],
            seconds=float(doc.get("seconds", 0.0)),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def header(self) -> str:
        s = self.settings
        if s["lr_protocol"] == "fixed":
            protocol = f"lr protocol: **fixed** (lr {s['lr']:g} for every loss)"
        else:
            grid = ", ".join(f"{v:g}" for v in s["lr_grid"])
            protocol = (
                f"lr protocol: **tuned** (per loss and cell, the lr of {{{grid}}} with the best mean last-epoch "
                f"accuracy on the selection split)"
            )
        optimiser = s["optimizer"] + (f" (momentum {s['momentum']:g})" if s["optimizer"] in ("sgd", "rmsprop") else "")
        if s.get("weight_decay"):
            optimiser += f", weight decay {s['weight_decay']:g}"
        seeds = ", ".join(str(v) for v in s["seeds"])
        if s.get("task") == "domains":
            data = "train: the other domains; selection: their val splits; test: the held-out domain"
        else:
            fraction = s.get("noisy_val_fraction")
            share = f"{fraction * 100:g}% " if fraction else ""
            data = f"train: noisy labels; selection: {share}noisy validation split; test: clean held-out split"
        if s.get("task") == "mixed":
            data = "selection: noisy validation / source-domain validation; test: clean labels / held-out domain"
        return (
            f"{protocol} · {optimiser} · {s['epochs']} epochs · batch {s['batch_size']} · "
            f"seeds {seeds} · {data} · diverged runs score chance"
        )

    def to_markdown(self) -> str:
        """Three tables (accuracy at convergence, with noisy-validation early stopping, and the gap)
        under a header that states the protocol; accuracies in %, mean ± std over seeds."""
        n_seeds = len(self.settings["seeds"])
        selection = "source-domain validation" if self.settings.get("task") == "domains" else "noisy-validation"
        columns = [_cell_label(c) for c in self.cells]
        lines = [self.header(), ""]
        sections = [
            ("converged", f"Accuracy at convergence (%, mean ± std over {n_seeds} seed(s))", True),
            ("early_stop", f"Accuracy with {selection} early stopping (%, mean ± std over {n_seeds} seed(s))", True),
            ("gap", "Early-stop gap (early-stopped − converged, percentage points)", False),
        ]
        for metric, title, ranked in sections:
            lines += [f"### {title}", ""]
            head = ["loss", *columns] + (["avg rank", "diverged"] if ranked else [])
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
            for loss in self.losses:
                row = [loss]
                for cell in self.cells:
                    mean, std = self.summary(loss, cell).metric(metric)
                    sign = "+" if metric == "gap" else ""
                    row.append(f"{mean * 100:{sign}.1f} ± {std * 100:.1f}")
                if ranked:
                    row += [f"{self.ranks[metric][loss]:.2f}", str(self.diverged_runs(loss))]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        if self.settings["lr_protocol"] == "tuned":
            lines += ["### Chosen learning rates", ""]
            lines.append("| " + " | ".join(["loss", *columns]) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * len(columns)) + "|")
            for loss in self.losses:
                lines.append("| " + " | ".join([loss] + [f"{self.summary(loss, c).lr:g}" for c in self.cells]) + " |")
            lines.append("")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# running


def _as_architecture(value: str | ArchitectureSpec | Mapping) -> ArchitectureSpec:
    return value if isinstance(value, ArchitectureSpec) else ArchitectureSpec.model_validate(value)


@torch.no_grad()
def _softmax_outputs(model: nn.Module, data, device, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    out = [torch.softmax(model(data.x[i : i + batch_size].to(device)), -1).cpu() for i in range(0, len(data), batch_size)]
    model.train()
    return torch.cat(out)


def train_run(
    loss: Callable[[], nn.Module] | TwoStageForward,
    task: Task,
    architecture: ArchitectureSpec,
    seed: int,
    lr: float,
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    loss_label: str = "loss",
) -> RunRecord:
    """Train one model and score it (see the module docstring for the three numbers)."""
    from metaopt_core.train import fit

    in_channels, image_size = task.train.shape[0], task.train.shape[-1]
    train_kwargs = dict(
        val={"select": task.select, "test": task.test}, optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
    )  # fmt: skip
    start = time.perf_counter()
    if isinstance(loss, TwoStageForward):
        from metaopt_core.losses.registry import get_loss
        from metaopt_core.losses.robust import estimate_transition_matrix

        stage1 = architecture.build(in_channels, image_size, task.num_classes, seed).to(device or "cpu")
        first = fit(stage1, get_loss("ce"), task.train, **train_kwargs)
        if first.diverged:
            loss_fn = None
        else:
            probs = _softmax_outputs(stage1, task.train, next(stage1.parameters()).device)
            loss_fn = loss.build(estimate_transition_matrix(probs))
    else:
        loss_fn = loss()
    model = architecture.build(in_channels, image_size, task.num_classes, seed).to(device or "cpu")
    if loss_fn is None:  # stage 1 of the two-stage recipe diverged: nothing to correct with
        history, diverged = [{"epoch": 1, "diverged": True, "val_acc/select": task.chance, "val_acc/test": task.chance}], True
    else:
        if isinstance(loss_fn, nn.Module):
            loss_fn = loss_fn.to(device or "cpu")
        result = fit(model, loss_fn, task.train, **train_kwargs)
        history, diverged = result.history, result.diverged
    rows = [
        {
            "epoch": row["epoch"],
            "train_loss": row.get("train_loss"),  # None (valid JSON), not NaN, when not trained
            "train_acc": row.get("train_acc"),
            "select_acc": row["val_acc/select"],
            "test_acc": row["val_acc/test"],
            **({"diverged": True} if row.get("diverged") else {}),
        }
        for row in history
    ]
    # The row of the diverging epoch reflects a half-trained model: only complete epochs count.
    usable = sum(1 for row in rows if not row.get("diverged"))
    chosen = early_stop_index([row["select_acc"] for row in rows], usable)
    return RunRecord(
        loss=loss_label,
        dataset=task.dataset,
        condition=task.condition,
        architecture=architecture.display,
        seed=seed,
        lr=lr,
        converged_acc=task.chance if diverged else rows[-1]["test_acc"],
        early_stop_acc=task.chance if chosen is None else rows[chosen]["test_acc"],
        early_stop_epoch=None if chosen is None else rows[chosen]["epoch"],
        final_select_acc=task.chance if diverged else rows[-1]["select_acc"],
        diverged=diverged,
        seconds=time.perf_counter() - start,
        history=rows,
    )


def _summarise(runs: list[RunRecord], lr: float, lr_scores: dict[str, float]) -> CellSummary:
    first = runs[0]
    conv = mean_std([r.converged_acc for r in runs])
    stop = mean_std([r.early_stop_acc for r in runs])
    gap = mean_std([r.gap for r in runs])
    return CellSummary(
        loss=first.loss, dataset=first.dataset, condition=first.condition, architecture=first.architecture,
        lr=lr, seeds=[r.seed for r in runs], converged_mean=conv[0], converged_std=conv[1],
        early_stop_mean=stop[0], early_stop_std=stop[1], gap_mean=gap[0], gap_std=gap[1],
        diverged=sum(r.diverged for r in runs), lr_scores=lr_scores,
    )  # fmt: skip


def compare_losses(
    losses: Mapping[str, LossLike],
    tasks: Task | Sequence[Task],
    architectures: Sequence[str | ArchitectureSpec | Mapping] = ("mlp2",),
    seeds: Sequence[int] = (0,),
    *,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_protocol: str = "fixed",
    lr: float = 0.01,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Train every loss on every (task, architecture) cell for every seed; score and rank them.

    ``losses``: label -> ``get_loss`` name, ``nn.Module`` (deep-copied per run) or zero-argument
    factory. ``progress`` receives one dict per trained model (``done``, ``total`` and the run's
    labels and scores).

    Example (ARL meta-test)::

        task = noise_task({"source": "digits", "noise": {"kind": "symmetric", "rate": 0.8}})
        result = compare_losses({"learned": learned, "ce": "ce", "gce": "gce", "sce": "sce",
                                 "nce+mae": "nce+mae", "itl": "taylor:itl"},
                                task, ["small_cnn"], seeds=[0, 1, 2], epochs=20)
        print(result.to_markdown())
    """
    if lr_protocol not in LR_PROTOCOLS:
        raise ValueError(f"lr_protocol: got {lr_protocol!r}; allowed: {list(LR_PROTOCOLS)}")
    if not losses:
        raise ValueError("losses: got none; give at least one loss")
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    if not tasks:
        raise ValueError("tasks: got none")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: got {seeds}; allowed: a non-empty list of distinct integers")
    archs = [_as_architecture(a) for a in architectures]
    if not archs:
        raise ValueError("architectures: got none")
    factories = {label: loss_factory(value) for label, value in losses.items()}
    lrs = [float(lr)] if lr_protocol == "fixed" else [float(v) for v in lr_grid]
    if not lrs or any(not v > 0 for v in lrs):
        raise ValueError(f"lr / lr_grid: got {lrs}; allowed: positive learning rates")

    cells = [(t.dataset, t.condition, a.display) for t in tasks for a in archs]
    duplicates = sorted({c for c in cells if cells.count(c) > 1})
    if duplicates:
        raise ValueError(f"tasks x architectures: duplicate cell(s) {duplicates}; give tasks distinct names")
    total = len(factories) * len(cells) * len(seeds) * len(lrs)
    done, start = 0, time.perf_counter()
    runs: list[RunRecord] = []
    summaries: list[CellSummary] = []
    train_kwargs = dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                        weight_decay=weight_decay, device=device)  # fmt: skip
    for task in tasks:
        for arch in archs:
            for label, factory in factories.items():
                by_lr: dict[float, list[RunRecord]] = {}
                for rate in lrs:
                    by_lr[rate] = []
                    for seed in seeds:
                        record = train_run(factory, task, arch, seed, rate, loss_label=label, **train_kwargs)
                        by_lr[rate].append(record)
                        done += 1
                        if progress:
                            progress({"done": done, "total": total, "loss": label, "dataset": task.dataset,
                                      "condition": task.condition, "architecture": arch.display, "seed": seed,
                                      "lr": rate, "converged_acc": record.converged_acc,
                                      "early_stop_acc": record.early_stop_acc, "diverged": record.diverged})  # fmt: skip
                scores = {rate: statistics.fmean(r.final_select_acc for r in records) for rate, records in by_lr.items()}
                best = max(lrs, key=lambda rate: scores[rate])  # first in grid order on ties
                for rate, records in by_lr.items():
                    for record in records:
                        record.selected = rate == best
                    runs.extend(records)
                lr_scores = {f"{rate:g}": score for rate, score in scores.items()} if lr_protocol == "tuned" else {}
                summaries.append(_summarise(by_lr[best], best, lr_scores))

    labels = list(factories)
    kinds = sorted({t.kind for t in tasks})
    fractions = sorted({t.select_fraction for t in tasks if t.select_fraction is not None})
    result = EvaluationResult(
        settings={
            "task": kinds[0] if len(kinds) == 1 else "mixed",
            "noisy_val_fraction": fractions[0] if len(fractions) == 1 else None,
            **dict(extra_settings or {}),
            "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "momentum": momentum,
            "weight_decay": weight_decay, "lr_protocol": lr_protocol, "lr": float(lr),
            "lr_grid": [float(v) for v in lr_grid], "seeds": seeds,
        },  # fmt: skip
        losses=labels,
        cells=cells,
        summaries=summaries,
        ranks={},
        runs=runs,
        seconds=time.perf_counter() - start,
    )
    for metric in ("converged", "early_stop"):
        result.ranks[metric] = average_ranks(
            {cell: {loss: result.summary(loss, cell).metric(metric)[0] for loss in labels} for cell in cells}
        )
    return result


def evaluate_domain_generalisation(
    losses: Mapping[str, LossLike],
    data: DataSpec | Mapping | Any,
    architectures: Sequence[str | ArchitectureSpec | Mapping] = ("mlp2",),
    seeds: Sequence[int] = (0,),
    held_out: Sequence[str] | None = None,
    **kwargs,
) -> EvaluationResult:
    """Leave-one-domain-out meta-test (see :func:`domain_tasks`); ``kwargs`` go to :func:`compare_losses`."""
    return compare_losses(losses, domain_tasks(data, held_out), architectures, seeds, **kwargs)


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


def evaluate(
    config: EvaluationConfig | Mapping,
    progress: ProgressCallback | None = None,
    losses_override: Mapping[str, LossLike] | None = None,
) -> EvaluationResult:
    """Run the meta-test a config describes.

    ``losses_override``: label -> loss (name, module or factory), e.g. the loss just meta-learned.
    An entry replaces the config's loss of the same label and any other label is appended, so a
    config can list the baselines and the caller adds the learned loss.
    """
    if not isinstance(config, EvaluationConfig):
        from metaopt_core.config import validate

        config = validate(EvaluationConfig, config)
    losses: dict[str, LossLike | Callable] = {spec.display: spec.factory() for spec in config.losses}
    for label, value in (losses_override or {}).items():
        losses[label] = value
    settings = {"datasets": [spec.model_dump(mode="json") for spec in config.data_specs()],
                "architectures": [a.model_dump(mode="json") for a in config.architectures]}  # fmt: skip
    tasks = build_tasks(config)
    settings["data_fingerprints"] = {f"{t.dataset} · {t.condition}": t.fingerprint for t in tasks}
    return compare_losses(
        losses,
        tasks,
        config.architectures,
        config.seeds,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        lr_protocol=config.lr_protocol,
        lr=config.lr,
        lr_grid=config.lr_grid,
        device=config.device,
        progress=progress,
        extra_settings=settings,
    )


def count_runs(config: EvaluationConfig) -> int:
    """Models the config trains (the two-stage forward loss trains two per run; counted once)."""
    cells = len(config.data_specs()) * len(config.architectures)
    if config.task == "domains":
        cells = len(config.architectures) * sum(
            len(config.held_out) if config.held_out is not None else _domain_count(spec) for spec in config.datasets
        )
    lrs = 1 if config.lr_protocol == "fixed" else len(config.lr_grid)
    return len(config.losses) * cells * len(config.seeds) * lrs


def _domain_count(spec: DataSpec) -> int:
    if spec.domains == "rotated":
        return len(spec.angles)
    if spec.domains == "colored":
        from metaopt_core.data.domains import COLORED_ENVIRONMENTS

        return len(COLORED_ENVIRONMENTS)
    return 0  # folder: unknown until read; the progress bar grows when it is


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m metaopt_core.evaluate --config FILE [--json OUT] [--markdown OUT]``."""
    import argparse
    import sys

    from metaopt_core.config import load_config

    parser = argparse.ArgumentParser(prog="python -m metaopt_core.evaluate", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML with algorithm: evaluate")
    parser.add_argument("--json", help="write the full result (settings, per-cell summaries, ranks, runs) here")
    parser.add_argument("--markdown", help="write the Markdown tables here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's choice); 1 is fastest for the small demo "
        "models on a shared 2-core machine"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: got {args.threads}; allowed: an integer >= 1")
        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if not isinstance(config, EvaluationConfig):
        print(f"{args.config}: field 'algorithm': got {config.algorithm!r}; this command needs 'evaluate'", file=sys.stderr)
        return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=count_runs(config), unit="run", dynamic_ncols=True)

    def progress(event: dict) -> None:
        if bar is not None:
            if event["total"] != bar.total:
                bar.total = event["total"]
            bar.set_postfix_str(f"{event['loss']} | {event['dataset']} {event['condition']} | {event['architecture']}")
            bar.update(1)

    started = time.perf_counter()
    result = evaluate(config, progress=progress)
    if bar is not None:
        bar.close()
    markdown = result.to_markdown()
    if args.json:
        result.to_json(args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n")
    print(markdown)
    print(f"{len(result.runs)} runs in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    # Run the imported module's main, not this __main__ copy's: load_config builds the config
    # class from metaopt_core.evaluate, and isinstance checks must see that same class.
    from metaopt_core.evaluate import main as _main

    raise SystemExit(_main())
