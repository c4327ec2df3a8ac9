"""What the components do when they run (inside a pipeline pod, or a ``kfp.local`` subprocess).

Each Kubeflow component's body is one call into this module; each function here reads the
component's inputs, calls the learner (``metaopt_core.meta``: the registry finds it by the name or
import reference the pipeline passes as ``learner``) or ``metaopt_core.mlops`` for MLflow, and
writes the outputs, metrics and MLflow records. Nothing here knows a learner by name.
The functions take plain values and KFP artifact objects (anything with ``.path``, ``.metadata``
and, for metrics, ``.log_metric``), so they are testable without Kubeflow.

Progress lines start with ``[metaopt]`` (the local runner shows exactly those).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

PREFIX = "[metaopt]"
DOWNSTREAM = {
    "loss": ("from metaopt_core import load_loss", 'criterion = load_loss("models:/{name}/production")'),
    "optimizer": ("from metaopt_core import load_optimizer", 'optimizer = load_optimizer("models:/{name}/production", model)'),
}


def learner_of(learner: str) -> Any:
    from metaopt_core.meta import registry

    return registry.get(learner)


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


@contextlib.contextmanager
def tracked(run_id: str) -> Iterator[Any]:
    """The pipeline's MLflow run (a ``Tracker``), resumed by id; None when ``run_id`` is empty.
    The run is marked FAILED if the step raises."""
    if not run_id:
        yield None
        return
    from metaopt_core.mlops.tracking import Tracker

    with Tracker(run_id=run_id) as tracker:
        yield tracker


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _log_kfp_metrics(artifact: Any, metrics: Mapping[str, Any]) -> None:
    if artifact is None:
        return
    for key, value in sorted(_numeric(metrics).items()):
        artifact.log_metric(key, value)


def config_doc(config: str | Mapping[str, Any]) -> dict:
    """A configuration passed between steps: JSON text (what prepare_data hands on) or a mapping."""
    if isinstance(config, str):
        doc = json.loads(config) if config.strip() else {}
        if not isinstance(doc, dict):
            raise ValueError(f"config: got JSON {type(doc).__name__}; allowed: a JSON object")
        return doc
    return dict(config or {})


def _copy_tree(source: str, destination: str) -> None:
    if os.path.exists(destination):
        shutil.rmtree(destination)
    shutil.copytree(source, destination)


# ============================================================================= data


def read_config(learner: str, config: Mapping[str, Any] | None, config_uri: str = "") -> Any:
    """The validated run configuration: the YAML/JSON at ``config_uri`` (a path, ``file://`` or
    ``s3://`` URI) when given, else the ``config`` mapping (the pipeline parameter)."""
    if config_uri:
        import yaml

        from metaopt_core.mlops import storage

        doc = yaml.safe_load(storage.read_text(config_uri)) or {}
        return learner_of(learner).resolve_config(doc, source=config_uri)
    return learner_of(learner).resolve_config(dict(config or {}), source="config")


def prepare_data(learner: str, config: Mapping[str, Any], config_uri: str, data: Any) -> tuple[str, str, str]:
    """Resolve the configuration and prepare what meta-training reads into ``data`` (a Dataset
    artifact: ``inputs.json`` + one folder per dataset). Returns (fingerprint, the resolved config
    as JSON text, a one-line summary)."""
    meta_learner = learner_of(learner)
    resolved = read_config(learner, config, config_uri)
    say(f"{meta_learner.name}: config {getattr(resolved, 'name', meta_learner.name)!r} from {config_uri or 'the pipeline parameter'}")
    inputs = meta_learner.prepare(resolved, progress=say)
    inputs.save(data.path)
    data.metadata.update({"fingerprint": inputs.fingerprint, "learner": meta_learner.name, "summary": inputs.summary()})
    say(f"{meta_learner.name}: data {inputs.summary()}")
    return inputs.fingerprint, json.dumps(resolved.model_dump(mode="json")), inputs.summary()


def check_new_data(fingerprint: str, model_name: str, force: bool) -> tuple[bool, str, str, str]:
    """Whether to meta-train: yes when forced, when ``model_name`` has no production version, or
    when the production version was meta-trained on data with another fingerprint. Returns
    (should_train, production version or "", its fingerprint or "", the reason)."""
    from metaopt_core.mlops import registry
    from metaopt_core.mlops.tracking import TAG_FINGERPRINT

    try:
        production = registry.production_version(model_name)
    except registry.ModelNotFoundError:
        production = None
    recorded = ""
    if production is not None:
        version = next(v for v in registry.iter_versions(model_name) if str(v.version) == str(production))
        recorded = version.tags.get(TAG_FINGERPRINT, "")
    if force:
        should, reason = True, "force_retrain is set"
    elif production is None:
        should, reason = True, f"model {model_name!r} has no production version yet"
    elif recorded != fingerprint:
        should, reason = True, f"the data changed: fingerprint {fingerprint[:12]}, production version {production} was trained on {recorded[:12] or 'unrecorded data'}"
    else:
        should, reason = False, f"the data is unchanged since production version {production} (fingerprint {fingerprint[:12]})"
    say(f"{'meta-train' if should else 'skip meta-training'}: {reason}")
    return should, str(production or ""), recorded, reason


def start_tracking(
    learner: str, config: str | Mapping[str, Any], data: Any, fingerprint: str, experiment: str, model_name: str, pipeline_run: str
) -> tuple[str, str, str]:
    """Create the pipeline run's MLflow run (or adopt ``MLFLOW_RUN_ID``): config as params, data
    fingerprint as a tag, the prepared inputs' manifest as an artifact. Returns (run id,
    experiment id, tracking URI)."""
    from metaopt_core.mlops.tracking import TAG_ALGORITHM, Tracker

    tags = {TAG_ALGORITHM: learner_of(learner).name, "metaopt.model_name": model_name, "metaopt.pipeline_run": pipeline_run}
    # an injected MLFLOW_EXPERIMENT_ID (KFP's MLflow integration) wins over the parameter
    name = None if os.environ.get("MLFLOW_EXPERIMENT_ID") else (experiment or None)
    with Tracker(name, run_name=pipeline_run or model_name, tags=tags) as tracker:
        tracker.log_config(config_doc(config))
        tracker.set_fingerprint(fingerprint)
        manifest = Path(data.path) / "inputs.json"
        if manifest.exists():
            tracker.log_artifact(manifest, "data")
        run_id, experiment_id, uri = tracker.run_id, tracker.experiment_id, tracker.tracking_uri
    say(f"MLflow run {run_id} (experiment {experiment_id}) at {uri}")
    return run_id, experiment_id, uri


# ============================================================================= meta-training


def _setup(learner: str, config: str | Mapping[str, Any], data_path: str, device: str = "") -> tuple[Any, Any, Any]:
    """(the learner, its configuration on ``device``, the prepared inputs)."""
    from metaopt_core.meta.inputs import PreparedInputs

    meta_learner = learner_of(learner)
    return meta_learner, meta_learner.with_device(meta_learner.resolve_config(config_doc(config)), device), PreparedInputs.load(data_path)


def _hand_on(meta_learner: Any, new_state: Any, inputs: Any, state: Any, learned: Any, metrics: Any) -> int:
    """Export what was learned so far (the state is saved already), log the last step's metrics; the step reached."""
    from metaopt_core.meta import runner

    step = meta_learner.step(new_state)
    state.metadata.update({"learner": meta_learner.name, "step": step})
    doc = runner.export(meta_learner, new_state, inputs, learned.path)
    learned.metadata.update({"learner": meta_learner.name, "kind": doc["kind"], "steps": doc["steps"], "fingerprint": inputs.fingerprint})
    _log_kfp_metrics(metrics, meta_learner.metrics(new_state))
    return step


def init_state(learner: str, config: str | Mapping[str, Any], data_path: str, device: str, total_steps: int, state: Any) -> int:
    """The state before the first outer step, on ``device`` (empty: the config's). ``total_steps``
    > 0 replaces the config's outer-step count (sharded pipelines have one outer step per block).
    Returns the number of outer steps the run will take."""
    meta_learner, resolved, inputs = _setup(learner, config, data_path, device)
    if total_steps > 0 and total_steps != meta_learner.total_steps(resolved):
        say(f"{meta_learner.name}: {total_steps} outer steps (one per pipeline block) instead of the config's {meta_learner.total_steps(resolved)}")
        resolved = meta_learner.with_total_steps(resolved, total_steps)
    meta_learner.save_state(meta_learner.init(resolved, inputs), state.path)
    state.metadata.update({"learner": meta_learner.name, "step": 0})
    return meta_learner.total_steps(resolved)


def run_block(
    learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, run_id: str, block_index: int, blocks_count: int,
    device: str, state: Any, learned: Any, metrics: Any,
) -> int:  # fmt: skip
    """Block ``block_index`` of ``blocks_count``: resume the state and run outer steps up to this
    block's share of the run, logging every step to MLflow; hand on the state and the learned
    loss/optimiser so far. Returns the step reached."""
    from metaopt_core.meta import runner

    meta_learner, resolved, inputs = _setup(learner, config, data_path, device)
    total = meta_learner.total_steps(resolved)
    until = runner.block_target(total, block_index, blocks_count)
    _copy_tree(state_in_path, state.path)
    say(f"{meta_learner.name}: block {block_index + 1}/{blocks_count}: outer steps up to {until} of {total}")

    def progress(line: str) -> None:
        if ": resumed from " not in line:  # every block resumes its predecessor's state by design
            say(line)

    with tracked(run_id) as tracker:
        reached = runner.run_block(meta_learner, resolved, inputs, state.path, until, total=total, progress=progress,
                                   callback=tracker.callback() if tracker else None)  # fmt: skip
    return _hand_on(meta_learner, reached, inputs, state, learned, metrics)


def ask(learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, work: Any) -> int:
    """The next outer step's jobs (one JSON file). Returns the step about to be taken."""
    from metaopt_core.meta import runner

    meta_learner, _, inputs = _setup(learner, config, data_path)
    current = meta_learner.load_state(state_in_path)
    runner.write_work(meta_learner, current, inputs, work.path)
    step = meta_learner.step(current)
    work.metadata.update({"learner": meta_learner.name, "step": step})
    if meta_learner.done(current):  # stopped by itself: the remaining blocks pass the state on
        say(f"{meta_learner.name}: the run finished at step {step}; nothing to ask")
    else:
        say(f"{meta_learner.name}: outer step {step + 1}: work asked")
    return step


def evaluate(learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, work_path: str, shard_index: int,
             shards: int, part: Any) -> None:  # fmt: skip
    """One shard of the next outer step's work (the inner trainings)."""
    from metaopt_core.meta import runner

    meta_learner, _, inputs = _setup(learner, config, data_path)
    current = meta_learner.load_state(state_in_path)
    say(f"{meta_learner.name}: shard {shard_index + 1}/{shards}")
    runner.write_part(meta_learner, current, runner.read_work(meta_learner, work_path), shard_index, shards, inputs, part.path)
    part.metadata.update({"learner": meta_learner.name, "shard": shard_index, "shards": shards})


def tell(
    learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, part_paths: Sequence[str], run_id: str,
    state: Any, learned: Any, metrics: Any,
) -> int:  # fmt: skip
    """Merge the shards of one outer step, take it, log it to MLflow, hand on state and result."""
    from metaopt_core.meta import runner

    meta_learner, _, inputs = _setup(learner, config, data_path)
    previous = meta_learner.load_state(state_in_path)
    if meta_learner.done(previous):
        say(f"{meta_learner.name}: the run already finished at step {meta_learner.step(previous)}; nothing to merge")
        new_state = previous
    else:
        with tracked(run_id) as tracker:  # a failed merge marks the MLflow run FAILED
            new_state = runner.tell_parts(meta_learner, previous, part_paths, inputs)
            row = meta_learner.metrics(new_state)
            total = meta_learner.total_steps(meta_learner.config_of(new_state))  # sharded runs: one step per block
            say(f"{meta_learner.name}: outer step {meta_learner.step(new_state)}/{total} from {len(part_paths)} shards: "
                + ", ".join(f"{k} {v:.4g}" for k, v in list(_numeric(row).items())[:6]))  # fmt: skip
            if tracker:
                tracker.callback()(row)
    meta_learner.save_state(new_state, state.path)
    return _hand_on(meta_learner, new_state, inputs, state, learned, metrics)


# ============================================================================= meta-test, registry


def _png_tag(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}"/><figcaption>{alt}</figcaption></figure>'


def _plots(meta_learner: Any, exported: dict, directory: Path) -> list[tuple[Path, str]]:
    """The learned loss beside cross-entropy (losses) and the meta-training curves, as PNGs."""
    from metaopt_core.losses.document import loss_from_document
    from metaopt_core.plots import plot_history, plot_loss_curves

    made = []
    title = meta_learner.name.upper()
    if exported["kind"] == "loss":
        import torch

        path = plot_loss_curves({"learned": loss_from_document(exported["loss"]), "cross-entropy": torch.nn.CrossEntropyLoss()},
                                directory / "learned_loss.png", title=f"{title}: learned loss")  # fmt: skip
        made.append((path, "learned loss vs cross-entropy (loss of one example against the probability of its labelled class)"))
    history = [row for row in exported.get("history", []) if isinstance(row, Mapping)]
    keys = [k for k in meta_learner.history_keys if any(k in row for row in history)]
    if history and keys:
        path = plot_history(history, keys, directory / "meta_training.png", title=f"{title} meta-training")
        made.append((path, "meta-training curves, one point per outer step"))
    return made


def meta_test(
    learner: str, config: str | Mapping[str, Any], data_path: str, learned_path: str, run_id: str, settings: Mapping[str, Any],
    device: str, report: Any, plots: Any, scores_artifact: Any,
) -> tuple[dict, str, bool]:  # fmt: skip
    """Meta-test the learned loss/optimiser; the tables go to a Markdown artifact and MLflow, the
    plots to an HTML artifact and MLflow, the scores to a Metrics artifact and MLflow. Returns
    (scores, promotion metric, greater_is_better)."""
    from metaopt_core.meta import runner

    meta_learner, resolved, inputs = _setup(learner, config, data_path, device)
    chosen = meta_learner.resolve_meta_test(settings)
    say(f"{meta_learner.name}: meta-test with settings {chosen.model_dump(mode='json')}")
    with tracked(run_id) as tracker, tempfile.TemporaryDirectory() as scratch:  # a failure marks the MLflow run FAILED
        outcome = runner.meta_test(meta_learner, resolved, learned_path, inputs, chosen, progress=say)
        Path(report.path).parent.mkdir(parents=True, exist_ok=True)
        Path(report.path).write_text(outcome.markdown)
        exported = runner.read_result(learned_path)
        figures = _plots(meta_learner, exported, Path(scratch))
        body = "\n".join(_png_tag(path, caption) for path, caption in figures)
        Path(plots.path).parent.mkdir(parents=True, exist_ok=True)
        Path(plots.path).write_text(f"<html><body><h3>{meta_learner.name.upper()}</h3>\n{body}\n</body></html>\n")
        if tracker:
            tracker.log_metrics(outcome.scores, step=exported["steps"])
            tracker.log_text(outcome.markdown, "meta_test/report.md")
            tracker.log_dict(outcome.details, "meta_test/details.json")
            for path, _ in figures:
                tracker.log_artifact(path, "plots")
            if exported["kind"] == "loss":
                tracker.log_dict(exported["loss"], "learned/loss.json")
    _log_kfp_metrics(scores_artifact, outcome.scores)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.scores.items())
    say(f"{meta_learner.name}: meta-test scores: {shown}")
    return dict(outcome.scores), outcome.metric, outcome.greater_is_better


def register_and_promote(
    learner: str, config: str | Mapping[str, Any], learned_path: str, fingerprint: str, run_id: str, model_name: str,
    scores: Mapping[str, Any], metric: str, greater_is_better: bool, margin: float, report: Any,
) -> tuple[str, str, bool, str, str]:  # fmt: skip
    """Register the learned loss/optimiser as a new version of ``model_name`` (provenance: config,
    data fingerprint, git commit, scores, the MLflow run) and promote it if it beats production
    (champion/challenger). Returns (version, decision, promoted, production version, summary JSON)."""
    from metaopt_core.meta import runner
    from metaopt_core.mlops import registry

    name = learner_of(learner).name
    exported = runner.read_result(learned_path)
    tags = {"metaopt.algorithm": name, "metaopt.steps": exported["steps"]}
    with tracked(run_id) as tracker:
        if exported["kind"] == "loss":
            version = registry.register_loss(exported["loss"], model_name, config=config_doc(config), fingerprint=fingerprint,
                                             scores=dict(scores), run_id=run_id or None, tags=tags)  # fmt: skip
        else:
            version = registry.register_optimizer(exported["divergence_dir"], model_name, config=config_doc(config), fingerprint=fingerprint,
                                                  scores=dict(scores), run_id=run_id or None, tags=tags)  # fmt: skip
        say(f"registered {version.model_uri}")
        decision = registry.promote(model_name, version.version, dict(scores), metric=metric, margin=float(margin),
                                    greater_is_better=bool(greater_is_better))  # fmt: skip
        say(f"promotion: {decision}")
        if tracker:
            tracker.set_tags({"metaopt.registered_version": version.version, "metaopt.promotion": decision.decision})
        tracking_uri = tracker.tracking_uri if tracker else ""
        experiment_id = tracker.experiment_id if tracker else ""
    summary = {
        "status": "trained",
        "algorithm": name,
        "kind": exported["kind"],
        "model_name": model_name,
        "version": version.version,
        "model_uri": version.model_uri,
        "decision": decision.decision,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "production_version": decision.production_version or "",
        "metric": metric,
        "scores": {k: float(v) for k, v in scores.items()},
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "fingerprint": fingerprint,
        "downstream": [line.format(name=model_name) for line in DOWNSTREAM[exported["kind"]]],
    }
    lines = [f"### {model_name} version {version.version}: {decision.decision}", "", decision.reason, "",
             "| score | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in summary["scores"].items()]  # fmt: skip
    lines += ["", f"Production version: {summary['production_version'] or 'none'}", "", "```python", *summary["downstream"], "```", ""]
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text("\n".join(lines))
    return version.version, decision.decision, bool(decision.promoted), summary["production_version"], json.dumps(summary)


def report_skipped(learner: str, model_name: str, production_version: str, fingerprint: str, reason: str, report: Any) -> str:
    """The pipeline's answer when the data has not changed: the production version stays. Returns
    the summary JSON."""
    meta_learner = learner_of(learner)
    kind = meta_learner.kind
    summary = {
        "status": "skipped",
        "algorithm": meta_learner.name,
        "kind": kind,
        "model_name": model_name,
        "production_version": production_version,
        "reason": reason,
        "fingerprint": fingerprint,
        "downstream": [line.format(name=model_name) for line in DOWNSTREAM[kind]],
    }
    text = f"### {model_name}: meta-training skipped\n\n{reason}\n\nProduction version: {production_version or 'none'}\n"
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(text)
    say(f"{model_name}: meta-training skipped; production stays at version {production_version}")
    return json.dumps(summary)
