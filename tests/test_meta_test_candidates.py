"""Every meta-test candidate at its own tuned lr, chosen on a validation split only, and the
champion re-evaluated in the same run on the same units (issue 11, items 2 and 3)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from metaopt_core import evaluate, exports
from metaopt_core.losses.document import document_of_loss
from metaopt_core.losses.registry import get_loss
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.meta import registry, runner
from metaopt_core.meta.loss_meta_test import compare_learned_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GRID = [0.003, 0.03, 0.3]


@pytest.fixture(scope="module")
def task() -> evaluate.Task:
    return evaluate.noise_task({"source": "digits", "max_examples": 300, "noise": {"kind": "symmetric", "rate": 0.4}, "seed": 0})


def poisoned(task: evaluate.Task) -> evaluate.Task:
    """The same task with a test split no one could learn from: its labels shuffled and its images
    replaced by noise. Anything that reads the test split to choose an lr would choose differently."""
    generator = torch.Generator().manual_seed(1)
    test = dataclasses.replace(task.test, x=torch.randn(task.test.x.shape, generator=generator),
                               y=task.test.y[torch.randperm(len(task.test.y), generator=generator)])  # fmt: skip
    return dataclasses.replace(task, test=test)


def test_the_tuned_lr_is_chosen_on_the_selection_split_only(task):
    protocol = evaluate.TrainingProtocol(architectures=["mlp2"], seeds=[0, 1], epochs=2, batch_size=64, lr_protocol="tuned", lr_grid=GRID)
    losses = {"ce": "ce", "gce": "gce"}
    clean = evaluate.compare_losses(losses, [task], protocol)
    dirty = evaluate.compare_losses(losses, [poisoned(task)], protocol)
    cell = clean.cells[0]
    for loss in losses:
        assert dirty.summary(loss, cell).lr == clean.summary(loss, cell).lr
        assert dirty.summary(loss, cell).lr_scores == clean.summary(loss, cell).lr_scores
        # the poison did reach the test split (so the test would notice if tuning read it)
        assert dirty.summary(loss, cell).converged_mean != clean.summary(loss, cell).converged_mean
    assert len({clean.summary(loss, cell).lr for loss in losses} | set(GRID)) == len(GRID)


def test_the_loss_meta_test_tunes_every_candidate_and_re_evaluates_the_champion(task):
    learned = document_of_loss(TaylorLoss.from_preset("itl"))
    champion = document_of_loss(get_loss("ce"))
    training = {"model": "mlp2", "seeds": [0, 1, 2], "epochs": 1, "batch_size": 64, "momentum": 0.9, "lr_grid": GRID}
    report = compare_learned_loss("test", learned, ["ce", "gce"], [task], training, champion=champion)
    assert list(report.paired) == ["learned", "champion", "ce", "gce"]
    assert report.units == [{"dataset": task.dataset, "condition": task.condition, "architecture": "mlp2", "seed": s} for s in (0, 1, 2)]
    assert all(len(scores) == 3 for scores in report.paired.values())
    # the champion (cross-entropy as a loss document) and the 'ce' baseline are the same loss, trained
    # on the same units at the same lrs: the same scores, unit by unit
    assert report.paired["champion"] == report.paired["ce"]
    assert report.settings["lr_grid"] == GRID and report.settings["seeds"] == [0, 1, 2]
    assert set(report.settings["chosen_lr"]) == {"learned", "champion", "ce", "gce"}
    assert all(lr in GRID for chosen in report.settings["chosen_lr"].values() for lr in chosen.values())
    assert "Chosen learning rates" in report.markdown and "tuned" in report.markdown
    assert report.details["meta_test_settings"] == report.settings
    assert report.scores["champion.accuracy"] == pytest.approx(sum(report.paired["champion"]) / 3)


def test_arl_meta_test_passes_the_champion_through_the_runner(tmp_path):
    arl = registry.get("arl")
    config = arl.resolve_config(yaml.safe_load((CONFIGS / "arl-tiny.yaml").read_text()))
    settings = arl.resolve_meta_test({"epochs": 1, "max_examples": 300, "lr_grid": [0.01, 0.1], "baselines": ["ce"]})
    assert settings.seeds == [0, 1, 2] and arl.resolve_meta_test({}).baselines == ["ce", "gce", "sce"]
    inputs = arl.prepare(config, settings)
    learned = tmp_path / "learned"
    exports.write(learned, "loss-document", document_of_loss(TaylorLoss.from_preset("itl")))
    result = {"format": runner.RESULT_FORMAT, "learner": "arl", "kind": "loss", "export_kind": "loss-document", "steps": 0, "fingerprint": ""}
    (learned / "result.json").write_text(json.dumps(result))
    exports.write(tmp_path / "champion", "loss-document", document_of_loss(get_loss("ce")))
    report = runner.meta_test(arl, config, learned, inputs, settings, champion_dir=tmp_path / "champion")
    assert list(report.paired) == ["learned", "champion", "ce"]
    assert report.paired["champion"] == report.paired["ce"]  # same loss, same units, same lr grid
    with_none = runner.meta_test(arl, config, learned, inputs, settings)
    assert "champion" not in with_none.paired and with_none.paired["learned"] == report.paired["learned"]


def test_metamd_meta_test_tunes_each_optimiser_on_meta_training_domains_and_re_evaluates_the_champion(tmp_path):
    metamd = registry.get("metamd")
    config = metamd.resolve_config(yaml.safe_load((CONFIGS / "metamd-tiny.yaml").read_text()))
    settings = metamd.resolve_meta_test({"seeds": 3, "lr_grid": [0.01, 0.1, 1.0], "steps": 3})
    inputs = metamd.prepare(config, settings)
    runner.export(metamd, metamd.init(config, inputs), inputs, tmp_path / "learned")
    report = runner.meta_test(metamd, config, tmp_path / "learned", inputs, settings, champion_dir=tmp_path / "learned")
    assert list(report.paired) == ["learned", "champion", "sgd", "sgd-m", "adam"]
    assert all(len(v) == len(report.units) == 3 for v in report.paired.values())  # one held-out domain x 3 seeds
    assert report.paired["champion"] == report.paired["learned"]  # the same divergence, the same units
    assert report.settings["tested_on"] and not set(report.settings["tuned_on"]) & set(report.settings["tested_on"])
    assert set(report.settings["chosen_lr"].values()) <= {0.01, 0.1, 1.0}
    assert report.settings["replicates"] == 3 and report.greater_is_better
