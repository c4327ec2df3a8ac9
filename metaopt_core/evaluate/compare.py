"""Comparing losses: train every loss on every (task, architecture) cell for every seed (and, under
the ``tuned`` lr protocol, every lr of the grid), then summarise and rank them
(:func:`compare_losses`); :func:`evaluate` runs the whole meta-test an :class:`EvaluationConfig`
describes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from metaopt_core.config import DataSpec
from metaopt_core.evaluate.config import EvaluationConfig, TrainingProtocol
from metaopt_core.evaluate.loss_factories import LossLike, loss_factory
from metaopt_core.evaluate.report import CellSummary, EvaluationResult, RunRecord, average_ranks
from metaopt_core.evaluate.runs import train_run
from metaopt_core.evaluate.tasks import Task, build_tasks, domain_tasks

# Receives one dict per trained model: done, total, the run's labels (loss, dataset, condition,
# architecture, seed, lr) and its scores (converged_acc, early_stop_acc, diverged).
ProgressCallback = Callable[[dict], None]


def compare_losses(
    losses: Mapping[str, LossLike],
    tasks: Task | Sequence[Task],
    config: TrainingProtocol,
    *,
    progress: ProgressCallback | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Train every loss on every (task, architecture) cell for every seed; score and rank them.

    ``losses``: label -> ``get_loss`` name, ``nn.Module`` (deep-copied per run) or zero-argument
    factory. ``config``: how to train (a :class:`TrainingProtocol`, or a whole
    :class:`EvaluationConfig`). ``extra_settings`` are recorded in the result's settings (e.g.
    where the learned loss came from).

    Example (ARL meta-test)::

        task = noise_task({"source": "digits", "noise": {"kind": "symmetric", "rate": 0.8}})
        protocol = TrainingProtocol(architectures=["small_cnn"], seeds=[0, 1, 2], epochs=20)
        result = compare_losses({"learned": learned, "ce": "ce", "gce": "gce", "itl": "taylor:itl"}, task, protocol)
        print(result.to_markdown())
    """
    if not isinstance(config, TrainingProtocol):
        raise TypeError(f"config: got {type(config).__name__}; allowed: a TrainingProtocol (or an EvaluationConfig)")
    if not losses:
        raise ValueError("losses: got none; give at least one loss")
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    if not tasks:
        raise ValueError("tasks: got none")
    factories = {label: loss_factory(value) for label, value in losses.items()}
    archs, seeds, lrs = config.architectures, list(config.seeds), config.learning_rates
    cells = [(t.dataset, t.condition, a.display) for t in tasks for a in archs]
    duplicates = sorted({c for c in cells if cells.count(c) > 1})
    if duplicates:
        raise ValueError(f"tasks x architectures: duplicate cell(s) {duplicates}; give tasks distinct names")
    total = len(factories) * len(cells) * len(seeds) * len(lrs)
    done, start = 0, time.perf_counter()
    runs: list[RunRecord] = []
    summaries: list[CellSummary] = []
    for task in tasks:
        for arch in archs:
            for label, factory in factories.items():
                by_lr: dict[float, list[RunRecord]] = {}
                for rate in lrs:
                    by_lr[rate] = []
                    for seed in seeds:
                        record = train_run(factory, task, arch, seed, rate, config, loss_label=label)
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
                lr_scores = {f"{rate:g}": score for rate, score in scores.items()} if config.lr_protocol == "tuned" else {}
                summaries.append(CellSummary.from_runs(by_lr[best], best, lr_scores))

    labels = list(factories)
    kinds = sorted({t.kind for t in tasks})
    fractions = sorted({t.select_fraction for t in tasks if t.select_fraction is not None})
    result = EvaluationResult(
        settings={
            "task": kinds[0] if len(kinds) == 1 else "mixed",
            "noisy_val_fraction": fractions[0] if len(fractions) == 1 else None,
            **dict(extra_settings or {}),
            **config.settings(),
        },
        losses=labels,
        cells=cells,
        summaries=summaries,
        ranks={},
        runs=runs,
        seconds=time.perf_counter() - start,
    )
    for metric in ("converged", "early_stop"):
        result.ranks[metric] = average_ranks({cell: {loss: result.summary(loss, cell).metric(metric)[0] for loss in labels} for cell in cells})
    return result


def evaluate_domain_generalisation(
    losses: Mapping[str, LossLike],
    data: DataSpec | Mapping | Any,
    config: TrainingProtocol,
    held_out: Sequence[str] | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Leave-one-domain-out meta-test (see :func:`domain_tasks`) of :func:`compare_losses`."""
    return compare_losses(losses, domain_tasks(data, held_out), config, progress=progress)


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
    return compare_losses(losses, tasks, config, progress=progress, extra_settings=settings)


def count_runs(config: EvaluationConfig) -> int:
    """Models the config trains (the two-stage forward loss trains two per run; counted once)."""
    cells = len(config.data_specs()) * len(config.architectures)
    if config.task == "domains":
        cells = len(config.architectures) * sum(len(config.held_out) if config.held_out is not None else _domain_count(spec) for spec in config.datasets)
    return len(config.losses) * cells * len(config.seeds) * len(config.learning_rates)


def _domain_count(spec: DataSpec) -> int:
    if spec.domains == "rotated":
        return len(spec.angles)
    if spec.domains == "colored":
        from metaopt_core.data.domains import COLORED_ENVIRONMENTS

        return len(COLORED_ENVIRONMENTS)
    return 0  # folder: unknown until read; the progress bar grows when it is
