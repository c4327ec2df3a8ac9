"""ITL's serialisable meta-training state: ω, the outer optimiser's state, the step count and
the history (``state.json`` plus a safetensors file; see :mod:`metaopt_core.meta.checkpoint`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from metaopt_core.config import coerce
from metaopt_core.meta.checkpoint import load_checkpoint, omega_tensors, save_checkpoint
from metaopt_core.meta.itl.config import ITLConfig

STATE_FORMAT = "metaopt.itl.state/1"


def _config_of(state: ITLState) -> ITLConfig:
    return coerce(ITLConfig, state.config, source="state.config")


@dataclass
class ITLState:
    """Everything the meta-training needs to continue: ω, the outer optimiser's state, the step
    count and the history. Saved as ``state.json`` (config, history, readable ω) plus a
    safetensors file (ω and optimiser tensors, exact)."""

    config: dict
    omega: Tensor
    optimizer: dict[str, Tensor] = field(default_factory=dict)  # adam: exp_avg, exp_avg_sq; sgd: momentum_buffer
    step: int = 0  # completed outer steps
    history: list[dict] = field(default_factory=list)
    domains: list[str] | None = None  # the dataset's domains: every step needs one hypergradient each

    @classmethod
    def initial(cls, config: ITLConfig | Mapping[str, Any]) -> ITLState:
        config = coerce(ITLConfig, config)
        return cls(config=config.model_dump(mode="json"), omega=config.initial_omega().to(torch.float32))

    @property
    def itl_config(self) -> ITLConfig:
        return _config_of(self)

    @property
    def finished(self) -> bool:
        return self.step >= int(self.config["outer"]["steps"])

    def loss(self) -> nn.Module:
        """The current loss as a drop-in module."""
        return self.itl_config.loss_family().to_module(self.omega)

    def tensors(self) -> dict[str, Tensor]:
        return omega_tensors(self.omega, self.optimizer)

    def save(self, directory: str | Path) -> Path:
        """Write the checkpoint (crash-safe; see :mod:`metaopt_core.meta.checkpoint`)."""
        doc = {
            "format": STATE_FORMAT,
            "config": self.config,
            "step": self.step,
            "omega": [float(v) for v in self.omega],
            "optimizer_keys": sorted(self.optimizer),
            "domains": self.domains,
            "history": self.history,
        }
        return save_checkpoint(directory, self.step, doc, self.tensors())

    @classmethod
    def load(cls, directory: str | Path) -> ITLState:
        doc, tensors, path = load_checkpoint(directory, STATE_FORMAT, "ITL")
        tensor_path = Path(directory) / doc["tensors"]
        optimizer = {key: tensors[f"optimizer.{key}"] for key in doc["optimizer_keys"]}
        state = cls(doc["config"], tensors["omega"], optimizer, int(doc["step"]), list(doc["history"]), doc.get("domains"))
        if [float(v) for v in state.omega] != [float(v) for v in doc["omega"]]:
            raise ValueError(f"ITL state {path}: omega in the JSON and in {tensor_path.name} differ")
        return state
