"""MetaMD's run configuration (``algorithm: metamd`` in a YAML config): the config classes, the η
schedule across outer steps (:func:`config_at`) and the run's dtype."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from metaopt_core.config import Betas, DataSpec, DeviceName, ModelName, StrictModel
from metaopt_core.data.folders import is_folder_source
from metaopt_core.meta.metamd.quadratics import QuadraticFamily


class NetworkTasks(StrictModel):
    """Network tasks: a fresh ``model`` trained on one meta-train domain of ``data`` per task.

    ``held_out_domains``: domains (full names like ``mnist5k-rot75`` or suffixes like ``rot75``) that
    meta-training never touches (meta-test). ``hypergrad_examples``: size of the seeded subset of the
    task's training split on which the implicit method's L_tr is evaluated.
    """

    data: DataSpec = DataSpec(source="mnist5k", domains="rotated")
    held_out_domains: list[str] = ["rot75"]
    model: ModelName = "mlp2"
    model_options: dict[str, int | float] = {}
    batch_size: int = Field(64, ge=1)
    hypergrad_examples: int = Field(512, ge=1)

    @field_validator("data")
    @classmethod
    def _has_domains(cls, value: DataSpec) -> DataSpec:
        if value.domains == "none" and not is_folder_source(value.source):
            raise ValueError("network tasks need several domains: set domains: rotated | colored (or use a folder: source)")
        return value


class TaskConfig(StrictModel):
    """Which task family meta-trains the divergence: ``quadratic`` (the 2-D problems, section 5.6.1)
    or ``rotated-domains`` (a base network per RotatedMNIST domain)."""

    family: Literal["quadratic", "rotated-domains"] = "quadratic"
    quadratic: QuadraticFamily = QuadraticFamily()
    network: NetworkTasks = NetworkTasks()


class DivergenceConfig(StrictModel):
    """The meta-model. ``init_scale``: the Kronecker factors a, b start as Gaussian vectors of norm
    ≈ ``init_scale`` (a = b = 0, M = I, is a stationary point of every meta-objective, since M depends
    on them only through a aᵀ and b bᵀ); diagonal and dense start at M = I. ``epsilon``: the dense
    M's floor, M = L Lᵀ + εI."""

    kind: Literal["kronecker", "diagonal", "dense"] = "kronecker"
    init_scale: float = Field(0.1, ge=0.0)
    epsilon: float = Field(1e-4, gt=0.0, lt=1.0)


class InnerConfig(StrictModel):
    """The inner loop: T = ``steps`` mirror-descent steps θ ← θ − η M⁻¹(∇L + wd·θ), η = ``lr``.

    Continuation in η (optional): with ``lr_start`` and ``lr_warmup_steps`` the outer step s uses
    η_s = lr_start · (lr / lr_start)^min(1, s / lr_warmup_steps), so M can be learned at an η where
    SGD is stable and then carried to a larger η that only the learned M makes stable (at that η,
    with M = I, the inner runs diverge and give no useful hypergradient). The divergence is saved
    with the final η = ``lr``.
    """

    steps: int = Field(50, ge=1)
    lr: float = Field(0.05, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_start: float | None = Field(None, gt=0.0)
    lr_warmup_steps: int = Field(0, ge=0)

    def lr_at(self, step: int) -> float:
        """η of outer step ``step`` (0-based)."""
        if self.lr_start is None or self.lr_warmup_steps == 0:
            return self.lr
        fraction = min(1.0, step / self.lr_warmup_steps)
        return float(self.lr_start * (self.lr / self.lr_start) ** fraction)


class ObjectiveConfig(StrictModel):
    """The meta-objective: ``bound`` (eq 5.7, with ``k``) or ``trajectory`` (mean training loss
    along the T steps); ``rho`` adds ρ‖M − I‖_F² (eqs 5.29–5.32) to either."""

    kind: Literal["bound", "trajectory"] = "trajectory"
    k: float = Field(0.01, ge=0.0)
    rho: float = Field(0.0, ge=0.0)


class HypergradConfig(StrictModel):
    """How the hypergradient is computed (see the package docstring). ``implicit`` options: ``solver``
    (``cg`` or ``neumann``), ``terms`` (CG iterations / Neumann terms), ``alpha`` (Neumann step),
    ``damping``, ``constraint_weight`` μ (0 = the thesis's eq 5.28). ``max_forward_scalars`` caps the
    size of ω for the generic forward mode (one inner run per scalar)."""

    method: Literal["implicit", "forward", "unrolled"] = "unrolled"
    solver: Literal["cg", "neumann"] = "cg"
    terms: int = Field(20, ge=0)
    alpha: float = Field(0.5, gt=0.0)
    damping: float = Field(0.0, ge=0.0)
    constraint_weight: float = Field(0.0, ge=0.0)
    max_forward_scalars: int = Field(64, ge=1)


class OuterConfig(StrictModel):
    """The optimiser on ω: the mean of the tasks' hypergradients, each first rescaled to norm at most
    ``clip_norm`` when set (a task near the inner stability edge can give a hypergradient 40 orders of
    magnitude above the others, which would freeze Adam through its second moment), then Adam or SGD
    (PyTorch's arithmetic). ``tasks_per_step``: tasks per outer step."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    betas: Betas = (0.9, 0.999)  # adam only
    eps: float = Field(1e-8, gt=0.0)  # adam only
    clip_norm: float | None = Field(None, gt=0.0)
    steps: int = Field(100, ge=1)
    tasks_per_step: int = Field(8, ge=1)


class EvaluationConfig(StrictModel):
    """Monitoring recorded in the history every ``every`` outer steps (0: never; the last step is
    always evaluated when ``every`` > 0), on meta-training problems only: quadratics, iterations to
    threshold of the current optimiser on the meta-train problems; networks, the trajectory
    objective on each meta-training domain (``seeds`` fresh models, T steps, no hypergradient)."""

    every: int = Field(0, ge=0)
    seeds: int = Field(1, ge=1)


class MetaMDConfig(StrictModel):
    """One MetaMD meta-training run (``algorithm: metamd`` in a YAML config)."""

    algorithm: Literal["metamd"] = "metamd"
    name: str = "metamd"
    tasks: TaskConfig = TaskConfig()
    divergence: DivergenceConfig = DivergenceConfig()
    inner: InnerConfig = InnerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    hypergrad: HypergradConfig = HypergradConfig()
    outer: OuterConfig = OuterConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    seed: int = Field(0, ge=0)
    device: DeviceName = "cpu"

    @model_validator(mode="after")
    def _consistent(self) -> MetaMDConfig:
        if self.hypergrad.method == "implicit" and self.objective.kind != "bound":
            raise ValueError(
                "hypergrad.method: 'implicit' differentiates a function of the inner solution only (eq 5.28); "
                f"objective.kind is {self.objective.kind!r}: use objective.kind 'bound', or method 'unrolled' / 'forward'"
            )
        if self.tasks.family == "quadratic":
            if self.outer.tasks_per_step > self.tasks.quadratic.meta_train:
                raise ValueError(
                    f"outer.tasks_per_step: got {self.outer.tasks_per_step}; allowed: at most tasks.quadratic.meta_train "
                    f"= {self.tasks.quadratic.meta_train} (tasks of a step are distinct problems)"
                )
        elif self.divergence.kind == "dense":
            raise ValueError(
                "divergence.kind: 'dense' holds a dim x dim matrix over all parameters; allowed for tasks.family "
                "'quadratic' only (networks: 'kronecker' or 'diagonal')"
            )
        return self


def config_at(config: MetaMDConfig, step: int) -> MetaMDConfig:
    """The config with ``inner.lr`` set to the η of outer step ``step`` (see ``InnerConfig``)."""
    lr = config.inner.lr_at(step)
    if lr == config.inner.lr:
        return config
    return config.model_copy(update={"inner": config.inner.model_copy(update={"lr": lr})})


def run_dtype(config: MetaMDConfig) -> torch.dtype:
    """The dtype of θ and ω: float64 for the 2-D quadratics (thresholds of 1e-3 on gradients of size
    ~1 at 20,000 iterations), float32 for networks."""
    return torch.float64 if config.tasks.family == "quadratic" else torch.float32


__all__ = [
    "DivergenceConfig",
    "EvaluationConfig",
    "HypergradConfig",
    "InnerConfig",
    "MetaMDConfig",
    "NetworkTasks",
    "ObjectiveConfig",
    "OuterConfig",
    "TaskConfig",
    "config_at",
    "run_dtype",
]
