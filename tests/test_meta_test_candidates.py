"""The loss meta-test (issue 18): independent units, every candidate trained at every lr of one grid
in batched passes (the same numbers as one sequential run each), the three protocols read from the
same curves, choices made on the selection split only, the champion re-evaluated on the same units,
and the learned loss's lr scale."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from metaopt_core import evaluate, exports
from metaopt_core.evaluate.units import Curve, Training, Unit, _train_sequential, choose, train_units
from metaopt_core.losses.document import document_of_loss, loss_from_document
from metaopt_core.losses.registry import get_loss
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.meta import registry, runner
from metaopt_core.meta.loss_meta_test import compare_learned_loss, lr_scale

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GRID = [0.003, 0.03, 0.3]


def digits_unit(seed: int, model: str = "mlp2") -> Unit:
    prepared = evaluate.noise_task({"source": "digits", "image_size": 8, "max_examples": 400, "noise": {"kind": "symmetric", "rate": 0.4},
                                    "seed": seed, "val_fraction": 0.3}, 0.3)  # fmt: skip
    return Unit("digits8", seed, prepared.train, prepared.select, prepared.test, model, 100 + seed, 200 + seed)


@pytest.fixture(scope="module")
def units() -> list[Unit]:
    return [digits_unit(seed) for seed in range(3)]


def poisoned(unit: Unit) -> Unit:
    """The same unit with a test split no one could learn from: its labels shuffled and its images
    replaced by noise. Anything that reads the test split to choose an lr would choose differently."""
    generator = torch.Generator().manual_seed(1)
    test = dataclasses.replace(unit.test, x=torch.rand(unit.test.x.shape, generator=generator),
                               y=unit.test.y[torch.randperm(len(unit.test.y), generator=generator)])  # fmt: skip
    return dataclasses.replace(unit, test=test)


def test_batched_training_gives_the_sequential_numbers(units):
    """Every (candidate, unit, lr) of one batched pass matches its own `fit` run: same init, same
    minibatches, same SGD arithmetic (the lr enters as a loss multiplier)."""
    losses = {"ce": get_loss("ce"), "itl": TaylorLoss.from_preset("itl")}
    training = train_units(losses, units, GRID, epochs=3, batch_size=64)
    assert training.batched_members == len(losses) * len(units) * len(GRID) and training.sequential_members == 0
    for label, loss in losses.items():
        for u, unit in enumerate(units):
            for lr in GRID:
                batched, alone = training.curve(label, u, lr), _train_sequential(loss, unit, lr, 3, 64, 0.9, 0.0, torch.device("cpu"))
                assert batched.diverged == alone.diverged
                assert batched.select == pytest.approx(alone.select, abs=2e-3) and batched.test == pytest.approx(alone.test, abs=2e-3)


def _fake(curves: dict[tuple[str, int, float], Curve], grid: list[float]) -> Training:
    unit = digits_unit(0)
    return Training(curves, sorted({k[0] for k in curves}), grid, [unit])


def test_the_protocols_read_the_curves_by_hand():
    grid = [0.01, 0.1]
    curves = {("a", 0, 0.01): Curve([0.30, 0.50, 0.40], [0.6, 0.8, 0.7], False, 3),  # best selection at epoch 2
              ("a", 0, 0.1): Curve([0.45, 0.45, 0.45], [0.5, 0.9, 0.95], False, 3),  # flat selection, last epoch best on test
              ("b", 0, 0.01): Curve([0.2], [0.3], True, 3),  # diverged in epoch 2: only epoch 1 is usable
              ("b", 0, 0.1): Curve([0.1, 0.1, 0.1], [0.2, 0.2, 0.2], False, 3)}  # fmt: skip
    training = _fake(curves, grid)
    # early-stop: (lr, epoch) with the best selection accuracy: 0.01 at epoch 2 (0.50 > 0.45)
    assert choose(training, "a", 0, "early-stop") == choose(training, "a", 0, "early-stop")
    stop = choose(training, "a", 0, "early-stop")
    assert (stop.lr, stop.epoch, stop.test, stop.select) == (0.01, 2, 0.8, 0.5)
    # tuned: last-epoch selection 0.40 vs 0.45 -> lr 0.1, scored at the last epoch
    tuned = choose(training, "a", 0, "tuned")
    assert (tuned.lr, tuned.epoch, tuned.test) == (0.1, 3, 0.95)
    # fixed: the recipe's lr, last epoch, whatever the selection split says
    assert choose(training, "a", 0, "fixed", recipe_lr=0.01).test == 0.7
    with pytest.raises(ValueError, match="recipe_lr"):
        choose(training, "a", 0, "fixed", recipe_lr=0.5)
    # a diverged run scores chance at convergence; early stopping may keep an epoch before it
    assert choose(training, "b", 0, "fixed", recipe_lr=0.01).test == pytest.approx(0.1)
    assert choose(training, "b", 0, "early-stop").lr == 0.01 and choose(training, "b", 0, "early-stop").test == 0.3


def test_choices_never_read_the_test_split(units):
    clean = train_units({"ce": get_loss("ce"), "gce": get_loss("gce")}, units, GRID, epochs=2, batch_size=64)
    dirty = train_units({"ce": get_loss("ce"), "gce": get_loss("gce")}, [poisoned(u) for u in units], GRID, epochs=2, batch_size=64)
    for label in ("ce", "gce"):
        for u in range(len(units)):
            for protocol in ("early-stop", "tuned"):
                a, b = choose(clean, label, u, protocol), choose(dirty, label, u, protocol)
                assert (a.lr, a.epoch, a.select) == (b.lr, b.epoch, b.select)
    assert any(choose(clean, "ce", u, "tuned").test != choose(dirty, "ce", u, "tuned").test for u in range(len(units)))


def test_the_loss_meta_test_reports_every_protocol_and_re_evaluates_the_champion(units):
    learned = document_of_loss(TaylorLoss.from_preset("itl"))
    champion = document_of_loss(get_loss("ce"))
    training = {"seeds": [0, 1, 2], "epochs": 2, "batch_size": 64, "momentum": 0.9, "lr_grid": GRID, "recipe_lr": 0.03}
    report = compare_learned_loss("test", learned, ["ce", "gce"], units, training, champion=champion)
    assert list(report.paired) == ["learned", "champion", "ce", "gce"]
    assert [u["seed"] for u in report.units] == [0, 1, 2] and all(len(v) == 3 for v in report.paired.values())
    # the champion (cross-entropy as a loss document) and the 'ce' baseline: the same loss, units and lrs
    assert report.paired["champion"] == report.paired["ce"]
    assert report.settings["gate_protocol"] == "early-stop" and report.settings["lr_grid"] == GRID
    assert all(lr in GRID for chosen in report.settings["chosen_lr"].values() for lr in chosen)
    tables = report.details["tables"]
    for protocol in ("early-stop", "tuned", "fixed"):
        row = tables[protocol]["learned"]
        assert row["ci_low"] <= row["mean"] <= row["ci_high"] and row["worst"] <= row["median"]
        assert f"**{protocol}**" in report.markdown
    assert report.scores["meta_test_accuracy"] == pytest.approx(sum(report.paired["learned"]) / 3)
    assert report.scores["champion.accuracy_fixed"] == pytest.approx(tables["fixed"]["champion"]["mean"])
    assert 0 < report.deployment["lr_scale"] and report.scores["meta_test_lr_scale"] == report.deployment["lr_scale"]
    assert set(report.settings["selection"]["learned"]) == {"mean_regret", "agreement", "select_spread", "select_standard_error"}


def test_the_lr_scale_makes_the_loss_train_at_the_lr_tuned_for_cross_entropy(units):
    """A loss that is cross-entropy times 10 is tuned to a 10x smaller lr than CE on every unit: its
    lr scale is 0.1, and the loaded loss (the document with that scale) trains at CE's lr exactly
    as CE does."""
    tenfold = loss_from_document({"family": "ce", "params": {}, "lr_scale": 10.0})  # a loss whose scale is an lr
    grid = [0.003, 0.03, 0.3, 3.0]
    training = train_units({"learned": tenfold, "ce": get_loss("ce")}, units, grid, epochs=2, batch_size=64)
    for u in range(len(units)):
        assert choose(training, "learned", u, "early-stop").lr * 10 == pytest.approx(choose(training, "ce", u, "early-stop").lr)
    scale = lr_scale(training, "early-stop")
    assert scale["lr_scale"] == pytest.approx(0.1) and scale["lr_scale_reference"] == "ce"
    served = loss_from_document({**document_of_loss(tenfold), "lr_scale": 10.0 * scale["lr_scale"]})  # what the registry bakes in
    ce_lr = choose(training, "ce", 0, "early-stop").lr
    again = train_units({"served": served, "ce": get_loss("ce")}, units[:1], [ce_lr], epochs=2, batch_size=64)
    assert again.curve("served", 0, ce_lr).test == pytest.approx(again.curve("ce", 0, ce_lr).test, abs=1e-3)


def test_arl_meta_test_builds_independent_units_and_passes_the_champion(tmp_path):
    arl = registry.get("arl")
    config = arl.resolve_config(yaml.safe_load((CONFIGS / "arl-tiny.yaml").read_text()))
    settings = arl.resolve_meta_test({"epochs": 1, "seeds": 2, "lr_grid": [0.01, 0.1], "baselines": ["ce"],
                                      "tasks": [{"source": "digits", "image_size": 8, "model": "mlp2", "max_examples": 300},
                                                {"source": "digits", "image_size": 8, "model": "mlp3", "max_examples": 300}]})  # fmt: skip
    assert arl.resolve_meta_test({}).baselines == ["ce", "gce", "sce"] and len(arl.resolve_meta_test({}).tasks) * 5 >= 15
    inputs = arl.prepare(config, settings)
    assert len(inputs.meta_test) == 4  # 2 tasks x 2 seeds, each its own prepared split and noise draw
    assert len({d.fingerprint for d in inputs.meta_test}) == 4
    units = {e["unit"] for e in inputs.manifest["entries"] if e["phase"] == "meta_test"}
    assert units == {0, 1, 2, 3}
    learned = tmp_path / "learned"
    exports.write(learned, "loss-document", document_of_loss(TaylorLoss.from_preset("itl")))
    result = {"format": runner.RESULT_FORMAT, "learner": "arl", "kind": "loss", "export_kind": "loss-document", "steps": 0, "fingerprint": ""}
    (learned / "result.json").write_text(json.dumps(result))
    exports.write(tmp_path / "champion", "loss-document", document_of_loss(get_loss("ce")))
    report = runner.meta_test(arl, config, learned, inputs, settings, champion_dir=tmp_path / "champion")
    assert list(report.paired) == ["learned", "champion", "ce"] and len(report.units) == 4
    assert report.paired["champion"] == report.paired["ce"]  # same loss, same units, same lr grid
    assert {u["task"].split(" · ")[1] for u in report.units} == {"mlp2", "mlp3"}
    with_none = runner.meta_test(arl, config, learned, inputs, settings)
    assert "champion" not in with_none.paired and with_none.paired["learned"] == report.paired["learned"]
    assert not math.isnan(report.scores["meta_test_accuracy_fixed"])


def test_metamd_meta_test_tunes_each_optimiser_on_meta_training_domains_and_re_evaluates_the_champion(tmp_path):
    metamd = registry.get("metamd")
    config = metamd.resolve_config(yaml.safe_load((CONFIGS / "metamd-tiny.yaml").read_text()))
    settings = metamd.resolve_meta_test({"seeds": 3, "lr_grid": [0.01, 0.1, 1.0], "steps": 3, "horizons": [1, 2]})
    inputs = metamd.prepare(config, settings)
    assert len(inputs.meta_test) == 3 and len({d.fingerprint for d in inputs.meta_test}) == 3  # every seed its own draw
    runner.export(metamd, metamd.init(config, inputs), inputs, tmp_path / "learned")
    report = runner.meta_test(metamd, config, tmp_path / "learned", inputs, settings, champion_dir=tmp_path / "learned")
    assert list(report.paired) == ["learned", "champion", "sgd", "sgd-m", "adam"]
    assert all(len(v) == len(report.units) == 6 for v in report.paired.values())  # one held-out domain x 3 seeds x 2 horizons
    assert [u["stratum"] for u in report.units] == ["3 steps"] * 3 + ["6 steps"] * 3  # the gate tests each horizon
    assert report.paired["champion"] == report.paired["learned"]  # the same divergence, the same units
    assert report.settings["tested_on"] and not set(report.settings["tuned_on"]) & set(report.settings["tested_on"])
    assert {lr for per_horizon in report.settings["chosen_lr"].values() for lr in per_horizon.values()} <= {0.01, 0.1, 1.0}
    assert report.settings["replicates"] == 3 and report.greater_is_better
    assert report.deployment["lr"] == report.settings["chosen_lr"]["learned"]["3 steps"]


def test_a_normalised_taylor_loss_meta_tests_in_a_fresh_process():
    """The A.3 normalisation samples the simplex (a random operation vmap refuses) and caches it: the
    engine computes it once outside vmap, so a pipeline's meta-test step (a fresh process, nothing
    cached) trains a normalised loss batched. Failed before the warm-up with 'vmap: called random
    operation while in randomness error mode'."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from metaopt_core import evaluate\n"
        "from metaopt_core.evaluate.units import Unit, train_units\n"
        "from metaopt_core.losses.taylor import TaylorLoss\n"
        "t = evaluate.noise_task({'source': 'digits', 'image_size': 8, 'max_examples': 200, 'seed': 0}, 0.3)\n"
        "unit = Unit('digits8', 0, t.train, t.select, t.test, 'mlp2', 1, 2)\n"
        "loss = TaylorLoss([0.5, 0.1, *[0.3] * 10], order=4, form='taylor', normalise=True)\n"
        "print(len(train_units({'l': loss}, [unit], [0.1], epochs=1, batch_size=64).curve('l', 0, 0.1).test))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1"
