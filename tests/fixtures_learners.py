"""Small runs of every registered learner for the generic tests (the driver, the pipelines): its
tiny configuration (``configs/<name>-tiny.yaml``, a few seconds per outer step), else its demo
configuration with its required ``quick`` preset; inputs prepared once per process."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from metaopt_core.meta import PreparedInputs, registry

ROOT = Path(__file__).resolve().parents[1]
# The tiny configurations' meta-test settings where the learner's default does not fit them
# (configs/itl-tiny.yaml: rot90 is the domain the meta-test holds out).
TINY_META_TEST = {"itl": {"held_out": ["rot90"]}}


def learner_names() -> list[str]:
    """Every built-in learner (what `make run` runs and the registry ships)."""
    return list(registry.BUILTIN)


def tiny_document(name: str) -> dict:
    """The tiny configuration of learner ``name`` as a dict."""
    from metaopt_core.config import read_config
    from pipelines.builder import default_config, preset_overrides

    path = ROOT / "configs" / f"{name}-tiny.yaml"
    if path.exists():
        return read_config(path, algorithm=name)
    return read_config(default_config(name), preset_overrides("quick", name), algorithm=name)


def meta_test_settings(name: str) -> dict:
    return dict(TINY_META_TEST.get(name, registry.get(name).default_meta_test))


@functools.cache
def _prepared(name: str) -> PreparedInputs:
    learner = registry.get(name)
    return learner.prepare(learner.resolve_config(tiny_document(name)), meta_test_settings(name))


def tiny(name: str, steps: int | None = None) -> tuple[Any, Any, PreparedInputs]:
    """(learner, its tiny config, with ``steps`` outer steps if given, its prepared inputs)."""
    learner = registry.get(name)
    config = learner.resolve_config(tiny_document(name))
    if steps is not None:
        config = learner.with_total_steps(config, steps)
    return learner, config, _prepared(name)
