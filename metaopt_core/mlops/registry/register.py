"""Registering learned losses and optimisers: an export folder (``metaopt_core.exports``: the export
kind's files and ``export.json``) becomes an MLflow model (pyfunc flavour, white-box artifacts, logged
from code so nothing is pickled) and a registered version whose tags hold the role, the export kind,
the family, every artifact file's sha256, the deployment settings baked in (``metaopt.deploy.<key>``),
provenance (config, data fingerprint, git commit) and scores. Nothing here knows a kind's files."""

from __future__ import annotations

import dataclasses
import json
import os
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
    DEPLOY_PREFIX,
    LOCK_SUFFIX,
    PYFUNC_CODE,
    SCORE_PREFIX,
    SHA_PREFIX,
    TAG_CONFIG,
    TAG_EXPORT_KIND,
    TAG_FAMILY,
    TAG_KIND,
    TAG_SCORES,
    ArtifactValidationError,
    ModelNotFoundError,
    WrongModelKindError,
    quiet,
    scores_of,
    sha256_file,
    truncate_tag,
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


@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    """What a registration produced."""

    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    model_id: str
    tags: dict[str, str]


def register_export(
    artifact_dir: str | Path,
    name: str,
    *,
    deployment: Mapping[str, Any] | None = None,
    config: Any = None,
    fingerprint: str | None = None,
    scores: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> RegisteredVersion:
    """Register the export in ``artifact_dir`` (any export kind) as a new version of ``name``.

    ``deployment``: what the meta-test measured for downstream use (``MetaTestReport.deployment``:
    ``lr_scale`` for a loss, ``lr`` for an optimiser), baked into the registered files by the kind
    (so ``load_loss`` / ``load_optimizer`` apply it; covered by the sha256 tags) and recorded as
    tags ``metaopt.deploy.<key>``. The files are checked (they must build) before anything is
    logged. ``scores``: meta-test metrics ``{metric: value}``. ``run_id`` (or ``MLFLOW_RUN_ID``):
    the meta-training run the model belongs to; without one a short registration run is created."""
    from metaopt_core import exports

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "export"
        try:
            kind = exports.copy(artifact_dir, staged)
            baked = exports.bake(staged, deployment)
            kind.check(staged)
            described = kind.describe(staged)
        except (FileNotFoundError, ValueError) as exc:  # ExportError, LossDocumentError, DivergenceFormatError
            raise ArtifactValidationError(f"artifact_dir {str(artifact_dir)!r}: {exc}") from None
        extra = {**{DEPLOY_PREFIX + key: repr(value) if isinstance(value, float) else str(value) for key, value in baked.items()},
                 **{str(k): str(v) for k, v in (tags or {}).items()}}  # fmt: skip
        family = str(described.get("family", kind.name))
        return _register(
            kind=kind, name=name, directory=staged, family=family, config=config, fingerprint=fingerprint, scores=scores, run_id=run_id,
            description=description or f"learned {kind.role} ({kind.name}, {family})", extra_tags=extra, tracking_uri=tracking_uri,
            experiment=experiment,
        )  # fmt: skip


def register_loss(loss: Any, name: str = "itl", **options: Any) -> RegisteredVersion:
    """Register a loss given as a loss document (a dict) or a loss module (``TaylorLoss``, a named
    loss, a learned family's module): written as its family's export kind, then
    :func:`register_export` (``options`` are its keyword arguments)."""
    from metaopt_core import exports
    from metaopt_core.losses import families
    from metaopt_core.losses.document import LossDocumentError, document_of_loss, validate_loss_document

    try:
        doc = validate_loss_document(loss, "loss") if isinstance(loss, Mapping) else document_of_loss(loss)
    except (LossDocumentError, TypeError) as exc:
        raise ArtifactValidationError(str(exc)) from None
    family = families.document_family_name(doc)
    kind = families.family_class(family).export_kind if families.has_family(family) else "loss-document"
    with tempfile.TemporaryDirectory() as tmp:
        exports.write(tmp, kind, doc)
        return register_export(tmp, name, **options)


def register_optimizer(divergence: Any, name: str = "metamd", *, lr: float | None = None, **options: Any) -> RegisteredVersion:
    """Register a learned mirror-descent optimiser given as a ``Divergence`` (saved here with ``lr``)
    or a folder ``save_divergence`` wrote, then :func:`register_export` (``options``)."""
    from metaopt_core import exports
    from metaopt_core.optim.divergence import Divergence

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(divergence, Divergence):
            exports.write(tmp, "mirror-descent", exports.LearnedDivergence(divergence, lr))
        else:
            source = Path(divergence)
            if not source.is_dir():
                raise FileNotFoundError(f"divergence: {str(source)!r} is not a directory (allowed: a Divergence or a save_divergence folder)")
            kind = exports.get("mirror-descent")
            staged = Path(tmp) / "staged"
            for relative in kind.files:
                found = source / Path(relative).name
                if not found.is_file():
                    raise FileNotFoundError(f"divergence: {found} is missing")
                (staged / relative).parent.mkdir(parents=True, exist_ok=True)
                (staged / relative).write_bytes(found.read_bytes())
            exports.mark(staged, kind)
            return register_export(staged, name, **options)
        return register_export(tmp, name, **options)


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
    kind: Any,
    name: str,
    directory: Path,
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
    from metaopt_core.exports import EXPORT_FILE

    role = kind.role
    _check_model_name(name)
    client = connect(tracking_uri)
    _check_kind(client, name, role)  # first: a kind mismatch must not leave a logged model behind
    score_values = scores_of(scores)
    config_plain = flatten(config) if config is not None else None
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None

    tags: dict[str, str] = {TAG_KIND: role, TAG_EXPORT_KIND: kind.name, TAG_FAMILY: family}
    for rel in kind.files:
        tags[SHA_PREFIX + rel] = sha256_file(directory / rel)
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
    # the model's artifacts: export.json and the kind's files, each top-level entry one MLflow
    # artifact, so they land at artifacts/<relative path> (what the loaders download and verify)
    artifacts = {entry: str(directory / entry) for entry in sorted({rel.split("/")[0] for rel in kind.files} | {EXPORT_FILE})}

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
            name=role,
            source_run_id=run_id,
            experiment_id=experiment_id,
            tags={TAG_KIND: role, TAG_EXPORT_KIND: kind.name, TAG_FAMILY: family},
            model_type=f"metaopt-{role}",
        )
        # "no input example": a signature is given; an example would make MLflow load and run the
        # model at logging time (+0.4 s per registration) for what the tests check anyway.
        with quiet(".*input example was not provided.*", UserWarning):
            mlflow.pyfunc.log_model(
                name=role,
                python_model=str(PYFUNC_CODE),
                artifacts=artifacts,
                signature=_signature(role),
                pip_requirements=pip_requirements(),
                metadata={
                    "metaopt_kind": role,
                    "metaopt_export_kind": kind.name,
                    "metaopt_family": family,
                    METADATA_SHA256: {rel: tags[SHA_PREFIX + rel] for rel in kind.files},
                },  # fmt: skip
                model_id=logged.model_id,
            )
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        # created only now, right before its version: a kill earlier leaves no registered model without versions
        _ensure_registered_model(client, name, role)
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


def _signature(role: str) -> Any:
    """The pyfunc model's signature: a loss takes (probabilities, label) rows and gives the loss;
    an optimiser takes (parameter, gradient) rows and gives the step direction."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema

    if role == "loss":
        return ModelSignature(inputs=Schema([ColSpec(Array(DataType.double), "probabilities"), ColSpec(DataType.long, "label")]),
                              outputs=Schema([ColSpec(DataType.double, "loss")]))  # fmt: skip
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "parameter"), ColSpec(Array(DataType.double), "gradient")]),
                          outputs=Schema([ColSpec(Array(DataType.double), "direction")]))  # fmt: skip


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
    "DISTRIBUTION",
    "RegisteredVersion",
    "find_version",
    "pip_requirements",
    "register_export",
    "register_loss",
    "register_optimizer",
]
