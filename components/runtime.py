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
from typing import Any, Iterator, Mapping

PREFIX = "[metaopt]"
DOWNSTREAM = {
    "loss": ("from metaopt_core import load_loss", 'criterion = load_loss("models:/{name}/production")'),
    "optimizer": ("from metaopt_core import load_optimizer", 'optimizer = load_optimizer("models:/{name}/production", model)'),
}
# Nothing in production: how a job that accepts an unpromoted version opts in (never the default).
FALLBACK = {
    "loss": ("from metaopt_core import load_loss", 'criterion = load_loss("models:/{name}/production", fallback="models:/{name}/{version}")'),
    "optimizer": ("from metaopt_core import load_optimizer",
                  'optimizer = load_optimizer("models:/{name}/production", model, fallback="models:/{name}/{version}")'),
}  # fmt: skip


def usage(kind: str, model_name: str, production_version: str, version: str = "", fits: str = "") -> dict:
    """What a summary tells a downstream job: ``downstream`` (the lines that load the production
    version; none while nothing is in production), ``fallback`` (while nothing is: the explicit
    opt-in to ``version``), ``fits`` (an optimiser: the architecture the model must have)."""
    if production_version:
        return {"downstream": [line.format(name=model_name) for line in DOWNSTREAM[kind]], "fallback": [], "fits": fits}
    lines = [line.format(name=model_name, version=version) for line in FALLBACK[kind]] if version else []
    return {"downstream": [], "fallback": lines, "fits": fits}


def exported_fits(learned_path: str | Path, exported: Mapping[str, Any]) -> str:
    """The architecture an exported optimiser fits, in words ("" for a loss)."""
    if exported.get("kind") != "optimizer":
        return ""
    from metaopt_core import exports

    return str(exports.kind_of(learned_path, "optimizer").describe(Path(learned_path)).get("fits", ""))


def learner_of(learner: str) -> Any:
    from metaopt_core.meta import registry

    return registry.get(learner)


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


@contextlib.contextmanager
def tracked(run_id: str) -> Iterator[Any]:
    """The pipeline's MLflow run (a ``Tracker``), resumed by id; None when ``run_id`` is empty.
    The run stays RUNNING whatever the step does: the pipeline's exit step ends it
    (:func:`components.lineage.finish_tracking`), FAILED if any step failed. (A run that is not
    RUNNING, e.g. a step run by hand, is reopened and ended with the step.)"""
    if not run_id:
        yield None
        return
    from metaopt_core.mlops.tracking import Tracker

    with Tracker(run_id=run_id) as tracker:
        yield tracker


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def log_kfp_metrics(artifact: Any, metrics: Mapping[str, Any]) -> None:
    if artifact is None:
        return
    for key, value in sorted(numeric(metrics).items()):
        artifact.log_metric(key, value)


def config_doc(config: str | Mapping[str, Any]) -> dict:
    """A configuration passed between steps: JSON text (what prepare_data hands on) or a mapping."""
    if isinstance(config, str):
        doc = json.loads(config) if config.strip() else {}
        if not isinstance(doc, dict):
            raise ValueError(f"config: got JSON {type(doc).__name__}; allowed: a JSON object")
        return doc
    return dict(config or {})


def copy_tree(source: str, destination: str) -> None:
    if os.path.exists(destination):
        shutil.rmtree(destination)
    shutil.copytree(source, destination)


# ============================================================================= data


def prepare_data(
    learner: str, config: Mapping[str, Any], config_uri: str, data: Any, meta_test_settings: Mapping[str, Any] | None = None
) -> tuple[str, str, str]:
    """Resolve the configuration and prepare what meta-training and the meta-test read into
    ``data`` (a Dataset artifact: ``inputs.json``, ``split_manifest.json`` and one folder per
    dataset). Returns (fingerprint, the resolved config as JSON text, a one-line summary)."""
    from metaopt_core.meta.run_config import load_config
    from metaopt_core.mlops import datasets  # noqa: F401 (registers the s3:// folder source)

    meta_learner = learner_of(learner)
    # the YAML/JSON at config_uri (a path, file:// or s3:// URI) when given, else the pipeline parameter
    resolved = load_config(config_uri or dict(config or {}), algorithm=meta_learner.name)
    say(f"{meta_learner.name}: config {getattr(resolved, 'name', meta_learner.name)!r} from {config_uri or 'the pipeline parameter'}")
    inputs = meta_learner.prepare(resolved, meta_test_settings, progress=say)
    for phase, row in inputs.manifest.get("summary", {}).items():
        say(f"{meta_learner.name}: split manifest: {phase}: {row['examples']} examples of {row['sources']}"
            + (f", domains {row['domains']}" if row["domains"] else ""))  # fmt: skip
    inputs.save(data.path)
    data.metadata.update({"fingerprint": inputs.fingerprint, "learner": meta_learner.name, "summary": inputs.summary()})
    say(f"{meta_learner.name}: data {inputs.summary()}")
    return inputs.fingerprint, json.dumps(resolved.model_dump(mode="json")), inputs.summary()


def check_new_data(fingerprint: str, model_name: str, force: bool, config: str | Mapping[str, Any] = "") -> tuple[bool, str, str, str]:
    """Whether to meta-train: yes when forced, or when (data fingerprint, configuration hash)
    differs from that of the last meta-training run of ``model_name`` that finished (recorded in
    MLflow, whether or not its version was promoted), or when there is none. A skip names the run
    it matched. Returns (should_train, production version or "", the matched run's fingerprint or
    "", the reason)."""
    from metaopt_core.mlops import registry
    from metaopt_core.mlops.tracking import config_hash, last_finished_training

    try:
        production = registry.production_version(model_name)
    except registry.ModelNotFoundError:
        production = None
    digest = config_hash(config_doc(config)) if config else ""
    last = last_finished_training(model_name)
    recorded = last.fingerprint if last else ""
    if force:
        should, reason = True, "force_retrain is set"
    elif last is None:
        should, reason = True, f"no finished meta-training run of {model_name!r} is recorded"
    elif last.fingerprint != fingerprint:
        should, reason = (
            True,
            f"the data changed: fingerprint {fingerprint[:12]}, the last meta-training (MLflow run {last.run_id}) read {recorded[:12] or 'unrecorded data'}",
        )
    elif digest and last.config_hash != digest:
        should, reason = (
            True,
            f"the configuration changed: hash {digest[:12]}, the last meta-training (MLflow run {last.run_id}) used {last.config_hash[:12] or 'an unrecorded one'}",
        )
    else:
        should, reason = False, (f"the data and configuration are unchanged since MLflow run {last.run_id} (version {last.version or '?'}; "
                                 f"fingerprint {fingerprint[:12]}, config {digest[:12] or 'not compared'})")  # fmt: skip
    say(f"{'meta-train' if should else 'skip meta-training'}: {reason}")
    return should, str(production or ""), recorded, reason


def record_meta_training(tracker: Any, model_name: str, fingerprint: str, config: str | Mapping[str, Any], version: str) -> None:
    """Mark the pipeline's MLflow run as a finished meta-training on (fingerprint, config hash):
    what the next run's new-data check compares with."""
    from metaopt_core.mlops.tracking import config_hash, finished_training_tags

    if tracker is not None:
        tracker.set_tags(finished_training_tags(model_name, fingerprint, config_hash(config_doc(config)), version))


def learner_setup(learner: str, config: str | Mapping[str, Any], data_path: str, device: str = "") -> tuple[Any, Any, Any]:
    """(the learner, its configuration on ``device``, the prepared inputs)."""
    from metaopt_core.meta.inputs import PreparedInputs

    meta_learner = learner_of(learner)
    return meta_learner, meta_learner.with_device(meta_learner.resolve_config(config_doc(config)), device), PreparedInputs.load(data_path)


# ============================================================================= meta-test, registry


def _png_tag(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}"/><figcaption>{alt}</figcaption></figure>'


def _plots(meta_learner: Any, learned_dir: str | Path, exported: dict, directory: Path) -> list[tuple[Path, str]]:
    """What the export kind plots (a loss: beside cross-entropy) and the meta-training curves, as PNGs."""
    from metaopt_core import exports
    from metaopt_core.plots import plot_history

    made = []
    title = meta_learner.name.upper()
    path = exports.kind_of(learned_dir).plot(Path(learned_dir), directory / "learned.png", f"{title}: learned {meta_learner.kind}")
    if path is not None:
        made.append((path, f"the learned {meta_learner.kind} (a loss: against the probability of the labelled class, beside cross-entropy)"))
    history = [row for row in exported.get("history", []) if isinstance(row, Mapping)]
    keys = [k for k in meta_learner.history_keys if any(k in row for row in history)]
    if history and keys:
        path = plot_history(history, keys, directory / "meta_training.png", title=f"{title} meta-training")
        made.append((path, "meta-training curves, one point per outer step"))
    return made


def load_champion(model_name: str, directory: str | Path) -> tuple[str, Path | None]:
    """The production version of ``model_name`` for the meta-test to re-evaluate: (version, its
    export folder), or ("", None) when there is none (or no model name)."""
    if not model_name:
        return "", None
    from metaopt_core.mlops import registry

    version, champion = registry.load_champion(model_name, directory)
    return str(version or ""), champion


def meta_test(
    learner: str, config: str | Mapping[str, Any], data_path: str, learned_path: str, run_id: str, settings: Mapping[str, Any],
    device: str, report: Any, plots: Any, scores_artifact: Any, model_name: str = "", gate_inputs: Any = None,
) -> tuple[dict, str, bool]:  # fmt: skip
    """Meta-test the learned loss/optimiser beside the production version of ``model_name`` (the
    champion, re-evaluated in this run on the same tasks and seeds) and the tuned baselines; the
    tables go to a Markdown artifact and MLflow, the plots to an HTML artifact and MLflow, the
    scores to a Metrics artifact and MLflow, and what the promotion gate decides on (paired scores,
    settings, champion version, data fingerprint, split manifest) to ``gate_inputs``
    (``gate_inputs.json``). Returns (scores, registry metric, greater_is_better)."""
    from metaopt_core import exports
    from metaopt_core.meta import runner

    meta_learner, resolved, inputs = learner_setup(learner, config, data_path, device)
    chosen = meta_learner.resolve_meta_test(settings)
    from metaopt_core.faults import fault_point

    fault_point("meta-test")
    say(f"{meta_learner.name}: meta-test with settings {chosen.model_dump(mode='json')}")
    with tracked(run_id) as tracker, tempfile.TemporaryDirectory() as scratch:  # a failure marks the MLflow run FAILED
        champion_version, champion = load_champion(model_name, Path(scratch) / "champion")
        say(
            f"{meta_learner.name}: champion: "
            + (f"production version {champion_version}, re-evaluated in this run" if champion else "none (no production version)")
        )
        outcome = runner.meta_test(meta_learner, resolved, learned_path, inputs, chosen, champion_dir=champion, progress=say)
        record = {**outcome.gate_inputs(), "champion_version": champion_version or None, "fingerprint": inputs.fingerprint,
                  "split_manifest": inputs.manifest, "deployment": dict(outcome.deployment)}  # fmt: skip
        if gate_inputs is not None:
            Path(gate_inputs.path).parent.mkdir(parents=True, exist_ok=True)
            Path(gate_inputs.path).write_text(json.dumps(record))
        Path(report.path).parent.mkdir(parents=True, exist_ok=True)
        Path(report.path).write_text(outcome.markdown)
        exported = runner.read_result(learned_path)
        figures = _plots(meta_learner, learned_path, exported, Path(scratch))
        body = "\n".join(_png_tag(path, caption) for path, caption in figures)
        Path(plots.path).parent.mkdir(parents=True, exist_ok=True)
        Path(plots.path).write_text(f"<html><body><h3>{meta_learner.name.upper()}</h3>\n{body}\n</body></html>\n")
        if tracker:
            tracker.log_metrics(outcome.scores, step=exported["steps"])
            tracker.log_text(outcome.markdown, "meta_test/report.md")
            tracker.log_dict(outcome.details, "meta_test/details.json")
            tracker.log_dict(record, "meta_test/gate_inputs.json")
            for path, _ in figures:
                tracker.log_artifact(path, "plots")
            kind = exports.kind_of(learned_path)
            for relative in (*kind.files, exports.EXPORT_FILE):  # the learned artifact, as the registry will hold it
                tracker.log_artifact(Path(learned_path) / relative, str(Path("learned", relative).parent))
    log_kfp_metrics(scores_artifact, outcome.scores)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.scores.items())
    say(f"{meta_learner.name}: meta-test scores: {shown}")
    return dict(outcome.scores), outcome.metric, outcome.greater_is_better


def gate_decision(record: Mapping[str, Any], margin: float, confidence: float = 0.95) -> dict:
    """The promotion gate on one meta-test run's record (``gate_inputs.json``), as a dict."""
    from metaopt_core.gate import decide_recorded

    return decide_recorded(record, margin=float(margin), confidence=confidence).to_dict()


def register_and_promote(
    learner: str, config: str | Mapping[str, Any], learned_path: str, fingerprint: str, run_id: str, model_name: str,
    scores: Mapping[str, Any], metric: str, greater_is_better: bool, margin: float, report: Any, gate_inputs_path: str = "",
    kfp_run_id: str = "", registered: Any = None,
) -> tuple[str, str, bool, str, str]:  # fmt: skip
    """Register the learned loss/optimiser as a new version of ``model_name`` (provenance: config,
    data fingerprint, git commit, scores, the MLflow run) and let the promotion gate decide from
    the same meta-test run (``gate_inputs_path``: its ``gate_inputs.json``): the challenger against
    the champion re-evaluated in that run, and against the tuned baselines. The decision, its
    numbers and the meta-test settings become ``metaopt.gate.*`` tags and ``gate.json``; a rejected
    version stays registered with its reason.

    Idempotent per pipeline run: the version is tagged ``metaopt.kfp_run_id``; a retried step finds
    the version its earlier attempt registered and reuses it with its recorded decision (or lets
    the gate decide, if the attempt stopped before recording). ``registered`` (a KFP Model) gets
    the registered files, with ``models:/name/version`` and the MLflow run in its metadata; the
    report links the version, the MLflow run and the KFP run. Returns (version, decision,
    promoted, production version, summary JSON)."""
    from components.lineage import hand_on_registered, links_markdown, write_summary
    from metaopt_core import exports
    from metaopt_core.faults import fault_point
    from metaopt_core.meta import runner
    from metaopt_core.mlops import registry
    from metaopt_core.mlops.tracking import TAG_CONFIG_HASH, TAG_KFP_RUN_ID, config_hash, kfp_run_url

    record: dict = {}
    if gate_inputs_path and Path(gate_inputs_path).exists():
        record = json.loads(Path(gate_inputs_path).read_text())
    record.setdefault("metric", metric)
    record.setdefault("greater_is_better", bool(greater_is_better))
    record.setdefault("fingerprint", fingerprint)
    gate = gate_decision(record, float(margin))

    name = learner_of(learner).name
    exported = runner.read_result(learned_path)
    deployment = dict(record.get("deployment") or {})
    digest = config_hash(config_doc(config))
    tags = {"metaopt.algorithm": name, "metaopt.steps": exported["steps"], TAG_CONFIG_HASH: digest, **({TAG_KFP_RUN_ID: kfp_run_id} if kfp_run_id else {})}
    earlier = registry.find_version(model_name, TAG_KFP_RUN_ID, kfp_run_id) if kfp_run_id else None
    killed = None if earlier is not None else registry.unfinished_registration(model_name, fingerprint, digest)
    with tracked(run_id) as tracker:
        if earlier is not None:
            version = earlier
            say(f"{version.model_uri} was registered by an earlier attempt of this step (KFP run {kfp_run_id}): reusing it")
        elif killed is not None:
            version = earlier = killed
            say(f"{version.model_uri} was registered for this data and configuration by MLflow run {killed.run_id}, which did not finish: "
                "reusing it instead of registering a duplicate")  # fmt: skip
        else:  # the export kind's files, with the deployment settings the meta-test measured baked in
            version = registry.register_export(learned_path, model_name, deployment=deployment, config=config_doc(config), fingerprint=fingerprint,
                                               scores=dict(scores), run_id=run_id or None, tags=tags)  # fmt: skip
        say(f"registered {version.model_uri}" + (f" with {deployment}" if deployment else ""))
        fault_point("register-version")
        decision = registry.recorded_decision(model_name, version.version) if earlier is not None else None
        decision = decision or registry.apply_gate(model_name, version.version, gate, record)
        say(f"promotion gate: {decision}")
        record_meta_training(tracker, model_name, fingerprint, config, version.version)
        if tracker:
            tracker.set_tags({"metaopt.registered_version": version.version, "metaopt.promotion": decision.decision})
            tracker.log_dict({**gate, "version": version.version}, f"registry/{model_name}-v{version.version}-gate.json")
        tracking_uri = tracker.tracking_uri if tracker else ""
        experiment_id = tracker.experiment_id if tracker else ""
        run_url = tracker.run_url if tracker else None
    summary = {
        "status": "trained",
        "algorithm": name,
        "kind": exported["kind"],
        "export_kind": exported["export_kind"],
        "deployment": deployment,
        "model_name": model_name,
        "version": version.version,
        "model_uri": version.model_uri,
        "decision": decision.decision,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "gate": gate.get("numbers", {}),
        "champion_version": record.get("champion_version") or "",
        "production_version": decision.production_version or "",
        "metric": metric,
        "scores": {k: float(v) for k, v in scores.items()},
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "mlflow_run_url": run_url,
        "kfp_run_id": kfp_run_id,
        "kfp_run_url": kfp_run_url(kfp_run_id),
        "fingerprint": fingerprint,
        "config_hash": digest,
    }
    production = summary["production_version"]
    same = production == version.version
    fits = (
        exported_fits(learned_path, exported) if same or not production else (registry.production_fits(model_name) if exported["kind"] == "optimizer" else "")
    )
    summary.update(usage(exported["kind"], model_name, production, version.version, fits))
    links = {"model_uri": version.model_uri, "registered_model": model_name, "version": version.version, "decision": decision.decision,
             "promoted": bool(decision.promoted), "mlflow_run_id": run_id, "mlflow_run_url": run_url, "kfp_run_id": kfp_run_id}  # fmt: skip
    hand_on_registered(learned_path, registered, {**links, "kind": exported["kind"], "steps": exported["steps"], "fingerprint": fingerprint})
    if registered is not None:
        exports.bake(registered.path, deployment)  # the files as registered
    lines = [f"### {model_name} version {version.version}: {decision.decision}", "", decision.reason, "",
             "| score | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in summary["scores"].items()]  # fmt: skip
    lines += ["", f"Production version: {summary['production_version'] or 'none'}", ""]
    if deployment:
        lines += [f"Deployment (measured by the meta-test, baked into the registered {exported['export_kind']}): "
                  + ", ".join(f"{key} {value:g}" for key, value in deployment.items()), ""]  # fmt: skip
    lines += links_markdown(version.model_uri, run_id, run_url, tracking_uri, summary["kfp_run_url"])
    if summary["downstream"]:
        lines += ["```python", *summary["downstream"], "```", ""]
    else:
        lines += [f"Nothing is in production, so `models:/{model_name}/production` does not load. A job that accepts this unpromoted version "
                  "opts in explicitly:", "", "```python", *summary["fallback"], "```", ""]  # fmt: skip
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text("\n".join(lines))
    report.metadata.update({key: value for key, value in links.items() if value not in (None, "")})
    write_summary(summary)
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
    }
    fits = ""
    if production_version and kind == "optimizer":
        from metaopt_core.mlops import registry

        fits = registry.production_fits(model_name)
    summary.update(usage(kind, model_name, production_version, fits=fits))
    text = f"### {model_name}: meta-training skipped\n\n{reason}\n\nProduction version: {production_version or 'none'}\n"
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(text)
    stays = f"production stays at version {production_version}" if production_version else "no version is in production (none passed the gate)"
    say(f"{model_name}: meta-training skipped; {stays}")
    from components.lineage import write_summary

    write_summary(summary)
    return json.dumps(summary)
