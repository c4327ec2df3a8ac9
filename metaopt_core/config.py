"""Run configurations as pydantic models, and the YAML loader that turns validation failures into
one readable error (field, value, what is allowed).

Shared building blocks live here; each meta-learner's top-level config lives in its package
(``metaopt_core.meta.arl.ARLConfig`` …) and is found through ``algorithm:`` (the learner's registry
name). One entry point reads a configuration from anywhere: :func:`read_config` (a path, URI,
mapping, with dot-path overrides: a dict); :func:`metaopt_core.meta.run_config.load_config`
validates it by the schema its ``algorithm:`` names (the learner registry sits above this module).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
    # square images of this many pixels (bilinear); None: the source's own size (digits: upsampled to 28)
    image_size: int | None = Field(None, ge=4, le=512)
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


def apply_overrides(doc: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
    """A copy of ``doc`` with ``{"train.epochs": 4, ...}`` set (dot paths into nested mappings).
    A path through something that is not a mapping is an error naming it."""
    out = json.loads(json.dumps(dict(doc)))
    for path, value in (overrides or {}).items():
        keys = str(path).split(".")
        if not all(keys):
            raise ConfigError(f"override {path!r}: allowed: a dot path such as train.epochs")
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {path!r}: {'.'.join(keys[: depth + 1])} is {child!r}, not a mapping")
            node = child
        node[keys[-1]] = value
    return out


ConfigSource = str | Path | Mapping[str, Any] | BaseModel


def read_config(source: ConfigSource, overrides: Mapping[str, Any] | None = None, *, algorithm: str | None = None) -> dict:
    """The one way a run configuration comes in, as a plain dict: ``source`` is a YAML/JSON file
    (a path or ``file://`` URI), any other URI the storage layer reads (``s3://...``, through
    :mod:`metaopt_core.mlops.storage`, imported only for such URIs), a mapping or a validated
    config. ``overrides``: dot paths set on top (``{"outer.steps": 5}``). ``algorithm``: the
    learner the configuration is for; its ``algorithm:`` field is filled in when missing and must
    match when present."""
    where = "config"
    if isinstance(source, BaseModel):
        doc: Any = source.model_dump(mode="json")
    elif isinstance(source, Mapping):
        doc = dict(source)
    else:
        where = str(source)
        doc = parse_yaml(_read_text(where), where) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(doc).__name__}")
    doc = apply_overrides(doc, overrides)
    if algorithm is not None and doc.setdefault("algorithm", algorithm) != algorithm:
        raise ConfigError(f"{where}: field 'algorithm': got {doc['algorithm']!r}; this is a run of {algorithm!r}")
    return doc


def _read_text(location: str) -> str:
    if "://" in location and not location.startswith("file://"):
        from metaopt_core.mlops import storage  # object storage: the only reason core reads through mlops

        return storage.read_text(location)
    path = Path(location.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return path.read_text()


def coerce(model_cls: type[BaseModel], value: Any, source: str = "config") -> Any:
    """``value`` itself when it is a ``model_cls`` already, else the mapping validated as one."""
    return value if isinstance(value, model_cls) else validate(model_cls, dict(value), source=source)
