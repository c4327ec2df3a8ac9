"""The meta-test every loss learner shares (ARL, ITL, ML3): the learned loss, the production
version's loss (the champion, when there is one) and the named baseline losses, each trained on
every independent unit at every lr of one grid (:func:`metaopt_core.evaluate.units.train_units`, one
batched pass per candidate), then read out under the three protocols:

- ``early-stop`` (the default gate protocol; the thesis's Table 3.3): each candidate's lr and epoch
  chosen on the unit's selection split;
- ``tuned``: lr chosen on the selection split, scored at convergence;
- ``fixed`` (the thesis's Table 3.1): one recipe lr for every loss, at convergence.

Scored as the registry records (``meta_test_accuracy``: the learned loss's mean test accuracy under
the gate protocol, higher is better), with the per-unit paired scores the gate compares
(:mod:`metaopt_core.gate`), every protocol's mean with its 95 % confidence interval, median and
worst, how well the selection split ranks lrs (its regret against choosing on the test split),
and the learned loss's **lr scale**: its chosen lr over cross-entropy's on the same unit (the
geometric mean over units), which the registry bakes into the artifact so the served loss trains at
the lr a user tuned for cross-entropy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from metaopt_core.config import DataSpec, ModelName, StrictModel, validate
from metaopt_core.evaluate.units import PROTOCOL_TEXT, PROTOCOLS, Training, Unit, choose, oracle, train_units
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter

LEARNED = "learned"
CHAMPION = "champion"
LR_GRID_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)  # a grid around the meta-training lr, factor 3 apart
GATE_PROTOCOL = "early-stop"
LR_SCALE_REFERENCE = "ce"  # the loss a user already tuned an lr for


def lr_grid_around(lr: float, factors: Sequence[float] = LR_GRID_FACTORS) -> list[float]:
    """The default lr grid of a loss meta-test: ``lr`` times each factor (5 values, factor 3 apart)."""
    return [float(f"{lr * factor:.6g}") for factor in factors]


def unit_seed(*words: int) -> int:
    """A seed for one unit's data, weights or minibatches, from (base seed, task, replicate, purpose)."""
    import numpy as np

    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0] & 0x7FFFFFFF)


class LossMetaTestSettings(StrictModel):
    """What every loss meta-test takes: ``seeds`` independent units per task (a count, or the seed
    values), ``epochs`` of SGD, the ``baselines`` (registry loss names), one ``lr_grid`` for every
    candidate (default: around the meta-training lr), the fixed protocol's ``recipe_lr`` (default:
    the meta-training lr) and the ``protocol`` the gate decides on."""

    seeds: int | list[int] = 5
    epochs: int = Field(12, ge=1)
    baselines: list[str] = ["ce"]
    lr_grid: list[float] | None = Field(None, min_length=1)
    recipe_lr: float | None = Field(None, gt=0.0)
    protocol: Literal["early-stop", "tuned", "fixed"] = "early-stop"
    batch_size: int | None = Field(None, ge=1)

    @property
    def seed_values(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def training(self, lr: float, momentum: float, batch_size: int) -> dict:
        """The settings :func:`compare_learned_loss` takes, around the meta-training ``lr``."""
        return {"seeds": self.seed_values, "epochs": self.epochs, "momentum": momentum, "lr_grid": self.lr_grid or lr_grid_around(lr),
                "recipe_lr": self.recipe_lr or lr, "batch_size": self.batch_size or batch_size, "gate_protocol": self.protocol}  # fmt: skip


class MetaTestTask(StrictModel):
    """One meta-test task: a dataset (at ``image_size`` pixels; digits' native size is 8) and an architecture."""

    source: str = "digits"
    model: ModelName = "mlp2"
    image_size: int | None = Field(None, ge=4, le=512)
    max_examples: int | None = Field(None, ge=1)

    @property
    def label(self) -> str:
        return f"{self.source}{self.image_size or ''} · {self.model}"


class TaskMetaTestSettings(LossMetaTestSettings):
    """A loss meta-test over ``tasks`` (dataset x architecture), each unit its own split of the
    dataset into train / selection (``select_fraction`` of the training split, with its labels as
    given: noisy under label noise) / test (``test_fraction``, clean labels)."""

    tasks: list[MetaTestTask] = Field(min_length=1)
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    select_fraction: float = Field(0.3, gt=0.0, lt=1.0)


def task_specs(settings: TaskMetaTestSettings, base_seed: int, noise: Mapping[str, Any], meta_train_sources: set[str]) -> list[DataSpec]:
    """One dataset per unit (task x seed, in that order), each its own split and noise draw; a
    source meta-training also reads gives the meta-test only its meta-test part."""
    specs = []
    for t, task in enumerate(settings.tasks):
        for seed in settings.seed_values:
            doc = {"source": task.source, "max_examples": task.max_examples, "image_size": task.image_size, "noise": dict(noise),
                   "seed": unit_seed(base_seed, t, seed), "val_fraction": settings.test_fraction,
                   "part": "meta-test" if task.source in meta_train_sources else "all"}  # fmt: skip
            specs.append(validate(DataSpec, doc, source=f"meta_test.tasks[{t}]"))
    return specs


def task_units(settings: TaskMetaTestSettings, base_seed: int, datasets: Sequence[Any]) -> list[Unit]:
    """The units of :func:`task_specs`' prepared datasets: their noisy train split cut into the
    training and selection parts, their clean val split the test set."""
    from metaopt_core import evaluate

    units, prepared = [], iter(datasets)
    for t, task in enumerate(settings.tasks):
        for seed in settings.seed_values:
            split = evaluate.noise_task(next(prepared), settings.select_fraction)
            units.append(Unit(f"{task.label} · {split.condition}", seed, split.train, split.select, split.test, task.model,
                              unit_seed(base_seed, t, seed, 1), unit_seed(base_seed, t, seed, 2)))  # fmt: skip
    return units


def task_manifest(manifest: Any, datasets: Sequence[Any]) -> Any:
    """The meta-test phases of :func:`task_units`, one unit per dataset."""
    for unit, dataset in enumerate(datasets):
        manifest.add("meta_test_training", dataset, ["train"], unit).add("lr_selection", dataset, ["train"], unit).add("meta_test", dataset, ["val"], unit)
    return manifest


def _summary_rows(training: Training, labels: Sequence[str], protocol: str, recipe_lr: float) -> dict[str, dict]:
    from metaopt_core.evaluate.report import unit_summary

    rows = {}
    for label in labels:
        choices = [choose(training, label, u, protocol, recipe_lr) for u in range(len(training.units))]
        row = unit_summary([c.test for c in choices])
        tasks = sorted({unit.task for unit in training.units})
        row["per_task"] = {task: statistics.fmean(c.test for c, unit in zip(choices, training.units) if unit.task == task) for task in tasks}
        row["per_unit"] = [{"lr": c.lr, "epoch": c.epoch, "test": c.test} for c in choices]
        rows[label] = row
    return rows


def selection_quality(training: Training, labels: Sequence[str], protocol: str) -> dict[str, dict]:
    """How well the selection split ranks the lr grid, per candidate: the mean test accuracy given
    up by choosing on it instead of on the test split (regret), how often both choose alike, the
    spread of selection accuracy across the grid, and that accuracy's sampling error (binomial SE
    at the selection split's size): a spread near the SE means the lr choice is close to random."""
    protocol = "tuned" if protocol == "fixed" else protocol  # the recipe chooses nothing; judge the tuned choice
    out = {}
    for label in labels:
        regret, agree, spread, error = [], [], [], []
        for u, unit in enumerate(training.units):
            chosen = choose(training, label, u, protocol)
            best = oracle(training, label, u, protocol)
            regret.append(best - chosen.test)
            agree.append(chosen.test >= best - 1e-12)
            per_lr = [choose(_only(training, lr), label, u, protocol).select for lr in training.lr_grid]
            spread.append(max(per_lr) - min(per_lr))
            p = min(max(chosen.select, 1e-6), 1 - 1e-6)
            error.append(math.sqrt(p * (1 - p) / max(1, len(unit.select))))
        out[label] = {"mean_regret": statistics.fmean(regret), "agreement": statistics.fmean(agree), "select_spread": statistics.fmean(spread),
                      "select_standard_error": statistics.fmean(error)}  # fmt: skip
    return out


def _only(training: Training, lr: float) -> Training:
    """The same training restricted to one lr (to read one lr's selection accuracy)."""
    return Training(training.curves, training.labels, [lr], training.units)


def lr_scale(training: Training, protocol: str, label: str = LEARNED, reference: str = LR_SCALE_REFERENCE) -> dict:
    """The learned loss's lr relative to ``reference``'s (cross-entropy): the geometric mean over
    units of (its chosen lr) / (the reference's chosen lr) under ``protocol``. The loader multiplies
    the loss by it, so the served loss trains at the lr the user tuned for the reference (exact for
    SGD; scale-invariant optimisers such as Adam ignore it). Empty without the reference."""
    if reference not in training.labels:
        return {}
    ratios = [choose(training, label, u, protocol).lr / choose(training, reference, u, protocol).lr for u in range(len(training.units))]
    scale = math.exp(statistics.fmean(math.log(r) for r in ratios))
    return {"lr_scale": float(f"{scale:.6g}"), "lr_scale_reference": reference, "lr_scale_protocol": protocol,
            "lr_scale_range": [min(ratios), max(ratios)]}  # fmt: skip


def _markdown(title: str, training: Training, tables: dict[str, dict[str, dict]], quality: dict[str, dict], settings: dict, deployment: dict) -> str:
    labels, gate = training.labels, settings["gate_protocol"]
    tasks = sorted({unit.task for unit in training.units})
    lines = [f"### {title}: {LEARNED} vs {', '.join(labels[1:]) or 'nothing'}", "",
             f"{len(training.units)} independent units ({len(tasks)} task(s) x {len(settings['seeds'])} seeds; every unit its own split, "
             f"label noise and initialisation), {settings['epochs']} epochs of SGD (momentum {settings['momentum']}, batch {settings['batch_size']}), "
             f"lr grid {settings['lr_grid']}; the gate decides on **{gate}**. Mean [95 % CI], median and worst test accuracy over units.", ""]  # fmt: skip
    for protocol in PROTOCOLS:
        extra = f" (lr {settings['recipe_lr']:g})" if protocol == "fixed" else ""
        lines += [f"**{protocol}**{extra}: {PROTOCOL_TEXT[protocol]}", "",
                  "| candidate | mean [95 % CI] | median | worst | " + " | ".join(tasks) + " |", "|---|---:|---:|---:|" + "---:|" * len(tasks)]  # fmt: skip
        for label in labels:
            row = tables[protocol][label]
            per_task = " | ".join(f"{row['per_task'][t] * 100:.1f}" for t in tasks)
            lines.append(f"| {label} | {row['mean'] * 100:.1f} [{row['ci_low'] * 100:.1f}, {row['ci_high'] * 100:.1f}] | {row['median'] * 100:.1f} | "
                         f"{row['worst'] * 100:.1f} | {per_task} |")  # fmt: skip
        lines.append("")
    lines += [f"Every unit under **{gate}** (test accuracy %, chosen lr):", "",
              "| task | seed | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]  # fmt: skip
    for u, unit in enumerate(training.units):
        cells = [f"{tables[gate][label]['per_unit'][u]['test'] * 100:.1f} ({tables[gate][label]['per_unit'][u]['lr']:g})" for label in labels]
        lines.append(f"| {unit.task} | {unit.seed} | " + " | ".join(cells) + " |")
    lines += ["", f"How well the selection split ranks the lr grid ({gate}): mean test accuracy lost by choosing on it rather than on the test "
              "split, how often both choose alike, the spread of selection accuracy across the grid, and its binomial standard error:", "",
              "| candidate | regret | same choice | selection spread | selection SE |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for label in labels:
        q = quality[label]
        lines.append(
            f"| {label} | {q['mean_regret'] * 100:.1f} | {q['agreement']:.0%} | {q['select_spread'] * 100:.1f} | {q['select_standard_error'] * 100:.1f} |"
        )
    if deployment:
        low, high = deployment["lr_scale_range"]
        lines += ["", f"lr scale of the learned loss (its chosen lr over {deployment['lr_scale_reference']}'s, geometric mean over units): "
                  f"**{deployment['lr_scale']:.3g}** (per unit {low:.3g} … {high:.3g}); the registered loss is multiplied by it, so it "
                  f"trains at the lr a user tuned for {deployment['lr_scale_reference']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def compare_learned_loss(
    title: str,
    loss_document: Mapping[str, Any],
    baselines: Sequence[str],
    units: Sequence[Unit],
    training: Mapping[str, Any],
    *,
    champion: Mapping[str, Any] | None = None,
    device: str | None = None,
    progress: ProgressReporter | None = None,
) -> MetaTestReport:
    """Train the learned loss, the champion's loss (``champion``: the production version's loss
    document, or None) and each baseline on every unit with the same ``training`` settings
    (``lr_grid``, ``epochs``, ``batch_size``, ``momentum``, ``recipe_lr``: the fixed protocol's lr,
    one of the grid, ``gate_protocol``: one of ``early-stop | tuned | fixed``, ``seeds``); report
    every protocol, the gate protocol's paired per-unit scores, and the lr scale."""
    from metaopt_core.losses.document import loss_from_document
    from metaopt_core.losses.registry import get_loss

    losses: dict[str, Any] = {LEARNED: loss_from_document(loss_document, apply_lr_scale=False)}
    if champion is not None:
        losses[CHAMPION] = loss_from_document(champion, apply_lr_scale=False)
    for name in baselines:
        if name in (LEARNED, CHAMPION):
            raise ValueError(f"meta_test.baselines: {name!r} is a candidate's own label; pick another name")
        losses[name] = get_loss(name)
    gate = training.get("gate_protocol", GATE_PROTOCOL)
    if gate not in PROTOCOLS:
        raise ValueError(f"meta_test.protocol: got {gate!r}; allowed: {list(PROTOCOLS)}")
    grid = [float(v) for v in training["lr_grid"]]
    recipe_lr = float(training["recipe_lr"])
    if recipe_lr not in grid:
        grid = sorted({*grid, recipe_lr})  # the fixed recipe's lr is always trained

    def on_group(event: dict) -> None:
        if progress:
            progress(f"meta-test {event['done']}/{event['total']} trainings: {event['label']} done on every unit and lr")

    trained = train_units(losses, units, grid, epochs=int(training["epochs"]), batch_size=int(training["batch_size"]),
                          momentum=float(training["momentum"]), device=device, progress=on_group)  # fmt: skip
    labels = list(losses)
    tables = {protocol: _summary_rows(trained, labels, protocol, recipe_lr) for protocol in PROTOCOLS}
    quality = selection_quality(trained, labels, gate)
    measured = lr_scale(trained, gate)
    deployment = {"lr_scale": measured["lr_scale"]} if measured else {}  # what the registry bakes into the artifact
    paired = {label: [row["test"] for row in tables[gate][label]["per_unit"]] for label in labels}
    unit_rows = [unit.describe() for unit in units]
    settings = {"gate_protocol": gate, "protocols": {p: PROTOCOL_TEXT[p] for p in PROTOCOLS}, "lr_grid": grid, "recipe_lr": recipe_lr,
                "epochs": int(training["epochs"]), "batch_size": int(training["batch_size"]), "momentum": float(training["momentum"]),
                "seeds": list(training.get("seeds") or sorted({u.seed for u in units})), "replicates": len(units),
                "tasks": sorted({u.task for u in units}), "candidates": labels, "baselines": list(baselines),
                "chosen_lr": {label: [row["lr"] for row in tables[gate][label]["per_unit"]] for label in labels},
                "selection": quality, "lr_scale": measured, "seconds": trained.seconds}  # fmt: skip
    scores: dict[str, float] = {}
    for label in labels:
        prefix = "meta_test_" if label == LEARNED else f"{label}." if label == CHAMPION else f"baseline.{label}."
        scores[prefix + "accuracy"] = tables[gate][label]["mean"]
        for protocol in PROTOCOLS:
            scores[f"{prefix}accuracy_{protocol.replace('-', '_')}"] = tables[protocol][label]["mean"]
    if deployment:
        scores["meta_test_lr_scale"] = deployment["lr_scale"]
    details = {"tables": tables, "selection": quality, "settings": settings, "paired": paired, "units": unit_rows, "deployment": deployment,
               "lr_scale": measured}  # fmt: skip
    return MetaTestReport(_markdown(title, trained, tables, quality, settings, measured), scores, "meta_test_accuracy", True, details,
                          paired=paired, units=unit_rows, settings=settings, deployment=deployment)  # fmt: skip


__all__ = [
    "CHAMPION",
    "GATE_PROTOCOL",
    "LEARNED",
    "LR_GRID_FACTORS",
    "LossMetaTestSettings",
    "MetaTestTask",
    "TaskMetaTestSettings",
    "compare_learned_loss",
    "lr_grid_around",
    "lr_scale",
    "selection_quality",
    "task_manifest",
    "task_specs",
    "task_units",
    "unit_seed",
]
