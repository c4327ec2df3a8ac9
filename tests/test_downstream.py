"""The downstream job: a fresh Python process that has only the package and MLFLOW_TRACKING_URI
loads ``models:/itl/production`` and ``models:/metamd/production`` and trains a model with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from torch import nn

from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.mlops.registry import promote, register_loss, register_optimizer
from metaopt_core.optim import KroneckerBregman
from tests.fixtures_mlflow import mlflow_server, reset_mlflow_uri  # noqa: F401

# The job. Everything that could unpickle is booby-trapped first: loading must not need it.
JOB = textwrap.dedent(
    """
    import json, pickle, sys
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the downstream load path tried to unpickle")

    pickle.load = pickle.loads = torch.load = refuse
    try:
        import cloudpickle
        cloudpickle.load = cloudpickle.loads = refuse
    except ImportError:
        pass

    from metaopt_core import load_loss, load_optimizer

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    torch.manual_seed(0)
    centres = 2.0 * torch.randn(4, 20)
    y = torch.randint(0, 4, (512,))
    x = centres[y] + torch.randn(512, 20)
    model = mlp()

    criterion = load_loss("models:/itl/production")
    optimizer = load_optimizer("models:/metamd/production", model)

    losses = []
    for step in range(60):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(json.dumps({
        "criterion": type(criterion).__name__, "form": criterion.form,
        "optimizer": type(optimizer).__name__, "lr": optimizer.param_groups[0]["lr"],
        "losses": losses, "accuracy": accuracy,
    }))
    """
)


def test_fresh_process_trains_with_the_production_loss_and_optimizer(mlflow_server, tmp_path):
    # meta-training's side: register and promote (ITL's published loss; a learned Kronecker divergence)
    loss_version = register_loss(TaylorLoss.from_preset("itl"), "itl", scores={"meta_test_accuracy": 0.77}, tracking_uri=mlflow_server)
    promote("itl", loss_version.version, override_reason="the downstream test needs a production loss", tracking_uri=mlflow_server)
    torch.manual_seed(0)
    architecture = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    divergence = KroneckerBregman.for_model(architecture)
    with torch.no_grad():
        for factor in divergence.parameters():
            factor.copy_(0.3 * torch.randn(factor.shape))
    optimizer_version = register_optimizer(divergence, "metamd", lr=0.1, scores={"meta_test_accuracy": 0.95}, tracking_uri=mlflow_server)
    promote("metamd", optimizer_version.version, override_reason="the downstream test needs a production optimiser", tracking_uri=mlflow_server)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["MLFLOW_TRACKING_URI"] = str(mlflow_server)
    result = subprocess.run([sys.executable, "-c", JOB], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["criterion"] == "TaylorLoss" and report["form"] == "monomial"
    assert report["optimizer"] == "MirrorDescent" and report["lr"] == 0.1  # the meta-training lr, from the manifest
    losses = report["losses"]
    assert losses[-1] < losses[0] - 1.0, losses[::10]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert report["accuracy"] > 0.9  # 4 well-separated classes; chance is 0.25
    assert not (tmp_path / "mlflow.db").exists()  # it used the tracking server, not a local store
