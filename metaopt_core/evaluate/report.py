"""Statistics and results of a meta-test: mean ± std over seeds, Demšar (2006) average ranks, the
early-stopping rule, and the result records (per run, per (loss, cell)) with their JSON and
Markdown renderings."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("converged", "early_stop", "gap")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 denominator; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: got no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def unit_summary(values: Sequence[float], confidence: float = 0.95, higher_is_better: bool = True) -> dict:
    """Mean with its two-sided ``confidence`` t-interval, median and worst over independent units
    (the numbers every meta-test row reports): ``{n, mean, ci_low, ci_high, median, worst}``."""
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("unit_summary: got no values")
    n, mean = len(values), statistics.fmean(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / n**0.5) if n > 1 else float("inf")
    worst = min(values) if higher_is_better else max(values)
    return {"n": n, "mean": mean, "ci_low": mean - half, "ci_high": mean + half, "median": statistics.median(values), "worst": worst}


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

    @classmethod
    def from_runs(cls, runs: Sequence[RunRecord], lr: float, lr_scores: dict[str, float] | None = None) -> CellSummary:
        """The summary of one (loss, cell)'s runs at its chosen ``lr`` (one run per seed)."""
        first = runs[0]
        conv = mean_std([r.converged_acc for r in runs])
        stop = mean_std([r.early_stop_acc for r in runs])
        gap = mean_std([r.gap for r in runs])
        return cls(
            loss=first.loss, dataset=first.dataset, condition=first.condition, architecture=first.architecture,
            lr=lr, seeds=[r.seed for r in runs], converged_mean=conv[0], converged_std=conv[1],
            early_stop_mean=stop[0], early_stop_std=stop[1], gap_mean=gap[0], gap_std=gap[1],
            diverged=sum(r.diverged for r in runs), lr_scores=dict(lr_scores or {}),
        )  # fmt: skip

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
    def from_dict(cls, doc: Mapping) -> EvaluationResult:
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
            protocol = f"lr protocol: **tuned** (per loss and cell, the lr of {{{grid}}} with the best mean last-epoch accuracy on the selection split)"
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
        return f"{protocol} · {optimiser} · {s['epochs']} epochs · batch {s['batch_size']} · seeds {seeds} · {data} · diverged runs score chance"

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
