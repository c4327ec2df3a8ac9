"""ARL's run configuration: the pool of (model, dataset) entries, inner training, CMA-ES and the
loss family (``algorithm: arl`` in a YAML config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from metaopt_core.config import DataSpec, DeviceName, ModelName, NoiseSpec, StrictModel
from metaopt_core.losses.parametric import TaylorFamily
from metaopt_core.losses.taylor import ORDERS, PRESETS, num_params
from metaopt_core.population import Schedule


class ModelSpec(StrictModel):
    """One architecture of the pool; ``options`` go to ``build_model`` (e.g. ``width``)."""

    name: ModelName
    options: dict[str, int | float] = {}


class PoolSpec(StrictModel):
    """The meta-train pool: every model is trained on every dataset (their Cartesian product).

    ``ar`` (architecture randomisation): several models, exactly one dataset.
    ``dr`` (dataset randomisation): exactly one model, several datasets.
    Label noise is set once, by the top-level ``noise`` of :class:`ARLConfig`.
    """

    kind: Literal["ar", "dr"] = "ar"
    models: list[ModelSpec] = Field(min_length=1)
    datasets: list[DataSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape_of_pool(self) -> PoolSpec:
        if self.kind == "ar" and len(self.datasets) != 1:
            raise ValueError(f"kind 'ar' takes exactly one dataset, got {len(self.datasets)}; use kind 'dr' for several")
        if self.kind == "dr" and len(self.models) != 1:
            raise ValueError(f"kind 'dr' takes exactly one model, got {len(self.models)}; use kind 'ar' for several")
        for position, spec in enumerate(self.datasets):
            if spec.noise.kind != "none" or spec.noise.rate != 0.0:
                raise ValueError(
                    f"datasets[{position}].noise: got {spec.noise.model_dump()}; leave it unset and give the "
                    "label noise once in the top-level 'noise' field (it applies to every dataset of the pool)"
                )
        return self


class InnerTraining(StrictModel):
    """Inner training of every (candidate, pool entry): SGD with momentum (thesis: lr 0.01, 0.9)."""

    optimizer: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1000, ge=1)

    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.momentum, self.weight_decay, self.epochs, self.batch_size, self.eval_batch_size)


class FitnessSpec(StrictModel):
    """How a candidate loss is scored: the way its meta-test will use it (the deployment protocol).

    Every generation, each pool entry's noisy training split is redrawn into an inner training part,
    a noisy selection part (``select_fraction``) and a scoring part (``score_fraction``) read with
    its clean labels: fresh validation data every generation. Each (candidate, entry) trains at every
    lr of ``lr_grid`` (default: the training lr / 3, x 1, x 3) and ``protocol`` picks what counts:
    ``early-stop`` (the meta-test gate's default: lr and epoch chosen on the noisy selection part),
    ``tuned`` (lr chosen there, last epoch) or ``fixed`` (the training lr, last epoch: the thesis's
    one-recipe protocol, where a loss can win by acting as a smaller lr). The entry's clean
    validation split is held back from the search: the ``rescore_top`` best distinct candidates are
    re-scored there (``rescore_seeds`` fresh initialisations, the same protocol) and the best one on
    it is exported, against the winner's curse of a best-of-many pick."""

    protocol: Literal["early-stop", "tuned", "fixed"] = "early-stop"
    lr_grid: list[float] | None = Field(None, min_length=1)
    select_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    score_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    rescore_top: int = Field(3, ge=1)
    rescore_seeds: int = Field(2, ge=1)

    @field_validator("lr_grid")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (any(v <= 0 for v in value) or len(set(value)) != len(value)):
            raise ValueError(f"got {value}; allowed: distinct numbers > 0")
        return value


class ARLConfig(StrictModel):
    """One ARL meta-training run (``algorithm: arl`` in a YAML config)."""

    algorithm: Literal["arl"] = "arl"
    name: str = "arl"
    pool: PoolSpec
    noise: NoiseSpec = NoiseSpec(kind="symmetric", rate=0.8)
    train: InnerTraining = InnerTraining()
    fitness: FitnessSpec = FitnessSpec()
    # CMA-ES (thesis / TaylorGLO: population 20, sigma0 1.2, <= 100 generations)
    population_size: int = Field(20, ge=2)
    sigma0: float = Field(1.2, gt=0.0)
    init: str | list[float] = "zeros"  # "zeros", a preset name (its loss_params(): sign applied), or the n initial parameters
    bounds: tuple[float, float] | None = (-50.0, 50.0)  # per-parameter box; covers every published preset
    generations: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    stop_on_cma_termination: bool = True  # honour pycma's own stop criteria (tolfun, tolx, ...)
    # loss family
    order: int = 4
    form: Literal["taylor", "monomial"] = "taylor"
    normalise: bool = False  # scale normalisation of A.3 (the found loss carries the same flag)
    eta: float = Field(1.0, gt=0.0)
    # evaluation
    common_random_numbers: bool = True  # all candidates of a generation share initial weights and batch order per pool entry
    batched: bool = True
    max_batch: int | None = Field(None, ge=1)
    device: DeviceName = "cpu"

    @field_validator("order")
    @classmethod
    def _known_order(cls, value: int) -> int:
        if value not in ORDERS:
            raise ValueError(f"order {value!r} is not supported; allowed: {list(ORDERS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ARLConfig:
        n = num_params(self.order)
        if isinstance(self.init, str):
            if self.init != "zeros" and self.init not in PRESETS:
                raise ValueError(f"init: got {self.init!r}; allowed: 'zeros', {sorted(PRESETS)} or a list of {n} numbers")
            if self.init in PRESETS and (self.order != 4 or PRESETS[self.init].form != self.form):
                preset = PRESETS[self.init]
                raise ValueError(f"init: preset {self.init!r} is order 4, form {preset.form!r}; the config has order {self.order}, form {self.form!r}")
        elif len(self.init) != n:
            raise ValueError(f"init: got {len(self.init)} numbers; order {self.order} needs {n}")
        if self.bounds is not None:
            low, high = self.bounds
            if not low < high:
                raise ValueError(f"bounds: got {list(self.bounds)}; allowed: [lower, upper] with lower < upper")
            if any(not low <= v <= high for v in self.initial_mean()):
                raise ValueError(f"init: the initial parameters {self.initial_mean()} lie outside bounds {list(self.bounds)}")
        return self

    def initial_mean(self) -> list[float]:
        if isinstance(self.init, list):
            return [float(v) for v in self.init]
        if self.init == "zeros":
            return [0.0] * num_params(self.order)
        return list(PRESETS[self.init].loss_params())  # the sign-corrected vector TaylorLoss trains with

    def fitness_lrs(self) -> list[float]:
        """The lrs every (candidate, entry) trains at: the fixed protocol needs only the training lr."""
        if self.fitness.protocol == "fixed":
            return [self.train.lr]
        return list(self.fitness.lr_grid) if self.fitness.lr_grid else [float(f"{self.train.lr * f:.6g}") for f in (1 / 3, 1.0, 3.0)]

    def family(self) -> TaylorFamily:
        return TaylorFamily(order=self.order, form=self.form, normalise=self.normalise, eta=self.eta)

    def dataset_specs(self) -> list[DataSpec]:
        """The pool's datasets with the run's label noise applied: what ``prepare`` should build."""
        return [spec.model_copy(update={"noise": self.noise}) for spec in self.pool.datasets]
