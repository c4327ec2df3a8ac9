"""MLOps: the only part of metaopt_core that imports mlflow and boto3.

- ``tracking``: ``Tracker`` (one MLflow run: config params, per-step metrics, plots, tables) and
  its ``log_step`` for the driver's step events;
- ``registry``: ``register_export``, ``register_loss``, ``register_optimizer``, ``promote``, ``load_loss``,
  ``load_optimizer`` (white-box artifacts, never unpickled);
- ``pyfunc``: the model code logged with every registered version (``mlflow.pyfunc.load_model``);
- ``storage``: bytes at local paths, ``file://`` and ``s3://`` URIs.

Names are resolved lazily so ``import metaopt_core.mlops`` does not import MLflow until used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Tracker": "tracking",
    "TrackingServerUnreachable": "tracking",
    "start_run": "tracking",
    "register_export": "registry",
    "register_loss": "registry",
    "register_optimizer": "registry",
    "promote": "registry",
    "load_loss": "registry",
    "load_optimizer": "registry",
    "ModelNotFoundError": "registry",
    "NoProductionVersionError": "registry",
    "ArtifactValidationError": "registry",
    "RegistryError": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
