"""ITL's run configuration (``algorithm: itl`` in a YAML config): the loss family, inner
training, the implicit hypergradient and the outer optimiser on ω."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import Tensor

from metaopt_core.config import Betas, DataSpec, DeviceName, ModelName, StrictModel
from metaopt_core.data.folders import is_folder_source
from metaopt_core.losses import families
from metaopt_core.losses.families import LossFamily
from metaopt_core.losses.taylor import ORDERS
from metaopt_core.population import Schedule


class FamilyConfig(StrictModel):
    """The loss family whose parameters ω are meta-learned: a name of the representation table
    (:mod:`metaopt_core.losses.families`) and its options.

    ``taylor``: ``order`` 2–5, ``form`` "monomial" (ITL, eq B.1) or "taylor" (ARL's factors,
    eq 3.5); ``ce_centre`` is the expansion point of the ``"ce-like"`` start. ``isce``: SCE's
    (α, β) = softplus(ω), ``log_zero`` = RCE's A. ``options``: further options of the family
    (those it has beyond these fields). A family takes the fields that are its options.
    """

    kind: str = "taylor"
    order: int = 4
    form: Literal["taylor", "monomial"] = "monomial"
    ce_centre: float = Field(0.5, gt=0.0, le=1.0)
    log_zero: float = Field(-4.0, lt=0.0)
    options: dict[str, Any] = {}

    @field_validator("kind")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if not families.has_family(value):
            raise ValueError(f"unknown loss family {value!r}; allowed: {families.names()}")
        return value

    @field_validator("order")
    @classmethod
    def _known_order(cls, value: int) -> int:
        if value not in ORDERS:
            raise ValueError(f"order {value!r} is not supported; allowed: {list(ORDERS)}")
        return value

    def build(self) -> LossFamily:
        accepted = families.options_of(self.kind)
        fields = {name: getattr(self, name) for name in ("order", "form", "ce_centre", "log_zero") if name in accepted}
        return families.build_family(self.kind, **fields, **self.options)


class InnerConfig(StrictModel):
    """Inner training of one base model: SGD (heavy-ball momentum, PyTorch's convention) until the
    gradient norm of the inner objective on the check subset is ``<= grad_tol`` (checked after
    every epoch; 0 disables the check) or ``max_epochs`` epochs have run.

    ``lr_grid`` (the deployment protocol: a user tunes the lr of the loss they are given): every
    job trains at every lr of the grid and its hypergradient is taken at the lr whose model has the
    best accuracy on the job's source domains' validation splits (DomainBed's training-domain
    validation, what the meta-test chooses by). Without it every job trains at ``lr``."""

    model: ModelName = "mlp_itl"
    model_options: dict[str, int | float] = {}
    lr: float = Field(0.01, gt=0.0)
    lr_grid: list[float] | None = Field(None, min_length=1)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(10, ge=1)
    grad_tol: float = Field(1e-3, ge=0.0)
    eval_batch_size: int = Field(1000, ge=1)

    @field_validator("lr_grid")
    @classmethod
    def _distinct_positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (any(v <= 0 for v in value) or len(set(value)) != len(value)):
            raise ValueError(f"got {value}; allowed: distinct numbers > 0")
        return value

    def schedule(self) -> Schedule:
        """These settings as the batched trainer's schedule (``max_epochs`` epochs at most)."""
        return Schedule(self.lr, self.momentum, self.weight_decay, self.max_epochs, self.batch_size, self.eval_batch_size)


class HypergradConfig(StrictModel):
    """The implicit hypergradient (thesis Alg 8): ``neumann`` (J = ``terms``, step ``alpha``) or
    ``cg`` (at most ``terms`` iterations). ``inner_examples``: size of the seeded source subset the
    inner loss's derivatives (and the convergence check) use; ``outer_examples``: size of the
    held-out subset for ∂M/∂θ (None = all)."""

    method: Literal["neumann", "cg"] = "neumann"
    terms: int = Field(15, ge=0)
    alpha: float = Field(0.01, gt=0.0)
    damping: float = Field(0.0, ge=0.0)
    inner_examples: int | None = Field(1024, ge=1)
    outer_examples: int | None = Field(None, ge=1)


class OuterConfig(StrictModel):
    """Aggregation of the m hypergradients and the optimiser on ω."""

    aggregation: Literal["pcgrad", "mean"] = "pcgrad"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    betas: Betas = (0.9, 0.999)  # adam only
    eps: float = Field(1e-8, gt=0.0)  # adam only
    clip_norm: float | None = Field(None, gt=0.0)  # rescale the aggregated hypergradient to at most this norm
    steps: int = Field(200, ge=1)
    # Keep the loss's scale (the norm of the coefficients it is linear in) where it started: the
    # hypergradient's radial part is projected out and ω's coefficients renormalised after every
    # step. With an inner lr grid the lr is tuned, so a larger or smaller loss is no gain: the
    # outer step learns the loss's shape. None: on exactly when inner.lr_grid is set.
    fixed_scale: bool | None = None


class ITLConfig(StrictModel):
    """One ITL meta-training run (``algorithm: itl`` in a YAML config).

    ``init``: where ω starts — a Taylor preset name (``itl``, …; its order/form must match the
    family), ``ce-like`` (the Taylor expansion of CE, or α = 1, β = 0.01 for iSCE), ``sce``
    (iSCE only: α = 0.1, β = 1) or explicit numbers (Taylor: the parameter vector; iSCE: [α, β]).
    The default is ``ce-like``: from the ``itl`` preset the Neumann hypergradient diverges (relative
    residual 1.3 → 12 on RotatedMNIST, 10²–10⁹ on tests/test_itl.py's tiny domains) and held-out CE
    rose 3.0 → 7.4 in 9 steps (docs/details/itl.md); from ``ce-like`` both behave.
    """

    algorithm: Literal["itl"] = "itl"
    name: str = "itl"
    data: DataSpec = DataSpec(source="mnist5k", domains="rotated")
    family: FamilyConfig = FamilyConfig()
    init: str | list[float] = "ce-like"  # works for both families; see the class docstring
    inner: InnerConfig = InnerConfig()
    hypergrad: HypergradConfig = HypergradConfig()
    outer: OuterConfig = OuterConfig()
    seed: int = Field(0, ge=0)
    batched: bool = True
    max_batch: int | None = Field(None, ge=1)
    device: DeviceName = "cpu"

    @field_validator("data")
    @classmethod
    def _has_domains(cls, value: DataSpec) -> DataSpec:
        if value.domains == "none" and not is_folder_source(value.source):
            raise ValueError("ITL needs several domains: set domains: rotated | colored (or use a folder: source)")
        if value.domains == "rotated" and len(value.angles) < 2:
            raise ValueError(f"angles: got {value.angles}; leave-one-domain-out needs at least 2 domains")
        return value

    @model_validator(mode="after")
    def _init_fits_family(self) -> ITLConfig:
        try:
            self.family.build().init(self.init)
        except ValueError as error:
            raise ValueError(str(error)) from None
        return self

    def loss_family(self) -> LossFamily:
        return self.family.build()

    def initial_omega(self) -> Tensor:
        return self.loss_family().init(self.init)
