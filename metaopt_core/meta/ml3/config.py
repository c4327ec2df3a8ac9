"""ML3's run configuration (``algorithm: ml3`` in a YAML config): the data, the loss network, the
unrolled inner training and the outer optimiser on ω."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from metaopt_core.config import Betas, DataSpec, DeviceName, ModelName, StrictModel
from metaopt_core.meta.ml3.family import ACTIVATIONS, MAX_WIDTH, NeuralLossFamily


class LossNetwork(StrictModel):
    """The loss network (see :mod:`.family`) and where ω starts: ``ce-like`` (cross-entropy
    exactly, through the skip) or ``random`` (ML3's own start)."""

    hidden: list[int] = Field([16], min_length=1, max_length=3)
    activation: Literal[tuple(ACTIVATIONS)] = "tanh"  # type: ignore[valid-type]
    init: Literal["ce-like", "random"] = "ce-like"
    init_scale: float = Field(0.5, gt=0.0)

    @field_validator("hidden")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if any(not 1 <= width <= MAX_WIDTH for width in value):
            raise ValueError(f"layer widths must lie in [1, {MAX_WIDTH}]; got {value}")
        return value


class InnerConfig(StrictModel):
    """The inner training ML3 differentiates through: ``steps`` steps of SGD at ``lr`` on
    minibatches of ``batch_size``, from a fresh, seeded base model."""

    model: ModelName = "mlp2"
    model_options: dict[str, int | float] = {}
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    steps: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)


class OuterConfig(StrictModel):
    """The outer objective (cross-entropy of the updated model on a minibatch of ``batch_size``
    from the meta-train part's validation split) and the optimiser on ω."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    betas: Betas = (0.9, 0.999)  # adam only
    eps: float = Field(1e-8, gt=0.0)  # adam only
    clip_norm: float | None = Field(1.0, gt=0.0)  # rescale the mean hypergradient to at most this norm
    steps: int = Field(100, ge=1)
    tasks_per_step: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)


class ML3Config(StrictModel):
    """One ML3 meta-training run (``algorithm: ml3``)."""

    algorithm: Literal["ml3"] = "ml3"
    name: str = "ml3"
    data: DataSpec = DataSpec(source="digits")
    loss: LossNetwork = LossNetwork()
    inner: InnerConfig = InnerConfig()
    outer: OuterConfig = OuterConfig()
    seed: int = Field(0, ge=0)
    device: DeviceName = "cpu"

    @field_validator("data")
    @classmethod
    def _no_domains(cls, value: DataSpec) -> DataSpec:
        if value.domains != "none":
            raise ValueError(f"domains: got {value.domains!r}; ML3 here learns on one dataset: allowed: 'none'")
        return value

    def family(self) -> NeuralLossFamily:
        return NeuralLossFamily(hidden=tuple(self.loss.hidden), activation=self.loss.activation, init_scale=self.loss.init_scale, init_seed=self.seed)

    def initial_omega(self):
        return self.family().init(self.loss.init)


__all__ = ["InnerConfig", "LossNetwork", "ML3Config", "OuterConfig"]
