"""No credential value leaks: not into compiled pipeline YAML, not into MLflow params, tags or
registered-version tags, not into what a step logs. Every credential a pipeline step or the CLI
can hold is set to a recognisable fake value while a run is tracked and a model registered
against the real MLflow test server (PostgreSQL), and a pipeline is compiled and uploaded."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.fixtures_mlflow import mlflow_server, reset_mlflow_uri  # noqa: F401

FAKE = {  # every credential variable the steps, MLflow clients, boto3 or the KFP client read
    "AWS_ACCESS_KEY_ID": "AKIALEAKCHECKKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "leak-check-aws-secret-7f3a9c",
    "MLFLOW_TRACKING_USERNAME": "leak-check-user-5b1e",
    "MLFLOW_TRACKING_PASSWORD": "leak-check-mlflow-password-2d8c",
    "KFP_TOKEN": "leak-check-kfp-token-9e4f",
    "KFP_COOKIE": "authservice_session=leak-check-cookie-1a6b",
}


def _leaks(text: str) -> list[str]:
    return [name for name, value in FAKE.items() if value in text or value.split("=")[-1] in text]


def test_compiled_and_uploaded_pipelines_hold_no_credential(tmp_path, monkeypatch):
    from unittest import mock

    import kfp

    from pipelines import remote
    from pipelines.builder import PipelineOptions, compile_pipeline
    from pipelines.kfp_client import connection

    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    for options in (PipelineOptions(), PipelineOptions(gpu=True, shards=2, blocks=1), PipelineOptions(workers=2)):
        text = compile_pipeline("itl", tmp_path / "itl.yaml", options).read_text()
        assert not _leaks(text), _leaks(text)
        assert "metaopt-mlflow-auth" in text  # the Secret is referenced by name, its values come at run time
    uploaded = []
    instance = mock.create_autospec(kfp.Client, instance=True)
    instance.list_pipelines.return_value = argparse.Namespace(pipelines=[argparse.Namespace(pipeline_id="p-1")])
    instance.upload_pipeline_version.side_effect = lambda path, **kw: uploaded.append(Path(path).read_text()) or argparse.Namespace(pipeline_version_id="v")
    monkeypatch.setattr(kfp, "Client", mock.create_autospec(kfp.Client, return_value=instance))
    conn = connection("http://kfp:8080", "team-a")
    assert conn.token == FAKE["KFP_TOKEN"] or conn.cookies == FAKE["KFP_COOKIE"]
    assert not _leaks(repr(conn))
    remote.upload_pipeline("itl", conn)
    assert uploaded and not _leaks(uploaded[0]) and not _leaks(str(instance.mock_calls))


def test_tracked_runs_and_registered_versions_hold_no_credential(mlflow_server, monkeypatch, capfd, caplog):  # noqa: F811
    from metaopt_core.losses.taylor import TaylorLoss
    from metaopt_core.mlops.registry import register_loss
    from metaopt_core.mlops.tracking import start_run

    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    config = {"algorithm": "itl", "outer": {"steps": 2}, "data": {"source": "s3://metaopt/datasets/pacs/"}}
    with start_run("leak-check", tracking_uri=mlflow_server) as tracker:
        tracker.log_config(config)
        tracker.set_fingerprint("sha256:feedbeef")
        tracker.log_metrics({"loss": 0.5}, step=0)
        run_id = tracker.run_id
    registered = register_loss(TaylorLoss.from_preset("itl"), "leak-check", config=config, scores={"meta_test_accuracy": 0.7},
                               run_id=run_id, tracking_uri=mlflow_server)  # fmt: skip
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    version = client.get_model_version("leak-check", registered.version)
    recorded = [run.data.params, run.data.tags, version.tags, {"description": version.description or ""}]
    for record in recorded:
        for key, value in record.items():
            assert not _leaks(f"{key}={value}"), f"{key} holds {_leaks(f'{key}={value}')}"
    out, err = capfd.readouterr()
    assert not _leaks(out + err + caplog.text)
