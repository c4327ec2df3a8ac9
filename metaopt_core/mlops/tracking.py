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

``MLFLOW_RUN_ID`` (set by KFP's MLflow integration) resumes that run instead of creating one, and
``MLFLOW_EXPERIMENT_ID`` selects the experiment of a new run. An HTTP tracking server is probed
at ``/health`` with a few bounded retries first, so a wrong or dead URI fails in seconds with
:class:`TrackingServerUnreachable` naming the URI, not after MLflow's minutes of retries.

Every call goes through an explicit ``MlflowClient`` and run id; nothing here uses MLflow's
process-global "active run", so two trackers in one process (threads, tests) do not interfere.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "metaopt"
DB_FILE = "mlflow.db"

# Tag keys shared with the registry (provenance of a registered loss / optimiser).
TAG_FINGERPRINT = "metaopt.data_fingerprint"
TAG_GIT_COMMIT = "metaopt.git_commit"
TAG_ALGORITHM = "metaopt.algorithm"

# MLflow's limits (mlflow.utils.validation): 100 params/tags per batch, 1000 metrics per batch,
# 6000 characters per param value, 8000 per run tag value, 250 per key.
_MAX_BATCH_PARAMS = 100
_MAX_BATCH_METRICS = 1000
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_KEY = 250
# Keys that carry the outer-step index inside a callback's metric dict.
STEP_KEYS = ("step", "outer_step", "generation", "iteration", "epoch")
_METRIC_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")


class TrackingServerUnreachable(ConnectionError):
    """The MLflow tracking server at a URI did not answer (after bounded retries)."""


# ---------------------------------------------------------------------------------------- URIs


def default_tracking_uri(cwd: str | os.PathLike[str] | None = None) -> str:
    """The embedded store: ``sqlite:///<cwd>/mlflow.db`` (absolute, so a later ``chdir`` is harmless)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / DB_FILE).resolve()}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    if tracking_uri is not None:
        if not isinstance(tracking_uri, str) or not tracking_uri.strip():
            raise ValueError(f"tracking_uri: got {tracking_uri!r}; allowed: a non-empty URI string or None")
        return tracking_uri.strip()
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return from_env or default_tracking_uri()


def is_http_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


_health_ok: dict[str, float] = {}  # uri -> monotonic time of the last successful probe
_health_lock = threading.Lock()
_HEALTH_CACHE_S = 30.0


def ensure_reachable(uri: str, *, attempts: int = 3, timeout_s: float = 2.0, backoff_s: float = 0.5) -> None:
    """Probe ``<uri>/health`` of an HTTP tracking server; raise :class:`TrackingServerUnreachable` if
    no attempt gets an HTTP answer. Non-HTTP URIs (SQLite, files) pass. Worst case: about
    ``attempts * timeout_s + backoff_s * (2 ** (attempts - 1) - 1)`` seconds.

    Any HTTP status other than 502/503/504 counts as reachable (a 401 from an auth proxy means the
    server is there; the real request will report the auth problem).
    """
    if not is_http_uri(uri):
        return
    if attempts < 1:
        raise ValueError(f"attempts: got {attempts!r}; allowed: an int >= 1")
    with _health_lock:
        last = _health_ok.get(uri)
    if last is not None and time.monotonic() - last < _HEALTH_CACHE_S:
        return
    url = uri.rstrip("/") + "/health"
    problem = "no attempt made"
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            urllib.request.urlopen(url, timeout=timeout_s).close()
        except urllib.error.HTTPError as exc:
            if exc.code not in (502, 503, 504):
                break
            problem = f"HTTP {exc.code} from {url}"
        except (OSError, ValueError) as exc:  # URLError, ConnectionRefused, timeouts, bad URL
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError) or isinstance(exc, ssl.SSLError):
                break  # it answered TLS; certificates are MLflow's business (MLFLOW_TRACKING_INSECURE_TLS ...)
            problem = f"{type(exc).__name__}: {reason}"
        else:
            break
    else:
        raise TrackingServerUnreachable(
            f"MLflow tracking server at {uri} is unreachable ({problem}; {attempts} attempts, "
            f"{timeout_s:g} s timeout each). Check MLFLOW_TRACKING_URI / --tracking-uri and that the "
            "server is running."
        )
    with _health_lock:
        _health_ok[uri] = time.monotonic()


def connect(tracking_uri: str | None = None, *, check: bool = True) -> MlflowClient:
    """Resolve the tracking URI, probe it (HTTP only), make it MLflow's current URI and return a client.

    MLflow's registry/artifact helpers (``mlflow.artifacts``, ``log_model``) read the process-wide
    tracking URI, so it is set here every time rather than once at import.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if check:
        ensure_reachable(uri)
    if mlflow.get_tracking_uri() != uri or os.environ.get("MLFLOW_TRACKING_URI") != uri:
        mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Experiment id for ``name``, creating it if needed (restoring it if it was deleted)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException as exc:
            # another process created it between the two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------- values


def flatten(config: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings (and pydantic models / dataclasses) to ``{"a.b.c": leaf}``; lists stay leaves."""
    config = _plain(config)
    if not isinstance(config, Mapping):
        return {prefix or "value": config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        value = _plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def _plain(value: Any) -> Any:
    """pydantic model / dataclass -> JSON-like dict; anything else unchanged."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy: pydantic models and dataclasses become dicts, tuples lists, numpy/torch
    scalars and arrays numbers and lists, paths strings (anything else: ``str``)."""
    value = _plain(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy arrays / scalars, torch tensors
        return to_jsonable(value.tolist())
    return str(value)


def param_value(value: Any) -> str:
    """How a config leaf is shown as an MLflow param: JSON for lists/None/bools, str otherwise."""
    if isinstance(value, (list, tuple, dict, bool)) or value is None:
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def metric_key(key: str) -> str:
    """A metric name MLflow accepts (alphanumerics, ``_ - . / : space``); other characters become ``_``."""
    return _METRIC_KEY_BAD_CHARS.sub("_", str(key))[:_MAX_KEY]


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metric dict as floats; strings and other objects are skipped.

    Tensors / numpy scalars with one element count as numbers. NaN and inf are kept (MLflow stores them;
    a diverged outer step should be visible, not silently dropped).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}" if not prefix else f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name))
            continue
        number = _as_number(value)
        if number is not None:
            out[metric_key(name)] = number
    return out


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item"):  # torch tensor
        return float(value.item()) if value.numel() == 1 else None
    if hasattr(value, "size") and hasattr(value, "item") and getattr(value, "size", 0) == 1:  # numpy
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; floats shown with ``digits`` decimals, missing cells empty."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(str(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_rows(table: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]], index: str = "name") -> list[dict]:
    """Rows from a list of dicts, or from ``{row_name: {column: value}}`` (the row name goes to ``index``)."""
    if isinstance(table, Mapping):
        return [{index: name, **dict(row)} for name, row in table.items()]
    if isinstance(table, (list, tuple)) and all(isinstance(r, Mapping) for r in table):
        return [dict(r) for r in table]
    raise TypeError(
        f"table: got {type(table).__name__}; allowed: a list of row dicts or a mapping {{row name: row dict}}"
    )


# ---------------------------------------------------------------------------------------- Tracker


class Tracker:
    """One MLflow run of a meta-training job: params, per-step metrics, tags, plots and tables.

    Use as a context manager (the run ends FINISHED, or FAILED / KILLED on an exception) or call
    :meth:`start` / :meth:`end`. A run resumed from ``run_id`` / ``MLFLOW_RUN_ID`` that was already
    RUNNING (KFP created it) is left running at the end: its owner closes it.
    """

    def __init__(
        self,
        experiment: str | None = None,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self._requested_run_id = run_id
        self._requested_uri = tracking_uri
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client: MlflowClient | None = None
        self.tracking_uri: str | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._owns_run = False
        self._auto_step = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "Tracker":
        """Create (or resume) the run. Idempotent."""
        if self.run_id is not None:
            return self
        self.client = connect(self._requested_uri)
        self.tracking_uri = resolve_tracking_uri(self._requested_uri)
        run_id = self._requested_run_id or os.environ.get("MLFLOW_RUN_ID") or None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException as exc:
                raise LookupError(f"run_id: run {run_id!r} not found at {self.tracking_uri} ({exc.message})") from None
            self.resumed = True
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
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
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id, self.experiment_id = run.info.run_id, experiment_id
        self._owns_run = True
        return self

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run (``FINISHED``, ``FAILED`` or ``KILLED``) if this tracker owns it."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: got {status!r}; allowed: ['FINISHED', 'FAILED', 'KILLED']")
        if self.run_id is not None and self._owns_run:
            self.client.set_terminated(self.run_id, status=status)
            self._owns_run = False

    def __enter__(self) -> "Tracker":
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
        """The run's page in the MLflow UI (HTTP tracking servers only)."""
        if self.tracking_uri and is_http_uri(self.tracking_uri) and self.run_id:
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return None

    # ------------------------------------------------------------------ params, tags, metrics
    def log_config(self, config: Any, *, prefix: str = "", artifact_file: str | None = "config.json") -> dict[str, str]:
        """Log a run configuration as flattened params (``train.lr`` …) and the whole of it as JSON.

        Returns the params as logged. MLflow params are write-once: logging a different value for a
        key already on a resumed run raises ``ValueError`` naming the key.
        """
        flat = flatten(config, prefix)
        params = {k[:_MAX_KEY]: param_value(v) for k, v in flat.items()}
        self.log_params(params)
        if artifact_file:
            self.log_dict(to_jsonable(config), artifact_file)
        return params

    def log_params(self, params: Mapping[str, Any]) -> None:
        client, run_id = self._require_run()
        items = [Param(str(k)[:_MAX_KEY], param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_BATCH_PARAMS):
            try:
                client.log_batch(run_id, params=items[i : i + _MAX_BATCH_PARAMS])
            except mlflow.exceptions.MlflowException as exc:
                if "Changing param values is not allowed" in str(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                    raise ValueError(
                        f"params: run {run_id} already has different values for some of "
                        f"{[p.key for p in items[i:i + _MAX_BATCH_PARAMS]][:10]}...; MLflow params are "
                        f"write-once ({exc.message})"
                    ) from None
                raise

    def set_tags(self, tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
        client = self.client if run_id is not None else self._require_run()[0]
        run_id = run_id or self.run_id
        items = [RunTag(str(k)[:_MAX_KEY], str(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_BATCH_PARAMS):
            client.log_batch(run_id, tags=items[i : i + _MAX_BATCH_PARAMS])

    def set_fingerprint(self, fingerprint: str) -> None:
        """Tag the run with the content fingerprint of its (prepared) training data."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint: got {fingerprint!r}; allowed: a non-empty string")
        self.set_tags({TAG_FINGERPRINT: fingerprint})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Log the numeric entries of ``metrics`` (nested dicts flattened with ``.``) at ``step``.

        ``step=None`` uses an internal counter (0, 1, 2, ...). Returns what was logged.
        """
        client, run_id = self._require_run()
        with self._lock:
            if step is None:
                step = self._auto_step
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"step: got {step!r}; allowed: an int >= 0")
            self._auto_step = int(step) + 1
        values = numeric_metrics(metrics)
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in values.items()]
        for i in range(0, len(items), _MAX_BATCH_METRICS):
            client.log_batch(run_id, metrics=items[i : i + _MAX_BATCH_METRICS])
        return values

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
                if key in metrics and _as_number(metrics[key]) is not None:
                    step = int(_as_number(metrics.pop(key)))
                    break
            if prefix:
                metrics = {prefix: metrics}
            self.log_metrics(metrics, step=step)

        return record

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of one metric of this run, by step."""
        client, run_id = self._require_run()
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        client, run_id = self._require_run()
        client.log_artifact(run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        client, run_id = self._require_run()
        client.log_text(run_id, text, artifact_file)

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
        client.log_artifact(run_id, str(path), None if directory == "." else directory)

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


def loss_curves_input(losses: Mapping[str, Any], *, compare_ce: bool = True) -> dict[str, Any]:
    """Label -> loss module for ``plots.plot_loss_curves``: loss documents built, cross-entropy added."""
    import torch

    modules = {str(label): _as_loss_module(loss) for label, loss in losses.items()}
    if compare_ce:
        modules.setdefault("cross-entropy", torch.nn.CrossEntropyLoss())
    return modules


def history_rows(history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[float]]) -> tuple[list[dict], list[str]]:
    """Rows for ``plots.plot_history`` and the numeric keys worth plotting (step keys excluded).

    Named series ``{"MetaMD": [f0, f1, ...], ...}`` become rows ``{"step": k, "MetaMD": f_k, ...}``."""
    if isinstance(history, Mapping):
        length = max((len(v) for v in history.values()), default=0)
        rows = [{"step": k, **{str(name): float(v[k]) for name, v in history.items() if k < len(v)}} for k in range(length)]
        return rows, [str(name) for name in history]
    rows = [dict(row) for row in history]
    keys = [
        k
        for k in dict.fromkeys(k for row in rows for k in row)
        if k not in STEP_KEYS and any(isinstance(_as_number(row.get(k)), float) and not isinstance(row.get(k), bool) for row in rows)
    ]
    return rows, keys


def _as_loss_module(loss: Any) -> Any:
    if isinstance(loss, Mapping):
        from metaopt_core.mlops.registry import loss_from_doc

        return loss_from_doc(loss)
    return loss


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The checked-out commit (``GIT_COMMIT`` / ``METAOPT_GIT_COMMIT`` env first, for containers
    built without ``.git``), or None when unknown."""
    for name in ("METAOPT_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(name):
            return os.environ[name]
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=str(cwd) if cwd else str(Path(__file__).resolve().parent),
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def start_run(experiment: str | None = None, **kwargs: Any) -> Tracker:
    """``Tracker(experiment, **kwargs).start()``."""
    return Tracker(experiment, **kwargs).start()


__all__ = [
    "DEFAULT_EXPERIMENT",
    "STEP_KEYS",
    "TAG_FINGERPRINT",
    "TAG_GIT_COMMIT",
    "Tracker",
    "TrackingServerUnreachable",
    "connect",
    "default_tracking_uri",
    "ensure_reachable",
    "flatten",
    "git_commit",
    "markdown_table",
    "history_rows",
    "loss_curves_input",
    "resolve_tracking_uri",
    "start_run",
    "to_jsonable",
]
