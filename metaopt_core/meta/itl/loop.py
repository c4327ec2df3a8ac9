"""ITL's outer loop: :func:`run` chains ``inner_hypergrads`` → ``outer_update``, checkpoints after
every outer step and resumes from a checkpoint; :func:`result_of` turns a state into the learned
loss and its history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from metaopt_core.data.prepare import PreparedData
from metaopt_core.meta.checkpoint import STATE_FILE, check_resumable, save_loss_export
from metaopt_core.meta.itl.config import ITLConfig, as_config
from metaopt_core.meta.itl.domains import DomainSet, domain_set
from metaopt_core.meta.itl.outer_step import inner_hypergrads, outer_update, with_domains
from metaopt_core.meta.itl.state import ITLState

# Fields that may change on resume without changing what the run computes (the last three only
# up to float reassociation between the batched and sequential paths / devices).
RESUMABLE_CHANGES = ("outer.steps", "device", "max_batch", "batched")

ProgressReporter = Callable[[str], None]
MetricsCallback = Callable[[dict], None]


# Keys of a history row that are per-step scalars (what a tracker logs as metrics).
SCALAR_METRICS = ("heldout_ce", "heldout_acc", "source_acc", "outer_objective", "inner_grad_norm", "inner_grad_norm_max",
                  "hypergrad_norm", "domain_hypergrad_norm", "solve_rel_residual", "epochs", "inner_lr", "converged", "diverged",
                  "solver_warnings", "seconds")  # fmt: skip


@dataclass
class ITLResult:
    """The learned loss (a module and its white-box document) and the meta-training history."""

    loss: nn.Module
    document: dict  # the family's to_dict() plus "meta"
    history: list[dict]
    state: ITLState

    def save(self, directory: str | Path) -> dict[str, Path]:
        """``loss.json`` (the registry artifact: JSON only) and ``history.json``."""
        return save_loss_export(directory, self.document, self.history)


def result_of(state: ITLState, fingerprint: str | None = None) -> ITLResult:
    """The current loss of a state as an :class:`ITLResult`."""
    config = state.itl_config
    family = config.loss_family()
    document = family.to_dict(state.omega)
    history = state.history
    document["meta"] = {
        "algorithm": "itl",
        "name": config.name,
        "family": family.describe(),
        "init": config.init,
        "initial_params": [float(v) for v in config.initial_omega()],
        "outer_steps": state.step,
        "domains": state.domains,
        "heldout_ce_first": history[0]["heldout_ce"] if history else None,
        "heldout_ce_last": history[-1]["heldout_ce"] if history else None,
        "heldout_acc_first": history[0]["heldout_acc"] if history else None,
        "heldout_acc_last": history[-1]["heldout_acc"] if history else None,
        "metrics_convention": "history row k: inner models trained with omega_before of step k; heldout_* on the held-out domain's val split",
        "data_fingerprint": fingerprint,
        "config": state.config,
    }
    return ITLResult(family.to_module(state.omega), document, list(history), state)


def _resume_state(config: ITLConfig, checkpoint_dir: Path) -> ITLState:
    state = ITLState.load(checkpoint_dir)
    check_resumable(state.config, config.model_dump(mode="json"), checkpoint_dir, RESUMABLE_CHANGES)
    state.config = config.model_dump(mode="json")
    return state


def run(
    config: ITLConfig | Mapping[str, Any],
    checkpoint_dir: str | Path | None = None,
    progress: ProgressReporter | None = None,
    callback: MetricsCallback | None = None,
    *,
    data: PreparedData | DomainSet | None = None,
) -> ITLResult:
    """Meta-train a loss: ``inner_hypergrads`` → ``outer_update`` for ``outer.steps`` steps.

    With ``checkpoint_dir`` the state is saved after every outer step and an existing checkpoint
    there is resumed. ``progress`` receives one human-readable line per step; ``callback``
    receives that step's scalar metrics (``step`` plus :data:`SCALAR_METRICS`) after the
    checkpoint is written, so an exception raised there loses nothing.
    """
    config = as_config(config)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    domains = domain_set(config, data)
    if checkpoint is not None and (checkpoint / STATE_FILE).exists():
        state = _resume_state(config, checkpoint)
        if progress:
            progress(f"itl: resumed from {checkpoint} at step {state.step}/{config.outer.steps}")
    else:
        state = ITLState.initial(config)
    state = with_domains(state, domains)
    while not state.finished:
        gradients = inner_hypergrads(state, data=domains)
        state = outer_update(state, gradients)
        if checkpoint is not None:
            state.save(checkpoint)
        row = state.history[-1]
        if progress:
            progress(
                f"itl: step {row['step']}/{config.outer.steps}: held-out CE {row['heldout_ce']:.4f} acc {row['heldout_acc']:.4f} "
                f"source acc {row['source_acc']:.4f} inner |g| {row['inner_grad_norm']:.2e} |hypergrad| {row['hypergrad_norm']:.2e} "
                f"epochs {row['epochs']:.1f} converged {row['converged']}/{len(row['per_domain'])} ({row['seconds']:.1f}s)"
            )
        if callback:
            callback({"step": row["step"], **{key: row[key] for key in SCALAR_METRICS}})
    return result_of(state, domains.fingerprint)
