"""The promotion gate (``metaopt_core.gate``) as a pure function: paired scores from one meta-test
run in, a decision with its reason and numbers out (no MLflow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metaopt_core.gate import decide_gate, paired_bootstrap_lower_bound

UNITS = 12  # e.g. 4 tasks x 3 seeds


@pytest.fixture
def noisy():
    """Scores around ``mean``: each test draws from its own seeded generator (the same draws
    whatever ran before it)."""
    rng = np.random.default_rng(0)

    def draw(mean: float, spread: float = 0.01) -> list[float]:
        return list(mean + spread * rng.standard_normal(UNITS))

    return draw


def test_a_challenger_worse_than_the_champion_is_rejected(noisy):
    base = noisy(0.80)
    paired = {"learned": [v - 0.03 for v in base], "champion": base, "ce": noisy(0.70)}
    decision = decide_gate(paired, greater_is_better=True, margin=0.0, seeds=3)
    assert not decision.promoted and decision.decision == "rejected"
    assert "vs the champion" in decision.reason
    assert decision.numbers["mean_difference"] == pytest.approx(-0.03)
    assert decision.numbers["lower_bound"] < 0


def test_a_challenger_better_than_the_champion_and_the_baselines_is_promoted(noisy):
    base = noisy(0.80)
    paired = {"learned": [v + 0.05 for v in base], "champion": base, "ce": noisy(0.78), "gce": noisy(0.79)}
    decision = decide_gate(paired, greater_is_better=True, margin=0.01, seeds=3)
    assert decision.promoted and decision.decision == "promoted"
    assert decision.numbers["lower_bound"] >= 0.01
    assert decision.numbers["best_baseline"] == "gce"
    json.dumps(decision.to_dict())  # recorded as gate.json


def test_a_better_mean_without_confidence_is_rejected():
    """Half the units much better, half much worse: a positive mean, but the bound is below 0."""
    champion = [0.8] * UNITS
    learned = [0.8 + (0.2 if i % 2 else -0.19) for i in range(UNITS)]
    decision = decide_gate({"learned": learned, "champion": champion}, greater_is_better=True, margin=0.0, seeds=3)
    assert decision.numbers["mean_difference"] > 0 and decision.numbers["lower_bound"] < 0
    assert not decision.promoted


def test_a_tie_keeps_the_champion(noisy):
    scores = noisy(0.8)
    decision = decide_gate({"learned": scores, "champion": list(scores), "ce": noisy(0.5)}, greater_is_better=True, margin=0.0, seeds=3)
    assert not decision.promoted and "a tie keeps the champion" in decision.reason


def test_the_first_version_is_held_to_the_baseline_rule(noisy):
    good = decide_gate({"learned": noisy(0.80), "ce": noisy(0.79)}, greater_is_better=True, margin=0.02, seeds=3)
    assert good.promoted and "no production version" in good.reason
    bad = decide_gate({"learned": noisy(0.70), "ce": noisy(0.60), "sce": noisy(0.80)}, greater_is_better=True, margin=0.02, seeds=3)
    assert not bad.promoted
    assert "best tuned baseline 'sce'" in bad.reason and "worse by more than the margin" in bad.reason
    assert bad.numbers["baseline_shortfall"] == pytest.approx(0.10, abs=0.02)


def test_beating_the_champion_is_not_enough_when_a_baseline_is_better(noisy):
    champion = noisy(0.60)
    paired = {"learned": [v + 0.1 for v in champion], "champion": champion, "ce": noisy(0.90)}
    decision = decide_gate(paired, greater_is_better=True, margin=0.0, seeds=3)
    assert decision.numbers["lower_bound"] > 0 and not decision.promoted


def test_fewer_than_three_seeds_is_rejected_with_the_reason():
    decision = decide_gate({"learned": [0.9, 0.9], "ce": [0.1, 0.1]}, greater_is_better=True, margin=0.0, seeds=2)
    assert not decision.promoted
    assert "only 2 seed(s)" in decision.reason and "at least 3" in decision.reason


def test_lower_is_better_metrics():
    champion = [100.0 + i for i in range(UNITS)]
    faster = {"learned": [c - 20 for c in champion], "champion": champion, "sgd": [300.0] * UNITS}
    assert decide_gate(faster, greater_is_better=False, margin=5.0, seeds=3).promoted
    slower = {"learned": [c + 20 for c in champion], "champion": champion, "sgd": [300.0] * UNITS}
    decision = decide_gate(slower, greater_is_better=False, margin=0.0, seeds=3)
    assert not decision.promoted and decision.numbers["mean_difference"] == pytest.approx(-20.0)
    # first version: not worse than the best baseline (fewest iterations) by more than the margin
    assert not decide_gate({"learned": [150.0] * UNITS, "adam": [100.0] * UNITS}, greater_is_better=False, margin=10.0, seeds=3).promoted
    assert decide_gate({"learned": [105.0] * UNITS, "adam": [100.0] * UNITS}, greater_is_better=False, margin=10.0, seeds=3).promoted


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same non-zero number of units"):
        decide_gate({"learned": [1.0, 2.0], "ce": [1.0]}, greater_is_better=True, seeds=3)
    with pytest.raises(ValueError, match="no 'learned' scores"):
        decide_gate({"ce": [1.0]}, greater_is_better=True, seeds=3)
    with pytest.raises(ValueError, match="margin"):
        decide_gate({"learned": [1.0]}, greater_is_better=True, margin=-1.0, seeds=3)
    with pytest.raises(ValueError, match="non-finite"):
        decide_gate({"learned": [float("nan")] * 3}, greater_is_better=True, seeds=3)


def test_the_bootstrap_bound_is_seeded_and_below_the_mean(noisy):
    values = noisy(0.05, 0.05)
    first = paired_bootstrap_lower_bound(values, 0.95, 10_000, seed=0)
    assert first == paired_bootstrap_lower_bound(values, 0.95, 10_000, seed=0)
    assert first < float(np.mean(values)) and paired_bootstrap_lower_bound(values, 0.99, 10_000, seed=0) < first
