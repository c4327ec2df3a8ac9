"""The embedded default: run a pipeline's DAG on this machine with ``kfp.local`` (each step a
subprocess in this Python environment, no containers) and MLflow on ``sqlite:///<cwd>/mlflow.db``.

    summary = run_local("itl", "configs/itl-demo.yaml")     # the same DAG a cluster runs
    summary["model_uri"], summary["decision"]

What is printed while it runs: one line per step (started / finished with its time) and the
steps' own ``[metaopt]`` progress lines (generations, outer steps, meta-test runs). Everything
KFP prints — executor inputs, artifact listings, tracebacks — goes to a log file under
``.metaopt/logs/``; when a step fails, its last lines are printed and the error names the log.
Every run has its own files (``pipelines/local_runs.py``), so runs started at the same moment do
not read each other's configuration.

Kills lose nothing: the steps checkpoint meta-training under ``.metaopt/checkpoints/``, keyed by the
data fingerprint and the configuration hash, and a later run of the same data and configuration
resumes from there (``components/resume.py``); the MLflow run of a runner that died (``kill -9``) is
ended KILLED, with a note, when the next run of its model starts (``metaopt_core.mlops.tracking.owners``).

The pipeline's exit step ends its MLflow run (FINISHED, or FAILED when a step failed) here as on a
cluster (``kfp.local`` runs ``dsl.ExitHandler``s); the pipeline returns that step's lineage, and the
final step writes the run's summary to ``$METAOPT_SUMMARY_FILE``, which this runner sets.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from components.lineage import SUMMARY_FILE_ENV
from components.resume import CHECKPOINT_ROOT_ENV
from metaopt_core.config import apply_overrides, read_config
from pipelines.builder import PipelineOptions, build_pipeline, default_config, default_config_path, learner_of
from pipelines.local_runs import KEEP_RUNS, STATE_DIR, prune_runs, run_files, stop_steps_on_sigterm, store_first_use

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_PROGRESS = "[metaopt] "

Echo = Callable[[str], None]


class PipelineFailed(RuntimeError):
    """A step of a local pipeline run failed; the message names the step and the log file."""


def _task_names(pipeline: Any) -> dict[str, str]:
    """Task key (what kfp.local reports) -> display name, over every DAG of the compiled spec."""
    spec = pipeline.pipeline_spec
    names: dict[str, str] = {}
    dags = [spec.root.dag] + [component.dag for component in spec.components.values() if component.HasField("dag")]
    for dag in dags:
        for key, task in dag.tasks.items():
            names[key] = task.task_info.name or key
    return names


class _ProgressFilter(io.TextIOBase):
    """A stdout stand-in: every line goes to the log file; step boundaries and ``[metaopt]``
    lines are echoed. Keeps each step's lines to show them when it fails."""

    def __init__(self, log: Any, echo: Echo | None, names: Mapping[str, str], original: Any) -> None:
        self.log, self.names, self.original = log, names, original
        self._echo = echo
        self.pending = ""
        self.started: dict[str, float] = {}
        self.current: str | None = None
        self.task_lines: list[str] = []
        self.failed: tuple[str, list[str]] | None = None

    def writable(self) -> bool:
        return True

    def echo(self, line: str) -> None:
        """Show a line on the real stdout (kfp.local patches ``print`` and stdout while a step runs)."""
        if self._echo is None:
            self.original.write(line + "\n")
            self.original.flush()
            return
        redirected = sys.stdout
        sys.stdout = self.original
        try:
            self._echo(line)
        finally:
            sys.stdout = redirected

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def _line(self, line: str) -> None:
        started = _EXECUTING.search(line)
        if started:
            self.current = started.group(1)
            self.started[self.current] = time.monotonic()
            self.task_lines = []
            self.echo(f"  ▸ {self.names.get(self.current, self.current)}")
            return
        finished = _FINISHED.search(line)
        if finished:
            key, status = finished.groups()
            seconds = time.monotonic() - self.started.get(key, time.monotonic())
            mark = "✓" if status == "SUCCESS" else "✗"
            self.echo(f"  {mark} {self.names.get(key, key)} ({seconds:.1f} s)")
            if status != "SUCCESS":
                self.failed = (self.names.get(key, key), list(self.task_lines))
            self.current = None
            return
        if self.current is not None:
            self.task_lines.append(line)
            if len(self.task_lines) > 400:
                del self.task_lines[:200]
        position = line.find(_PROGRESS)
        if position >= 0:
            self.echo(f"      {line[position + len(_PROGRESS) :]}")


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the steps' subprocesses; restore after."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _forget_handlers_on(stream: Any, root_level: int) -> None:
    """Remove logging handlers left writing to ``stream`` (the run's stdout stand-in, whose log file
    closes with the run) and restore the root level: kfp.local logs a failed run's clean-up outside
    its own logging context, and later log records would otherwise fail on the closed file."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in [h for h in logger.handlers if getattr(h, "stream", None) is stream]:
            logger.removeHandler(handler)
    logging.getLogger().setLevel(root_level)


def resolve_config_arg(algorithm: str, config: str | Path | Mapping[str, Any] | None) -> tuple[dict, Path | None]:
    """(config dict, its file or None): a file, a mapping, or the pipeline's demo configuration."""
    if config is None:
        path = default_config_path(algorithm)
        return (read_config(path, algorithm=algorithm), path) if path else (default_config(algorithm), None)
    if isinstance(config, Mapping):
        return read_config(config, algorithm=algorithm), None
    return read_config(config, algorithm=algorithm), Path(config).resolve()


def run_local(
    algorithm: str,
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    options: PipelineOptions | None = None,
    tracking_uri: str | None = None,
    workdir: str | Path | None = None,
    force_retrain: bool = False,
    model_name: str | None = None,
    meta_test_settings: Mapping[str, Any] | None = None,
    experiment: str = "metaopt",
    promotion_margin: float = 0.0,
    overrides: Mapping[str, Any] | None = None,
    echo: Echo | None = None,
) -> dict:
    """Run the pipeline of the learner called ``algorithm`` locally; returns its summary (``status`` trained | skipped,
    ``model_uri``, ``version``, ``decision``, ``production_version``, ``run_id``, ``scores``, ...,
    plus ``seconds`` and ``log``).

    ``config``: a YAML/JSON file, a mapping, or None for the demo configuration. ``tracking_uri``:
    default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db``. ``workdir`` (default
    the current directory) holds ``mlflow.db`` and ``.metaopt/`` (this run's own folder, its log, and
    meta-training checkpoints a later run of the same data and configuration resumes: ``pipelines/local_runs.py``).
    ``overrides``: ``{"train.epochs": 4, ...}`` set in the configuration (a preset, ``--set``).
    ``echo``: where progress lines go (default: stdout).
    """
    from kfp import local

    from metaopt_core.mlops.tracking import (
        OWNER_ENV,
        default_tracking_uri,
        end_owned_runs,
        end_stale_runs,
        ensure_reachable,
        owner_token,
        resolve_tracking_uri,
    )

    learner = learner_of(algorithm)
    doc, config_file = resolve_config_arg(algorithm, config)
    source = str(config_file) if config_file is not None else "the given mapping"
    changes = describe_overrides(doc, overrides)
    if overrides:
        doc, config_file = apply_overrides(doc, dict(overrides)), None
    learner.resolve_config(doc, source=str(config_file or "config"))  # fail here, naming the field, not in a step
    if meta_test_settings:
        learner.resolve_meta_test(meta_test_settings)
    options = options or PipelineOptions(cluster_env=False, retries=False)
    if options.gpu:
        raise ValueError("options.gpu: the local runner is CPU only; compile with --gpu for a cluster instead")
    workdir = Path(workdir or Path.cwd()).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    uri = resolve_tracking_uri(uri)
    ensure_reachable(uri)
    name = model_name or learner.name
    with run_files(workdir, algorithm) as files:
        if config_file is None:  # a mapping or overrides: the steps read it from this run's own file, like a cluster reads s3://
            files.config.write_text(json.dumps(doc, indent=2))
            config_file = files.config
        pipeline = build_pipeline(algorithm, options)
        # the configuration goes as config_uri (a file the steps read), so it may hold nulls
        arguments: dict[str, Any] = {"config_uri": str(config_file), "force_retrain": bool(force_retrain), "experiment": experiment,
                                     "promotion_margin": float(promotion_margin)}  # fmt: skip
        if model_name:
            arguments["model_name"] = model_name
        if meta_test_settings:
            arguments["meta_test_settings"] = dict(meta_test_settings)
        show = echo or (lambda line: print(line, flush=True))
        show(f"{algorithm}: running pipeline metaopt-{algorithm} locally ({options.describe()}); config {source}; MLflow {uri}")
        if changes:
            show(f"{algorithm}: overrides {changes}")
        with store_first_use(uri):  # the first to open a new mlflow.db creates its tables
            stale_runs = end_stale_runs(name, by=f"metaopt run {algorithm} (pid {os.getpid()})", tracking_uri=uri)
        for stale in stale_runs:
            show(f"{algorithm}: MLflow run {stale['run_id']} was left RUNNING by a runner that is gone ({stale['owner']}): ended it KILLED, with a note")
        started = time.monotonic()
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(files.pipeline_root), raise_on_error=True)
        owner = owner_token()
        steps_env = {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", SUMMARY_FILE_ENV: str(files.summary), OWNER_ENV: owner,
                     CHECKPOINT_ROOT_ENV: str(files.checkpoints)}  # fmt: skip
        root_level = logging.getLogger().level
        with open(files.log, "w", encoding="utf-8") as log:
            progress = _ProgressFilter(log, echo, _task_names(pipeline), sys.stdout)
            try:
                with _environment(steps_env), warnings.catch_warnings():
                    # kfp.local cannot tell that the project image is a Python image; the steps run here anyway
                    warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
                    # display names, retries, accelerators: cluster settings kfp.local does not apply
                    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
                    with contextlib.redirect_stdout(progress), stop_steps_on_sigterm():
                        outcome = pipeline(**arguments)
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the steps are stopped; end this run's MLflow run too
                reason = str(exc) or "interrupted (Ctrl-C)"
                for ended in end_owned_runs(name, owner, reason, tracking_uri=uri):
                    progress.echo(f"{algorithm}: {reason}: MLflow run {ended['run_id']} ended KILLED; the next run of this data and configuration resumes it")
                raise
            except RuntimeError as exc:
                step, lines = progress.failed or ("a step", [])
                tail = "\n".join(f"      | {line}" for line in lines[-25:])
                if tail:
                    progress.echo(tail)
                raise PipelineFailed(f"{algorithm}: step '{step}' failed ({_ANSI.sub('', str(exc))}); full log: {files.log}") from None
            finally:
                _forget_handlers_on(progress, root_level)
                with contextlib.suppress(OSError):
                    prune_runs(workdir / STATE_DIR, algorithm, KEEP_RUNS)
        if not files.summary.exists():
            raise PipelineFailed(f"{algorithm}: the pipeline ended without a summary; full log: {files.log}")
        summary = json.loads(files.summary.read_text())
        log_path = files.log
    lineage = json.loads(outcome.output)
    summary.update({"seconds": time.monotonic() - started, "log": str(log_path), "tracking_uri": summary.get("tracking_uri") or uri,
                    "mlflow_status": lineage.get("mlflow_status", ""), "kfp_run_id": summary.get("kfp_run_id") or lineage.get("kfp_run_id", "")})  # fmt: skip
    return summary


def describe_overrides(doc: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> str:
    """'generations 8 -> 3, train.epochs 12 -> 4' (what an override changes)."""
    parts = []
    for path, value in (overrides or {}).items():
        node: Any = doc
        for key in str(path).split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        parts.append(f"{path} {node if node is not None else '(default)'} -> {value}")
    return ", ".join(parts)


def format_summary(summary: Mapping[str, Any]) -> str:
    """What the end of a run prints: the MLflow run, the version, whether the gate promoted it and
    why, what is in production, and how a job uses it: "use it" only for a production version
    (while there is none, the explicit opt-in to this version, labelled as such)."""
    name, algorithm = summary["model_name"], summary["algorithm"]
    uri = summary.get("tracking_uri", "")
    production = summary.get("production_version") or ""
    lines = []
    if summary["status"] == "skipped":
        lines.append(f"{algorithm}: meta-training skipped ({summary['seconds']:.0f} s): {summary['reason']}")
        lines.append(f"  production       {f'models:/{name}/{production}' if production else f'none: no version of {name} has passed the gate'}")
    else:
        lines.append(f"{algorithm}: meta-trained, meta-tested and registered in {summary['seconds']:.0f} s")
        where = f" (experiment {summary['experiment_id']})" if summary.get("experiment_id") else ""
        lines.append(f"  MLflow run       {summary['run_id']}{where} at {uri}")
        if summary.get("mlflow_run_url"):
            lines.append(f"                   {summary['mlflow_run_url']}")
        elif uri.startswith("sqlite:///"):
            lines.append(f"                   browse: mlflow ui --backend-store-uri {uri}")
        scores = summary.get("scores", {})
        metric = summary.get("metric")
        shown = [f"{metric} {scores[metric]:.4f}"] if metric in scores else []
        suffix = "." + str(metric).removeprefix("meta_test_")
        shown += [f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("baseline.") and k.endswith(suffix)]
        if shown:
            lines.append(f"  meta-test        {', '.join(shown)}")
        lines.append(f"  registered       {summary['model_uri']}")
        if summary.get("deployment"):  # measured by the meta-test, applied by load_loss / load_optimizer
            lines.append(f"  deployment       {', '.join(f'{k} {v:g}' for k, v in summary['deployment'].items())}")
        reason = str(summary["reason"])  # the gate's reasons already start with the decision
        lines.append(f"  promotion        {reason if reason.startswith(summary['decision']) else summary['decision'] + ': ' + reason}")
        if production == summary.get("version"):
            lines.append(f"  production       models:/{name}/{production} (this version)")
        elif production:
            lines.append(f"  production       models:/{name}/{production} (unchanged: version {summary.get('version')} was not promoted)")
        else:
            lines.append(f"  production       none: no version of {name} has passed the gate, so models:/{name}/production does not load")
    if summary.get("fits"):
        lines.append(f"  fits             {summary['fits']}")
    if summary.get("downstream"):
        lines.append("  use it:")
        lines += [f"    {line}" for line in summary["downstream"]]
    elif summary.get("fallback"):
        lines.append("  use it           nothing yet. A job that accepts this unpromoted version opts in explicitly (README: a rejected model):")
        lines += [f"    {line}" for line in summary["fallback"]]
    lines.append(f"  log              {summary['log']}")
    return "\n".join(lines)


__all__ = ["PipelineFailed", "format_summary", "resolve_config_arg", "run_local"]
