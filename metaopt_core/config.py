"""Run configurations as pydantic models, and the YAML loader that turns validation failures into
one readable error (field, value, what is allowed).

Shared building blocks live here; each meta-learner's top-level config lives in its package
(``metaopt_core.meta.arl.ARLConfig`` …) and is found through ``algorithm:`` (the learner's registry
name) by ``load_config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field, the value and what is allowed."""


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_names(kind: str) -> list[str]:
    # Local imports: the registries import torch-heavy modules; config must stay cheap to import.
    if kind == "model":
        from metaopt_core.models import MODEL_NAMES

        return list(MODEL_NAMES)
    if kind == "source":
        from metaopt_core.data.sources import SOURCE_NAMES

        return list(SOURCE_NAMES)
    raise KeyError(kind)


def _known_model(value: str) -> str:
    known = _known_names("model")
    if value not in known:
        raise ValueError(f"unknown model {value!r}; allowed: {known}")
    return value


def _known_device(value: str) -> str:
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {value!r} is not a torch device; allowed e.g. 'cpu', 'cuda', 'cuda:1'") from None
    return value


def _betas_in_range(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"betas must both lie in [0, 1); got {list(value)}")
    return value


# Field types shared by every run configuration (one validator each, used by all learners).
ModelName = Annotated[str, AfterValidator(_known_model)]
DeviceName = Annotated[str, AfterValidator(_known_device)]
Betas = Annotated[tuple[float, float], AfterValidator(_betas_in_range)]


class NoiseSpec(StrictModel):
    kind: Literal["none", "symmetric", "asymmetric"] = "symmetric"
    rate: float = Field(0.8, ge=0.0, le=1.0)


class DataSpec(StrictModel):
    """One prepared dataset: a source, optional label noise, optional domain construction."""

    source: str = "mnist5k"
    root: str | None = None
    noise: NoiseSpec = NoiseSpec(kind="none", rate=0.0)
    domains: Literal["none", "rotated", "colored"] = "none"
    angles: list[float] = [0, 15, 30, 45, 60, 75]
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_examples: int | None = Field(None, gt=0)
    seed: int = 0
    # Data discipline: the source's examples are split into a meta-train and a meta-test part
    # *before* domains, noise and splits are built on a part, so meta-training and meta-test never
    # share an example. "all" uses the whole source (a source only one side reads).
    part: Literal["all", "meta-train", "meta-test"] = "all"
    meta_test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    # Domains left out entirely (full names like mnist5k-rot75 or suffixes like rot75): a
    # meta-training set without the domains its meta-test holds out.
    exclude_domains: list[str] = []

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        from metaopt_core.data.folders import is_folder_source  # here: metaopt_core.data imports this module

        if is_folder_source(value):
            return value
        known = _known_names("source")
        if value not in known:
            raise ValueError(f"unknown source {value!r}; allowed: {known}, 'folder:<path>' or 's3://bucket/prefix/'")
        return value


class TrainSpec(StrictModel):
    """Inner-loop training of one base model."""

    model: ModelName = "mlp2"
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        value = item.get("input")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{source}: field '{field}': got {value!r}: {message}")
    return "\n".join(lines)


def parse_yaml(text: str, source: str = "config") -> Any:
    """``yaml.safe_load`` whose syntax errors are one :class:`ConfigError` naming ``source``, the
    line and column and what YAML expected (not a traceback through the parser)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        context = getattr(exc, "context", None)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}" + (f" ({context})" if context else "")) from None


def validate(model_cls: type[BaseModel], data: Any, source: str = "config") -> BaseModel:
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


# Run configurations that are not a meta-learner's (those come from the learner registry).
OTHER_SCHEMAS = {"evaluate": ("metaopt_core.evaluate", "EvaluationConfig")}


def config_class(algorithm: str) -> type[BaseModel]:
    """The configuration schema ``algorithm:`` names: a meta-learner's (from the learner registry)
    or another run's (``evaluate``: the meta-test evaluator's)."""
    if algorithm in OTHER_SCHEMAS:
        import importlib

        module, name = OTHER_SCHEMAS[algorithm]
        return getattr(importlib.import_module(module), name)
    from metaopt_core.meta import registry

    try:
        return registry.get(algorithm).config_class
    except registry.UnknownLearnerError:
        raise ConfigError(f"config: field 'algorithm': got {algorithm!r}; allowed: {sorted([*registry.names(), *OTHER_SCHEMAS])}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> BaseModel:
    """Read a YAML run configuration; ``algorithm:`` selects its schema."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data.update(overrides or {})
    algorithm = data.get("algorithm")
    if algorithm is None:
        from metaopt_core.meta import registry

        raise ConfigError(f"{path}: field 'algorithm' is missing; allowed: {sorted([*registry.names(), *OTHER_SCHEMAS])}")
    return validate(config_class(algorithm), data, source=str(path))
