"""Serving a registered loss: ``mlflow models serve`` answers POST /invocations with the loss
values the library computes, and the requirements logged with the model name only this
project's library distribution (metaopt-core; not "metaopt", an unrelated package on the index)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import tomllib
import torch

from metaopt_core import exports
from metaopt_core.losses import families, loss_from_document
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.mlops.pyfunc import loss_values
from metaopt_core.mlops.registry import DISTRIBUTION, pip_requirements, register_loss
from tests.fixtures_mlflow import mlflow_server, reset_mlflow_uri  # noqa: F401  (fixtures)
from tests.fixtures_s3 import free_port

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(line: str) -> str:
    import re

    return re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("_", "-")


def test_registered_requirements_name_only_this_project(mlflow_server):
    library = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    app = tomllib.loads((ROOT / "app" / "pyproject.toml").read_text())["project"]
    assert library["name"] == DISTRIBUTION == "metaopt-core"
    # the library a downstream job installs holds no pipeline code and needs no kfp
    assert not any(_requirement_name(d).startswith(("kfp", "kubeflow")) for d in library["dependencies"])
    assert "Private :: Do Not Upload" in app["classifiers"] and f"{DISTRIBUTION}=={library['version']}" in app["dependencies"]
    assert pip_requirements() == [f"metaopt-core=={library['version']}"]

    name = f"serve-req-{uuid.uuid4().hex[:8]}"
    version = register_loss(TaylorLoss.from_preset("itl"), name, tracking_uri=mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", tracking_uri=mlflow_server))
    lines = [line.strip() for line in (local / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    names = {_requirement_name(line) for line in lines}
    # MLflow itself serves the model; everything else comes from this project's distribution
    assert names - {"mlflow"} == {"metaopt-core"} and "metaopt" not in names
    assert f"metaopt-core=={library['version']}" in lines


LOSS_KINDS = [name for name in exports.names() if exports.get(name).role == "loss"]


def learned_document(kind: str) -> dict:
    """A learned loss stored as export kind ``kind``: the first family of the table that exports
    as it, at its "ce-like" start plus a nudge (so the parameters are not a special case)."""
    name = next(name for name in families.names() if families.family_class(name).export_kind == kind)
    family = families.build_family(name)
    params = family.init(families.CE_LIKE)
    return family.to_dict(params + 0.01 * torch.randn(params.shape, generator=torch.Generator().manual_seed(0)))


def readme_request_body() -> dict:
    """The request body of the README's serving example (its ``curl ... -d '<json>'``), and a check
    that the example serves from the activated environment, as this test does."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and "mlflow models serve -m models:/itl/production --env-manager local" in readme
    return json.loads(re.search(r"-d '(\{.*?\})'", readme).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_mlflow_models_serve_answers_invocations(kind, mlflow_server, tmp_path):
    """Every loss export kind serves as the README says (the environment's bin first on PATH, as
    activating it does): the README's request body gets one loss per row."""
    name = f"serve-{uuid.uuid4().hex[:8]}"
    document = learned_document(kind)
    registered = register_loss(document, name, tracking_uri=mlflow_server)
    assert registered.tags["metaopt.export_kind"] == kind
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": str(mlflow_server)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the server execs this environment's uvicorn
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{registered.version}", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping: " + (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        for body in (readme_request_body(), {"dataframe_split": {"columns": ["probabilities", "label"], "data": [[[0.5, 0.5], 1]]}}):
            rows = body["dataframe_split"]["data"]
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions = json.loads(response.read())["predictions"]
            served = [row["loss"] for row in predictions]
            with torch.no_grad():
                expected = loss_values(loss_from_document(document, reduction="none"), pd.DataFrame(rows, columns=["probabilities", "label"]))
            assert served == pytest.approx(expected, rel=1e-6)
            assert len(set(round(v, 6) for v in served)) == len(rows)  # different rows, different losses
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# ---------------------------------------------------------------------------------------- integrity on the pyfunc path


def _stored(server, model_id: str, rel: str) -> Path:
    [path] = Path(server.artifacts_destination).rglob(f"{model_id}/artifacts/artifacts/{rel}")
    return path


def test_pyfunc_refuses_a_tampered_artifact_like_load_loss(mlflow_server, tmp_path, monkeypatch):
    """``mlflow.pyfunc.load_model`` (what ``mlflow models serve`` runs) checks the registered sha256
    tags before it serves: an edited loss.json or divergence manifest is refused with the error
    load_loss and load_optimizer give, not evaluated."""
    from metaopt_core.mlops.registry import ArtifactValidationError, load_loss, register_optimizer
    from metaopt_core.optim import KroneckerBregman
    from metaopt_core.optim.io import save_divergence

    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    name = f"pyfunc-tamper-{uuid.uuid4().hex[:8]}"
    registered = register_loss(TaylorLoss.from_preset("itl"), name, tracking_uri=mlflow_server)
    uri = f"models:/{name}/{registered.version}"
    rows = pd.DataFrame({"probabilities": [[0.7, 0.2, 0.1]], "label": [0]})
    honest = float(mlflow.pyfunc.load_model(uri).predict(rows)["loss"][0])
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "copy")))  # an untouched copy, for later

    stored = _stored(mlflow_server, registered.model_id, "loss.json")
    doc = json.loads(stored.read_text())
    doc["params"] = [-p for p in doc["params"]]  # still a valid loss document: only the hash can tell
    stored.write_text(json.dumps(doc))
    with pytest.raises(ArtifactValidationError, match="modified after registration") as served:
        mlflow.pyfunc.load_model(uri)
    with pytest.raises(ArtifactValidationError, match="modified after registration") as loaded:
        load_loss(uri)
    assert str(served.value).split(": artifacts/")[1] == str(loaded.value).split(": artifacts/")[1]  # the same error

    # no registry reachable (a copied model folder): the hashes MLmodel recorded at registration
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-such-store.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'no-such-store.db'}")
    assert float(mlflow.pyfunc.load_model(str(local)).predict(rows)["loss"][0]) == pytest.approx(honest)
    (local / "artifacts" / "loss.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactValidationError, match="hashes recorded in MLmodel"):
        mlflow.pyfunc.load_model(str(local))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    mlflow.set_tracking_uri(str(mlflow_server))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    save_divergence(KroneckerBregman.for_model(model), tmp_path / "div", lr=0.1)
    optimizer = register_optimizer(tmp_path / "div", f"{name}-md", tracking_uri=mlflow_server)
    manifest = _stored(mlflow_server, optimizer.model_id, "divergence/manifest.json")
    manifest.write_text(manifest.read_text().replace('"lr": 0.1', '"lr": 10.0'))
    with pytest.raises(ArtifactValidationError, match="divergence/manifest.json has sha256"):
        mlflow.pyfunc.load_model(optimizer.model_uri)
