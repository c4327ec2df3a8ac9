"""ML3 (metaopt_core.meta.ml3): the neural loss family and its export kind, the exact unrolled
hypergradient, meta-training that reshapes the loss, and the learner end to end through the local
pipeline (registered as a neural-loss, served by load_loss and the pyfunc model).

The generic tests cover ML3 through the registries: kill-and-resume and the resume check
(test_driver), the compile and the quick preset (test_pipelines_compile), the family's document
round trip and lr_scale (test_loss_document), `mlflow models serve` (test_serving)."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
import torch.nn.functional as F

from metaopt_core import exports
from metaopt_core.config import ConfigError
from metaopt_core.losses import loss_from_document
from metaopt_core.losses.families import CE_LIKE, build_family
from metaopt_core.meta import driver, registry
from metaopt_core.meta.itl import ITLConfig
from metaopt_core.meta.ml3 import ML3State, NeuralLoss, NeuralLossFamily, hypergradient, jobs_for_step, outer_update
from metaopt_core.meta.run_config import load_config
from metaopt_core.population import Member, Schedule, train_population
from tests.fixtures_mlflow import mlflow_server, reset_mlflow_uri  # noqa: F401  (fixtures)

TINY = {"algorithm": "ml3", "name": "ml3-tiny", "data": {"source": "digits", "max_examples": 600, "seed": 0},
        "loss": {"hidden": [8]}, "inner": {"steps": 3, "batch_size": 32, "lr": 0.1},
        "outer": {"steps": 2, "tasks_per_step": 2, "batch_size": 64}}  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    learner = registry.get("ml3")
    config = learner.resolve_config(TINY)
    return learner, config, learner.prepare(config)


def test_the_ce_like_start_is_cross_entropy_and_the_network_still_learns():
    family = NeuralLossFamily(hidden=(8, 4))
    logits, target = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 4, 0])
    omega = family.init(CE_LIKE).requires_grad_(True)
    value = family.functional(omega, logits, target)
    assert torch.allclose(value, F.cross_entropy(logits, target))
    (grad,) = torch.autograd.grad(value, omega)
    assert grad.abs().sum() > 0  # the output layer's weights get a gradient at the CE start
    random = family.init("random")
    assert not torch.allclose(family.functional(random, logits, target), value) and random.shape == omega.shape == (family.num_params,)
    assert isinstance(family.to_module(omega), NeuralLoss)
    with pytest.raises(ValueError, match=r"hidden: got \[0\]"):
        NeuralLossFamily(hidden=(0,))
    with pytest.raises(ValueError, match=r"allowed for family 'neural': \['ce-like', 'random'\]"):
        family.init("itl")


def test_the_neural_family_is_shared_by_the_batched_trainer_and_itl():
    """One table: the population trainer (ARL's and ITL's inner training) vmaps the neural family
    like any other, and ITL's config learns it by name."""
    from metaopt_core.data.sources import load_source

    digits = load_source("digits")
    train, val = digits.subset(torch.arange(0, 300)), digits.subset(torch.arange(300, 400))
    family = NeuralLossFamily(hidden=(8,))
    members = [Member("mlp2", train, val, family.init(CE_LIKE), init_seed=seed, data_seed=seed) for seed in (1, 2)]
    schedule = Schedule(lr=0.1, epochs=1, batch_size=32)
    batched = train_population(members, family, schedule, batched=True)
    sequential = train_population(members, family, schedule, batched=False)
    for b, s in zip(batched, sequential):
        assert b.val_accuracy == pytest.approx(s.val_accuracy, abs=1.5 / len(val)) and b.train_loss == pytest.approx(s.train_loss, rel=1e-4)
    itl = ITLConfig(family={"kind": "neural", "options": {"hidden": [8]}})
    assert itl.loss_family() == NeuralLossFamily(hidden=(8,)) and build_family("neural", hidden=(8,)) == itl.loss_family()


def test_the_export_kind_stores_named_tensors_and_refuses_a_replaced_tensor_file(tmp_path):
    family = NeuralLossFamily(hidden=(8,))
    document = {**family.to_dict(family.init("random")), "meta": {"algorithm": "ml3"}}
    kind = exports.write(tmp_path, "neural-loss", document)
    assert kind.files == ("loss.json", "loss.safetensors") and kind.role == "loss"
    stored = json.loads((tmp_path / "loss.json").read_text())
    assert "params" not in stored and stored["tensors"]["order"] == ["layer0.weight", "layer0.bias", "layer1.weight", "layer1.bias", "skip"]
    assert exports.read(tmp_path) == document  # the in-memory artifact is the complete document
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(kind.build(tmp_path)(logits, target), loss_from_document(document)(logits, target))
    assert kind.bake(tmp_path, {"lr_scale": 0.5}) == {"lr_scale": 0.5} and exports.read(tmp_path)["lr_scale"] == 0.5
    other = tmp_path / "other"
    exports.write(other, "neural-loss", family.to_dict(family.init(CE_LIKE)))
    (tmp_path / "loss.safetensors").write_bytes((other / "loss.safetensors").read_bytes())
    with pytest.raises(exports.ExportError, match="does not match the sha256 its document records"):
        exports.read(tmp_path)


def smooth_model(name, channels, size, classes, seed=None, **options):
    """A base model without ReLU kinks (the outer objective is then smooth in ω, so finite
    differences are a fair reference)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, 32), torch.nn.Tanh(), torch.nn.Linear(32, classes))


def test_the_unrolled_hypergradient_is_the_derivative_of_the_outer_objective(tiny, monkeypatch):
    """Central finite differences of the outer cross-entropy along a random direction of ω (float32)."""
    from metaopt_core.meta.ml3 import step

    monkeypatch.setattr(step, "build_model", smooth_model)
    learner, config, inputs = tiny
    data = inputs.datasets[0]
    state = ML3State.initial(config)
    job = jobs_for_step(config, 0)[0]

    def outer(omega):
        return hypergradient(config, omega, job, data.splits["train"], data.splits["val"], 0)

    result = outer(state.omega)
    direction = torch.randn(state.omega.shape, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    eps = 1e-2
    plus, minus = outer(state.omega + eps * direction).metrics["outer_ce"], outer(state.omega - eps * direction).metrics["outer_ce"]
    numeric = (plus - minus) / (2 * eps)
    analytic = float(torch.tensor(result.grad) @ direction)
    assert analytic == pytest.approx(numeric, rel=0.05, abs=2e-4)
    assert not result.diverged and result.metrics["outer_ce"] < result.metrics["outer_ce_start"]  # 3 SGD steps help
    assert result.metrics["outer_ce"] == pytest.approx(result.metrics["outer_ce_with_ce"], rel=1e-5)  # at the CE start, the loss is CE


def test_outer_update_checks_its_inputs_and_moves_omega(tiny):
    learner, config, inputs = tiny
    data = inputs.datasets[0]
    state = ML3State.initial(config)
    grads = [hypergradient(config, state.omega, job, data.splits["train"], data.splits["val"], 0) for job in jobs_for_step(config, 0)]
    new = outer_update(state, grads)
    assert new.step == 1 and not torch.equal(new.omega, state.omega) and set(new.history[0]) >= {"outer_ce", "advantage_over_ce", "hypergrad_norm"}
    assert torch.equal(outer_update(state, list(reversed(grads))).omega, new.omega)  # the order of the shards does not matter
    with pytest.raises(ValueError, match="needs exactly one of each"):
        outer_update(state, grads[:1])
    with pytest.raises(ValueError, match="another ω"):
        outer_update(
            new, [hypergradient(config, new.omega, job, data.splits["train"], data.splits["val"], 1) for job in jobs_for_step(config, 1)][:1] + grads[1:]
        )


def test_meta_training_gains_on_cross_entropy_within_the_horizon(tiny):
    """From the CE start, a dozen outer steps make the learned loss's T inner steps reach a lower
    outer cross-entropy than the same steps with CE on the same tasks (the quantity ML3 minimises)."""
    learner, config, inputs = tiny
    config = learner.resolve_config({**config.model_dump(mode="json"), "inner": {**TINY["inner"], "steps": 5},
                                     "outer": {**TINY["outer"], "steps": 12, "tasks_per_step": 3}})  # fmt: skip
    state = driver.run(learner, config, inputs)
    history = state.history
    assert history[0]["advantage_over_ce"] == pytest.approx(0.0, abs=1e-5)  # step 1 trains with CE itself
    assert sum(row["advantage_over_ce"] for row in history[-4:]) / 4 > 0.002, [row["advantage_over_ce"] for row in history]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'loss.activation'"):
        load_config({**TINY, "loss": {"activation": "gelu"}})
    with pytest.raises(ConfigError, match=r"field 'data'.*domains"):
        load_config({**TINY, "data": {"source": "digits", "domains": "rotated"}})
    with pytest.raises(ConfigError, match=r"field 'loss.hidden'"):
        load_config({**TINY, "loss": {"hidden": [1000]}})


@pytest.mark.slow
def test_the_local_pipeline_meta_trains_meta_tests_registers_and_serves_ml3(mlflow_server, tmp_path):
    import mlflow
    import pandas as pd

    from metaopt_core import load_loss
    from metaopt_core.mlops.registry import promote
    from pipelines.builder import PipelineOptions
    from pipelines.local import run_local

    name = f"e2e-ml3-{uuid.uuid4().hex[:6]}"
    options = PipelineOptions(blocks=2, cluster_env=False, retries=False)
    settings = {"epochs": 2, "seeds": [0, 1, 2], "lr_grid": [0.03, 0.3], "tasks": [{"source": "digits", "model": "mlp2"}]}
    summary = run_local("ml3", TINY, options=options, model_name=name, tracking_uri=mlflow_server, workdir=tmp_path, meta_test_settings=settings,
                        echo=lambda line: None)  # fmt: skip
    assert (summary["status"], summary["export_kind"], summary["algorithm"]) == ("trained", "neural-loss", "ml3")
    # 3 units are too few for the gate to promote anything; production then takes a recorded override
    assert summary["decision"] == "rejected" and summary["gate"]["units"] == 3 and "only 3 independent unit(s)" in summary["reason"]
    promote(name, summary["version"], override_reason="the serving test needs a production version", tracking_uri=mlflow_server)
    loss = load_loss(f"models:/{name}/production", tracking_uri=mlflow_server)
    inner = getattr(loss, "loss", loss)  # a ScaledLoss when the meta-test measured an lr_scale
    assert isinstance(inner, NeuralLoss) and inner.family.hidden == (8,)
    frame = pd.DataFrame({"probabilities": [[0.7, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], "label": [0, 3]})
    served = mlflow.pyfunc.load_model(f"models:/{name}/production").predict(frame)["loss"].tolist()
    with torch.no_grad():
        expected = [float(loss(torch.log(torch.tensor([row])), torch.tensor([label]))) for row, label in zip(frame["probabilities"], frame["label"])]
    assert served == pytest.approx(expected, rel=1e-5)
