"""A run configuration validated by the schema its ``algorithm:`` names: a meta-learner's (found
in the learner registry) or another run's (``evaluate``). Here, above the registry, so that
:mod:`metaopt_core.config` (the shared schemas and the reader) does not reach up to the learners."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from metaopt_core.config import ConfigError, ConfigSource, read_config, validate
from metaopt_core.meta import registry

# Run configurations that are not a meta-learner's (those come from the learner registry).
OTHER_SCHEMAS = {"evaluate": ("metaopt_core.evaluate", "EvaluationConfig")}


def config_class(algorithm: str) -> type[BaseModel]:
    """The configuration schema ``algorithm:`` names: a meta-learner's (from the learner registry)
    or another run's (``evaluate``: the meta-test evaluator's)."""
    if algorithm in OTHER_SCHEMAS:
        import importlib

        module, name = OTHER_SCHEMAS[algorithm]
        return getattr(importlib.import_module(module), name)
    try:
        return registry.get(algorithm).config_class
    except registry.UnknownLearnerError:
        raise ConfigError(f"config: field 'algorithm': got {algorithm!r}; allowed: {sorted([*registry.names(), *OTHER_SCHEMAS])}") from None


def load_config(source: ConfigSource, overrides: Mapping[str, Any] | None = None, *, algorithm: str | None = None) -> BaseModel:
    """:func:`read_config`, validated by the schema its ``algorithm:`` names (a learner's, through
    its ``resolve_config``, or another run's such as ``evaluate``). Errors name the source and the field."""
    doc = read_config(source, overrides, algorithm=algorithm)
    where = str(source) if isinstance(source, (str, Path)) else "config"
    name = doc.get("algorithm")
    if name is None:
        raise ConfigError(f"{where}: field 'algorithm' is missing; allowed: {sorted([*registry.names(), *OTHER_SCHEMAS])}")
    if name in OTHER_SCHEMAS:
        return validate(config_class(name), doc, source=where)
    try:
        learner = registry.get(name)
    except registry.UnknownLearnerError:
        raise ConfigError(f"{where}: field 'algorithm': got {name!r}; allowed: {sorted([*registry.names(), *OTHER_SCHEMAS])}") from None
    return learner.resolve_config(doc, source=where)


__all__ = ["OTHER_SCHEMAS", "config_class", "load_config"]
