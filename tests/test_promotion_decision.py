"""The champion/challenger decision of the model registry, as a pure function (no MLflow server)."""

from __future__ import annotations

import pytest

from metaopt_core.mlops.registry import PromotionVerdict, decide_promotion

METRIC = "meta_test_accuracy"


def decide(challenger_score, champion_score, **kwargs) -> PromotionVerdict:
    """``champion_score``: None for no champion, "no score" for a champion without the metric."""
    return decide_promotion(
        None if challenger_score is None else {METRIC: challenger_score},
        None if champion_score is None else ({} if champion_score == "no score" else {METRIC: champion_score}),
        metric=METRIC,
        **kwargs,
    )


def test_better_by_more_than_the_margin_is_promoted():
    verdict = decide(0.71, 0.60, margin=0.1, champion="production version 1")
    assert (verdict.promoted, verdict.decision) == (True, "promoted")
    assert verdict.reason == ("meta_test_accuracy 0.71 beats production version 1's 0.6 by more than the margin 0.1 (higher is better)")


def test_better_by_less_than_the_margin_is_rejected():
    verdict = decide(0.65, 0.60, margin=0.1)
    assert (verdict.promoted, verdict.decision) == (False, "rejected")
    assert "does not beat" in verdict.reason


def test_a_tie_keeps_the_champion():
    verdict = decide(0.6, 0.6)
    assert (verdict.promoted, verdict.decision) == (False, "rejected")


def test_no_champion_promotes():
    verdict = decide(None, None)
    assert (verdict.promoted, verdict.decision, verdict.reason) == (True, "promoted", "no production version yet")


def test_lower_is_better_metrics():
    assert decide(0.2, 0.3, greater_is_better=False).promoted
    verdict = decide(0.4, 0.3, greater_is_better=False)
    assert not verdict.promoted and "(lower is better)" in verdict.reason
    assert not decide(0.25, 0.3, greater_is_better=False, margin=0.1).promoted


def test_force_and_already_production():
    assert decide(0.1, 0.9, force=True) == PromotionVerdict(True, "forced", "promotion forced")
    assert decide(0.1, 0.9, already_production=True, force=True).decision == "unchanged"


def test_champion_without_the_metric_is_kept():
    verdict = decide(0.9, "no score", champion="production version 2")
    assert (verdict.promoted, verdict.decision) == (False, "rejected")
    assert verdict.reason.startswith("production version 2 has no 'meta_test_accuracy' score")


def test_challenger_without_the_metric_facing_a_champion_is_an_error():
    with pytest.raises(ValueError, match="version 3 of 'itl' has no 'meta_test_accuracy' score.*force=True"):
        decide(None, 0.5, challenger="version 3 of 'itl'")
    with pytest.raises(ValueError, match="no 'meta_test_accuracy' score"):
        decide_promotion({"other": 1.0}, {METRIC: 0.5}, metric=METRIC)


@pytest.mark.parametrize("margin", [-0.1, float("nan"), True])
def test_bad_margins_are_refused(margin):
    with pytest.raises(ValueError, match="margin"):
        decide(0.9, 0.5, margin=margin)
