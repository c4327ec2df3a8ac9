"""Lineage between a Kubeflow pipeline run and its MLflow run, both ways: the tags naming the KFP run
on the MLflow run (its id always, its UI page when ``KFP_UI_URL`` says where the UI is), the page
of an MLflow run (HTTP tracking servers), and finding a pipeline run's MLflow run by the KFP run id
(what the pipeline's exit step does: it cannot take outputs of the steps it guards)."""

from __future__ import annotations

import os
from typing import Any

from metaopt_core.mlops.tracking.retry import DEFAULT_RETRY, RetryPolicy, call_with_retries
from metaopt_core.mlops.tracking.server import connect, is_http_uri

TAG_KFP_RUN_ID = "metaopt.kfp_run_id"
TAG_KFP_RUN_NAME = "metaopt.pipeline_run"
TAG_KFP_RUN_URL = "metaopt.kfp_run_url"
# The Kubeflow Pipelines UI as users reach it (e.g. https://kubeflow.example.com/pipeline); unset or
# empty: run pages are not linked, only the run id is tagged.
KFP_UI_URL_ENV = "KFP_UI_URL"
# The MLflow UI as users reach it, when that is not the tracking URI the steps use (in a cluster the
# steps talk to http://mlflow.metaopt.svc.cluster.local:5000, which no browser resolves). Unset or
# empty: run pages are linked under an HTTP tracking URI.
MLFLOW_UI_URL_ENV = "MLFLOW_UI_URL"


def kfp_run_url(kfp_run_id: str, base: str | None = None) -> str | None:
    """The run's page in the KFP UI, ``{base}/#/runs/details/{id}`` (``base``: default ``$KFP_UI_URL``;
    None when neither is set, or without a run id)."""
    base = (os.environ.get(KFP_UI_URL_ENV, "") if base is None else base).strip()
    if not base or not kfp_run_id:
        return None
    return f"{base.rstrip('/')}/#/runs/details/{kfp_run_id}"


def mlflow_run_url(tracking_uri: str | None, experiment_id: str | None, run_id: str | None, base: str | None = None) -> str | None:
    """The run's page in the MLflow UI, ``{base}/#/experiments/{experiment}/runs/{run}``. ``base``:
    default ``$MLFLOW_UI_URL``; when neither is set, an HTTP(S) tracking URI (None otherwise: a
    SQLite store has no UI of its own)."""
    base = (os.environ.get(MLFLOW_UI_URL_ENV, "") if base is None else base).strip()
    if not base and tracking_uri and is_http_uri(tracking_uri):
        base = tracking_uri
    if base and experiment_id and run_id:
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def kfp_tags(kfp_run_id: str, kfp_run_name: str = "", base: str | None = None) -> dict[str, str]:
    """The tags naming the KFP run on its MLflow run: id, name, and the UI page when known."""
    tags = {TAG_KFP_RUN_ID: kfp_run_id, TAG_KFP_RUN_NAME: kfp_run_name}
    url = kfp_run_url(kfp_run_id, base)
    if url:
        tags[TAG_KFP_RUN_URL] = url
    return {key: value for key, value in tags.items() if value}


def find_pipeline_run(kfp_run_id: str, *, tracking_uri: str | None = None, client: Any = None, retry: RetryPolicy = DEFAULT_RETRY) -> Any:
    """The MLflow run (``mlflow.entities.Run``) tagged with ``kfp_run_id``, in any experiment; the
    oldest if a retried step made more than one; None when there is none (the pipeline skipped
    meta-training, or failed before it created the run)."""
    if not kfp_run_id:
        return None
    client = client or connect(tracking_uri)
    experiments = [e.experiment_id for e in call_with_retries(client.search_experiments, policy=retry)]
    quoted = kfp_run_id.replace("'", "\\'")
    found = []
    for start in range(0, len(experiments), 100):  # the search takes a bounded list of experiments
        found += call_with_retries(client.search_runs, experiments[start : start + 100], f"tags.`{TAG_KFP_RUN_ID}` = '{quoted}'",
                                   max_results=10, policy=retry)  # fmt: skip
    return min(found, key=lambda run: run.info.start_time or 0) if found else None


__all__ = [
    "KFP_UI_URL_ENV",
    "MLFLOW_UI_URL_ENV",
    "TAG_KFP_RUN_ID",
    "TAG_KFP_RUN_NAME",
    "TAG_KFP_RUN_URL",
    "find_pipeline_run",
    "kfp_run_url",
    "kfp_tags",
    "mlflow_run_url",
]
