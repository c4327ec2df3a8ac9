"""Shared pytest set-up. Fixtures that start real services live in tests/fixtures_*.py and are
registered here so every test module can use them."""

import pytest
import torch

# Real services (moto S3 server, MLflow tracking server) as session fixtures.
pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_mlflow"]

# Test tensors are small: one intra-op thread is as fast and leaves the second core to the
# MLflow/S3 server processes the tests start (two threads each was up to 10x slower under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch, tmp_path):
    """No test may write to the developer's ./mlflow.db or inherit a cluster's MLflow run."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METAOPT_HOME", str(tmp_path / "metaopt-home"))
