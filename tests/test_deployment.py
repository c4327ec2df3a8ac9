"""What a meta-test measures for downstream use (``MetaTestReport.deployment``: ``lr_scale`` for a loss,
``lr`` for an optimiser) reaches the registered artifact: the pipeline's meta-test step records it,
the registration step has the export kind bake it into the files (covered by their sha256) and tags
the version ``metaopt.deploy.<key>``, and ``load_loss`` / ``load_optimizer`` apply it.

The learners here are the toy learner with hand-made reports (the real meta-tests fill the numbers)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from components import runtime
from metaopt_core import exports, load_loss, load_optimizer
from metaopt_core.losses import ScaledLoss
from metaopt_core.meta import driver, registry, runner
from metaopt_core.mlops.registry import ArtifactValidationError, register_export
from metaopt_core.optim import DiagonalBregman, MirrorDescent
from tests.fixtures_mlflow import mlflow_server, reset_mlflow_uri  # noqa: F401  (fixtures)
from tests.test_learner_protocol import ToyLearner


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


class LossDeployToy(ToyLearner):
    """The toy loss learner; its meta-test reports that the loss trains best at 0.5x CE's lr."""

    name = "deploy-toy-loss"

    def meta_test(self, config, artifact_dir, data, settings, *, champion_dir=None, progress=None):
        report = super().meta_test(config, artifact_dir, data, settings, champion_dir=champion_dir, progress=progress)
        report.deployment = {"lr_scale": 0.5}
        return report


class OptimizerDeployToy(LossDeployToy):
    """The toy search, exported as a mirror-descent optimiser meta-trained at lr 0.05; its
    meta-test chose lr 0.2."""

    name = "deploy-toy-optimizer"
    kind = "optimizer"

    def export(self, state, data):
        return "mirror-descent", exports.LearnedDivergence(DiagonalBregman.for_model(model()), lr=0.05)

    def meta_test(self, config, artifact_dir, data, settings, *, champion_dir=None, progress=None):
        paired = {"learned": [1.0, 1.0, 1.0], "constant": [0.0, 0.0, 0.0]}
        return runner.MetaTestReport("optimizer\n", {"meta_test_accuracy": 1.0}, "meta_test_accuracy", True, paired=paired,
                                     units=[{"seed": s} for s in range(3)], settings={"seeds": [0, 1, 2]}, deployment={"lr": 0.2})  # fmt: skip


class Artifact:
    """What a KFP artifact offers a component body."""

    def __init__(self, path: Path):
        self.path, self.uri, self.metadata = str(path), str(path), {}

    def log_metric(self, key: str, value: float) -> None:
        pass


@pytest.fixture
def learners():
    for cls in (LossDeployToy, OptimizerDeployToy):
        registry.register(cls)
    yield
    for cls in (LossDeployToy, OptimizerDeployToy):
        registry.unregister(cls.name)


def pipeline_steps(name: str, tmp_path: Path) -> dict:
    """Meta-train, then the pipeline's meta-test step and registration step (their bodies, as the
    components call them); the registration summary."""
    learner = registry.get(name)
    config = learner.resolve_config({"steps": 2})
    inputs = learner.prepare(config)
    inputs.save(tmp_path / "data")
    runner.export(learner, driver.run(learner, config, inputs), inputs, tmp_path / "learned")
    model_name = f"{name}-{uuid.uuid4().hex[:8]}"
    doc = json.dumps(config.model_dump(mode="json"))
    gate = Artifact(tmp_path / "gate" / "gate_inputs.json")
    scores, metric, greater = runtime.meta_test(name, doc, str(tmp_path / "data"), str(tmp_path / "learned"), "", {}, "",
                                                Artifact(tmp_path / "report.md"), Artifact(tmp_path / "plots.html"), None, model_name, gate)  # fmt: skip
    recorded = json.loads(Path(gate.path).read_text())["deployment"]  # what the registration step reads
    registered = Artifact(tmp_path / "registered")
    outcome = runtime.register_and_promote(name, doc, str(tmp_path / "learned"), inputs.fingerprint, "", model_name, scores, metric, greater, 0.0,
                                           Artifact(tmp_path / "registration.md"), gate.path, "", registered)  # fmt: skip
    summary = json.loads(outcome[-1])
    assert summary["deployment"] == recorded and "Deployment (measured by the meta-test" in (tmp_path / "registration.md").read_text()
    return {**summary, "registered": Path(registered.path)}


def test_a_losss_measured_lr_scale_is_baked_into_the_registered_loss(learners, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    summary = pipeline_steps("deploy-toy-loss", tmp_path)
    assert summary["deployment"] == {"lr_scale": 0.5} and summary["export_kind"] == "loss-document"
    version = MlflowClient(mlflow_server).get_model_version(summary["model_name"], summary["version"])
    assert version.tags["metaopt.deploy.lr_scale"] == "0.5" and version.tags["metaopt.export_kind"] == "loss-document"
    served = load_loss(summary["model_uri"], tracking_uri=mlflow_server)
    trained = exports.get("loss-document").build(tmp_path / "learned")  # as meta-training exported it: no scale
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert isinstance(served, ScaledLoss) and served.lr_scale == 0.5
    assert torch.allclose(served(logits, labels), 0.5 * trained(logits, labels))
    assert exports.read(summary["registered"])["lr_scale"] == 0.5  # the KFP output holds the registered files


def test_an_optimisers_measured_lr_is_baked_into_the_registered_optimiser(learners, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    summary = pipeline_steps("deploy-toy-optimizer", tmp_path)
    assert summary["deployment"] == {"lr": 0.2} and summary["export_kind"] == "mirror-descent" and summary["kind"] == "optimizer"
    version = MlflowClient(mlflow_server).get_model_version(summary["model_name"], summary["version"])
    assert version.tags["metaopt.deploy.lr"] == "0.2"
    optimizer = load_optimizer(summary["model_uri"], model(), tracking_uri=mlflow_server)
    assert isinstance(optimizer, MirrorDescent) and optimizer.param_groups[0]["lr"] == 0.2  # meta-training's was 0.05
    assert load_optimizer(summary["model_uri"], model(), lr=0.01, tracking_uri=mlflow_server).param_groups[0]["lr"] == 0.01


def test_a_deployment_the_kind_does_not_take_is_refused(mlflow_server, tmp_path):
    exports.write(tmp_path, "mirror-descent", exports.LearnedDivergence(DiagonalBregman.for_model(model()), lr=0.05))
    with pytest.raises(ArtifactValidationError, match=r"deployment: got \['lr_scale'\] for a mirror-descent; allowed: \['lr'\]"):
        register_export(tmp_path, f"bad-{uuid.uuid4().hex[:8]}", deployment={"lr_scale": 0.5}, tracking_uri=mlflow_server)
    with pytest.raises(ArtifactValidationError, match="field 'lr': got -1"):
        register_export(tmp_path, f"bad-{uuid.uuid4().hex[:8]}", deployment={"lr": -1}, tracking_uri=mlflow_server)
