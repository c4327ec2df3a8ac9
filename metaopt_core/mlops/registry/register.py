"""Registering learned losses and optimisers: log an MLflow model (pyfunc flavour, white-box
artifacts, logged from code so nothing is pickled) and create a registered version whose tags hold
the kind, family, artifact sha256s, provenance (config, data fingerprint, git commit) and scores."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metaopt_core.faults import fault_point
from metaopt_core.mlops.registry.common import (
    DIVERGENCE_DIR,
    DIVERGENCE_FILES,
    LOCK_SUFFIX,
    LOSS_FILE,
    MAX_VERSION_TAG,
    PYFUNC_CODE,
    SCORE_PREFIX,
    SHA_PREFIX,
    TAG_CONFIG,
    TAG_FAMILY,
    TAG_KIND,
    TAG_SCORES,
    ArtifactValidationError,
    ModelNotFoundError,
    WrongModelKindError,
    loss_from_doc,
    quiet,
    scores_of,
    sha256_file,
    truncate_tag,
    validate_loss_doc,
)
from metaopt_core.mlops.registry.integrity import METADATA_SHA256
from metaopt_core.mlops.tracking import (
    DEFAULT_EXPERIMENT,
    TAG_FINGERPRINT,
    TAG_GIT_COMMIT,
    connect,
    flatten,
    get_or_create_experiment,
    git_commit,
    param_value,
    to_jsonable,
)

_MODEL_DESCRIPTIONS = {
    "loss": "metaopt learned loss: load with metaopt_core.load_loss('models:/<name>/production')",
    "optimizer": "metaopt learned optimiser: load with metaopt_core.load_optimizer('models:/<name>/production', model)",
}


# where a meta-learning result keeps its loss: the document (with its "meta" provenance) first
LOSS_DOC_KEYS = ("document", "best_loss", "loss_doc", "loss")


def loss_doc_of(obj: Any) -> dict:
    """A loss document from a document, a loss module, or a meta-learning result holding one."""
    if isinstance(obj, Mapping):
        if "family" in obj:
            return dict(obj)
        for key in LOSS_DOC_KEYS:
            if key in obj:
                return loss_doc_of(obj[key])
    elif hasattr(obj, "to_dict") and callable(obj.to_dict) and hasattr(obj, "forward"):
        return obj.to_dict()
    else:
        for key in LOSS_DOC_KEYS:
            value = getattr(obj, key, None)
            if value is not None:
                return loss_doc_of(value)
    raise TypeError(f"result_or_loss_doc: got {type(obj).__name__}; allowed: a loss JSON document (with 'family'), a TaylorLoss, or a result with 'best_loss'")


def field_of(obj: Any, *names: str) -> Any:
    """The first of ``names`` found on a result (key or attribute), else in its loss document's ``meta``."""
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if not isinstance(obj, Mapping) and getattr(obj, name, None) is not None:
            return getattr(obj, name)
    try:
        meta = loss_doc_of(obj).get("meta")
    except TypeError:
        return None
    if isinstance(meta, Mapping):
        for name in names:
            if meta.get(name) is not None:
                return meta[name]
        if "fingerprint" in names and isinstance(meta.get("data_fingerprints"), list):
            return ",".join(str(f) for f in meta["data_fingerprints"] if f) or None
    return None


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
    doc = validate_loss_doc(loss_doc_of(result_or_loss_doc), source="result_or_loss_doc")
    loss_from_doc(doc)  # the document must build (e.g. a baseline's keyword arguments)
    config = config if config is not None else field_of(result_or_loss_doc, "config")
    fingerprint = fingerprint or field_of(result_or_loss_doc, "fingerprint", "data_fingerprint")
    if scores is None:
        scores = field_of(result_or_loss_doc, "scores", "meta_test_scores", "meta_test")
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
        config = config if config is not None else field_of(source, "config")
        fingerprint = fingerprint or field_of(source, "fingerprint", "data_fingerprint")
        if scores is None:
            scores = field_of(source, "scores", "meta_test_scores", "meta_test")
        lr = lr if lr is not None else field_of(source, "lr")
        inner = field_of(source, "divergence_dir", "directory", "divergence")
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
            "metaopt.divergence.parameters": json.dumps(manifest["parameters"])[:MAX_VERSION_TAG],
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


# The distribution that holds metaopt_core (pyproject.toml). Not "metaopt": that name on the public
# index is an unrelated 2014 package, which `mlflow models serve` / `build-docker` would install.
DISTRIBUTION = "metaopt-core"


def pip_requirements() -> list[str]:
    """What a registered version's environment installs: this project's library, exactly this
    version (it pins torch and everything the model code imports)."""
    import metaopt_core

    return [f"{DISTRIBUTION}=={metaopt_core.__version__}"]


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
    _check_kind(client, name, kind)  # first: a kind mismatch must not leave a logged model behind
    score_values = scores_of(scores)
    config_plain = flatten(config) if config is not None else None
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None

    tags: dict[str, str] = {TAG_KIND: kind, TAG_FAMILY: family}
    for rel, path in files.items():
        tags[SHA_PREFIX + rel] = sha256_file(path)
    if config is not None:
        tags[TAG_CONFIG] = truncate_tag(json.dumps(to_jsonable(config)))
    if fingerprint:
        tags[TAG_FINGERPRINT] = str(fingerprint)
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    if score_values:
        tags[TAG_SCORES] = truncate_tag(json.dumps(score_values))
        tags.update({SCORE_PREFIX + k: repr(v) for k, v in score_values.items()})
    tags.update({str(k): truncate_tag(str(v)) for k, v in (extra_tags or {}).items()})

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
        with quiet(".*input example was not provided.*", UserWarning):
            mlflow.pyfunc.log_model(
                name=kind,
                python_model=str(PYFUNC_CODE),
                artifacts={key: str(path) for key, path in artifacts.items()},
                signature=signature,
                pip_requirements=pip_requirements(),
                metadata={"metaopt_kind": kind, "metaopt_family": family, METADATA_SHA256: {rel: tags[SHA_PREFIX + rel] for rel in files}},  # fmt: skip
                model_id=logged.model_id,
            )
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        # created only now, right before its version: a kill earlier leaves no registered model without versions
        _ensure_registered_model(client, name, kind)
        fault_point("register-model")
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


def find_version(name: str, tag: str, value: str, *, tracking_uri: str | None = None) -> RegisteredVersion | None:
    """The first version of ``name`` whose tag ``tag`` is ``value`` (e.g. ``metaopt.kfp_run_id``:
    the version a pipeline run registered, which its retried registration step reuses), or None."""
    from metaopt_core.mlops.tracking import call_with_retries

    _check_model_name(name)
    client = connect(tracking_uri)
    quote = lambda text: str(text).replace("'", "\\'")  # noqa: E731
    try:
        found = call_with_retries(client.search_model_versions, f"name='{quote(name)}' and tags.`{tag}` = '{quote(value)}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if not found:
        return None
    first = min(found, key=lambda mv: int(mv.version))
    return RegisteredVersion(name=name, version=str(first.version), model_uri=f"models:/{name}/{first.version}", run_id=first.run_id or "",
                             model_id=getattr(first, "model_id", None) or "", tags=dict(first.tags or {}))  # fmt: skip


def _check_kind(client: MlflowClient, name: str, kind: str) -> None:
    """An existing registered model ``name`` must hold models of ``kind`` (no model yet: nothing to check)."""
    try:
        existing = client.get_registered_model(name).tags.get(TAG_KIND)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if existing is not None and existing != kind:
        raise WrongModelKindError(f"name: registered model {name!r} holds {existing} models; a {kind} cannot be added to it")


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


def _check_model_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or "/" in name or ":" in name or "@" in name:
        raise ValueError(f"name: got {name!r}; allowed: a non-empty model name without '/', ':' or '@'")
    if name.endswith(LOCK_SUFFIX):
        raise ValueError(f"name: got {name!r}; names ending in {LOCK_SUFFIX!r} are reserved for promotion locks")


__all__ = [
    "LOSS_DOC_KEYS",
    "RegisteredVersion",
    "field_of",
    "find_version",
    "loss_doc_of",
    "DISTRIBUTION",
    "pip_requirements",
    "register_loss",
    "register_optimizer",
]
