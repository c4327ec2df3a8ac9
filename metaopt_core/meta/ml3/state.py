"""ML3's serialisable records: :class:`ML3State` (ω, the outer optimiser's state, step, history; a
crash-safe checkpoint, JSON + safetensors) and :class:`Hypergradient` (one task's result of one
outer step, what a shard's part carries)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from metaopt_core.config import coerce
from metaopt_core.meta.checkpoint import OmegaState
from metaopt_core.meta.ml3.config import ML3Config

STATE_FORMAT = "metaopt.ml3.state/1"
HYPERGRAD_FORMAT = "metaopt.ml3.hypergradient/1"


def omega_digest(omega: Tensor) -> str:
    """Which ω a hypergradient was computed at (``outer_update`` checks it)."""
    return hashlib.sha256(omega.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class Hypergradient:
    """d(outer cross-entropy)/dω for one task (a seeded base model and minibatch stream) at one
    outer step, and how its inner run went. Non-finite: ``diverged``, a zero gradient, left out of
    the mean."""

    step: int
    slot: int
    omega_sha256: str
    grad: list[float]
    diverged: bool
    metrics: dict

    def to_dict(self) -> dict:
        return {"format": HYPERGRAD_FORMAT, "step": self.step, "slot": self.slot, "omega_sha256": self.omega_sha256,
                "grad": self.grad, "diverged": self.diverged, "metrics": self.metrics}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: Mapping) -> Hypergradient:
        if doc.get("format") != HYPERGRAD_FORMAT:
            raise ValueError(f"hypergradient: format {doc.get('format')!r}; expected {HYPERGRAD_FORMAT!r}")
        return cls(int(doc["step"]), int(doc["slot"]), str(doc["omega_sha256"]), [float(v) for v in doc["grad"]], bool(doc["diverged"]),
                   dict(doc["metrics"]))  # fmt: skip


class ML3State(OmegaState):
    """Everything meta-training needs to continue (the driver's LearnerState): ω (the loss
    network's parameters, flat), the outer optimiser's state, step and history."""

    state_format = STATE_FORMAT
    label = "ML3"
    digest = staticmethod(omega_digest)  # of ω as float32, the dtype the inner runs use

    @classmethod
    def initial(cls, config: ML3Config | Mapping[str, Any]) -> ML3State:
        config = coerce(ML3Config, config)
        return cls(config=config.model_dump(mode="json"), omega=config.initial_omega())

    @property
    def ml3_config(self) -> ML3Config:
        return coerce(ML3Config, self.config, source="state.config")


__all__ = ["HYPERGRAD_FORMAT", "STATE_FORMAT", "Hypergradient", "ML3State", "omega_digest"]
