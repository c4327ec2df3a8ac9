"""MetaMD's in-process meta-training loop: :func:`run` chains ``inner_hypergrads`` → ``outer_update``
with a checkpoint after every outer step (and resumes from one), and :func:`result_of` turns a state
into a :class:`MetaMDResult` (the learned divergence, saved with its lr and provenance)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from metaopt_core.data.prepare import PreparedData
from metaopt_core.meta.checkpoint import STATE_FILE, check_resumable
from metaopt_core.meta.metamd.config import MetaMDConfig, as_config
from metaopt_core.meta.metamd.state import MetaMDState
from metaopt_core.meta.metamd.step import inner_hypergrads, outer_update
from metaopt_core.meta.metamd.tasks import DomainTasks, TaskSet, task_set
from metaopt_core.optim import Divergence, MirrorDescent, save_divergence

# Fields that may change on resume without changing what the run computes (device: up to float
# reassociation).
RESUMABLE_CHANGES = ("outer.steps", "device", "evaluation.every")

ProgressReporter = Callable[[str], None]
MetricsCallback = Callable[[dict], None]

SCALAR_METRICS = ("lr", "objective", "task_objective", "hypergrad_norm", "task_hypergrad_norm_max", "clipped", "diverged", "seconds", "lambda", "frobenius_distance",
                  "final_loss", "first_loss", "final_suboptimality", "final_grad_norm", "solve_rel_residual",
                  "monitor_iterations_median", "monitor_iterations_mean", "monitor_iterations_converged",
                  "monitor_trajectory_loss", "monitor_final_loss")  # fmt: skip


@dataclass
class MetaMDResult:
    """The learned divergence, the lr it was meta-trained with, and the meta-training history."""

    divergence: Divergence
    lr: float
    history: list[dict]
    state: MetaMDState
    metadata: dict

    def save(self, directory: str | Path) -> dict[str, Path]:
        """``divergence/`` (:func:`save_divergence`: safetensors + manifest, the registry artifact)
        and ``history.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"divergence": save_divergence(self.divergence, directory / "divergence", lr=self.lr, metadata=self.metadata),
                 "history": directory / "history.json"}  # fmt: skip
        paths["history"].write_text(json.dumps(self.history, indent=2))
        return paths

    def optimizer(self, model: nn.Module, lr: float | None = None) -> MirrorDescent:
        """A :class:`MirrorDescent` for ``model`` with the learned divergence (shapes must match)."""
        from metaopt_core.optim import attach

        return MirrorDescent(model.parameters(), attach(copy.deepcopy(self.divergence), model), lr=self.lr if lr is None else lr)


def result_of(state: MetaMDState, data: TaskSet | PreparedData | None = None) -> MetaMDResult:
    """The current divergence of a state as a :class:`MetaMDResult`."""
    config = state.metamd_config
    tasks = task_set(config, data)
    fingerprint = tasks.data.fingerprint if isinstance(tasks, DomainTasks) else None
    metadata = {
        "algorithm": "metamd",
        "name": config.name,
        "outer_steps": state.step,
        "objective": config.objective.kind,
        "hypergrad_method": config.hypergrad.method,
        "inner_steps": config.inner.steps,
        "task_family": config.tasks.family,
        "meta_train_domains": tasks.meta_train if isinstance(tasks, DomainTasks) else None,
        "held_out_domains": tasks.held_out if isinstance(tasks, DomainTasks) else None,
        "data_fingerprint": fingerprint,
        "objective_first": state.history[0]["objective"] if state.history else None,
        "objective_last": state.history[-1]["objective"] if state.history else None,
        "config": state.config,
    }
    return MetaMDResult(state.divergence(tasks), config.inner.lr, list(state.history), state, metadata)


def _resume_state(config: MetaMDConfig, checkpoint_dir: Path) -> MetaMDState:
    state = MetaMDState.load(checkpoint_dir)
    check_resumable(state.config, config.model_dump(mode="json"), checkpoint_dir, RESUMABLE_CHANGES)
    state.config = config.model_dump(mode="json")
    return state


def _progress_line(config: MetaMDConfig, row: Mapping[str, Any]) -> str:
    parts = [f"metamd: step {row['step']}/{config.outer.steps}: objective {row['objective']:.5g}",
             f"|hypergrad| {row['hypergrad_norm']:.2e}", f"lambda {row['lambda']:.3g}", f"||M-I||_F {row['frobenius_distance']:.3g}"]  # fmt: skip
    if "final_loss" in row:
        parts.append(f"final loss {row['final_loss']:.4f}")
    if "monitor_iterations_median" in row:
        parts.append(f"meta-train problems: iterations median {row['monitor_iterations_median']:.0f} (converged {row['monitor_iterations_converged']:.0%})")
    if "monitor_trajectory_loss" in row:
        parts.append(f"meta-train domains: trajectory loss {row['monitor_trajectory_loss']:.4f}")
    parts.append(f"({row['seconds']:.1f}s)")
    return " ".join(parts)


def run(
    config: MetaMDConfig | Mapping[str, Any],
    checkpoint_dir: str | Path | None = None,
    progress: ProgressReporter | None = None,
    callback: MetricsCallback | None = None,
    *,
    data: TaskSet | PreparedData | None = None,
) -> MetaMDResult:
    """Meta-train a divergence: ``inner_hypergrads`` → ``outer_update`` for ``outer.steps`` steps.

    With ``checkpoint_dir`` the state is saved after every outer step and an existing checkpoint
    there is resumed. ``progress`` receives one human-readable line per step; ``callback`` receives
    that step's scalar metrics (``step`` plus those of :data:`SCALAR_METRICS` present) after the
    checkpoint is written, so an exception raised there loses nothing.
    """
    config = as_config(config)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    tasks = task_set(config, data)
    if checkpoint is not None and (checkpoint / STATE_FILE).exists():
        state = _resume_state(config, checkpoint)
        if progress:
            progress(f"metamd: resumed from {checkpoint} at step {state.step}/{config.outer.steps}")
    else:
        state = MetaMDState.initial(config, tasks)
    while not state.finished:
        gradients = inner_hypergrads(state, data=tasks)
        state = outer_update(state, gradients, data=tasks)
        if checkpoint is not None:
            state.save(checkpoint)
        row = state.history[-1]
        if progress:
            progress(_progress_line(config, row))
        if callback:
            callback({"step": row["step"], **{key: row[key] for key in SCALAR_METRICS if key in row}})
    return result_of(state, tasks)


__all__ = ["RESUMABLE_CHANGES", "SCALAR_METRICS", "MetaMDResult", "MetricsCallback", "ProgressReporter", "result_of", "run"]
