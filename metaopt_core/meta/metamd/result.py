"""What MetaMD exports: :func:`result_of` turns a state into a :class:`MetaMDResult` (the learned
divergence, saved with its lr and provenance); and the per-step scalar metrics. (The outer loop is
the driver's.)"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from metaopt_core import exports
from metaopt_core.data.prepare import PreparedData
from metaopt_core.exports import LearnedDivergence
from metaopt_core.meta.metamd.state import MetaMDState
from metaopt_core.meta.metamd.tasks import DomainTasks, TaskSet, task_set
from metaopt_core.optim import Divergence, MirrorDescent

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

    export_kind = "mirror-descent"

    @property
    def artifact(self) -> LearnedDivergence:
        return LearnedDivergence(self.divergence, self.lr, self.metadata)

    def save(self, directory: str | Path) -> Path:
        """The optimiser as its export kind (``divergence/``: safetensors + manifest) and
        ``history.json``; the folder."""
        return exports.save(directory, self.export_kind, self.artifact, self.history)

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


__all__ = ["SCALAR_METRICS", "MetaMDResult", "result_of"]
