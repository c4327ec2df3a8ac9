"""Lineage both ways and idempotent steps (issue 13b).

- MLflow calls are retried on transient errors with back-off (a fake client that fails the first
  N calls), never on real errors, and a metric is logged at most once per step (a retried block);
- the pipeline's MLflow run is found by the KFP run id, ended FINISHED / FAILED by the exit step,
  and reused by a retried ``start_tracking``;
- a retried ``register_and_promote`` reuses the version (and the decision) its first attempt made;
- the compiled pipeline has the ExitHandler and its final-status task; the local runner leaves the
  MLflow run FAILED when a step fails and FINISHED when all succeed (slow).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from pydantic import Field

from metaopt_core.config import StrictModel
from metaopt_core.mlops.tracking import (
    NO_RETRY,
    TAG_KFP_RUN_ID,
    TAG_KFP_RUN_URL,
    RetryPolicy,
    Tracker,
    call_with_retries,
    find_pipeline_run,
    is_transient,
    kfp_run_url,
    kfp_tags,
    mlflow_run_url,
)
from tests.fixtures_mlflow import mlflow_server  # noqa: F401
from tests.test_learner_protocol import ToyLearner

FAST = RetryPolicy(attempts=4, backoff_s=0.0)
UNAVAILABLE = MlflowException("API request failed: 503", error_code=TEMPORARILY_UNAVAILABLE)


# ----------------------------------------------------------------------------- retries, with a fake client


class FlakyClient:
    """The MlflowClient calls a resumed Tracker makes; the first ``failures`` calls of each method
    in ``flaky`` raise ``error``; ``history`` is what the run already holds."""

    def __init__(self, failures: int = 0, error: Exception = UNAVAILABLE, flaky=("log_batch",), history: dict | None = None):
        self.failures, self.error, self.flaky = failures, error, set(flaky)
        self.calls: dict[str, int] = {}
        self.batches: list[list[Metric]] = []
        self.history = {key: [Metric(key, 0.0, 0, step) for step in steps] for key, steps in (history or {}).items()}
        self.status = "RUNNING"

    def _tick(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.flaky and self.calls[name] <= self.failures:
            raise self.error

    def get_run(self, run_id):
        self._tick("get_run")
        return SimpleNamespace(info=SimpleNamespace(status=self.status, experiment_id="7", run_id=run_id))

    def update_run(self, run_id, status):
        self._tick("update_run")
        self.status = status

    def set_terminated(self, run_id, status="FINISHED"):
        self._tick("set_terminated")
        self.status = status

    def get_metric_history(self, run_id, key):
        self._tick("get_metric_history")
        return list(self.history.get(key, []))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._tick("log_batch")
        if metrics:
            self.batches.append(list(metrics))
            for metric in metrics:
                self.history.setdefault(metric.key, []).append(metric)


def test_transient_errors_are_told_apart_from_real_ones():
    import requests

    assert is_transient(UNAVAILABLE) and is_transient(ConnectionResetError()) and is_transient(requests.exceptions.ConnectionError())
    assert is_transient(MlflowException("API request to http://x failed with exception Max retries exceeded"))  # INTERNAL_ERROR
    assert is_transient(MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED))
    assert not is_transient(MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(ValueError("bad"))


def test_call_with_retries_backs_off_and_gives_up():
    waits: list[float] = []
    attempts = iter([UNAVAILABLE, UNAVAILABLE, "done"])

    def flaky():
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert call_with_retries(flaky, policy=RetryPolicy(attempts=3, backoff_s=0.5), sleep=waits.append) == "done"
    assert waits == [0.5, 1.0]
    with pytest.raises(MlflowException):
        call_with_retries(lambda: (_ for _ in ()).throw(UNAVAILABLE), policy=RetryPolicy(attempts=2, backoff_s=0.0))
    real = MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)
    calls = []
    with pytest.raises(MlflowException, match="bad"):
        call_with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(real), policy=FAST)
    assert calls == [1]  # not retried
    assert RetryPolicy(attempts=9, backoff_s=1.0, max_backoff_s=4.0).delay(5) == 4.0
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_the_tracker_retries_transient_failures_of_its_calls():
    client = FlakyClient(failures=2, flaky=("get_run", "log_batch", "set_terminated"))
    tracker = Tracker(run_id="r1", client=client, retry=FAST).start()
    assert tracker.resumed and client.calls["get_run"] == 3
    assert tracker.log_metrics({"loss": 1.0}, step=1) == {"loss": 1.0}
    tracker.set_tags({"a": "b"})
    tracker.terminate("FAILED")
    assert client.status == "FAILED" and client.calls["set_terminated"] == 3
    assert [m.step for m in client.history["loss"]] == [1]


def test_a_logging_error_that_persists_or_is_real_still_fails():
    with pytest.raises(MlflowException, match="503"):
        Tracker(run_id="r1", client=FlakyClient(failures=10), retry=FAST).log_metrics({"loss": 1.0}, step=0)
    client = FlakyClient(failures=1, error=MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE))
    with pytest.raises(MlflowException, match="bad key"):
        Tracker(run_id="r1", client=client, retry=FAST).log_metrics({"loss": 1.0}, step=0)
    assert client.calls["log_batch"] == 1
    assert Tracker(run_id="r1", client=FlakyClient(), retry=NO_RETRY).log_metrics({"x": 1}, step=0) == {"x": 1.0}


def test_a_retried_block_does_not_log_a_step_twice():
    # the first attempt of the block logged steps 1 and 2 of "objective", then its pod died
    client = FlakyClient(history={"objective": [1, 2]})
    tracker = Tracker(run_id="r1", client=client, retry=FAST).start()
    callback = tracker.callback()
    for step in (1, 2, 3, 4):  # the retry repeats the block from its input state
        callback({"step": step, "objective": 1.0 / step, "theta": 0.1 * step})
    assert sorted(m.step for m in client.history["objective"]) == [1, 2, 3, 4]  # 3 and 4 added, 1 and 2 not again
    assert sorted(m.step for m in client.history["theta"]) == [1, 2, 3, 4]
    assert client.calls["get_metric_history"] == 2  # read once per key
    assert tracker.log_metrics({"objective": 9.0}, step=4) == {}  # this tracker's own steps are known too
    assert len(client.history["objective"]) == 4


# ----------------------------------------------------------------------------- lineage helpers


def test_urls_and_kfp_tags(monkeypatch):
    monkeypatch.delenv("KFP_UI_URL", raising=False)
    assert kfp_run_url("abc") is None and kfp_tags("abc", "metaopt-arl-x") == {TAG_KFP_RUN_ID: "abc", "metaopt.pipeline_run": "metaopt-arl-x"}
    monkeypatch.setenv("KFP_UI_URL", "https://kf.example.com/pipeline/")
    assert kfp_run_url("abc") == "https://kf.example.com/pipeline/#/runs/details/abc"
    assert kfp_tags("abc")[TAG_KFP_RUN_URL] == "https://kf.example.com/pipeline/#/runs/details/abc"
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert mlflow_run_url("http://mlflow:5000/", "3", "r") == "http://mlflow:5000/#/experiments/3/runs/r"
    assert mlflow_run_url("sqlite:///x.db", "3", "r") is None
    # the public UI address wins over the in-cluster tracking URI the steps use
    monkeypatch.setenv("MLFLOW_UI_URL", "https://mlflow.example.com/")
    assert mlflow_run_url("http://mlflow.metaopt.svc.cluster.local:5000", "3", "r") == "https://mlflow.example.com/#/experiments/3/runs/r"
    assert mlflow_run_url("sqlite:///x.db", "3", "r") == "https://mlflow.example.com/#/experiments/3/runs/r"
    assert mlflow_run_url("http://mlflow:5000", "3", "") is None


# ----------------------------------------------------------------------------- against a real server


class Folder(SimpleNamespace):
    """A KFP artifact stand-in: a path and metadata."""

    def __init__(self, path: Path):
        super().__init__(path=str(path), metadata={})


def test_start_and_finish_tracking_find_the_run_by_kfp_run_id(mlflow_server, monkeypatch, tmp_path):
    from components import lineage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("KFP_UI_URL", "http://kfp.example")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    data = Folder(tmp_path / "data")
    Path(data.path).mkdir()
    (Path(data.path) / "inputs.json").write_text("{}")
    kfp_id = f"kfp-{uuid.uuid4().hex}"
    config = json.dumps({"algorithm": "arl", "generations": 2})
    run_id, experiment_id, _ = lineage.start_tracking("arl", config, data, "f" * 64, "lineage-test", "lineage-model", "metaopt-arl-1", kfp_id)
    # a retried start step reuses the run instead of making a second one
    again, _, _ = lineage.start_tracking("arl", config, data, "f" * 64, "lineage-test", "lineage-model", "metaopt-arl-1", kfp_id)
    assert again == run_id and find_pipeline_run(kfp_id).info.run_id == run_id
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # every step logs into it; only the exit step ends it
    assert run.data.tags[TAG_KFP_RUN_ID] == kfp_id and run.data.tags[TAG_KFP_RUN_URL] == f"http://kfp.example/#/runs/details/{kfp_id}"
    assert run.data.tags["metaopt.pipeline_run"] == "metaopt-arl-1"

    out = json.loads(lineage.finish_tracking("FAILED", kfp_id, "Task meta-test failed."))
    run = client.get_run(run_id)
    assert (run.info.status, out["mlflow_status"], out["mlflow_run_id"]) == ("FAILED", "FAILED", run_id)
    assert run.data.tags["metaopt.pipeline_state"] == "FAILED" and run.data.tags["metaopt.pipeline_error"] == "Task meta-test failed."
    assert out["mlflow_run_url"] == f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run_id}"
    assert json.loads(lineage.finish_tracking("SUCCEEDED", kfp_id))["mlflow_status"] == "FINISHED"
    assert client.get_run(run_id).info.status == "FINISHED"
    # skipped pipelines have no MLflow run: nothing to end
    assert json.loads(lineage.finish_tracking("SUCCEEDED", "kfp-none"))["mlflow_run_id"] == ""


def _exported_loss(directory: Path) -> Path:
    from metaopt_core.losses.taylor import TaylorLoss
    from metaopt_core.meta.runner import RESULT_FORMAT

    directory.mkdir(parents=True)
    (directory / "result.json").write_text(json.dumps({"format": RESULT_FORMAT, "kind": "loss", "steps": 2}))
    (directory / "loss.json").write_text(json.dumps(TaylorLoss.from_preset("itl").to_dict()))
    return directory


def test_a_retried_registration_reuses_its_version_and_decision(mlflow_server, monkeypatch, tmp_path):
    from components import runtime
    from metaopt_core.mlops.registry import production_version

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    name = f"retry-{uuid.uuid4().hex[:8]}"
    learned = _exported_loss(tmp_path / "learned")
    gate_inputs = tmp_path / "gate_inputs.json"
    gate_inputs.write_text(json.dumps({"paired": {"learned": [0.9 + 0.001 * i for i in range(12)], "ce": [0.5] * 12}, "settings": {"seeds": list(range(12))},
                                       "greater_is_better": True, "metric": "meta_test_accuracy", "champion_version": None}))  # fmt: skip
    tracker = Tracker(experiment="lineage-test", tracking_uri=mlflow_server).start()

    def attempt(index: int) -> tuple:
        report, registered = Folder(tmp_path / f"report-{index}.md"), Folder(tmp_path / f"registered-{index}")
        outcome = runtime.register_and_promote("itl", "{}", str(learned), "f" * 64, tracker.run_id, name, {"meta_test_accuracy": 0.91},
                                               "meta_test_accuracy", True, 0.0, report, str(gate_inputs), "kfp-run-1", registered)  # fmt: skip
        return outcome, report, registered

    first, report, registered = attempt(0)
    second, _, registered_again = attempt(1)  # the step is retried after it registered and decided
    assert first[:4] == ("1", "promoted", True, "1") and second[:4] == first[:4]
    versions = MlflowClient(mlflow_server).search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == ["1"] and versions[0].tags[TAG_KFP_RUN_ID] == "kfp-run-1"
    assert production_version(name, tracking_uri=mlflow_server) == "1"
    # lineage in the KFP outputs: the registered files with their models:/ URI, the report's links
    assert registered.metadata["model_uri"] == f"models:/{name}/1" == registered_again.metadata["model_uri"]
    assert registered.metadata["mlflow_run_id"] == tracker.run_id and (Path(registered.path) / "loss.json").is_file()
    text = Path(report.path).read_text()
    assert f"models:/{name}/1" in text and f"[{tracker.run_id}]({tracker.run_url})" in text
    assert report.metadata["model_uri"] == f"models:/{name}/1"

    # another pipeline run registers its own version
    third = runtime.register_and_promote("itl", "{}", str(learned), "f" * 64, tracker.run_id, name, {"meta_test_accuracy": 0.91},
                                         "meta_test_accuracy", True, 0.0, Folder(tmp_path / "r.md"), "", "kfp-run-2", None)  # fmt: skip
    assert third[0] == "2"


def test_a_retried_gate_keeps_a_promotion_its_first_attempt_made(mlflow_server):
    from metaopt_core.gate import decide_gate
    from metaopt_core.losses.taylor import TaylorLoss
    from metaopt_core.mlops.registry import apply_gate, recorded_decision, register_loss

    name = f"regate-{uuid.uuid4().hex[:8]}"
    version = register_loss(TaylorLoss.from_preset("itl"), name, tracking_uri=mlflow_server).version
    assert recorded_decision(name, version, tracking_uri=mlflow_server) is None
    gate = decide_gate({"learned": [0.8 + 0.001 * i for i in range(12)], "ce": [0.7] * 12}, greater_is_better=True).to_dict()
    record = {"metric": "meta_test_accuracy", "greater_is_better": True, "champion_version": None, "settings": {}}
    assert apply_gate(name, version, gate, record, tracking_uri=mlflow_server).promoted
    # the same decision applied again (an attempt that stopped before its record was complete)
    again = apply_gate(name, version, gate, record, tracking_uri=mlflow_server)
    assert again.promoted and "production moved" not in again.reason and again.production_version == version
    recorded = recorded_decision(name, version, tracking_uri=mlflow_server)
    assert (recorded.decision, recorded.promoted, recorded.production_version, recorded.champion_version) == ("promoted", True, version, None)


# ----------------------------------------------------------------------------- the pipeline


def test_the_compiled_pipeline_ends_its_mlflow_run_in_an_exit_handler():
    from pipelines.builder import PipelineOptions, build_pipeline

    spec = build_pipeline("arl", PipelineOptions(blocks=1, cluster_env=False)).pipeline_spec
    root = spec.root.dag.tasks
    exits = [key for key, task in root.items() if task.trigger_policy.strategy == task.trigger_policy.TriggerStrategy.ALL_UPSTREAM_TASKS_COMPLETED]
    assert len(exits) == 1 and set(root) == {exits[0], "exit-handler-1"}
    finish = root[exits[0]]
    assert finish.component_ref.name == "comp-finish-tracking"
    assert finish.inputs.parameters["status"].task_final_status.producer_task == "exit-handler-1"
    assert finish.inputs.parameters["kfp_run_id"].runtime_value.constant.string_value == "{{$.pipeline_job_uuid}}"
    tasks = {key: task for component in spec.components.values() if component.HasField("dag") for key, task in component.dag.tasks.items()}
    for key in ("start-tracking", "register-and-promote"):
        assert tasks[key].inputs.parameters["kfp_run_id"].runtime_value.constant.string_value == "{{$.pipeline_job_uuid}}"
    outputs = spec.components["comp-register-and-promote"].output_definitions.artifacts
    assert outputs["registered"].artifact_type.schema_title == "system.Model"


class FailableMetaTest(StrictModel):
    tolerance: float = Field(0.5, gt=0.0)
    fail: bool = False


class LineageToy(ToyLearner):
    """The toy learner, with a meta-test that fails on request (a step failing mid-pipeline)."""

    name = "lineage-toy"
    meta_test_class = FailableMetaTest

    def meta_test(self, config, artifact_dir, data, settings, *, champion_dir=None, progress=None) -> Any:
        if settings.fail:
            raise RuntimeError("meta-test failed on purpose")
        return super().meta_test(config, artifact_dir, data, settings, champion_dir=champion_dir, progress=progress)


@pytest.mark.slow
def test_the_local_runner_ends_the_mlflow_run_failed_or_finished(mlflow_server, tmp_path):
    from metaopt_core.meta import registry
    from pipelines.builder import PipelineOptions
    from pipelines.local import PipelineFailed, run_local

    registry.register(LineageToy)
    try:
        model = f"lineage-{uuid.uuid4().hex[:8]}"
        options = PipelineOptions(blocks=1, cluster_env=False, retries=False)
        run = lambda **kw: run_local("lineage-toy", {"steps": 2}, options=options, tracking_uri=mlflow_server, workdir=tmp_path,  # noqa: E731
                                     model_name=model, echo=lambda line: None, **kw)  # fmt: skip
        with pytest.raises(PipelineFailed, match="meta-test"):
            run(meta_test_settings={"fail": True})
        client = MlflowClient(mlflow_server)
        experiment = client.get_experiment_by_name("metaopt").experiment_id
        failed = client.search_runs([experiment], f"tags.`metaopt.model_name` = '{model}'")
        assert [r.info.status for r in failed] == ["FAILED"]
        assert failed[0].data.tags["metaopt.pipeline_state"] == "FAILED" and failed[0].data.tags[TAG_KFP_RUN_ID]

        summary = run()
        assert (summary["status"], summary["version"], summary["mlflow_status"]) == ("trained", "1", "FINISHED")
        good = client.get_run(summary["run_id"])
        assert good.info.status == "FINISHED" and good.data.tags[TAG_KFP_RUN_ID] == summary["kfp_run_id"] != failed[0].data.tags[TAG_KFP_RUN_ID]
        assert client.get_model_version(model, "1").tags[TAG_KFP_RUN_ID] == summary["kfp_run_id"]
        assert sorted(m.step for m in client.get_metric_history(summary["run_id"], "objective")) == [1, 2]
    finally:
        registry.unregister("lineage-toy")
