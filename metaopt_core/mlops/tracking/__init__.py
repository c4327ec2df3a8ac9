"""MLflow tracking for meta-training runs, behind a small API the algorithms reach through a callback.

The algorithm modules (``metaopt_core.meta.*``) never import MLflow: they accept a
``callback(metrics: dict)`` and call it once per outer step. A component (or ``run()``) wires it::

    from metaopt_core.mlops.tracking import Tracker

    with Tracker(experiment="itl", run_name="itl-demo") as tracker:
        tracker.log_config(config)                  # flattened params + config.json
        tracker.set_fingerprint(data.fingerprint)   # tag metaopt.data_fingerprint
        result = itl.run(config, callback=tracker.callback())   # {"step": k, "meta_loss": ...}
        tracker.log_loss_plot({"learned": result.best_loss})
        tracker.log_table("meta_test", rows)        # tables/meta_test.md + .json

Where runs go (first match wins):

1. the ``tracking_uri`` argument,
2. ``MLFLOW_TRACKING_URI`` (a cluster's tracking server, ``http://mlflow:5000``),
3. the embedded default ``sqlite:///<cwd>/mlflow.db`` (MLflow 3 refuses a plain ``./mlruns``
   file store by default, so the local default is a SQLite file).

A pipeline run has one MLflow run, tagged with the KFP run id (``lineage``: ``metaopt.kfp_run_id``,
the KFP UI page when ``KFP_UI_URL`` is set); every step logs into it and the pipeline's exit step
ends it. Client calls are retried on transient errors (``retry``). A run whose local owner process
died (``kill -9``) is found and ended KILLED with a note by the next run of its model (``owners``).

``MLFLOW_RUN_ID`` (set by KFP's MLflow integration) resumes that run instead of creating one, and
``MLFLOW_EXPERIMENT_ID`` selects the experiment of a new run. An HTTP tracking server is probed
at ``/health`` with a few bounded retries first, so a wrong or dead URI fails in seconds with
:class:`TrackingServerUnreachable` naming the URI, not after MLflow's minutes of retries.

Every call goes through an explicit ``MlflowClient`` and run id; nothing here uses MLflow's
process-global "active run", so two trackers in one process (threads, tests) do not interfere.
"""

from metaopt_core.mlops.tracking.lineage import (
    KFP_UI_URL_ENV,
    MLFLOW_UI_URL_ENV,
    TAG_KFP_RUN_ID,
    TAG_KFP_RUN_NAME,
    TAG_KFP_RUN_URL,
    find_pipeline_run,
    kfp_run_url,
    kfp_tags,
    mlflow_run_url,
)
from metaopt_core.mlops.tracking.owners import OWNER_ENV, TAG_OWNER, end_owned_runs, end_stale_runs, owner_state, owner_token
from metaopt_core.mlops.tracking.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy, call_with_retries, is_transient
from metaopt_core.mlops.tracking.server import (
    DB_FILE,
    DEFAULT_EXPERIMENT,
    TAG_ALGORITHM,
    TAG_FINGERPRINT,
    TAG_GIT_COMMIT,
    TrackingServerUnreachable,
    connect,
    default_tracking_uri,
    ensure_reachable,
    get_or_create_experiment,
    git_commit,
    is_http_uri,
    resolve_tracking_uri,
)
from metaopt_core.mlops.tracking.tracker import Tracker, start_run
from metaopt_core.mlops.tracking.trainings import (
    TAG_CONFIG_HASH,
    FinishedTraining,
    config_hash,
    finished_training_tags,
    last_finished_training,
)
from metaopt_core.mlops.tracking.values import (
    STEP_KEYS,
    flatten,
    history_rows,
    loss_curves_input,
    markdown_table,
    metric_key,
    numeric_metrics,
    param_value,
    table_rows,
    to_jsonable,
)

__all__ = [
    "DB_FILE",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_RETRY",
    "FinishedTraining",
    "KFP_UI_URL_ENV",
    "MLFLOW_UI_URL_ENV",
    "NO_RETRY",
    "OWNER_ENV",
    "RetryPolicy",
    "STEP_KEYS",
    "TAG_ALGORITHM",
    "TAG_CONFIG_HASH",
    "TAG_FINGERPRINT",
    "TAG_GIT_COMMIT",
    "TAG_KFP_RUN_ID",
    "TAG_KFP_RUN_NAME",
    "TAG_KFP_RUN_URL",
    "TAG_OWNER",
    "Tracker",
    "TrackingServerUnreachable",
    "call_with_retries",
    "config_hash",
    "connect",
    "default_tracking_uri",
    "end_owned_runs",
    "end_stale_runs",
    "ensure_reachable",
    "find_pipeline_run",
    "finished_training_tags",
    "flatten",
    "get_or_create_experiment",
    "git_commit",
    "history_rows",
    "is_http_uri",
    "is_transient",
    "kfp_run_url",
    "kfp_tags",
    "last_finished_training",
    "loss_curves_input",
    "markdown_table",
    "metric_key",
    "mlflow_run_url",
    "numeric_metrics",
    "owner_state",
    "owner_token",
    "param_value",
    "resolve_tracking_uri",
    "start_run",
    "table_rows",
    "to_jsonable",
]
