"""The sha256 check every load path makes before it uses a registered artifact.

``load_loss`` / ``load_optimizer`` compare the files they download with the version's
``metaopt.sha256.<file>`` tags. The pyfunc flavour (``mlflow.pyfunc.load_model``, ``mlflow models
serve``) gets a model folder from MLflow instead, so :func:`verify_model_dir` finds the registered
version that holds that logged model (its ``model_id`` in ``MLmodel``; versions are created with
``source = models:/<model_id>``) and checks the same tags, refusing a changed file with the same
:class:`ArtifactValidationError`. Without a reachable registry (a model folder copied elsewhere,
or a logged model never registered) it checks the hashes recorded in ``MLmodel``'s metadata at
registration, which catches corruption, not someone who rewrites the folder's files together.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from metaopt_core.mlops.registry.common import SHA_PREFIX, ArtifactValidationError, sha256_file

METADATA_SHA256 = "metaopt_sha256"  # MLmodel metadata: {file: sha256}, written at registration


def check_sha256(files: Mapping[str, Path], expected: Mapping[str, str], where: str) -> None:
    """Every ``files[rel]`` must hash to ``expected[rel]`` (a registered tag); else the error that
    every load path raises."""
    for rel, path in files.items():
        tag = expected.get(rel)
        if tag is None:
            raise ArtifactValidationError(
                f"{where}: version tag {SHA_PREFIX + rel} is missing, so the artifact cannot be verified; register it with metaopt_core.mlops.registry"
            )
        actual = sha256_file(path)
        if actual != tag:
            raise ArtifactValidationError(
                f"{where}: artifacts/{rel} has sha256 {actual}, but {tag} was registered: the artifact "
                "was modified after registration (tampered or corrupted); refusing to load it"
            )


def registered_hashes(model_id: str, tracking_uri: str) -> tuple[dict[str, str], str] | None:
    """The sha256 tags of the registered version holding the logged model ``model_id`` and its
    ``models:/name/version``; None when no registry is reachable at ``tracking_uri`` or no version
    holds that model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from metaopt_core.mlops.tracking import TrackingServerUnreachable, ensure_reachable

    if tracking_uri.startswith("sqlite:///") and not Path(urllib.parse.urlparse(tracking_uri).path).exists():
        return None  # no store here (opening one would create it)
    try:
        ensure_reachable(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        versions = client.search_model_versions(f"source_path = 'models:/{model_id}'")
    except (TrackingServerUnreachable, MlflowException, OSError):
        return None
    if not versions:
        return None
    version = min(versions, key=lambda mv: int(mv.version))
    hashes = {key[len(SHA_PREFIX) :]: value for key, value in (version.tags or {}).items() if key.startswith(SHA_PREFIX)}
    return hashes, f"models:/{version.name}/{version.version}"


def verify_model_dir(model_dir: str | Path, files: list[str], tracking_uri: str | None = None) -> str:
    """Check the artifact ``files`` (relative to ``artifacts/``) of a downloaded model folder
    against the registered version's sha256 tags (else ``MLmodel``'s recorded hashes). Returns
    what it checked against; raises :class:`ArtifactValidationError`."""
    import mlflow
    import yaml

    model_dir = Path(model_dir)
    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ArtifactValidationError(f"{model_dir}: MLmodel is unreadable ({exc}), so the artifact cannot be verified") from None
    paths = {rel: model_dir / "artifacts" / rel for rel in files}
    model_id = mlmodel.get("model_id") or ""
    registered = registered_hashes(model_id, tracking_uri or mlflow.get_tracking_uri()) if model_id else None
    if registered is not None:
        hashes, where = registered
        check_sha256(paths, hashes, f"{where} (served from {model_dir})")
        return where
    recorded = (mlmodel.get("metadata") or {}).get(METADATA_SHA256)
    if not isinstance(recorded, Mapping):
        raise ArtifactValidationError(f"{model_dir}: no registered version holds this model and MLmodel records no sha256 of its artifacts, "
                                      "so it cannot be verified; load it with the registry reachable (MLFLOW_TRACKING_URI)")  # fmt: skip
    check_sha256(paths, {str(k): str(v) for k, v in recorded.items()}, f"{model_dir} (hashes recorded in MLmodel)")
    return "MLmodel"


__all__ = ["METADATA_SHA256", "check_sha256", "registered_hashes", "verify_model_dir"]
