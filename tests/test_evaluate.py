"""Meta-test evaluator: statistics against hand-worked values, selection rules on hand-made
histories (fit replaced by a deterministic fake), and tiny real evaluations end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import metaopt_core.train as train_module
from metaopt_core.config import ConfigError, validate
from metaopt_core.evaluate import (
    EvaluationConfig,
    EvaluationResult,
    TrainingProtocol,
    average_ranks,
    compare_losses,
    domain_tasks,
    early_stop_index,
    evaluate,
    main,
    mean_std,
    noise_task,
    rank_with_ties,
)
from metaopt_core.losses.robust_corrected import ForwardCorrectedCrossEntropy
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.meta.run_config import load_config
from metaopt_core.train import FitResult

REPO = Path(__file__).resolve().parents[1]
TINY_DIGITS = {"source": "digits", "max_examples": 300, "noise": {"kind": "symmetric", "rate": 0.4}}


@pytest.fixture(scope="module")
def tiny_task():
    return noise_task(TINY_DIGITS, noisy_val_fraction=0.2)


# ---------------------------------------------------------------------------------------------
# statistics


def test_rank_with_ties_shares_average_rank():
    assert rank_with_ties([0.1, 0.3, 0.3, 0.2]) == [4.0, 1.5, 1.5, 3.0]
    assert rank_with_ties([0.5, 0.5, 0.5]) == [2.0, 2.0, 2.0]
    assert rank_with_ties([3.0, 1.0, 2.0], higher_is_better=False) == [3.0, 1.0, 2.0]
    # means of the same accuracies summed in another order must still tie
    a, b = sum([0.1, 0.2, 0.3]) / 3, sum([0.3, 0.2, 0.1]) / 3
    assert rank_with_ties([a, b]) == [1.5, 1.5]


def test_average_ranks_hand_worked_demsar_example():
    # cell 1: A best, B and C tie for 2nd/3rd -> 1, 2.5, 2.5
    # cell 2: B > C > A                      -> 3, 1, 2
    # cell 3: three-way tie                  -> 2, 2, 2
    scores = {
        "c1": {"A": 0.9, "B": 0.8, "C": 0.8},
        "c2": {"A": 0.5, "B": 0.7, "C": 0.6},
        "c3": {"A": 0.4, "B": 0.4, "C": 0.4},
    }
    ranks = average_ranks(scores)
    assert ranks["A"] == pytest.approx((1 + 3 + 2) / 3)
    assert ranks["B"] == pytest.approx((2.5 + 1 + 2) / 3)
    assert ranks["C"] == pytest.approx((2.5 + 2 + 2) / 3)
    # ranks of n methods always average to (n + 1) / 2
    assert sum(ranks.values()) / 3 == pytest.approx(2.0)
    with pytest.raises(ValueError, match="expected"):
        average_ranks({"c1": {"A": 1.0, "B": 0.0}, "c2": {"A": 1.0}})


def test_mean_std_is_sample_std():
    mean, std = mean_std([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt((0.3**2 + 0.1**2 + 0.4**2) / 2))
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_early_stop_index_picks_best_earliest_usable_epoch():
    assert early_stop_index([0.1, 0.3, 0.25, 0.3]) == 1  # earliest of the tied best
    assert early_stop_index([0.1, 0.3, 0.25, 0.9], usable=3) == 1  # epoch 4 diverged: not usable
    assert early_stop_index([0.5], usable=0) is None


# ---------------------------------------------------------------------------------------------
# selection rules with a deterministic fake fit


def fake_fit(curves, calls=None):
    """A stand-in for train.fit returning hand-made histories.

    ``curves(loss_fn, lr, seed) -> (select_accs, test_accs, diverged)``.
    """

    def fit(model, loss_fn, train, *, val, lr, seed, epochs, **kwargs):
        assert set(val) == {"select", "test"}
        if calls is not None:
            calls.append({"loss_fn": loss_fn, "lr": lr, "seed": seed, "model": model})
        select, test, diverged = curves(loss_fn, lr, seed)
        rows = [
            {"epoch": i + 1, "step": i + 1, "train_loss": 1.0, "train_acc": 0.5, "val_acc/select": s, "val_acc/test": t}
            for i, (s, t) in enumerate(zip(select, test))
        ]
        if diverged:
            rows[-1]["diverged"] = True
        return FitResult(history=rows, diverged=diverged, steps=len(rows))

    return fit


def test_early_stopping_reports_test_accuracy_of_best_noisy_validation_epoch(monkeypatch, tiny_task):
    select = [0.20, 0.35, 0.30, 0.25]
    test = [0.40, 0.70, 0.60, 0.50]
    monkeypatch.setattr(train_module, "fit", fake_fit(lambda *_: (select, test, False)))
    result = compare_losses({"ce": "ce"}, tiny_task, TrainingProtocol(architectures=["mlp2"], seeds=[0], epochs=4))
    (run,) = result.runs
    assert run.early_stop_epoch == 2
    assert run.early_stop_acc == pytest.approx(0.70)
    assert run.converged_acc == pytest.approx(0.50)  # after the last epoch
    assert run.gap == pytest.approx(0.20)
    assert result.summaries[0].gap_mean == pytest.approx(0.20)


def test_diverged_run_scores_chance_and_keeps_only_complete_epochs(monkeypatch, tiny_task):
    # epoch 3 diverged: its (high) selection accuracy comes from a half-trained model
    select, test = [0.20, 0.30, 0.90], [0.50, 0.60, 0.95]
    monkeypatch.setattr(train_module, "fit", fake_fit(lambda *_: (select, test, True)))
    result = compare_losses({"ce": "ce"}, tiny_task, TrainingProtocol(architectures=["mlp2"], seeds=[0], epochs=3))
    (run,) = result.runs
    assert run.diverged
    assert run.converged_acc == pytest.approx(1 / tiny_task.num_classes)
    assert run.early_stop_epoch == 2 and run.early_stop_acc == pytest.approx(0.60)
    assert result.summaries[0].diverged == 1


def test_tuned_protocol_picks_lr_with_best_validation_accuracy(monkeypatch, tiny_task):
    final_select = {0.1: 0.30, 0.01: 0.60, 0.001: 0.50}

    def curves(loss_fn, lr, seed):
        # the test accuracy must not influence the choice: the best test is at lr 0.1
        test_at_end = {0.1: 0.99, 0.01: 0.40 + 0.01 * seed, 0.001: 0.45}[lr]
        return [0.1, final_select[lr]], [0.2, test_at_end], False

    monkeypatch.setattr(train_module, "fit", fake_fit(curves))
    protocol = TrainingProtocol(architectures=["mlp2"], seeds=[0, 1], epochs=2, lr_protocol="tuned", lr_grid=[0.1, 0.01, 0.001])
    result = compare_losses({"ce": "ce"}, tiny_task, protocol)
    (summary,) = result.summaries
    assert summary.lr == 0.01
    assert summary.lr_scores == {"0.1": pytest.approx(0.30), "0.01": pytest.approx(0.60), "0.001": pytest.approx(0.50)}
    assert summary.converged_mean == pytest.approx(0.405)  # mean of the chosen lr's runs only
    assert len(result.runs) == 6
    assert sorted(r.lr for r in result.runs if r.selected) == [0.01, 0.01]
    assert "lr protocol: **tuned**" in result.to_markdown()
    assert "### Chosen learning rates" in result.to_markdown()


def test_tuned_protocol_breaks_ties_by_grid_order(monkeypatch, tiny_task):
    monkeypatch.setattr(train_module, "fit", fake_fit(lambda loss_fn, lr, seed: ([0.5], [0.5], False)))
    protocol = TrainingProtocol(architectures=["mlp2"], epochs=1, lr_protocol="tuned", lr_grid=[0.03, 0.1])
    result = compare_losses({"ce": "ce"}, tiny_task, protocol)
    assert result.summaries[0].lr == 0.03


def test_two_stage_forward_estimates_transition_from_a_ce_model(monkeypatch, tiny_task):
    calls = []
    monkeypatch.setattr(train_module, "fit", fake_fit(lambda *_: ([0.5], [0.5], False), calls))
    compare_losses({"fw": "forward"}, tiny_task, TrainingProtocol(architectures=["mlp2"], seeds=[3], epochs=1))
    assert len(calls) == 2  # stage 1 (CE) and stage 2 (forward-corrected)
    assert not isinstance(calls[0]["loss_fn"], ForwardCorrectedCrossEntropy)
    stage2 = calls[1]["loss_fn"]
    assert isinstance(stage2, ForwardCorrectedCrossEntropy)
    matrix = stage2.transition_matrix
    assert matrix.shape == (10, 10) and torch.allclose(matrix.sum(1), torch.ones(10), atol=1e-5)
    assert calls[0]["model"] is not calls[1]["model"]  # stage 2 trains a fresh model


def test_losses_override_replaces_same_label_and_appends_new(monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "fit", fake_fit(lambda *_: ([0.5], [0.5], False), calls))
    learned = TaylorLoss.from_preset("itl")
    config = {
        "losses": ["ce", "gce"],
        "datasets": [TINY_DIGITS],
        "architectures": ["mlp2"],
        "epochs": 1,
    }
    result = evaluate(config, losses_override={"gce": "mae", "learned": learned})
    assert result.losses == ["ce", "gce", "learned"]
    used = [type(c["loss_fn"]).__name__ for c in calls]
    assert used == ["CrossEntropy", "MeanAbsoluteError", "TaylorLoss"]
    assert calls[2]["loss_fn"] is not learned  # deep-copied per run


# ---------------------------------------------------------------------------------------------
# tiny real evaluations


def _markdown_table(markdown: str, title_start: str) -> list[list[str]]:
    block = markdown.split(f"### {title_start}", 1)[1].split("###", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_tiny_real_evaluation_json_and_markdown_agree(tiny_task):
    protocol = TrainingProtocol(architectures=["mlp2"], seeds=[0, 1], epochs=2, batch_size=32, lr=0.05)
    result = compare_losses({"ce": "ce", "gce": "gce"}, tiny_task, protocol)
    doc = json.loads(result.to_json())
    assert set(doc) == {"settings", "losses", "cells", "summaries", "ranks", "runs", "seconds"}
    assert len(doc["runs"]) == 4 and len(doc["summaries"]) == 2
    assert doc["cells"] == [["digits", "symmetric 40%", "mlp2"]]
    for run in doc["runs"]:
        assert len(run["history"]) == 2 and 0.0 <= run["converged_acc"] <= 1.0
        assert run["converged_acc"] == run["history"][-1]["test_acc"]
    # the summaries are the statistics of the runs
    for summary in doc["summaries"]:
        accs = [r["converged_acc"] for r in doc["runs"] if r["loss"] == summary["loss"]]
        assert summary["converged_mean"] == pytest.approx(sum(accs) / 2)
        assert summary["converged_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    # with one cell the ranks are the order of the means
    means = {s["loss"]: s["converged_mean"] for s in doc["summaries"]}
    expected = dict(zip(means, rank_with_ties(list(means.values()))))
    assert doc["ranks"]["converged"] == expected

    markdown = result.to_markdown()
    assert markdown.splitlines()[0].startswith("lr protocol: **fixed** (lr 0.05 for every loss)")
    assert "2 epochs" in markdown and "batch 32" in markdown and "seeds 0, 1" in markdown
    tables = {
        "converged": _markdown_table(markdown, "Accuracy at convergence"),
        "early_stop": _markdown_table(markdown, "Accuracy with noisy-validation early stopping"),
        "gap": _markdown_table(markdown, "Early-stop gap"),
    }
    for metric, rows in tables.items():
        assert [row[0] for row in rows] == ["ce", "gce"]
        for row in rows:
            summary = next(s for s in doc["summaries"] if s["loss"] == row[0])
            mean, std = (float(v) for v in re.fullmatch(r"([+-]?[\d.]+) ± ([\d.]+)", row[1]).groups())
            assert mean == round(summary[f"{metric}_mean"] * 100, 1)
            assert std == round(summary[f"{metric}_std"] * 100, 1)
            if metric != "gap":
                assert float(row[2]) == round(doc["ranks"][metric][row[0]], 2)
                assert int(row[3]) == summary["diverged"]
    # JSON round trip renders the same tables
    assert EvaluationResult.from_dict(doc).to_markdown() == markdown


class NaNLoss(nn.Module):
    def forward(self, logits, target):
        return logits.sum() * float("nan")


def test_diverging_losses_score_chance_not_crash(tiny_task):
    huge = TaylorLoss([0.0, 0.0] + [1e37] * 10, form="monomial")
    protocol = TrainingProtocol(architectures=["mlp2"], seeds=[0, 1], epochs=2, batch_size=64)
    result = compare_losses({"ce": "ce", "nan": NaNLoss, "huge": huge}, tiny_task, protocol)
    chance = 1 / tiny_task.num_classes
    for label in ("nan", "huge"):
        summary = result.summaries[result.losses.index(label)]
        assert summary.diverged == 2
        assert summary.converged_mean == pytest.approx(chance) and summary.converged_std == 0.0
    nan_runs = [r for r in result.runs if r.loss == "nan"]
    assert all(r.early_stop_epoch is None and r.early_stop_acc == pytest.approx(chance) for r in nan_runs)
    assert result.diverged_runs("nan") == 2
    assert "| nan |" in result.to_markdown()


def test_domain_tasks_hold_out_one_domain(monkeypatch):
    spec = {"source": "digits", "max_examples": 300, "domains": "rotated", "angles": [0, 30, 60]}
    from metaopt_core.data import prepare

    prepared = prepare(spec)
    (task,) = domain_tasks(prepared, held_out=["rot60"])
    assert task.condition == "held-out rot60" and task.kind == "domains"
    others = ["digits-rot0", "digits-rot30"]
    assert len(task.train) == sum(len(prepared.splits[f"{d}/train"]) for d in others)
    assert len(task.select) == sum(len(prepared.splits[f"{d}/val"]) for d in others)
    assert torch.equal(task.test.x, prepared.splits["digits-rot60/train"].x)
    assert len(domain_tasks(prepared)) == 3
    with pytest.raises(ValueError, match="held_out: got 'rot90'"):
        domain_tasks(prepared, held_out=["rot90"])

    monkeypatch.setattr(train_module, "fit", fake_fit(lambda *_: ([0.5], [0.5], False)))
    result = evaluate({"task": "domains", "losses": ["ce"], "datasets": [spec], "held_out": ["rot0", "rot60"],
                       "architectures": ["mlp2"], "epochs": 1})  # fmt: skip
    assert result.cells == [("digits", "held-out rot0", "mlp2"), ("digits", "held-out rot60", "mlp2")]
    assert "source-domain validation early stopping" in result.to_markdown()


# ---------------------------------------------------------------------------------------------
# configuration and CLI


def _config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(EvaluationConfig, data)
    return str(info.value)


BASE = {"losses": ["ce"], "datasets": ["digits"], "architectures": ["mlp2"]}


def test_config_errors_name_the_field_and_allowed_values():
    message = _config_error({**BASE, "lr_protocol": "best"})
    assert "lr_protocol" in message and "'best'" in message and "'fixed'" in message and "'tuned'" in message
    message = _config_error({**BASE, "losses": ["ce", "cross-entropy"]})
    assert "losses.1" in message and "cross-entropy" in message and "nce+mae" in message
    message = _config_error({**BASE, "losses": [{"name": "gce", "kwargs": {"p": 0.5}}]})
    assert "losses.0" in message and "'p'" in message and "q" in message
    message = _config_error({**BASE, "architectures": ["resnet9"]})
    assert "architectures.0.name" in message and "resnet9" in message and "small_cnn" in message
    message = _config_error({**BASE, "datasets": ["imagenet"]})
    assert "datasets.0.source" in message and "imagenet" in message
    message = _config_error({**BASE, "epoch": 3})
    assert "epoch" in message and "unknown field" in message
    message = _config_error({**BASE, "task": "domains"})
    assert "datasets.0" in message and "domains" in message
    message = _config_error({**BASE, "losses": [{"path": "/nonexistent/loss.json"}]})
    assert "losses.0" in message and "/nonexistent/loss.json" in message


def test_learned_loss_from_white_box_json(tmp_path):
    doc = TaylorLoss.from_preset("arl-ar-s80").to_dict()
    path = tmp_path / "learned.json"
    path.write_text(json.dumps(doc))
    config = validate(EvaluationConfig, {**BASE, "losses": ["ce", {"path": str(path)}, {"white_box": doc, "label": "wb"}]})
    assert [spec.display for spec in config.losses] == ["ce", "learned", "wb"]
    loss = config.losses[1].factory()()
    assert isinstance(loss, TaylorLoss) and loss.to_dict() == doc
    message = _config_error({**BASE, "losses": [{"white_box": {"family": "poly"}}]})
    assert "losses.0" in message and "family" in message


def test_shipped_configs_validate():
    demo = load_config(REPO / "configs" / "demo-evaluate.yaml")
    assert isinstance(demo, EvaluationConfig) and demo.lr_protocol == "fixed"
    assert len(demo.data_specs()) == 4  # 2 datasets x 2 noise settings
    paper = load_config(REPO / "configs" / "evaluate-paper.yaml")
    assert isinstance(paper, EvaluationConfig)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "algorithm: evaluate\nlosses: [ce, 'taylor:itl']\n"
        "datasets: [{source: digits, max_examples: 200}]\nnoise: [{kind: asymmetric, rate: 0.4}]\n"
        "architectures: [mlp2]\nepochs: 1\nbatch_size: 64\n"
    )
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    assert main(["--config", str(config), "--json", str(out_json), "--markdown", str(out_md), "--no-progress"]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["losses"] == ["ce", "taylor:itl"] and doc["cells"] == [["digits", "asymmetric 40%", "mlp2"]]
    printed = capsys.readouterr().out
    assert out_md.read_text().strip() in printed
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: evaluate\nlosses: [ce]\ndatasets: [digits]\narchitectures: [mlp2]\nlr_protocol: best\n")
    assert main(["--config", str(bad), "--no-progress"]) == 2
    assert "lr_protocol" in capsys.readouterr().err


def test_architecture_kwargs_are_checked_at_load_time():
    message = _config_error({**BASE, "architectures": [{"name": "mlp2", "kwargs": {"width": 8}}]})
    assert "architectures.0" in message and "width" in message and "mlp2" in message
    config = validate(EvaluationConfig, {**BASE, "architectures": [{"name": "small_cnn", "kwargs": {"width": 8}}]})
    assert config.architectures[0].display == "small_cnn(width=8)"


def test_training_protocol_is_validated_and_an_evaluation_config_is_one(monkeypatch, tiny_task):
    with pytest.raises(ConfigError, match="seeds"):
        validate(TrainingProtocol, {"architectures": ["mlp2"], "seeds": [0, 0]})
    with pytest.raises(ConfigError, match="device"):
        validate(TrainingProtocol, {"architectures": ["mlp2"], "device": "gpu7"})
    with pytest.raises(ConfigError, match="architectures: duplicate"):
        validate(TrainingProtocol, {"architectures": ["mlp2", "mlp2"]})
    with pytest.raises(TypeError, match="TrainingProtocol"):
        compare_losses({"ce": "ce"}, tiny_task, {"architectures": ["mlp2"]})
    # an EvaluationConfig carries the protocol itself: compare_losses takes it as is
    monkeypatch.setattr(train_module, "fit", fake_fit(lambda *_: ([0.5], [0.5], False)))
    config = validate(EvaluationConfig, {**BASE, "epochs": 1, "lr": 0.05})
    result = compare_losses({"ce": "ce"}, tiny_task, config)
    assert result.settings["lr"] == 0.05 and result.settings["epochs"] == 1
