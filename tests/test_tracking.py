"""Tracking: one MLflow run per meta-training job, written through ``Tracker`` and its callback,
against a real ``mlflow server`` process and the embedded SQLite default."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.meta.itl import InnerConfig
from metaopt_core.mlops import tracking
from metaopt_core.mlops.tracking import Tracker, TrackingServerUnreachable, flatten, markdown_table, numeric_metrics
from tests.fixtures_mlflow import mlflow_server, reset_mlflow_uri  # noqa: F401
from tests.fixtures_s3 import free_port


def download_text(server: str, run_id: str, path: str, tmp_path: Path) -> str:
    mlflow.set_tracking_uri(server)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path))
    return Path(local).read_text()


# ---------------------------------------------------------------------------------------- pure helpers


def test_flatten_turns_nested_configs_into_dotted_params():
    spec = InnerConfig(model="mlp2", lr=0.05, max_epochs=3)
    flat = flatten({"algorithm": "itl", "train": spec, "angles": [0, 15], "empty": {}})
    assert flat["train.lr"] == 0.05 and flat["train.model"] == "mlp2" and flat["train.max_epochs"] == 3
    assert flat["angles"] == [0, 15] and flat["empty"] == {} and flat["algorithm"] == "itl"
    assert tracking.param_value([0, 15]) == "[0, 15]" and tracking.param_value(None) == "null"
    assert tracking.param_value(True) == "true" and tracking.param_value(0.05) == "0.05"


def test_numeric_metrics_keeps_numbers_and_flattens():
    got = numeric_metrics(
        {
            "loss": 1,
            "acc": np.float32(0.5),
            "t": torch.tensor(2.0),
            "ok": True,
            "name": "x",
            "vec": [1, 2],
            "held_out": {"acc": 0.25},
            "bad key!": 3.0,
            "nan": float("nan"),
        }
    )
    assert {k: v for k, v in got.items() if k != "nan"} == {"loss": 1.0, "acc": 0.5, "t": 2.0, "ok": 1.0, "held_out.acc": 0.25, "bad key_": 3.0}
    assert math.isnan(got["nan"])


def test_history_rows_for_the_plot_helpers():
    rows, keys = tracking.history_rows([{"generation": 1, "best": -0.5, "note": "x", "ok": True}, {"generation": 2, "best": -0.6}])
    assert keys == ["best"] and rows[1] == {"generation": 2, "best": -0.6}
    rows, keys = tracking.history_rows({"MetaMD": [3.0, 1.0], "SGD": [3.0, 2.5, 2.0]})
    assert keys == ["MetaMD", "SGD"]
    assert rows == [{"step": 0, "MetaMD": 3.0, "SGD": 3.0}, {"step": 1, "MetaMD": 1.0, "SGD": 2.5}, {"step": 2, "SGD": 2.0}]
    modules = tracking.loss_curves_input({"doc": {"family": "gce", "params": {"q": 0.7}}})
    assert list(modules) == ["doc", "cross-entropy"] and type(modules["doc"]).__name__ == "GeneralizedCrossEntropy"


def test_markdown_table_exact():
    rows = [{"loss": "CE", "acc": 0.28, "rank": 3}, {"loss": "ITL", "acc": 0.59, "note": "a|b"}]
    assert markdown_table(rows) == ("| loss | acc | rank | note |\n|---|---|---|---|\n| CE | 0.2800 | 3 |  |\n| ITL | 0.5900 |  | a\\|b |\n")


# ---------------------------------------------------------------------------------------- a run


def test_tracker_logs_config_step_metrics_fingerprint_plots_and_tables(mlflow_server, tmp_path):
    config = {"algorithm": "arl", "train": InnerConfig(model="mlp2", lr=0.01, max_epochs=2), "noise": {"kind": "symmetric", "rate": 0.8}}
    with Tracker(experiment="arl-test", run_name="demo", tracking_uri=mlflow_server) as tracker:
        params = tracker.log_config(config)
        tracker.set_fingerprint("sha256:0123")
        callback = tracker.callback()
        # the metrics dict ARL's run() hands its callback, one per generation
        for generation in (1, 2, 3):
            callback(
                {
                    "generation": generation,
                    "best": -0.5 - 0.1 * generation,
                    "mean": -0.4,
                    "best_accuracy": 0.5 + 0.1 * generation,
                    "diverged": 0,
                    "sigma": 1.2 / generation,
                    "note": "ignored",
                    "held_out": {"acc": 0.3 * generation},
                }
            )
        tracker.callback(prefix="meta_test")({"step": 0, "acc": 0.9})
        tracker.log_metrics({"worst_fitness": float("nan")}, step=3)  # a diverged generation must not crash the run
        tracker.log_loss_plot({"ITL preset": TaylorLoss.from_preset("itl"), "ARL AR-S80": TaylorLoss.from_preset("arl-ar-s80").to_dict()})
        tracker.log_history_plot([{"generation": g, "best_accuracy": 0.5 + 0.1 * g} for g in (1, 2, 3)])
        tracker.log_history_plot({"MetaMD": [3.0, 1.0, 0.2], "SGD": [3.0, 2.5, 2.1]}, "plots/convergence.png")
        tracker.log_table("meta_test", {"CE": {"accuracy": 0.28}, "ITL": {"accuracy": 0.59}}, index="loss", title="80% symmetric noise")
        run_id = tracker.run_id
        assert tracker.run_url.startswith(mlflow_server) and run_id in tracker.run_url

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert client.get_experiment(run.info.experiment_id).name == "arl-test"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["noise.rate"] == "0.8" and params["algorithm"] == "arl"
    assert run.data.params["train.model"] == "mlp2"
    assert run.data.tags["metaopt.data_fingerprint"] == "sha256:0123"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "best_accuracy"))
    assert [s for s, _ in history] == [1, 2, 3]
    assert np.allclose([v for _, v in history], [0.6, 0.7, 0.8])
    assert [m.step for m in client.get_metric_history(run_id, "held_out.acc")] == [1, 2, 3]
    assert client.get_metric_history(run_id, "meta_test.acc")[0].value == 0.9
    assert "note" not in run.data.metrics and "generation" not in run.data.metrics
    assert math.isnan(client.get_metric_history(run_id, "worst_fitness")[0].value)

    artifacts = (
        {a.path for a in client.list_artifacts(run_id)}
        | {a.path for a in client.list_artifacts(run_id, "plots")}
        | {a.path for a in client.list_artifacts(run_id, "tables")}
    )
    assert {
        "config.json",
        "plots/learned_loss.png",
        "plots/meta_training.png",
        "plots/convergence.png",
        "tables/meta_test.md",
        "tables/meta_test.json",
    } <= artifacts
    assert download_text(mlflow_server, run_id, "tables/meta_test.md", tmp_path) == (
        "### 80% symmetric noise\n\n| loss | accuracy |\n|---|---|\n| CE | 0.2800 |\n| ITL | 0.5900 |\n"
    )
    table = json.loads(download_text(mlflow_server, run_id, "tables/meta_test.json", tmp_path))
    assert table["rows"] == [{"loss": "CE", "accuracy": 0.28}, {"loss": "ITL", "accuracy": 0.59}]
    assert json.loads(download_text(mlflow_server, run_id, "config.json", tmp_path))["train"]["lr"] == 0.01


def test_failed_job_marks_the_run_failed(mlflow_server):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(tracking_uri=mlflow_server) as tracker:
            tracker.log_metrics({"loss": 1.0})
            raise RuntimeError("boom")
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "FAILED"


def test_the_new_data_gate_counts_only_runs_that_ended_finished(mlflow_server):
    from metaopt_core.mlops.tracking import finished_training_tags, last_finished_training

    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"new-data-gate-{time.time_ns()}")
    model = f"gate-model-{time.time_ns()}"

    def training(fingerprint: str, version: str, status: str | None) -> str:
        run = client.create_run(experiment_id)
        for key, value in finished_training_tags(model, fingerprint, "cfg", version).items():
            client.set_tag(run.info.run_id, key, value)
        if status:
            client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    assert last_finished_training(model, tracking_uri=mlflow_server) is None
    finished = training("aaa", "1", "FINISHED")
    time.sleep(0.01)  # end times order the runs
    training("bbb", "2", "FAILED")  # registered version 2, then a later step failed
    training("ccc", "3", "KILLED")
    training("ddd", "4", None)  # still running (or its pod died before the exit step)
    last = last_finished_training(model, tracking_uri=mlflow_server)
    assert (last.run_id, last.fingerprint, last.version) == (finished, "aaa", "1")


def test_cluster_environment_variables_are_honoured(mlflow_server, monkeypatch):
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"injected-{time.time_ns()}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    with Tracker() as tracker:  # no arguments: everything from the environment
        tracker.log_metrics({"loss": 2.0}, step=0)
    assert tracker.tracking_uri == mlflow_server and tracker.experiment_id == experiment_id
    assert client.get_run(tracker.run_id).info.experiment_id == experiment_id

    # KFP created the run and injects its id: the component's tracker appends to it, leaves it running
    injected = client.create_run(experiment_id, run_name="pipeline-run")
    monkeypatch.setenv("MLFLOW_RUN_ID", injected.info.run_id)
    for step in (0, 1):
        with Tracker() as tracker:
            assert tracker.resumed and tracker.run_id == injected.info.run_id
            tracker.log_metrics({"outer_loss": 1.0 / (step + 1)}, step=step)
    assert client.get_run(injected.info.run_id).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(injected.info.run_id, "outer_loss")] == [0, 1]

    # resuming a finished run reopens it and closes it again
    client.set_terminated(injected.info.run_id)
    with Tracker(run_id=injected.info.run_id) as tracker:
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
    assert client.get_run(injected.info.run_id).info.status == "FINISHED"

    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(LookupError, match="not found"):
        Tracker().start()


def test_params_are_write_once(mlflow_server):
    with Tracker(tracking_uri=mlflow_server) as tracker:
        tracker.log_config({"lr": 0.1}, artifact_file=None)
        tracker.log_config({"lr": 0.1}, artifact_file=None)  # same value: fine (a resumed component)
        with pytest.raises(ValueError, match="write-once"):
            tracker.log_config({"lr": 0.2}, artifact_file=None)


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Tracker(experiment="local") as tracker:
        tracker.log_metrics({"loss": 0.5}, step=3)
    assert tracker.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    metric = MlflowClient(tracker.tracking_uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in metric] == [(3, 0.5)]


def test_unreachable_tracking_server_fails_fast(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingServerUnreachable, match=f"at {uri} is unreachable"):
        Tracker().start()
    assert time.monotonic() - started < 15


def test_health_probe_counts_any_answer_but_gateway_errors():
    """401 from an auth proxy: the server is there. 503 from a proxy whose backend is down: not."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = {"status": 401, "paths": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            answer["paths"].append(self.path)
            self.send_response(answer["status"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        tracking.ensure_reachable(base + "/mlflow")
        assert answer["paths"] == ["/mlflow/health"]
        answer["status"] = 503
        with pytest.raises(TrackingServerUnreachable, match="HTTP 503 .* 2 attempts"):
            tracking.ensure_reachable(base + "/other", attempts=2, backoff_s=0.01)
        assert answer["paths"][1:] == ["/other/health", "/other/health"]
    finally:
        server.shutdown()
