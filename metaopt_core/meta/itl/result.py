"""What ITL exports: :func:`result_of` turns a state into the learned loss and its history; and the
per-step scalar metrics (:data:`SCALAR_METRICS`). (The outer loop is the driver's.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from metaopt_core.meta.itl.state import ITLState

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

    @property
    def export_kind(self) -> str:
        return self.state.itl_config.loss_family().export_kind

    def save(self, directory: str | Path) -> Path:
        """The loss as its family's export kind and ``history.json``; the folder."""
        from metaopt_core import exports

        return exports.save(directory, self.export_kind, self.document, self.history)


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
