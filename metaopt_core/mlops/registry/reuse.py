"""Registration that is idempotent across a killed run: a pipeline run killed after it registered
its version (before its MLflow run could end FINISHED) did not finish, so the next run of the same
data and configuration meta-trains (resuming its checkpoint) and registers again. It must not add
a second version of the same thing: it reuses the one the killed run registered, found by the
data fingerprint and configuration hash the version is tagged with, among versions whose MLflow
run ended KILLED or FAILED (a local run whose runner died is ended KILLED before the next one
starts: ``tracking.owners``). A finished run's version is not reused: a new run of the same data
and configuration then only happens when forced, and the user asked for a new version; nor is a
RUNNING run's (a run in progress owns its version)."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from metaopt_core.mlops.registry.register import RegisteredVersion, _check_model_name
from metaopt_core.mlops.tracking import TAG_CONFIG_HASH, TAG_FINGERPRINT, call_with_retries, connect


def _quote(text: str) -> str:
    return str(text).replace("'", "\\'")


def unfinished_registration(name: str, fingerprint: str, config_digest: str, *, tracking_uri: str | None = None) -> RegisteredVersion | None:
    """The oldest version of ``name`` tagged with this data fingerprint and configuration hash whose
    MLflow run ended KILLED or FAILED (or was deleted); None if none."""
    if not fingerprint or not config_digest:
        return None
    _check_model_name(name)
    client = connect(tracking_uri)
    query = f"name='{_quote(name)}' and tags.`{TAG_FINGERPRINT}` = '{_quote(fingerprint)}' and tags.`{TAG_CONFIG_HASH}` = '{_quote(config_digest)}'"
    try:
        found = call_with_retries(client.search_model_versions, query)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for version in sorted(found, key=lambda mv: int(mv.version)):
        try:
            status = call_with_retries(client.get_run, version.run_id).info.status if version.run_id else ""
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            status = ""
        if status in ("KILLED", "FAILED", ""):
            return RegisteredVersion(name=name, version=str(version.version), model_uri=f"models:/{name}/{version.version}",
                                     run_id=version.run_id or "", model_id=getattr(version, "model_id", None) or "", tags=dict(version.tags or {}))  # fmt: skip
    return None


__all__ = ["unfinished_registration"]
