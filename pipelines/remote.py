"""Kubeflow Pipelines clusters: submit a run, and manage recurring (scheduled) meta-trainings.

    submit("itl", host="http://localhost:8080")                       # one run now
    schedule_create("itl", host=..., cron="0 0 3 * * 0")               # Sundays 03:00:00
    schedule_list(host=...); schedule_delete(host=..., recurring_run_id=...)

The pipeline is compiled here (same DAG as the local runner, with the cluster wiring of
``infra/``: the ``metaopt-runtime`` ConfigMap and ``metaopt-s3`` Secret on every step) and the
YAML is uploaded with the run. A recurring run re-runs the whole pipeline on its schedule; its
``check_new_data`` step skips meta-training unless the data's fingerprint changed.

KFP's cron expressions have six fields, seconds first (``sec min hour day-of-month month
day-of-week``); :func:`validate_cron` rejects the five-field Unix form with a corrected example.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from metaopt_core.config import read_config
from pipelines.builder import PipelineOptions, compile_pipeline, learner_of, parameter_config
from pipelines.kfp_client import Connection, connect, upload

CRON_FIELDS = (
    ("seconds", 0, 59),
    ("minutes", 0, 59),
    ("hours", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
_NAMES = {
    "month": ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    "day of week": ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"),
}
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def validate_cron(expression: str) -> str:
    """Check a KFP (robfig/cron) schedule: six space-separated fields, seconds first; each field
    ``*``, ``?`` (day fields), numbers in range, names (JAN, MON), lists, ranges and ``/step``.
    Also accepts ``@daily``-style descriptors and ``@every <duration>``. Returns it normalised."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"cron: got {expression!r}; allowed: six fields 'sec min hour day-of-month month day-of-week', e.g. '0 0 3 * * 0'")
    text = " ".join(expression.split())
    if text.startswith("@"):
        if text in _DESCRIPTORS or re.fullmatch(r"@every (\d+(ns|us|µs|ms|s|m|h))+", text):
            return text
        raise ValueError(f"cron: got {text!r}; allowed descriptors: {list(_DESCRIPTORS)} or '@every <duration>' (e.g. '@every 6h')")
    fields = text.split(" ")
    if len(fields) == 5:
        raise ValueError(
            f"cron: got 5 fields {text!r} (the Unix form); Kubeflow Pipelines wants 6, seconds first: '0 {text}' runs at second 0 of the same schedule"
        )
    if len(fields) != 6:
        raise ValueError(f"cron: got {len(fields)} fields in {text!r}; allowed: 6 fields 'sec min hour day-of-month month day-of-week', e.g. '0 0 3 * * 0'")
    for value, (name, low, high) in zip(fields, CRON_FIELDS):
        _check_cron_field(value, name, low, high, text)
    return text


def _check_cron_field(value: str, name: str, low: int, high: int, text: str) -> None:
    def fail(detail: str) -> ValueError:
        return ValueError(f"cron: {name} field {value!r} in {text!r}: {detail}; allowed: *, numbers {low}-{high}, lists a,b, ranges a-b, steps */n")

    if value == "?" and name in ("day of month", "day of week"):
        return
    names = _NAMES.get(name, ())
    for part in value.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise fail(f"step {step!r} is not a positive number")
        if base == "*":
            continue
        bounds = base.split("-")
        if len(bounds) > 2 or not all(bounds):
            raise fail(f"{part!r} is not a number, name or range")
        for bound in bounds:
            if bound.upper() in names:
                continue
            if not bound.isdigit():
                raise fail(f"{bound!r} is not a number" + (f" or one of {list(names)}" if names else ""))
            if not low <= int(bound) <= high:
                raise fail(f"{bound} is out of range")


def target(host: str | Connection, namespace: str | None = None) -> Connection:
    """``host`` as a :class:`~pipelines.kfp_client.Connection` (a URL: no credentials, ``namespace`` if given)."""
    return host if isinstance(host, Connection) else Connection(host, namespace)


def client(host: str | Connection, namespace: str | None = None) -> Any:
    """A ``kfp.Client`` for the KFP API at ``host`` (a URL such as http://localhost:8080, or a Connection with credentials)."""
    return connect(target(host, namespace))


def pipeline_arguments(
    algorithm: str,
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    config_uri: str | None = None,
    force_retrain: bool = False,
    model_name: str | None = None,
    meta_test_settings: Mapping[str, Any] | None = None,
    experiment: str | None = None,
    promotion_margin: float | None = None,
) -> dict:
    """The run's pipeline arguments: only what differs from the compiled defaults. A local config
    file is sent as the ``config`` parameter (its content); ``config_uri`` names one the cluster reads."""
    learner_of(algorithm)  # an unknown name fails here, listing the known ones
    arguments: dict[str, Any] = {}
    if config is not None and config_uri:
        raise ValueError("config, config_uri: give one of them (a local file sent with the run, or a URI the cluster reads)")
    if config is not None:
        doc = read_config(config, algorithm=algorithm)
        arguments["config"] = parameter_config(algorithm, doc)
    if config_uri:
        arguments["config_uri"] = config_uri
    if force_retrain:
        arguments["force_retrain"] = True
    if model_name:
        arguments["model_name"] = model_name
    if meta_test_settings:
        arguments["meta_test_settings"] = dict(meta_test_settings)
    if experiment:
        arguments["experiment"] = experiment
    if promotion_margin is not None:
        arguments["promotion_margin"] = float(promotion_margin)
    return arguments


def submit(
    algorithm: str,
    host: str | Connection,
    arguments: Mapping[str, Any] | None = None,
    *,
    options: PipelineOptions | None = None,
    run_name: str | None = None,
    kfp_experiment: str = "metaopt",
    namespace: str | None = None,
    wait_s: float | None = None,
) -> dict:
    """Compile and submit one run; with ``wait_s`` wait for it to finish. Returns run id, URL, state."""
    conn = target(host, namespace)
    namespace, host = conn.namespace, conn.host
    kfp_client = connect(conn)
    with tempfile.TemporaryDirectory() as scratch:
        path = compile_pipeline(algorithm, Path(scratch) / f"{algorithm}.yaml", options or PipelineOptions())
        result = kfp_client.create_run_from_pipeline_package(
            str(path), arguments=dict(arguments or {}), run_name=run_name, experiment_name=kfp_experiment, namespace=namespace
        )
    out = {"run_id": result.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}", "state": "SUBMITTED"}
    if wait_s:
        run = kfp_client.wait_for_run_completion(result.run_id, timeout=wait_s)
        out["state"] = str(getattr(run, "state", "UNKNOWN"))
    return out


def schedule_create(
    algorithm: str,
    host: str | Connection,
    cron: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    options: PipelineOptions | None = None,
    name: str | None = None,
    kfp_experiment: str = "metaopt",
    namespace: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
) -> dict:
    """A KFP recurring run of the ``algorithm`` pipeline on a six-field ``cron`` schedule. At most
    ``max_concurrency`` runs at once (1: never two meta-trainings of one model together); after
    downtime it runs once, not once per missed slot, unless ``catchup``."""
    learner_of(algorithm)  # an unknown name fails here, listing the known ones
    cron = validate_cron(cron)
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or not 1 <= max_concurrency <= 10:
        raise ValueError(f"max_concurrency: got {max_concurrency!r}; allowed: an int from 1 to 10")
    conn = target(host, namespace)
    namespace = conn.namespace
    kfp_client = connect(conn)
    experiment = kfp_client.create_experiment(kfp_experiment, namespace=namespace)
    job_name = name or f"metaopt-{algorithm}-scheduled"
    with tempfile.TemporaryDirectory() as scratch:
        path = compile_pipeline(algorithm, Path(scratch) / f"{algorithm}.yaml", options or PipelineOptions())
        recurring = kfp_client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=job_name,
            description=f"metaopt {algorithm}: re-meta-train on new data ({cron})", cron_expression=cron,
            max_concurrency=max_concurrency, no_catchup=not catchup, params=dict(arguments or {}),
            pipeline_package_path=str(path), enabled=True,
        )  # fmt: skip
    return {"id": recurring.recurring_run_id, "name": job_name, "cron": cron, "experiment_id": experiment.experiment_id}


def schedule_list(host: str | Connection, *, namespace: str | None = None, page_size: int = 100) -> list[dict]:
    """Every recurring run the endpoint knows (all pages; multi-user: those of the namespace), with its schedule and status."""
    conn = target(host, namespace)
    namespace = conn.namespace
    kfp_client = connect(conn)
    rows, token = [], ""
    while True:
        page = kfp_client.list_recurring_runs(page_token=token, page_size=page_size, namespace=namespace)
        for item in page.recurring_runs or []:
            trigger = getattr(item, "trigger", None)
            cron = getattr(getattr(trigger, "cron_schedule", None), "cron", None) if trigger else None
            rows.append({"id": item.recurring_run_id, "name": item.display_name, "cron": cron or "",
                         "status": str(item.status or ""), "created": str(item.created_at or "")})  # fmt: skip
        token = page.next_page_token
        if not token:
            return rows


def schedule_delete(host: str | Connection, recurring_run_id: str, *, namespace: str | None = None) -> None:
    if not isinstance(recurring_run_id, str) or not recurring_run_id.strip():
        raise ValueError(f"recurring_run_id: got {recurring_run_id!r}; allowed: an id from `metaopt schedule list`")
    client(host, namespace).delete_recurring_run(recurring_run_id)


def upload_pipeline(
    algorithm: str,
    host: str | Connection,
    *,
    options: PipelineOptions | None = None,
    config: Mapping[str, Any] | None = None,
    namespace: str | None = None,
    version: str | None = None,
) -> dict:
    """Compile the ``algorithm`` pipeline and upload it as ``metaopt-<algorithm>``: created the first
    time, a new version every time after, so a run can be started from the UI's Pipelines page."""
    learner = learner_of(algorithm)
    conn = target(host, namespace)
    options = options or PipelineOptions()
    with tempfile.TemporaryDirectory() as scratch:
        path = compile_pipeline(algorithm, Path(scratch) / f"{algorithm}.yaml", options, dict(config) if config is not None else None)
        description = f"{learner.description}. {options.describe()}. Image {options.image_cuda if options.gpu else options.image}."
        return upload(connect(conn), path, f"metaopt-{learner.name}", namespace=conn.namespace, description=description, version=version)


__all__ = ["client", "target", "upload_pipeline", "pipeline_arguments", "schedule_create", "schedule_delete", "schedule_list", "submit", "validate_cron"]
