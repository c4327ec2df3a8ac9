"""MetaMD's serialisable records: :class:`MetaMDState` (ω, the outer optimiser's state, step,
history; a crash-safe checkpoint) and :class:`Hypergradient` (one task's result of one outer step,
the unit the pipeline's fan-out ships between machines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from metaopt_core.config import coerce
from metaopt_core.data.prepare import PreparedData
from metaopt_core.meta.checkpoint import OmegaState
from metaopt_core.meta.metamd.config import MetaMDConfig
from metaopt_core.meta.metamd.divergence import divergence_at, initial_omega
from metaopt_core.meta.metamd.tasks import Task, TaskSet
from metaopt_core.optim import Divergence

STATE_FORMAT = "metaopt.metamd.state/1"
HYPERGRAD_FORMAT = "metaopt.metamd.hypergradient/1"


@dataclass
class Hypergradient:
    """dE_task/dω for one task at one outer step (ω-only terms k/λ, ρ‖M − I‖² included, so the mean
    over a step's tasks is the gradient of the meta-objective), plus how the inner run went.

    ``omega_sha256`` identifies the ω it was computed at (``outer_update`` checks it). A non-finite
    inner run or hypergradient gives ``diverged = True`` and a zero gradient, left out of the mean.
    """

    step: int
    task: Task
    omega_sha256: str
    grad: Tensor
    value: float
    diverged: bool
    metrics: dict

    def to_dict(self) -> dict:
        return {"format": HYPERGRAD_FORMAT, "step": self.step, "task": self.task.to_dict(), "omega_sha256": self.omega_sha256,
                "grad": [float(v) for v in self.grad], "dtype": str(self.grad.dtype).removeprefix("torch."),
                "value": self.value, "diverged": self.diverged, "metrics": self.metrics}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: Mapping) -> Hypergradient:
        if doc.get("format") != HYPERGRAD_FORMAT:
            raise ValueError(f"hypergradient: format {doc.get('format')!r}; expected {HYPERGRAD_FORMAT!r}")
        dtype = getattr(torch, str(doc.get("dtype", "float64")))
        return cls(int(doc["step"]), Task.from_dict(doc["task"]), str(doc["omega_sha256"]), torch.tensor(doc["grad"], dtype=dtype),
                   float(doc["value"]), bool(doc["diverged"]), dict(doc["metrics"]))  # fmt: skip


class MetaMDState(OmegaState):
    """Everything the meta-training needs to continue: the flat ω (the divergence's tensors in
    ``parameters()`` order), the outer optimiser's state, the step count and the history. Saved as
    ``state.json`` (config, history, digests) plus a safetensors file (ω and optimiser tensors, exact)."""

    state_format = STATE_FORMAT
    label = "MetaMD"

    @classmethod
    def initial(cls, config: MetaMDConfig | Mapping[str, Any], data: TaskSet | PreparedData | None = None) -> MetaMDState:
        config = coerce(MetaMDConfig, config)
        return cls(config=config.model_dump(mode="json"), omega=initial_omega(config, data))

    @property
    def metamd_config(self) -> MetaMDConfig:
        return coerce(MetaMDConfig, self.config, source="state.config")

    def divergence(self, data: TaskSet | PreparedData | None = None) -> Divergence:
        """The current divergence (CPU)."""
        return divergence_at(self.metamd_config, self.omega, data)


__all__ = ["HYPERGRAD_FORMAT", "STATE_FORMAT", "Hypergradient", "MetaMDState"]
