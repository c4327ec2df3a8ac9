"""What the tracking steps do: create the pipeline run's one MLflow run (``start_tracking``), end it
when the pipeline ends (``finish_tracking``, the ``dsl.ExitHandler``'s exit step: FINISHED when
every step succeeded, FAILED otherwise), and the links between the two runs that the registration
step writes into its KFP outputs.

Both steps find each other's run by the KFP run id (``metaopt.kfp_run_id`` on the MLflow run): the
exit step cannot take outputs of the steps it guards, and a retried ``start_tracking`` reuses the
run its earlier attempt created instead of making a second one. Between the two, every step logs
into the run by id and leaves it RUNNING.

Plain values and objects with ``.path`` / ``.metadata`` in and out, like :mod:`components.runtime`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from components.runtime import config_doc, learner_of, say

# Set by the local runner (pipelines/local.py): the file the final step writes the pipeline's
# summary to, since a pipeline guarded by an ExitHandler can only return the exit step's output.
SUMMARY_FILE_ENV = "METAOPT_SUMMARY_FILE"
# PipelineTaskFinalStatus.state -> the MLflow run status the exit step sets
RUN_STATUS = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}
TAG_PIPELINE_STATE = "metaopt.pipeline_state"


def start_tracking(
    learner: str, config: str | Mapping[str, Any], data: Any, fingerprint: str, experiment: str, model_name: str, pipeline_run: str,
    kfp_run_id: str = "",
) -> tuple[str, str, str]:  # fmt: skip
    """Create the pipeline run's MLflow run (or adopt ``MLFLOW_RUN_ID``, or the run an earlier
    attempt of this step made for ``kfp_run_id``): config as params, data fingerprint, the KFP run's
    id, name and UI page (``$KFP_UI_URL``) as tags, the prepared inputs' manifest as an artifact.
    The run stays RUNNING: the pipeline's exit step ends it. Returns (run id, experiment id, tracking URI)."""
    from metaopt_core.mlops.tracking import OWNER_ENV, TAG_ALGORITHM, TAG_OWNER, Tracker, find_pipeline_run, kfp_tags

    tags = {TAG_ALGORITHM: learner_of(learner).name, "metaopt.model_name": model_name, **kfp_tags(kfp_run_id, pipeline_run)}
    if os.environ.get(OWNER_ENV):  # the local runner that started this pipeline: a later run ends this one if it dies
        tags[TAG_OWNER] = os.environ[OWNER_ENV]
    earlier = None if os.environ.get("MLFLOW_RUN_ID") else find_pipeline_run(kfp_run_id)
    # an injected MLFLOW_EXPERIMENT_ID (KFP's MLflow integration) wins over the parameter
    name = None if os.environ.get("MLFLOW_EXPERIMENT_ID") else (experiment or None)
    tracker = Tracker(name, run_name=pipeline_run or model_name, run_id=earlier.info.run_id if earlier else None, tags=tags).start()
    if earlier is not None:
        say(f"MLflow run {tracker.run_id} was created by an earlier attempt of this step: reusing it")
    try:
        tracker.log_config(config_doc(config))
        tracker.set_fingerprint(fingerprint)
        for file in ("inputs.json", "split_manifest.json"):  # what was prepared, and which phase reads what
            if (Path(data.path) / file).exists():
                tracker.log_artifact(Path(data.path) / file, "data")
        for manifest in sorted(Path(data.path).glob("*/content_manifest.json")):  # folder sources: what was really there
            tracker.log_artifact(manifest, f"data/{manifest.parent.name}")
    except BaseException:
        tracker.end("FAILED")  # a run this step created (the exit step would say so too)
        raise
    say(f"MLflow run {tracker.run_id} (experiment {tracker.experiment_id}) at {tracker.tracking_uri}" + (f": {tracker.run_url}" if tracker.run_url else ""))
    return tracker.run_id, tracker.experiment_id, tracker.tracking_uri


def finish_tracking(state: str, kfp_run_id: str, error: str = "") -> str:
    """The exit step: end the pipeline run's MLflow run (found by ``kfp_run_id``) as FINISHED when
    the pipeline's steps all succeeded (``state`` SUCCEEDED), KILLED when cancelled, FAILED
    otherwise, with the state (and error) as tags. Nothing to end when meta-training was skipped
    or never started. Returns the lineage as JSON (KFP run id and page, MLflow run id, page, status)."""
    from metaopt_core.mlops.tracking import TAG_KFP_RUN_URL, Tracker, find_pipeline_run, kfp_run_url, mlflow_run_url

    lineage: dict[str, Any] = {"pipeline_state": state, "kfp_run_id": kfp_run_id, "kfp_run_url": kfp_run_url(kfp_run_id),
                               "mlflow_run_id": "", "mlflow_run_url": None, "mlflow_status": ""}  # fmt: skip
    run = find_pipeline_run(kfp_run_id)
    if run is None:
        say(f"pipeline {state.lower()}; no MLflow run to end (meta-training was skipped or never started)")
        return json.dumps(lineage)
    status = RUN_STATUS.get(state, "FAILED")
    tracker = Tracker(run_id=run.info.run_id).start()
    tags = {TAG_PIPELINE_STATE: state}
    if error:
        tags["metaopt.pipeline_error"] = error
    if lineage["kfp_run_url"] and TAG_KFP_RUN_URL not in run.data.tags:
        tags[TAG_KFP_RUN_URL] = lineage["kfp_run_url"]
    tracker.set_tags(tags)
    tracker.terminate(status)
    if status == "FINISHED":  # its meta-training is registered: a later forced run starts over
        from components.resume import discard
        from metaopt_core.mlops.tracking import TAG_ALGORITHM, TAG_CONFIG_HASH, TAG_FINGERPRINT

        run_tags = run.data.tags
        discard(run_tags.get(TAG_ALGORITHM, ""), run_tags.get(TAG_FINGERPRINT, ""), run_tags.get(TAG_CONFIG_HASH, ""))
    lineage.update(
        mlflow_run_id=tracker.run_id, mlflow_status=status, mlflow_run_url=mlflow_run_url(tracker.tracking_uri, tracker.experiment_id, tracker.run_id)
    )
    say(f"pipeline {state.lower()}: MLflow run {tracker.run_id} ended {status}" + (f" ({lineage['mlflow_run_url']})" if lineage["mlflow_run_url"] else ""))
    return json.dumps(lineage)


def hand_on_registered(learned_path: str, registered: Any, metadata: Mapping[str, Any]) -> None:
    """The registration step's ``registered`` Model artifact: the white-box files that were
    registered, with the registry URI (``models:/name/version``) and the MLflow run in its metadata."""
    if registered is None:
        return
    if os.path.exists(registered.path):
        shutil.rmtree(registered.path)
    shutil.copytree(learned_path, registered.path)
    registered.metadata.update({key: value for key, value in metadata.items() if value not in (None, "")})


def links_markdown(model_uri: str, run_id: str, run_url: str | None, tracking_uri: str, kfp_run_url: str | None = None) -> list[str]:
    """The Markdown lines linking a KFP report to the registry version and the MLflow run."""
    lines = [f"Registered: `{model_uri}`", ""]
    if run_id:
        lines += [f"MLflow run: [{run_id}]({run_url})" if run_url else f"MLflow run: `{run_id}` at `{tracking_uri}`", ""]
    if kfp_run_url:
        lines += [f"KFP run: [{kfp_run_url}]({kfp_run_url})", ""]
    return lines


def write_summary(summary: Mapping[str, Any]) -> None:
    """The pipeline's summary to ``$METAOPT_SUMMARY_FILE`` when the local runner set it."""
    target = os.environ.get(SUMMARY_FILE_ENV)
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(dict(summary)))


__all__ = ["RUN_STATUS", "SUMMARY_FILE_ENV", "TAG_PIPELINE_STATE", "finish_tracking", "hand_on_registered", "links_markdown",
           "start_tracking", "write_summary"]  # fmt: skip
