"""What every part of the registry shares: names of tags and aliases, the errors, the loss-document
checks (as registry errors), and small helpers (file hashes, tag truncation, quieting MLflow)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from metaopt_core.losses.document import LossDocumentError, loss_from_document, validate_loss_document
from metaopt_core.mlops.tracking import flatten

PYFUNC_CODE = Path(__file__).resolve().parent.parent / "pyfunc.py"

ALIAS = "production"
STAGE = "Production"
LOCK_SUFFIX = ".promotion-lock"
DEFAULT_METRIC = "meta_test_accuracy"

TAG_KIND = "metaopt.kind"  # the role: "loss" | "optimizer" | "lock"
TAG_EXPORT_KIND = "metaopt.export_kind"  # metaopt_core.exports: which files the version holds
TAG_FAMILY = "metaopt.family"
DEPLOY_PREFIX = "metaopt.deploy."  # deployment settings the meta-test measured, baked into the files
TAG_CONFIG = "metaopt.config"
TAG_SCORES = "metaopt.scores"
SCORE_PREFIX = "metaopt.score."
SHA_PREFIX = "metaopt.sha256."
PROMOTION_PREFIX = "metaopt.promotion."
LOCK_OWNER = "metaopt.lock.owner"
LOCK_EXPIRES = "metaopt.lock.expires_at"

MAX_VERSION_TAG = 5000  # keep tags readable in the UI; the full config is also a run artifact


# ---------------------------------------------------------------------------------------- errors


class RegistryError(RuntimeError):
    """Base class of the registry's errors."""


class ModelNotFoundError(RegistryError, LookupError):
    """No registered model, version or alias by that name."""


class NoProductionVersionError(ModelNotFoundError):
    """The model exists but no version has been promoted to production yet."""


class WrongModelKindError(RegistryError, ValueError):
    """A loss URI given to ``load_optimizer`` or the other way round."""


class ArtifactValidationError(RegistryError, ValueError):
    """A registered artifact is malformed, fails its schema, or differs from what was registered."""


class PromotionLockTimeout(RegistryError, TimeoutError):
    """Another promotion of the same model held the lock for longer than the timeout."""


# ---------------------------------------------------------------------------------------- loss documents


def validate_loss_doc(doc: Any, source: str = "loss document") -> dict:
    """Check a loss JSON document (schema: ``metaopt_core.losses.document``) and return it as a
    plain dict. Raises ``ArtifactValidationError`` naming the field, the value found and what is allowed."""
    try:
        return validate_loss_document(doc, source)
    except LossDocumentError as exc:
        raise ArtifactValidationError(str(exc)) from None


def loss_from_doc(doc: Mapping[str, Any], reduction: str = "mean", source: str = "loss document") -> Any:
    """Build the loss module a loss document describes (``ArtifactValidationError`` if it cannot)."""
    try:
        return loss_from_document(doc, reduction=reduction, source=source)
    except LossDocumentError as exc:
        raise ArtifactValidationError(str(exc)) from None


# ---------------------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def truncate_tag(text: str) -> str:
    """``text`` cut to the length a version tag keeps (``...`` marks a cut)."""
    return text if len(text) <= MAX_VERSION_TAG else text[: MAX_VERSION_TAG - 3] + "..."


def score_tag(version: Any, metric: str) -> float | None:
    """The finite ``metaopt.score.<metric>`` of a ``ModelVersion``, or None."""
    value = version.tags.get(SCORE_PREFIX + metric)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def scores_of(scores: Any) -> dict[str, float]:
    """The finite numbers of a (nested) score mapping, flattened to ``{dotted.metric: float}``."""
    if scores is None:
        return {}
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores: got {type(scores).__name__}; allowed: a mapping {{metric: number}}")
    out = {}
    for key, value in flatten(scores).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            continue  # tables may carry strings (dataset names) next to the numbers
        out[str(key)] = float(value)
    return out


_warnings_lock = threading.Lock()


@contextlib.contextmanager
def quiet(message: str, category: type[Warning]) -> Iterator[None]:
    """Ignore one known MLflow warning inside the block only. ``catch_warnings`` swaps the
    process-global filter list, so uses from several threads are serialised (interleaved exits
    could otherwise leave the filter installed for good)."""
    with _warnings_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=category, message=message)
        yield


def quiet_stages() -> contextlib.AbstractContextManager[None]:
    """Stages are deprecated (FutureWarning) but still the only way to serve models:/NAME/production."""
    return quiet(r".*(stage|get_latest_versions).*", FutureWarning)


__all__ = [
    "ALIAS",
    "ArtifactValidationError",
    "DEFAULT_METRIC",
    "DEPLOY_PREFIX",
    "LOCK_EXPIRES",
    "LOCK_OWNER",
    "LOCK_SUFFIX",
    "MAX_VERSION_TAG",
    "ModelNotFoundError",
    "NoProductionVersionError",
    "PROMOTION_PREFIX",
    "PYFUNC_CODE",
    "PromotionLockTimeout",
    "RegistryError",
    "SCORE_PREFIX",
    "SHA_PREFIX",
    "STAGE",
    "TAG_CONFIG",
    "TAG_EXPORT_KIND",
    "TAG_FAMILY",
    "TAG_KIND",
    "TAG_SCORES",
    "WrongModelKindError",
    "loss_from_doc",
    "quiet",
    "quiet_stages",
    "score_tag",
    "scores_of",
    "sha256_file",
    "truncate_tag",
    "validate_loss_doc",
]
