"""The MLflow model registry for learned losses and optimisers: register, promote, load.

A downstream training job needs two lines::

    from metaopt_core import load_loss, load_optimizer
    criterion = load_loss("models:/itl/production")              # TaylorLoss, like nn.CrossEntropyLoss
    optimizer = load_optimizer("models:/metamd/production", model)  # MirrorDescent

What a registered version holds (an MLflow model with a pyfunc flavour, logged from code so
nothing is pickled; see ``metaopt_core.mlops.pyfunc``):

- ``artifacts/loss.json`` (a loss: family, order, form, sign, parameters, normalisation), or
  ``artifacts/divergence/{divergence.safetensors, manifest.json}`` (an optimiser);
- a signature (probabilities + label -> loss; parameter + gradient -> step direction);
- version tags: ``metaopt.kind``, ``metaopt.family``, the sha256 of every artifact file
  (``metaopt.sha256.<file>``), the meta-train provenance (``metaopt.config`` JSON,
  ``metaopt.data_fingerprint``, ``metaopt.git_commit``, meta-test scores as
  ``metaopt.score.<metric>``) and, after a promotion attempt, ``metaopt.promotion.*``.

Loading (``load_loss``, ``load_optimizer``) downloads only those white-box files, checks their
sha256 against the version's tags (a file changed in the artifact store after registration is
refused), validates their schema, and builds the module. It never unpickles and never runs the
logged code. ``mlflow.pyfunc.load_model(uri)`` also works (it runs the logged ``pyfunc.py``).

Promotion (champion/challenger): a version becomes production only if its meta-test score beats
the current production version's by ``margin`` (or there is none, or ``force``). Production is
both the alias ``production`` and the (deprecated, still supported) stage ``Production``, so
``models:/itl@production`` and ``models:/itl/production`` resolve to the same version:

- promotions of one model are serialised by a lock: a registered model ``<name>.promotion-lock``
  created with ``create_registered_model``, which the backend's unique name constraint makes
  atomic (exactly one concurrent creator succeeds). The lock carries an expiry, so a crashed
  holder's lock is broken after ``lock_ttl_s``;
- under the lock the champion is read, the decision made, and the alias set first (the commit
  point), then the stage;
- a final reconciliation makes the stage follow the alias (the source of truth), so even a
  promotion interrupted between the two writes, or a lock broken too early, ends with both
  pointing at one version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import numbers
import os
import random
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metaopt_core.mlops.tracking import (
    DEFAULT_EXPERIMENT,
    TAG_FINGERPRINT,
    TAG_GIT_COMMIT,
    TrackingServerUnreachable,
    connect,
    flatten,
    get_or_create_experiment,
    git_commit,
    param_value,
    resolve_tracking_uri,
    to_jsonable,
)

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
LOSS_FILE = "loss.json"
DIVERGENCE_DIR = "divergence"
DIVERGENCE_FILES = ("divergence.safetensors", "manifest.json")

ALIAS = "production"
STAGE = "Production"
LOCK_SUFFIX = ".promotion-lock"
DEFAULT_METRIC = "meta_test_accuracy"

TAG_KIND = "metaopt.kind"  # "loss" | "optimizer" | "lock"
TAG_FAMILY = "metaopt.family"
TAG_CONFIG = "metaopt.config"
TAG_SCORES = "metaopt.scores"
SCORE_PREFIX = "metaopt.score."
SHA_PREFIX = "metaopt.sha256."
PROMOTION_PREFIX = "metaopt.promotion."
LOCK_OWNER = "metaopt.lock.owner"
LOCK_EXPIRES = "metaopt.lock.expires_at"

_MODEL_DESCRIPTIONS = {
    "loss": "metaopt learned loss: load with metaopt_core.load_loss('models:/<name>/production')",
    "optimizer": "metaopt learned optimiser: load with metaopt_core.load_optimizer('models:/<name>/production', model)",
}
_MAX_VERSION_TAG = 5000  # keep tags readable in the UI; the full config is also a run artifact
_TAYLOR_SIGN = "negative-sum-over-classes"


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
    """Check a loss JSON document and return it (a plain dict). Raises ``ArtifactValidationError``
    naming the field, the value found and what is allowed.

    ``family == "taylor"``: ``order`` in (2, 3, 4, 5), ``form`` in (taylor, monomial), ``params`` a
    list of ``order (order + 1) / 2 + 2`` finite numbers; optional ``sign`` (must be
    ``negative-sum-over-classes``), ``class_reduction`` (sum | mean), ``normalisation``
    ({enabled: bool, eta: number > 0}). Any other family must be a loss name known to
    ``metaopt_core.losses.registry.get_loss`` with ``params`` a JSON object of its keyword arguments.
    """
    from metaopt_core.losses.taylor import ORDERS, num_params

    def fail(field: str, value: Any, allowed: str) -> ArtifactValidationError:
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        return ArtifactValidationError(f"{source}: field {field!r}: got {shown}; allowed: {allowed}")

    if not isinstance(doc, Mapping):
        raise ArtifactValidationError(f"{source}: got a JSON {type(doc).__name__}; allowed: an object")
    family = doc.get("family")
    if not isinstance(family, str) or not family:
        raise fail("family", family, "'taylor' or a loss name of metaopt_core.losses.registry")
    if family == "taylor":
        order = doc.get("order")
        if isinstance(order, bool) or not isinstance(order, int) or order not in ORDERS:
            raise fail("order", order, f"one of {list(ORDERS)}")
        form = doc.get("form")
        if form not in ("taylor", "monomial"):
            raise fail("form", form, "'taylor' or 'monomial'")
        params = doc.get("params")
        n = num_params(order)
        if not isinstance(params, list) or len(params) != n:
            got = f"{len(params)} values" if isinstance(params, list) else params
            raise fail("params", got, f"a list of {n} numbers (order {order})")
        for k, value in enumerate(params):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise fail(f"params[{k}]", value, "a finite number")
        if "sign" in doc and doc["sign"] != _TAYLOR_SIGN:
            raise fail("sign", doc["sign"], repr(_TAYLOR_SIGN))
        if doc.get("class_reduction", "sum") not in ("sum", "mean"):
            raise fail("class_reduction", doc.get("class_reduction"), "'sum' or 'mean'")
        norm = doc.get("normalisation", {"enabled": False, "eta": 1.0})
        if norm is not None:
            if not isinstance(norm, Mapping):
                raise fail("normalisation", norm, "an object {enabled: bool, eta: number > 0}")
            if not isinstance(norm.get("enabled", False), bool):
                raise fail("normalisation.enabled", norm.get("enabled"), "true or false")
            eta = norm.get("eta", 1.0)
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
                raise fail("normalisation.eta", eta, "a finite number > 0")
        return dict(doc)
    from metaopt_core.losses.registry import list_losses

    known = [name for name in list_losses() if name != "taylor"]
    if family.strip().lower() not in known:
        raise fail("family", family, f"'taylor' or one of {known}")
    params = doc.get("params", {})
    if not isinstance(params, Mapping):
        raise fail("params", params, f"an object of keyword arguments of the {family!r} loss")
    return dict(doc)


def loss_from_doc(doc: Mapping[str, Any], reduction: str = "mean", source: str = "loss document") -> Any:
    """Build the loss module a (validated) loss document describes."""
    doc = validate_loss_doc(doc, source)
    if doc["family"] == "taylor":
        from metaopt_core.losses.taylor import TaylorLoss

        return TaylorLoss.from_dict(doc, reduction=reduction)
    from metaopt_core.losses.registry import get_loss

    kwargs = dict(doc.get("params") or {})
    kwargs.setdefault("reduction", reduction)
    try:
        return get_loss(doc["family"], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ArtifactValidationError(f"{source}: field 'params': {exc}") from None


# where a meta-learning result keeps its loss: the document (with its "meta" provenance) first
_LOSS_DOC_KEYS = ("document", "best_loss", "loss_doc", "loss")


def _loss_doc_of(obj: Any) -> dict:
    """A loss document from a document, a loss module, or a meta-learning result holding one."""
    if isinstance(obj, Mapping):
        if "family" in obj:
            return dict(obj)
        for key in _LOSS_DOC_KEYS:
            if key in obj:
                return _loss_doc_of(obj[key])
    elif hasattr(obj, "to_dict") and callable(obj.to_dict) and hasattr(obj, "forward"):
        return obj.to_dict()
    else:
        for key in _LOSS_DOC_KEYS:
            value = getattr(obj, key, None)
            if value is not None:
                return _loss_doc_of(value)
    raise TypeError(
        f"result_or_loss_doc: got {type(obj).__name__}; allowed: a loss JSON document (with 'family'), "
        "a TaylorLoss, or a result with 'best_loss'"
    )


def _field_of(obj: Any, *names: str) -> Any:
    """The first of ``names`` found on a result (key or attribute), else in its loss document's ``meta``."""
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if not isinstance(obj, Mapping) and getattr(obj, name, None) is not None:
            return getattr(obj, name)
    try:
        meta = _loss_doc_of(obj).get("meta")
    except TypeError:
        return None
    if isinstance(meta, Mapping):
        for name in names:
            if meta.get(name) is not None:
                return meta[name]
        if "fingerprint" in names and isinstance(meta.get("data_fingerprints"), list):
            return ",".join(str(f) for f in meta["data_fingerprints"] if f) or None
    return None


def _scores_of(scores: Any) -> dict[str, float]:
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


# ---------------------------------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    """What a registration produced."""

    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    model_id: str
    tags: dict[str, str]


def register_loss(
    result_or_loss_doc: Any,
    name: str = "itl",
    *,
    config: Any = None,
    fingerprint: str | None = None,
    scores: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> RegisteredVersion:
    """Log a learned loss as an MLflow model (pyfunc, white-box ``loss.json``) and register a version.

    ``result_or_loss_doc``: the loss JSON document (``TaylorLoss.to_dict()``), a ``TaylorLoss``, or a
    meta-learning result with ``best_loss`` (its ``config``, ``fingerprint`` and ``scores`` fill the
    keyword arguments not given). ``scores``: meta-test metrics ``{metric: value}`` (promotion
    compares one of them). ``run_id`` (or ``MLFLOW_RUN_ID``): the meta-training run the model
    belongs to; without one a short registration run is created.
    """
    doc = validate_loss_doc(_loss_doc_of(result_or_loss_doc), source="result_or_loss_doc")
    loss_from_doc(doc)  # the document must build (e.g. a baseline's keyword arguments)
    config = config if config is not None else _field_of(result_or_loss_doc, "config")
    fingerprint = fingerprint or _field_of(result_or_loss_doc, "fingerprint", "data_fingerprint")
    if scores is None:
        scores = _field_of(result_or_loss_doc, "scores", "meta_test_scores", "meta_test")
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.double), "probabilities"), ColSpec(DataType.long, "label")]),
        outputs=Schema([ColSpec(DataType.double, "loss")]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / LOSS_FILE
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return _register(
            kind="loss",
            name=name,
            artifacts={"loss": path},
            files={LOSS_FILE: path},
            signature=signature,
            family=doc["family"],
            config=config,
            fingerprint=fingerprint,
            scores=scores,
            run_id=run_id,
            description=description or f"learned loss ({doc['family']}, white-box JSON)",
            extra_tags=tags,
            tracking_uri=tracking_uri,
            experiment=experiment,
        )


def register_optimizer(
    divergence_dir_or_result: Any,
    name: str = "metamd",
    *,
    lr: float | None = None,
    config: Any = None,
    fingerprint: str | None = None,
    scores: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> RegisteredVersion:
    """Log a learned MetaMD divergence as an MLflow model (safetensors + manifest) and register a version.

    ``divergence_dir_or_result``: a directory written by ``save_divergence``, a ``Divergence``
    (saved here with ``lr``), or a result with ``divergence_dir`` / ``divergence`` (and ``lr``).
    The directory is validated with ``load_divergence`` before anything is logged.
    """
    from metaopt_core.optim.divergence import Divergence
    from metaopt_core.optim.io import DivergenceFormatError, load_divergence, save_divergence

    source = divergence_dir_or_result
    if not isinstance(source, (str, os.PathLike, Divergence)):
        config = config if config is not None else _field_of(source, "config")
        fingerprint = fingerprint or _field_of(source, "fingerprint", "data_fingerprint")
        if scores is None:
            scores = _field_of(source, "scores", "meta_test_scores", "meta_test")
        lr = lr if lr is not None else _field_of(source, "lr")
        inner = _field_of(source, "divergence_dir", "directory", "divergence")
        if inner is None:
            raise TypeError(
                f"divergence_dir_or_result: got {type(source).__name__}; allowed: a directory from "
                "save_divergence, a Divergence, or a result with 'divergence_dir' / 'divergence'"
            )
        source = inner
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / DIVERGENCE_DIR
        if isinstance(source, Divergence):
            save_divergence(source, directory, lr=lr)
        else:
            src = Path(source)
            if not src.is_dir():
                raise FileNotFoundError(f"divergence_dir_or_result: {str(src)!r} is not a directory")
            directory.mkdir()
            for file in DIVERGENCE_FILES:
                if not (src / file).is_file():
                    raise FileNotFoundError(f"divergence_dir_or_result: {src / file} is missing")
                shutil.copyfile(src / file, directory / file)
        try:
            divergence, manifest = load_divergence(directory)
        except DivergenceFormatError as exc:
            raise ArtifactValidationError(f"divergence_dir_or_result: {exc}") from None
        from mlflow.models import ModelSignature
        from mlflow.types import DataType
        from mlflow.types.schema import Array, ColSpec, Schema

        signature = ModelSignature(
            inputs=Schema([ColSpec(DataType.string, "parameter"), ColSpec(Array(DataType.double), "gradient")]),
            outputs=Schema([ColSpec(Array(DataType.double), "direction")]),
        )
        extra = {
            "metaopt.divergence.parameters": json.dumps(manifest["parameters"])[:_MAX_VERSION_TAG],
            "metaopt.divergence.lr": str(manifest.get("lr")),
            **{str(k): str(v) for k, v in (tags or {}).items()},
        }
        return _register(
            kind="optimizer",
            name=name,
            artifacts={"divergence": directory},
            files={f"{DIVERGENCE_DIR}/{f}": directory / f for f in DIVERGENCE_FILES},
            signature=signature,
            family=divergence.kind,
            config=config,
            fingerprint=fingerprint,
            scores=scores,
            run_id=run_id,
            description=description or f"MetaMD mirror-descent optimiser ({divergence.kind} Bregman divergence)",
            extra_tags=extra,
            tracking_uri=tracking_uri,
            experiment=experiment,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_requirements() -> list[str]:
    import metaopt_core
    import torch

    return [f"metaopt=={metaopt_core.__version__}", f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"]


def _register(
    *,
    kind: str,
    name: str,
    artifacts: Mapping[str, Path],
    files: Mapping[str, Path],
    signature: Any,
    family: str,
    config: Any,
    fingerprint: str | None,
    scores: Any,
    run_id: str | None,
    description: str,
    extra_tags: Mapping[str, Any] | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> RegisteredVersion:
    _check_model_name(name)
    client = connect(tracking_uri)
    _ensure_registered_model(client, name, kind)  # first: a kind mismatch must not leave a logged model behind
    score_values = _scores_of(scores)
    config_plain = flatten(config) if config is not None else None
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None

    tags: dict[str, str] = {TAG_KIND: kind, TAG_FAMILY: family}
    for rel, path in files.items():
        tags[SHA_PREFIX + rel] = _sha256(path)
    if config is not None:
        tags[TAG_CONFIG] = _truncate(json.dumps(to_jsonable(config)))
    if fingerprint:
        tags[TAG_FINGERPRINT] = str(fingerprint)
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    if score_values:
        tags[TAG_SCORES] = _truncate(json.dumps(score_values))
        tags.update({SCORE_PREFIX + k: repr(v) for k, v in score_values.items()})
    tags.update({str(k): _truncate(str(v)) for k, v in (extra_tags or {}).items()})

    own_run = run_id is None
    if own_run:
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") if experiment is None else None
        experiment_id = experiment_id or get_or_create_experiment(client, experiment or DEFAULT_EXPERIMENT)
        run_tags = {k: v for k, v in tags.items() if k in (TAG_FINGERPRINT, TAG_GIT_COMMIT)}
        run = client.create_run(experiment_id, run_name=f"register-{name}", tags=run_tags)
        run_id = run.info.run_id
        if config_plain:
            from mlflow.entities import Param

            items = [Param(k[:250], param_value(v)) for k, v in config_plain.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
        if score_values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in score_values.items()])
    else:
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
        except MlflowException as exc:
            raise ModelNotFoundError(f"run_id: run {run_id!r} not found ({exc.message})") from None

    status = "FAILED"
    try:
        logged = mlflow.initialize_logged_model(
            name=kind,
            source_run_id=run_id,
            experiment_id=experiment_id,
            tags={TAG_KIND: kind, TAG_FAMILY: family},
            model_type=f"metaopt-{kind}",
        )
        # "no input example": a signature is given; an example would make MLflow load and run the
        # model at logging time (+0.4 s per registration) for what the tests check anyway.
        with _quiet(".*input example was not provided.*", UserWarning):
            mlflow.pyfunc.log_model(
                name=kind,
                python_model=str(PYFUNC_CODE),
                artifacts={key: str(path) for key, path in artifacts.items()},
                signature=signature,
                pip_requirements=_pip_requirements(),
                metadata={"metaopt_kind": kind, "metaopt_family": family},
                model_id=logged.model_id,
            )
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        version = client.create_model_version(
            name,
            source=f"models:/{logged.model_id}",
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=logged.model_id,
        )
        status = "FINISHED"
    finally:
        if own_run:
            client.set_terminated(run_id, status=status)
    return RegisteredVersion(
        name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        run_id=run_id,
        model_id=logged.model_id,
        tags=tags,
    )


def _ensure_registered_model(client: MlflowClient, name: str, kind: str) -> None:
    """Create the registered model, or check that an existing one holds the same kind of model."""
    try:
        client.create_registered_model(name, tags={TAG_KIND: kind}, description=_MODEL_DESCRIPTIONS[kind])
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.get_registered_model(name).tags.get(TAG_KIND)
    if existing is not None and existing != kind:
        raise WrongModelKindError(f"name: registered model {name!r} holds {existing} models; a {kind} cannot be added to it")


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_VERSION_TAG else text[: _MAX_VERSION_TAG - 3] + "..."


def _check_model_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or "/" in name or ":" in name or "@" in name:
        raise ValueError(f"name: got {name!r}; allowed: a non-empty model name without '/', ':' or '@'")
    if name.endswith(LOCK_SUFFIX):
        raise ValueError(f"name: got {name!r}; names ending in {LOCK_SUFFIX!r} are reserved for promotion locks")


# ---------------------------------------------------------------------------------------- resolving URIs


def _existing_store(tracking_uri: str | None) -> MlflowClient:
    """A client for reading the registry; a local SQLite store that does not exist is an error here
    (opening it would create an empty database as a side effect)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(urllib.parse.urlparse(uri).path)
        if not path.exists():
            hint = "" if os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri else " (MLFLOW_TRACKING_URI is not set)"
            raise ModelNotFoundError(
                f"no MLflow store at {uri}{hint}: nothing has been registered there; point MLFLOW_TRACKING_URI "
                "(or --tracking-uri) at the tracking server or the mlflow.db that holds the models"
            )
    return connect(uri)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/`` URI: exactly one of version, stage, alias, or latest."""

    name: str
    version: str | None = None
    stage: str | None = None
    alias: str | None = None
    latest: bool = False


def parse_models_uri(uri: str) -> ModelRef:
    """``models:/NAME/VERSION``, ``models:/NAME/STAGE``, ``models:/NAME/latest``, ``models:/NAME@ALIAS``."""
    parsed = urllib.parse.urlparse(uri)
    path = parsed.path.lstrip("/") if parsed.scheme == "models" else ""
    allowed = "models:/NAME/VERSION, models:/NAME/STAGE (e.g. production), models:/NAME/latest or models:/NAME@ALIAS"
    if not path or parsed.netloc:
        raise ValueError(f"uri: got {uri!r}; allowed: {allowed}")
    parts = path.split("/")
    if len(parts) == 2 and parts[0] and parts[1]:
        name, suffix = parts
        if suffix.isdigit():
            return ModelRef(name, version=suffix)
        if suffix.lower() == "latest":
            return ModelRef(name, latest=True)
        return ModelRef(name, stage=suffix)
    if len(parts) == 1 and "@" in parts[0]:
        name, _, alias = parts[0].rpartition("@")
        if name and alias:
            return ModelRef(name, alias=alias)
    raise ValueError(f"uri: got {uri!r}; allowed: {allowed}")


def _how_to_promote(name: str) -> str:
    return (
        f"promote a version with `metaopt models promote {name} VERSION` "
        f"(or metaopt_core.mlops.registry.promote({name!r}, VERSION, scores))"
    )


def _registered_model(client: MlflowClient, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(
            m.name for m in client.search_registered_models(max_results=100) if not m.name.endswith(LOCK_SUFFIX)
        )
        raise ModelNotFoundError(
            f"no registered model named {name!r} at {client.tracking_uri}; registered models: {known or 'none'}"
        ) from None


def _versions(client: MlflowClient, name: str) -> list[Any]:
    escaped = name.replace("'", "\\'")
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name='{escaped}'", max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


_warnings_lock = threading.Lock()


@contextlib.contextmanager
def _quiet(message: str, category: type[Warning]) -> Iterator[None]:
    """Ignore one known MLflow warning inside the block only. ``catch_warnings`` swaps the
    process-global filter list, so uses from several threads are serialised (interleaved exits
    could otherwise leave the filter installed for good)."""
    with _warnings_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=category, message=message)
        yield


def _quiet_stages() -> contextlib.AbstractContextManager[None]:
    """Stages are deprecated (FutureWarning) but still the only way to serve models:/NAME/production."""
    return _quiet(r".*(stage|get_latest_versions).*", FutureWarning)


def resolve_version(client: MlflowClient, ref: ModelRef, uri: str = "") -> Any:
    """The ``ModelVersion`` a reference points at, with errors that say what exists."""
    _registered_model(client, ref.name)
    if ref.version is not None:
        try:
            return client.get_model_version(ref.name, ref.version)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            have = [str(v.version) for v in _versions(client, ref.name)]
            raise ModelNotFoundError(f"{uri or ref.name}: model {ref.name!r} has no version {ref.version}; versions: {have or 'none'}") from None
    if ref.alias is not None:
        try:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        except MlflowException as exc:
            if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                raise
            if ref.alias.lower() == ALIAS:
                raise NoProductionVersionError(_no_production_message(client, ref.name, uri)) from None
            aliases = sorted(client.get_registered_model(ref.name).aliases)
            raise ModelNotFoundError(f"{uri}: model {ref.name!r} has no alias {ref.alias!r}; aliases: {aliases or 'none'}") from None
    if ref.stage is not None:
        with _quiet_stages():
            latest = client.get_latest_versions(ref.name, [ref.stage])
        if latest:
            return max(latest, key=lambda v: int(v.version))
        if ref.stage.lower() == STAGE.lower():
            raise NoProductionVersionError(_no_production_message(client, ref.name, uri))
        raise ModelNotFoundError(
            f"{uri}: model {ref.name!r} has no version in stage {ref.stage!r} (stages: None, Staging, Production, Archived)"
        )
    versions = _versions(client, ref.name)
    if not versions:
        raise ModelNotFoundError(f"{uri}: model {ref.name!r} has no versions yet")
    return versions[-1]


def _no_production_message(client: MlflowClient, name: str, uri: str) -> str:
    have = [str(v.version) for v in _versions(client, name)]
    return (
        f"{uri or name}: model {name!r} has no production version yet (versions: {have or 'none'}); "
        + _how_to_promote(name)
    )


# ---------------------------------------------------------------------------------------- loading


def _download(uri: str, kind: str, files: list[str], destination: Path, tracking_uri: str | None) -> tuple[dict[str, Path], str]:
    """Fetch the named white-box files of a model into ``destination``; verify registered hashes.

    Returns ``({relative file: local path}, description of where they came from)``.
    """
    if uri.startswith("file://") or not re.match(r"^[a-zA-Z][\w+.-]*:/", uri):
        local = Path(urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri)
        if not local.exists():
            raise FileNotFoundError(
                f"uri: {uri!r} is neither an existing path nor a models:/, runs:/ or other artifact URI"
            )
        return _local_files(local, kind, files), str(local)
    if uri.startswith("models:/") and not re.fullmatch(r"models:/m-[0-9a-f]+/?", uri):
        client = _existing_store(tracking_uri)
        ref = parse_models_uri(uri)
        version = resolve_version(client, ref, uri)
        where = f"{uri} (model {ref.name!r} version {version.version})"
        registered_kind = version.tags.get(TAG_KIND)
        if registered_kind is not None and registered_kind != kind:
            loader = "load_optimizer" if registered_kind == "optimizer" else "load_loss"
            raise WrongModelKindError(f"{where} is a registered {registered_kind}, not a {kind}; use {loader}")
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(client.get_model_version_download_uri(ref.name, version.version))
        out = {}
        for rel in files:
            try:
                path = Path(repo.download_artifacts(f"artifacts/{rel}", str(destination)))
            except (MlflowException, OSError) as exc:
                raise ArtifactValidationError(
                    f"{where}: artifact artifacts/{rel} could not be downloaded ({exc}); not a metaopt {kind} model?"
                ) from None
            expected = version.tags.get(SHA_PREFIX + rel)
            if expected is None:
                raise ArtifactValidationError(
                    f"{where}: version tag {SHA_PREFIX + rel} is missing, so the artifact cannot be verified; "
                    "register it with metaopt_core.mlops.registry"
                )
            actual = _sha256(path)
            if actual != expected:
                raise ArtifactValidationError(
                    f"{where}: artifacts/{rel} has sha256 {actual}, but {expected} was registered: the artifact "
                    "was modified after registration (tampered or corrupted); refusing to load it"
                )
            out[rel] = path
        return out, where
    # runs:/, models:/m-<id>, s3://, mlflow-artifacts:/ ...: MLflow's generic download, no registry tags
    connect(tracking_uri)
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: could not download ({exc.message})") from None
    return _local_files(fetched, kind, files), uri


def _local_files(path: Path, kind: str, files: list[str]) -> dict[str, Path]:
    """Files of a local model: a model directory (``artifacts/...``), a plain directory, or one JSON file."""
    if path.is_file():
        if len(files) != 1:
            raise ArtifactValidationError(f"{path}: a {kind} needs the directory holding {files}, not a file")
        return {files[0]: path}
    for base in (path / "artifacts", path):
        candidates = {rel: base / rel for rel in files}
        if all(p.is_file() for p in candidates.values()):
            return candidates
        if kind == "optimizer":  # a bare save_divergence directory
            bare = {rel: base / Path(rel).name for rel in files}
            if all(p.is_file() for p in bare.values()):
                return bare
    raise ArtifactValidationError(f"{path}: no {kind} artifact found (looked for {files} and artifacts/{files[0]})")


def load_loss_doc(uri: str, *, tracking_uri: str | None = None) -> dict:
    """The validated loss JSON document behind ``uri`` (``models:/...``, ``runs:/...``, a path)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, where = _download(uri, "loss", [LOSS_FILE], Path(tmp), tracking_uri)
        path = paths[LOSS_FILE]
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactValidationError(f"{where}: {LOSS_FILE} is not valid JSON ({exc})") from None
    return validate_loss_doc(doc, source=f"{where}: {LOSS_FILE}")


def load_loss(uri: str, *, reduction: str = "mean", tracking_uri: str | None = None) -> Any:
    """A ready loss module (``TaylorLoss`` or a named baseline) from a registered model.

    ``uri``: ``models:/itl/production``, ``models:/itl@production``, ``models:/itl/3``, ``runs:/...``,
    or a local ``loss.json`` / model directory. Reads only the JSON artifact (never unpickles),
    checks it against the sha256 recorded at registration and validates its schema.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")
    doc = load_loss_doc(uri, tracking_uri=tracking_uri)
    return loss_from_doc(doc, reduction=reduction, source=f"{uri}: {LOSS_FILE}")


def load_optimizer(
    uri: str, model: Any, lr: float | None = None, *, weight_decay: float = 0.0, tracking_uri: str | None = None
) -> Any:
    """A ready ``MirrorDescent`` over ``model.parameters()`` from a registered MetaMD divergence.

    ``lr`` defaults to the learning rate recorded at meta-training. The model's parameter shapes
    must match the meta-trained architecture (``ShapeMismatchError`` names the first mismatch).
    """
    from metaopt_core.optim.io import DivergenceFormatError
    from metaopt_core.optim.mirror_descent import MirrorDescent

    files = [f"{DIVERGENCE_DIR}/{f}" for f in DIVERGENCE_FILES]
    with tempfile.TemporaryDirectory() as tmp:
        paths, where = _download(uri, "optimizer", files, Path(tmp), tracking_uri)
        directory = Path(tmp) / "loaded"
        directory.mkdir()
        for rel, path in paths.items():
            shutil.copyfile(path, directory / Path(rel).name)
        try:
            return MirrorDescent.from_pretrained(directory, model, lr=lr, weight_decay=weight_decay)
        except DivergenceFormatError as exc:
            raise ArtifactValidationError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------------------- promotion


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    """The outcome of :func:`promote`, also recorded as ``metaopt.promotion.*`` tags on the version."""

    name: str
    version: str
    promoted: bool
    decision: str  # promoted | forced | rejected | unchanged
    reason: str
    metric: str
    challenger_score: float | None
    champion_version: str | None
    champion_score: float | None
    margin: float
    greater_is_better: bool
    production_version: str | None  # after the call

    def __str__(self) -> str:
        return f"{self.name} version {self.version}: {self.decision} ({self.reason})"


class _PromotionLock:
    """Mutual exclusion between promotions of one model, held as a registered model ``<name>.promotion-lock``."""

    def __init__(self, client: MlflowClient, name: str, ttl_s: float, timeout_s: float) -> None:
        self.client, self.name = client, name + LOCK_SUFFIX
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self.token = uuid.uuid4().hex

    def __enter__(self) -> "_PromotionLock":
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(
                    self.name,
                    tags={TAG_KIND: "lock", LOCK_OWNER: self.token, LOCK_EXPIRES: f"{time.time() + self.ttl_s:.3f}"},
                    description="transient lock held by metaopt promote(); expires on its own",
                )
                return self
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            self._break_if_expired()
            if time.monotonic() > deadline:
                raise PromotionLockTimeout(
                    f"promotion lock {self.name!r} still held after {self.timeout_s:g} s by another promotion; "
                    f"retry later (a crashed holder's lock expires after {self.ttl_s:g} s)"
                )
            time.sleep(random.uniform(0.02, 0.15))

    def _break_if_expired(self) -> None:
        try:
            held = self.client.get_registered_model(self.name)
        except MlflowException:
            return  # released meanwhile
        try:
            expires = float(held.tags.get(LOCK_EXPIRES, "inf"))
        except ValueError:
            expires = 0.0
        if time.time() > expires:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(self.name)

    def __exit__(self, *exc_info: Any) -> None:
        try:
            held = self.client.get_registered_model(self.name)
        except MlflowException:
            return
        if held.tags.get(LOCK_OWNER) == self.token:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(self.name)


def _score_tag(version: Any, metric: str) -> float | None:
    value = version.tags.get(SCORE_PREFIX + metric)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def production_version(name: str, *, tracking_uri: str | None = None) -> str | None:
    """The version currently in production (alias ``production``; the stage as a fallback), or None."""
    client = _existing_store(tracking_uri)
    _registered_model(client, name)
    return _current_production(client, name)


def _current_production(client: MlflowClient, name: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    if ALIAS in aliases:
        return str(aliases[ALIAS])
    staged = [str(v.version) for v in _versions(client, name) if v.current_stage == STAGE]
    return str(max(staged, key=int)) if staged else None


def _set_production(client: MlflowClient, name: str, version: str) -> None:
    # alias first: it is the commit point the reconciliation (and _current_production) trusts
    client.set_registered_model_alias(name, ALIAS, version)
    with _quiet_stages():
        client.transition_model_version_stage(name, version, STAGE, archive_existing_versions=True)


def reconcile(client: MlflowClient, name: str, attempts: int = 5) -> str | None:
    """Make the Production stage hold exactly the version the ``production`` alias names.

    Without an alias, a single (or the newest) Production-stage version becomes the alias target.
    Returns the production version (None if there is none).
    """
    for _ in range(attempts):
        aliases = client.get_registered_model(name).aliases
        staged = sorted((str(v.version) for v in _versions(client, name) if v.current_stage == STAGE), key=int)
        target = str(aliases[ALIAS]) if ALIAS in aliases else (staged[-1] if staged else None)
        if target is None:
            return None
        if staged == [target] and str(aliases.get(ALIAS)) == target:
            return target
        _set_production(client, name, target)
    raise RegistryError(f"model {name!r}: stage {STAGE} and alias {ALIAS!r} could not be reconciled after {attempts} attempts")


def promote(
    name: str,
    version: int | str,
    scores: Mapping[str, Any] | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    margin: float = 0.0,
    greater_is_better: bool = True,
    force: bool = False,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 60.0,
    lock_ttl_s: float = 120.0,
) -> PromotionDecision:
    """Champion/challenger promotion of ``name`` version ``version`` to production.

    ``scores``: meta-test scores of the challenger ({metric: value}); recorded as its tags. Without
    them, the scores recorded at registration are used. The challenger wins if its ``metric``
    beats the production version's by more than ``margin`` (``>`` when ``greater_is_better``,
    ``<`` otherwise), or there is no production version, or ``force``. A rejection is a normal
    outcome (``promoted=False``), recorded on the version like a promotion.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin: got {margin!r}; allowed: a finite number >= 0")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric: got {metric!r}; allowed: a non-empty metric name")
    if isinstance(version, bool) or not str(version).isdigit():
        raise ValueError(f"version: got {version!r}; allowed: a version number such as 3")
    version = str(int(version))
    client = _existing_store(tracking_uri)
    challenger = resolve_version(client, ModelRef(name, version=version), f"models:/{name}/{version}")
    score_values = _scores_of(scores)
    for key, value in score_values.items():
        client.set_model_version_tag(name, version, SCORE_PREFIX + key, repr(value))
    challenger_score = score_values.get(metric, _score_tag(challenger, metric))

    with _PromotionLock(client, name, ttl_s=lock_ttl_s, timeout_s=lock_timeout_s):
        champion = _current_production(client, name)
        champion_score = None
        if champion is not None and champion != version:
            champion_score = _score_tag(client.get_model_version(name, champion), metric)
        better = "higher" if greater_is_better else "lower"
        if champion == version:
            promoted, decision, reason = True, "unchanged", "already the production version"
        elif force:
            promoted, decision, reason = True, "forced", "promotion forced"
        elif champion is None:
            promoted, decision, reason = True, "promoted", "no production version yet"
        elif challenger_score is None:
            raise ValueError(
                f"scores: version {version} of {name!r} has no {metric!r} score to compare with production "
                f"version {champion}; pass scores={{{metric!r}: value}} or force=True"
            )
        elif champion_score is None:
            promoted, decision = False, "rejected"
            reason = f"production version {champion} has no {metric!r} score to compare with; use force to replace it"
        else:
            delta = challenger_score - champion_score if greater_is_better else champion_score - challenger_score
            promoted = delta > margin
            decision = "promoted" if promoted else "rejected"
            relation = "beats" if promoted else "does not beat"
            reason = (
                f"{metric} {challenger_score:.6g} {relation} production version {champion}'s {champion_score:.6g} "
                f"by more than the margin {margin:g} ({better} is better)"
            )
        record = {
            "decision": decision,
            "reason": reason,
            "metric": metric,
            "challenger_score": "none" if challenger_score is None else repr(challenger_score),
            "champion_version": "none" if champion is None else champion,
            "champion_score": "none" if champion_score is None else repr(champion_score),
            "margin": repr(float(margin)),
            "greater_is_better": str(bool(greater_is_better)).lower(),
            "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for key, value in record.items():
            client.set_model_version_tag(name, version, PROMOTION_PREFIX + key, _truncate(value))
        if promoted and champion != version:
            _set_production(client, name, version)
            if champion is not None:
                client.set_model_version_tag(name, champion, PROMOTION_PREFIX + "replaced_by", version)
        current = reconcile(client, name)
    return PromotionDecision(
        name=name,
        version=version,
        promoted=promoted,
        decision=decision,
        reason=reason,
        metric=metric,
        challenger_score=challenger_score,
        champion_version=champion,
        champion_score=champion_score,
        margin=float(margin),
        greater_is_better=bool(greater_is_better),
        production_version=current,
    )


# ---------------------------------------------------------------------------------------- listing


def list_models(*, metric: str = DEFAULT_METRIC, tracking_uri: str | None = None) -> list[dict]:
    """One row per registered model: name, kind, latest version, production version and its score."""
    client = _existing_store(tracking_uri)
    rows, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for model in page:
            if model.name.endswith(LOCK_SUFFIX) or model.tags.get(TAG_KIND) == "lock":
                continue
            versions = _versions(client, model.name)
            production = _current_production(client, model.name)
            prod = next((v for v in versions if str(v.version) == production), None)
            rows.append(
                {
                    "name": model.name,
                    "kind": model.tags.get(TAG_KIND, ""),
                    "versions": len(versions),
                    "latest": str(versions[-1].version) if versions else None,
                    "production": production,
                    metric: _score_tag(prod, metric) if prod is not None else None,
                    "updated": _timestamp(model.last_updated_timestamp),
                }
            )
        token = page.token
        if not token:
            return sorted(rows, key=lambda r: r["name"])


def describe_model(name: str, *, metric: str = DEFAULT_METRIC, tracking_uri: str | None = None) -> dict:
    """A registered model and a row per version (stage, aliases, score, last promotion decision)."""
    client = _existing_store(tracking_uri)
    model = _registered_model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in model.aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    versions = [
        {
            "version": str(v.version),
            "stage": v.current_stage,
            "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
            "family": v.tags.get(TAG_FAMILY, ""),
            metric: _score_tag(v, metric),
            "decision": v.tags.get(PROMOTION_PREFIX + "decision", ""),
            "created": _timestamp(v.creation_timestamp),
            "run_id": v.run_id,
        }
        for v in _versions(client, name)
    ]
    return {
        "name": model.name,
        "kind": model.tags.get(TAG_KIND, ""),
        "description": model.description,
        "production": _current_production(client, name),
        "aliases": dict(model.aliases),
        "versions": versions,
    }


def describe_version(name: str, version: int | str, *, tracking_uri: str | None = None) -> dict:
    """One version: where it comes from, its tags (provenance, scores, promotion) and its artifact."""
    client = _existing_store(tracking_uri)
    mv = resolve_version(client, ModelRef(name, version=str(version)), f"models:/{name}/{version}")
    out = {
        "name": name,
        "version": str(mv.version),
        "stage": mv.current_stage,
        "aliases": sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(mv.version)),
        "source": mv.source,
        "run_id": mv.run_id,
        "created": _timestamp(mv.creation_timestamp),
        "description": mv.description,
        "tags": dict(sorted(mv.tags.items())),
    }
    if mv.tags.get(TAG_KIND) == "loss":
        out["loss"] = load_loss_doc(f"models:/{name}/{mv.version}", tracking_uri=tracking_uri)
    return out


def _timestamp(millis: int | None) -> str:
    if not millis:
        return ""
    return _dt.datetime.fromtimestamp(millis / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def iter_versions(name: str, *, tracking_uri: str | None = None) -> Iterator[Any]:
    """All ``ModelVersion`` objects of ``name``, oldest first."""
    client = _existing_store(tracking_uri)
    _registered_model(client, name)
    yield from _versions(client, name)


__all__ = [
    "ALIAS",
    "ArtifactValidationError",
    "DEFAULT_METRIC",
    "ModelNotFoundError",
    "NoProductionVersionError",
    "PromotionDecision",
    "PromotionLockTimeout",
    "RegisteredVersion",
    "RegistryError",
    "STAGE",
    "TrackingServerUnreachable",
    "WrongModelKindError",
    "describe_model",
    "describe_version",
    "list_models",
    "load_loss",
    "load_loss_doc",
    "load_optimizer",
    "loss_from_doc",
    "parse_models_uri",
    "production_version",
    "promote",
    "reconcile",
    "register_loss",
    "register_optimizer",
    "resolve_tracking_uri",
    "resolve_version",
    "validate_loss_doc",
]
