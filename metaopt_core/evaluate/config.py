"""The evaluator's configuration: how every (loss, cell) is trained (:class:`TrainingProtocol`),
and the whole meta-test a YAML file describes (:class:`EvaluationConfig`: the protocol plus the
losses and datasets to run it on)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from metaopt_core.config import DataSpec, DeviceName, ModelName, NoiseSpec, StrictModel
from metaopt_core.data.folders import is_folder_source
from metaopt_core.evaluate.loss_factories import TwoStageForward, loss_factory

LrProtocol = Literal["fixed", "tuned"]
LR_PROTOCOLS = ("fixed", "tuned")
OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
DEFAULT_LR_GRID = (0.1, 0.03, 0.01, 0.003, 0.001)


class LossSpec(StrictModel):
    """One loss of the comparison: a ``get_loss`` name with kwargs, or a learned white-box loss
    (``white_box``: a loss document, see :mod:`metaopt_core.losses.document`, or ``path``: a JSON
    file holding one).
    A plain string is shorthand for ``{name: <string>}``."""

    name: str | None = None
    kwargs: dict[str, Any] = {}
    white_box: dict[str, Any] | None = None
    path: str | None = None
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> LossSpec:
        given = [f for f in ("name", "white_box", "path") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'name', 'white_box', 'path'; got {given or 'none'}")
        if self.name is not None:
            from metaopt_core.losses.registry import list_losses, loss_parameters

            try:
                if self.name.strip().lower() == "forward" and "transition_matrix" not in self.kwargs:
                    unknown = sorted(set(self.kwargs) - set(loss_parameters("forward")))
                    if unknown:
                        raise TypeError(f"forward: unknown parameter(s) {unknown}; accepted: {sorted(loss_parameters('forward'))}")
                else:
                    loss_factory(self.name, self.kwargs)
            except KeyError:
                raise ValueError(f"unknown loss {self.name!r}; allowed: {list_losses()}") from None
            except (TypeError, ValueError) as error:
                raise ValueError(str(error)) from None
        elif self.kwargs:
            raise ValueError("'kwargs' only applies to a loss given by 'name'")
        else:
            self.white_box_doc()  # a bad document or path fails at load time
        return self

    def white_box_doc(self) -> dict:
        """The learned loss's document (read from ``path`` if given), checked against the schema of
        :mod:`metaopt_core.losses.document`."""
        from metaopt_core.losses.document import validate_loss_document

        if self.path is not None:
            path = Path(self.path)
            if not path.is_file():
                raise ValueError(f"path: {str(path)!r} is not a file (expected a loss document, JSON)")
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"path: {str(path)!r} is not valid JSON ({error})") from None
            return validate_loss_document(doc, source=f"path {str(path)!r}")
        return validate_loss_document(self.white_box or {}, source="white_box")

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if self.name is not None:
            args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "transition_matrix")
            return f"{self.name.strip().lower()}({args})" if args else self.name.strip().lower()
        return Path(self.path).stem if self.path else "learned"

    def factory(self) -> Callable[[], nn.Module] | TwoStageForward:
        if self.name is not None:
            return loss_factory(self.name, self.kwargs)
        from metaopt_core.losses.document import loss_from_document

        doc = self.white_box_doc()
        return lambda: loss_from_document(doc)


class ArchitectureSpec(StrictModel):
    """A ``build_model`` name with optional constructor kwargs (e.g. ``{name: small_cnn, kwargs:
    {width: 8}}``). A plain string is shorthand for ``{name: <string>}``."""

    name: ModelName
    kwargs: dict[str, Any] = {}
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _kwargs_accepted(self) -> ArchitectureSpec:
        if self.kwargs:  # the zoo's constructors take **kwargs: only building tells what they accept
            try:
                self.build(1, 28, 10, seed=0)
            except TypeError as error:
                raise ValueError(f"kwargs {self.kwargs} not accepted by model {self.name!r}: {error}") from None
        return self

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def build(self, in_channels: int, image_size: int, num_classes: int, seed: int) -> nn.Module:
        from metaopt_core.models import build_model

        return build_model(self.name, in_channels, image_size, num_classes, seed=seed, **self.kwargs)


class TrainingProtocol(StrictModel):
    """How every (loss, cell) is trained: the architectures, the seeds, the optimiser and the
    learning-rate protocol (``fixed``: ``lr`` for every loss; ``tuned``: the best of ``lr_grid``
    per loss and cell on the selection split). What :func:`compare_losses` takes, e.g.
    ``TrainingProtocol(architectures=["mlp2"], seeds=[0, 1, 2], epochs=20)``."""

    architectures: list[ArchitectureSpec] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerName = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_protocol: LrProtocol = "fixed"
    lr: float = Field(0.01, gt=0.0)
    lr_grid: list[float] = Field(list(DEFAULT_LR_GRID), min_length=1)
    device: DeviceName | None = None

    @field_validator("lr_grid")
    @classmethod
    def _positive_grid(cls, value: list[float]) -> list[float]:
        bad = [v for v in value if not v > 0]
        if bad:
            raise ValueError(f"learning rates must be > 0; got {bad}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct; got {value}")
        return value

    @model_validator(mode="after")
    def _distinct_architectures(self) -> TrainingProtocol:
        archs = [spec.display for spec in self.architectures]
        duplicates = sorted({a for a in archs if archs.count(a) > 1})
        if duplicates:
            raise ValueError(f"architectures: duplicate label(s) {duplicates}; give each a distinct 'label'")
        return self

    @property
    def learning_rates(self) -> list[float]:
        """The lrs every (loss, cell) is trained at: ``[lr]`` (fixed) or ``lr_grid`` (tuned)."""
        return [float(self.lr)] if self.lr_protocol == "fixed" else [float(v) for v in self.lr_grid]

    def settings(self) -> dict:
        """The training settings a result records (and its Markdown header states)."""
        return {
            "epochs": self.epochs, "batch_size": self.batch_size, "optimizer": self.optimizer, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "lr_protocol": self.lr_protocol, "lr": float(self.lr),
            "lr_grid": [float(v) for v in self.lr_grid], "seeds": list(self.seeds),
        }  # fmt: skip


class EvaluationConfig(TrainingProtocol):
    """Meta-test run: every loss x dataset x condition x architecture x seed (``algorithm: evaluate``).

    The training fields are :class:`TrainingProtocol`'s, so the config itself is what
    :func:`compare_losses` takes. ``task: noise``: each dataset is crossed with every entry of
    ``noise`` (or, if ``noise`` is not given, uses its own ``noise``). ``task: domains``: datasets
    must have domains; each domain in ``held_out`` (default: all) is held out in turn.
    """

    algorithm: Literal["evaluate"] = "evaluate"
    task: Literal["noise", "domains"] = "noise"
    losses: list[LossSpec] = Field(min_length=1)
    datasets: list[DataSpec] = Field(min_length=1)
    noise: list[NoiseSpec] | None = None
    held_out: list[str] | None = None
    noisy_val_fraction: float = Field(0.1, gt=0.0, lt=1.0)

    @field_validator("datasets", mode="before")
    @classmethod
    def _dataset_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"source": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        labels = [spec.display for spec in self.losses]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"losses: duplicate label(s) {duplicates}; give each a distinct 'label'")
        for index, spec in enumerate(self.datasets):
            has_domains = spec.domains != "none" or is_folder_source(spec.source)
            if self.task == "noise" and has_domains:
                raise ValueError(f"datasets.{index}: task 'noise' needs a dataset without domains; set task: domains")
            if self.task == "domains" and not has_domains:
                raise ValueError(f"datasets.{index}: task 'domains' needs domains: rotated | colored or a folder: source")
            if self.noise is not None and "noise" in spec.model_fields_set:
                raise ValueError(f"datasets.{index}.noise: set noise once in the top-level 'noise' list, not per dataset")
        if self.task == "domains" and self.noise is not None:
            raise ValueError("noise: only for task 'noise' (domain tasks have no synthetic label noise here)")
        if self.task == "noise" and self.held_out is not None:
            raise ValueError("held_out: only for task 'domains'")
        return self

    def data_specs(self) -> list[DataSpec]:
        """The datasets to prepare, each crossed with the ``noise`` list when given."""
        if self.task == "domains" or self.noise is None:
            return list(self.datasets)
        return [spec.model_copy(update={"noise": noise}) for spec in self.datasets for noise in self.noise]
