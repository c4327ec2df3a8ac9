"""``Tracker``: one MLflow run of a meta-training job (params, per-step metrics through a callback,
tags, plots, tables), always through an explicit client and run id, never MLflow's active run.

Every client call that is safe to repeat is retried on transient errors (``retry.py``), and a
metric is logged at most once per step: a retried pipeline step that repeats outer steps it
logged before does not log them twice."""

from __future__ import annotations

import json
import numbers
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from metaopt_core.mlops.tracking.lineage import mlflow_run_url
from metaopt_core.mlops.tracking.retry import DEFAULT_RETRY, RetryPolicy, call_with_retries, is_transient
from metaopt_core.mlops.tracking.server import (
    DEFAULT_EXPERIMENT,
    TAG_FINGERPRINT,
    TAG_GIT_COMMIT,
    connect,
    get_or_create_experiment,
    git_commit,
    resolve_tracking_uri,
)
from metaopt_core.mlops.tracking.values import (
    MAX_BATCH_METRICS,
    MAX_BATCH_PARAMS,
    MAX_KEY,
    MAX_TAG_VALUE,
    STEP_KEYS,
    as_number,
    flatten,
    history_rows,
    loss_curves_input,
    markdown_table,
    numeric_metrics,
    param_value,
    table_rows,
    to_jsonable,
)


class Tracker:
    """One MLflow run of a meta-training job: params, per-step metrics, tags, plots and tables.

    Use as a context manager (the run ends FINISHED, or FAILED / KILLED on an exception) or call
    :meth:`start` / :meth:`end`. A run resumed from ``run_id`` / ``MLFLOW_RUN_ID`` that was already
    RUNNING (the pipeline's run) is left running at the end: its owner closes it (:meth:`terminate`).

    ``client``: an ``MlflowClient`` (or anything with its methods) to use instead of connecting.
    ``retry``: how often to retry a call that failed transiently (:class:`RetryPolicy`).
    A metric key is logged at most once per step: steps already in the run's history (a resumed
    run: read once per key) are skipped.
    """

    def __init__(
        self,
        experiment: str | None = None,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        client: Any = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self._requested_run_id = run_id
        self._requested_uri = tracking_uri
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client: MlflowClient | None = client
        self.retry = retry
        self.tracking_uri: str | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._owns_run = False
        self._auto_step = 0
        self._lock = threading.Lock()
        self._logged_steps: dict[str, set[int]] = {}  # metric key -> steps in the run's history

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A client call, retried on transient errors."""
        return call_with_retries(fn, *args, policy=self.retry, **kwargs)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> Tracker:
        """Create (or resume) the run. Idempotent."""
        if self.run_id is not None:
            return self
        if self.client is None:
            self.client = connect(self._requested_uri)
        self.tracking_uri = resolve_tracking_uri(self._requested_uri)
        run_id = self._requested_run_id or os.environ.get("MLFLOW_RUN_ID") or None
        if run_id:
            try:
                run = self._call(self.client.get_run, run_id)
            except mlflow.exceptions.MlflowException as exc:
                if is_transient(exc):
                    raise
                raise LookupError(f"run_id: run {run_id!r} not found at {self.tracking_uri} ({exc.message})") from None
            self.resumed = True
            if run.info.status != "RUNNING":
                self._call(self.client.update_run, run_id, status="RUNNING")
                self._owns_run = True  # we revived it, so we close it
            if self._tags:
                self.set_tags(self._tags, run_id=run_id)
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
            return self
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") if self.experiment is None else None
        if not experiment_id:
            experiment_id = get_or_create_experiment(self.client, self.experiment or DEFAULT_EXPERIMENT)
        tags = dict(self._tags)
        commit = git_commit()
        if commit and TAG_GIT_COMMIT not in tags:
            tags[TAG_GIT_COMMIT] = commit
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)  # not retried: a lost answer would make two runs
        self.run_id, self.experiment_id = run.info.run_id, experiment_id
        self._owns_run = True
        return self

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run (``FINISHED``, ``FAILED`` or ``KILLED``) if this tracker owns it."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: got {status!r}; allowed: ['FINISHED', 'FAILED', 'KILLED']")
        if self.run_id is not None and self._owns_run:
            self._call(self.client.set_terminated, self.run_id, status=status)
            self._owns_run = False

    def terminate(self, status: str = "FINISHED") -> None:
        """End the run whoever started it: the pipeline's exit step closes the run every step
        left running."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: got {status!r}; allowed: ['FINISHED', 'FAILED', 'KILLED']")
        client, run_id = self._require_run()
        self._call(client.set_terminated, run_id, status=status)
        self._owns_run = False

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _require_run(self) -> tuple[MlflowClient, str]:
        if self.run_id is None:
            self.start()
        return self.client, self.run_id  # type: ignore[return-value]

    @property
    def run_url(self) -> str | None:
        """The run's page in the MLflow UI (``$MLFLOW_UI_URL``, else an HTTP tracking URI)."""
        return mlflow_run_url(self.tracking_uri, self.experiment_id, self.run_id)

    # ------------------------------------------------------------------ params, tags, metrics
    def log_config(self, config: Any, *, prefix: str = "", artifact_file: str | None = "config.json") -> dict[str, str]:
        """Log a run configuration as flattened params (``train.lr`` …) and the whole of it as JSON.

        Returns the params as logged. MLflow params are write-once: logging a different value for a
        key already on a resumed run raises ``ValueError`` naming the key.
        """
        flat = flatten(config, prefix)
        params = {k[:MAX_KEY]: param_value(v) for k, v in flat.items()}
        self.log_params(params)
        if artifact_file:
            self.log_dict(to_jsonable(config), artifact_file)
        return params

    def log_params(self, params: Mapping[str, Any]) -> None:
        client, run_id = self._require_run()
        items = [Param(str(k)[:MAX_KEY], param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            try:
                self._call(client.log_batch, run_id, params=items[i : i + MAX_BATCH_PARAMS])
            except mlflow.exceptions.MlflowException as exc:
                if "Changing param values is not allowed" in str(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                    raise ValueError(
                        f"params: run {run_id} already has different values for some of "
                        f"{[p.key for p in items[i : i + MAX_BATCH_PARAMS]][:10]}...; MLflow params are "
                        f"write-once ({exc.message})"
                    ) from None
                raise

    def set_tags(self, tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
        client = self.client if run_id is not None else self._require_run()[0]
        run_id = run_id or self.run_id
        items = [RunTag(str(k)[:MAX_KEY], str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self._call(client.log_batch, run_id, tags=items[i : i + MAX_BATCH_PARAMS])

    def set_fingerprint(self, fingerprint: str) -> None:
        """Tag the run with the content fingerprint of its (prepared) training data."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint: got {fingerprint!r}; allowed: a non-empty string")
        self.set_tags({TAG_FINGERPRINT: fingerprint})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Log the numeric entries of ``metrics`` (nested dicts flattened with ``.``) at ``step``.

        ``step=None`` uses an internal counter (0, 1, 2, ...). A key already logged at ``step`` (by
        this tracker, or in the history of a resumed run) is skipped. Returns what was logged.
        """
        client, run_id = self._require_run()
        with self._lock:
            if step is None:
                step = self._auto_step
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"step: got {step!r}; allowed: an int >= 0")
            self._auto_step = int(step) + 1
        values = {k: v for k, v in numeric_metrics(metrics).items() if int(step) not in self._steps_logged(k)}
        now = int(time.time() * 1000)  # one timestamp: a resent batch is the same rows
        items = [Metric(k, v, now, int(step)) for k, v in values.items()]
        for i in range(0, len(items), MAX_BATCH_METRICS):
            self._call(client.log_batch, run_id, metrics=items[i : i + MAX_BATCH_METRICS])
        for key in values:
            self._logged_steps[key].add(int(step))
        return values

    def _steps_logged(self, key: str) -> set[int]:
        """The steps at which ``key`` is in the run (a resumed run's history is read once per key)."""
        if key not in self._logged_steps:
            history = self._call(self.client.get_metric_history, self.run_id, key) if self.resumed else []
            self._logged_steps[key] = {int(m.step) for m in history}
        return self._logged_steps[key]

    def callback(self, prefix: str = "") -> Callable[[Mapping[str, Any]], None]:
        """The hook the meta-learners call once per outer step with a dict of metrics.

        The step is taken from the dict's first key among ``STEP_KEYS`` (``step``, ``outer_step``,
        ``generation``, ...), else counted. Non-numeric entries (strings, lists, loss documents) are
        ignored; nested dicts are flattened (``held_out.accuracy``). ``prefix`` namespaces the
        metrics (``"meta_train"`` -> ``meta_train.loss``).
        """

        def record(metrics: Mapping[str, Any]) -> None:
            if not isinstance(metrics, Mapping):
                raise TypeError(f"callback: got {type(metrics).__name__}; allowed: a dict of metrics")
            metrics = dict(metrics)
            step = None
            for key in STEP_KEYS:
                if key in metrics and as_number(metrics[key]) is not None:
                    step = int(as_number(metrics.pop(key)))
                    break
            if prefix:
                metrics = {prefix: metrics}
            self.log_metrics(metrics, step=step)

        return record

    def log_step(self, event: Any) -> None:
        """Log one outer step of the meta-training loop: a ``metaopt_core.meta.driver.StepEvent``
        of kind ``step`` (its metrics at its step; other kinds carry no metrics)."""
        if event.kind == "step":
            self.log_metrics({key: value for key, value in event.metrics.items() if key not in STEP_KEYS}, step=int(event.step))

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of one metric of this run, by step."""
        client, run_id = self._require_run()
        return sorted((m.step, m.value) for m in self._call(client.get_metric_history, run_id, key))

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        client, run_id = self._require_run()
        self._call(client.log_artifact, run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        client, run_id = self._require_run()
        self._call(client.log_text, run_id, text, artifact_file)

    def log_dict(self, doc: Any, artifact_file: str) -> None:
        """A JSON document as an artifact (pretty-printed, keys in insertion order)."""
        self.log_text(json.dumps(doc, indent=2, default=str) + "\n", artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact (``plots/loss.png``)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            figure.savefig(path, dpi=120, bbox_inches="tight", format="png")
            self._log_file(path, artifact_file)

    def _log_file(self, path: Path, artifact_file: str) -> None:
        """Log ``path`` under the artifact name ``artifact_file`` (directory part kept)."""
        client, run_id = self._require_run()
        directory = str(Path(artifact_file).parent)
        if path.name != Path(artifact_file).name:
            renamed = path.with_name(Path(artifact_file).name)
            path.replace(renamed)
            path = renamed
        self._call(client.log_artifact, run_id, str(path), None if directory == "." else directory)

    def log_loss_plot(
        self,
        losses: Mapping[str, Any],
        artifact_file: str = "plots/learned_loss.png",
        *,
        compare_ce: bool = True,
        title: str | None = None,
    ) -> None:
        """The learned loss(es) beside cross-entropy: loss of one example against the predicted
        probability of its labelled class (``metaopt_core.plots.plot_loss_curves``), as a PNG.
        ``losses``: label -> loss module or loss JSON document."""
        from metaopt_core.plots import plot_loss_curves

        with tempfile.TemporaryDirectory() as tmp:
            path = plot_loss_curves(loss_curves_input(losses, compare_ce=compare_ce), Path(tmp) / "plot.png", title=title)
            self._log_file(Path(path), artifact_file)

    def log_history_plot(
        self,
        history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[float]],
        artifact_file: str = "plots/meta_training.png",
        *,
        keys: Sequence[str] | None = None,
        title: str | None = None,
    ) -> None:
        """Meta-training curves (per-step dicts, one panel per metric) or optimiser convergence
        curves (``{"MetaMD": [...], "SGD": [...]}``, one panel per optimiser) as a PNG."""
        from metaopt_core.plots import plot_history

        rows, default_keys = history_rows(history)
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_history(rows, list(keys or default_keys), Path(tmp) / "plot.png", title=title)
            self._log_file(Path(path), artifact_file)

    def log_table(
        self,
        name: str,
        table: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
        *,
        columns: Sequence[str] | None = None,
        title: str | None = None,
        index: str = "name",
    ) -> list[dict]:
        """A meta-test table as ``tables/<name>.md`` (for people) and ``tables/<name>.json`` (for code)."""
        if not isinstance(name, str) or not re.fullmatch(r"[\w\-.]+", name):
            raise ValueError(f"name: got {name!r}; allowed: letters, digits, '_', '-', '.'")
        rows = table_rows(table, index)
        markdown = markdown_table(rows, columns)
        if title:
            markdown = f"### {title}\n\n{markdown}"
        self.log_text(markdown, f"tables/{name}.md")
        self.log_dict({"title": title, "columns": list(columns) if columns else None, "rows": rows}, f"tables/{name}.json")
        return rows


def start_run(experiment: str | None = None, **kwargs: Any) -> Tracker:
    """``Tracker(experiment, **kwargs).start()``."""
    return Tracker(experiment, **kwargs).start()


__all__ = ["Tracker", "start_run"]
