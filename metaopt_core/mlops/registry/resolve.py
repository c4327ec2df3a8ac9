"""Resolving ``models:/`` URIs to registered versions, with errors that say what exists."""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metaopt_core.mlops.registry.common import (
    ALIAS,
    LOCK_SUFFIX,
    STAGE,
    ModelNotFoundError,
    NoProductionVersionError,
    quiet_stages,
)
from metaopt_core.mlops.tracking import connect, resolve_tracking_uri


def existing_store(tracking_uri: str | None) -> MlflowClient:
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


def how_to_promote(name: str) -> str:
    """The hint appended to "no production version" errors."""
    return (f"a version reaches production when the promotion gate finds it better than its tuned baselines (`metaopt models show {name}` "
            f"says why each version was rejected); `metaopt models promote {name} VERSION --override --reason TEXT` overrides the gate, recorded")  # fmt: skip


def registered_model(client: MlflowClient, name: str) -> Any:
    """The ``RegisteredModel`` ``name``; ``ModelNotFoundError`` listing the models that exist if it does not."""
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=100) if not m.name.endswith(LOCK_SUFFIX))
        raise ModelNotFoundError(f"no registered model named {name!r} at {client.tracking_uri}; registered models: {known or 'none'}") from None


def list_versions(client: MlflowClient, name: str) -> list[Any]:
    """Every ``ModelVersion`` of ``name``, oldest first (all result pages)."""
    escaped = name.replace("'", "\\'")
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name='{escaped}'", max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def resolve_version(client: MlflowClient, ref: ModelRef, uri: str = "") -> Any:
    """The ``ModelVersion`` a reference points at, with errors that say what exists."""
    registered_model(client, ref.name)
    if ref.version is not None:
        try:
            return client.get_model_version(ref.name, ref.version)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            have = [str(v.version) for v in list_versions(client, ref.name)]
            raise ModelNotFoundError(f"{uri or ref.name}: model {ref.name!r} has no version {ref.version}; versions: {have or 'none'}") from None
    if ref.alias is not None:
        try:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        except MlflowException as exc:
            if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                raise
            if ref.alias.lower() == ALIAS:
                raise NoProductionVersionError(no_production_message(client, ref.name, uri)) from None
            aliases = sorted(client.get_registered_model(ref.name).aliases)
            raise ModelNotFoundError(f"{uri}: model {ref.name!r} has no alias {ref.alias!r}; aliases: {aliases or 'none'}") from None
    if ref.stage is not None:
        with quiet_stages():
            latest = client.get_latest_versions(ref.name, [ref.stage])
        if latest:
            return max(latest, key=lambda v: int(v.version))
        if ref.stage.lower() == STAGE.lower():
            raise NoProductionVersionError(no_production_message(client, ref.name, uri))
        raise ModelNotFoundError(f"{uri}: model {ref.name!r} has no version in stage {ref.stage!r} (stages: None, Staging, Production, Archived)")
    versions = list_versions(client, ref.name)
    if not versions:
        raise ModelNotFoundError(f"{uri}: model {ref.name!r} has no versions yet")
    return versions[-1]


def no_production_message(client: MlflowClient, name: str, uri: str) -> str:
    """The error text for a model without a production version, listing its versions."""
    have = [str(v.version) for v in list_versions(client, name)]
    opt_in = (f"; a job that accepts an unpromoted version opts in with load_loss/load_optimizer(..., fallback='models:/{name}/latest')"
              if have else "")  # fmt: skip
    return f"{uri or name}: model {name!r} has no production version yet (versions: {have or 'none'}); " + how_to_promote(name) + opt_in


__all__ = [
    "ModelRef",
    "existing_store",
    "how_to_promote",
    "list_versions",
    "no_production_message",
    "parse_models_uri",
    "registered_model",
    "resolve_version",
]
