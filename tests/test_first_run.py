"""What a first run tells a newcomer is true, and every line it offers to paste works.

- The run summary says per model whether the gate promoted it and why, and prints "use it" only
  for a version in production; while nothing is, it offers the explicit opt-in (``fallback=``)
  to the registered version instead, labelled as such.
- ``load_loss`` / ``load_optimizer`` never fall back silently: without production they fail
  naming the opt-in; with ``fallback=`` they load it and warn.
- A MetaMD divergence states the architecture it fits (``models show``, the summary, the error),
  and ``load_optimizer(..., partial=True)`` applies it to the layers that fit and plain mirror
  descent (the identity metric) to the others.
"""

from __future__ import annotations

import json
import uuid
import warnings

import pytest
import torch
from torch import nn

from components.runtime import usage
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.mlops.registry import (
    ModelNotFoundError,
    NoProductionVersionError,
    UnpromotedVersionWarning,
    load_loss,
    load_optimizer,
    promote,
    register_loss,
    register_optimizer,
)
from metaopt_core.models import build_model
from metaopt_core.optim import DenseBregman, DiagonalBregman, KroneckerBregman, MirrorDescent, ShapeMismatchError, attach
from metaopt_core.optim.fit import describe_architecture, describe_model
from metaopt_core.optim.io import save_divergence
from pipelines.cli import main
from pipelines.local import format_summary
from tests.fixtures_mlflow import mlflow_server  # noqa: F401  (the session server)


def _trained(decision: str, version: str, production: str, kind: str = "loss", fits: str = "") -> dict:
    return {"status": "trained", "algorithm": "x", "model_name": "x", "seconds": 1.0, "run_id": "r", "tracking_uri": "http://mlflow:5000",
            "scores": {}, "metric": "meta_test_accuracy", "model_uri": f"models:/x/{version}", "version": version, "decision": decision,
            "reason": f"{decision}: because", "production_version": production, "log": "run.log",
            **usage(kind, "x", production, version, fits)}  # fmt: skip


def test_the_summary_says_use_it_only_for_a_production_version():
    promoted = format_summary(_trained("promoted", "1", "1"))
    assert "production       models:/x/1 (this version)" in promoted
    assert 'use it:\n    from metaopt_core import load_loss\n    criterion = load_loss("models:/x/production")' in promoted

    kept = format_summary(_trained("rejected", "2", "1"))
    assert "promotion        rejected: because" in kept and "models:/x/1 (unchanged: version 2 was not promoted)" in kept
    assert 'load_loss("models:/x/production")' in kept  # production still holds version 1

    nothing = format_summary(_trained("rejected", "1", "", kind="optimizer", fits="an MLP 784-256-10 (parameters ...)"))
    assert "production       none: no version of x has passed the gate, so models:/x/production does not load" in nothing
    assert "use it:" not in nothing and "fits             an MLP 784-256-10" in nothing
    assert "opts in explicitly" in nothing and 'load_optimizer("models:/x/production", model, fallback="models:/x/1")' in nothing

    skipped = {"status": "skipped", "algorithm": "x", "model_name": "x", "seconds": 1.0, "reason": "unchanged", "production_version": "",
               "log": "run.log", **usage("loss", "x", "")}  # fmt: skip
    text = format_summary(skipped)
    assert "production       none: no version of x has passed the gate" in text and "use it" not in text and "version \n" not in text


def test_no_silent_fallback_and_an_explicit_one_that_works(mlflow_server):
    name = f"first-{uuid.uuid4().hex[:8]}"
    registered = register_loss(TaylorLoss.from_preset("itl"), name, tracking_uri=mlflow_server)
    with pytest.raises(NoProductionVersionError, match=f"fallback='models:/{name}/latest'"):
        load_loss(f"models:/{name}/production", tracking_uri=mlflow_server)

    lines = usage("loss", name, "", registered.version)["fallback"]
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
            exec("\n".join(lines), scope)  # the lines the summary prints, pasted
    assert isinstance(scope["criterion"], TaylorLoss)
    assert [w.category for w in caught if issubclass(w.category, UnpromotedVersionWarning)] == [UnpromotedVersionWarning]
    with pytest.raises(ModelNotFoundError):  # only a missing production version falls back
        load_loss("models:/no-such-model-here/production", tracking_uri=mlflow_server, fallback=f"models:/{name}/1")

    promote(name, registered.version, override_reason="test: production set by hand", tracking_uri=mlflow_server)
    scope = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
        exec("\n".join(usage("loss", name, registered.version)["downstream"]), scope)
    assert isinstance(scope["criterion"], TaylorLoss)


def _learned(div):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for factor in div.parameters():
            factor.copy_(0.5 * torch.randn(factor.shape, generator=generator))
    return div


def test_a_divergence_states_what_it_fits_and_applies_in_part_on_request(mlflow_server, tmp_path, capsys):
    mlp2 = build_model("mlp2", 1, 28, 10, seed=0)
    assert describe_model(mlp2).startswith("an MLP 784-256-10 (parameters 1.weight (256, 784), 1.bias (256,), 3.weight (10, 256), 3.bias (10,))")
    div = _learned(KroneckerBregman.for_model(mlp2))
    save_divergence(div, tmp_path / "div", lr=0.1)
    name = f"fits-{uuid.uuid4().hex[:8]}"
    registered = register_optimizer(tmp_path / "div", name, tracking_uri=mlflow_server)

    assert main(["models", "show", f"{name}/{registered.version}", "--tracking-uri", str(mlflow_server)]) == 0
    assert "fits an MLP 784-256-10" in capsys.readouterr().out

    mlp3 = build_model("mlp3", 1, 28, 10, seed=0)  # 784-256-256-10: its first layer is the learned one
    with pytest.raises(ShapeMismatchError) as error:
        load_optimizer(registered.model_uri, mlp3, tracking_uri=mlflow_server)
    assert "The divergence fits an MLP 784-256-10" in str(error.value) and "the model is an MLP 784-256-256-10" in str(error.value)
    assert "partial=True" in str(error.value)

    optimizer = load_optimizer(registered.model_uri, mlp3, tracking_uri=mlflow_server, partial=True)
    assert optimizer.divergence.learned_parameters == ["1.weight", "1.bias"]
    assert optimizer.divergence.identity_parameters == ["3.weight", "3.bias", "5.weight", "5.bias"]
    before = [p.detach().clone() for p in mlp3.parameters()]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(mlp3.parameters())]
    for p, g in zip(mlp3.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()
    learned_step = div.precondition([grads[0], grads[1], torch.zeros(10, 256), torch.zeros(10)])
    after = list(mlp3.parameters())
    assert torch.allclose(after[0], before[0] - 0.1 * learned_step[0], atol=1e-6)  # the learned metric
    assert torch.allclose(after[1], before[1] - 0.1 * learned_step[1], atol=1e-6)
    for k in range(2, 6):  # plain mirror descent with the identity metric: a gradient step
        assert torch.allclose(after[k], before[k] - 0.1 * grads[k], atol=1e-6)


def test_partial_application_by_kind():
    small = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    other = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5))
    diagonal = _learned(DiagonalBregman.for_model(small))
    fitted = attach(diagonal, other, partial=True)
    assert fitted.learned_parameters == ["0.weight", "0.bias"] and torch.equal(fitted.log_scale[0], diagonal.log_scale[0])
    assert not fitted.log_scale[2].any()  # identity: exp(0) = 1
    step = MirrorDescent(other.parameters(), fitted, lr=0.1)
    assert step.param_groups[0]["lr"] == 0.1
    with pytest.raises(ShapeMismatchError, match="couples all its parameters"):
        attach(DenseBregman.for_model(small), other, partial=True)
    with pytest.raises(ShapeMismatchError, match="no layer of the model fits"):
        attach(diagonal, nn.Sequential(nn.Linear(7, 2)), partial=True)
    assert describe_architecture([("w", (3, 3, 5, 5)), ("b", (3,))]).startswith("a network of 2 parameter tensors (parameters w (3, 3, 5, 5), b (3,))")


def test_wording_names_what_the_user_wrote(tmp_path, capsys):
    import yaml

    from components.runtime import report_skipped
    from metaopt_core.config import ConfigError
    from metaopt_core.meta import registry

    itl = registry.get("itl")
    with open("configs/itl-tiny.yaml") as handle:  # domains rot0, rot45, rot90; the default meta-test holds out rot0 and rot75
        config = itl.resolve_config(yaml.safe_load(handle))
    with pytest.raises(ConfigError, match=r"meta_test: field 'held_out': got \['rot0', 'rot75'\]; \['rot75'\] are not domains") as error:
        itl.prepare(config, itl.default_meta_test)
    assert "exclude_domains" not in str(error.value)

    class Report:
        path, metadata = str(tmp_path / "report.md"), {}

    summary = json.loads(report_skipped("itl", "itl", "", "f" * 64, "the data and configuration are unchanged", Report()))
    assert "no version is in production" in capsys.readouterr().out and summary["downstream"] == []
