"""The champion/challenger gate: whether a freshly meta-learned version may replace production,
decided from one meta-test run's paired scores (a pure function; no MLflow).

In one meta-test run the challenger (``learned``), the production version (``champion``, when
there is one) and the tuned hand-designed baselines are scored on the same units (task x seed),
in the direction of the report's metric. The rule:

1. **Champion rule** (only when there is a champion): the one-sided lower confidence bound of the
   mean paired difference challenger - champion (a seeded paired bootstrap over the units,
   ``resamples`` resamples, percentile ``1 - confidence``) must reach ``margin``, and the mean
   difference must be > 0 (a tie keeps the champion, whatever the margin).
2. **Baseline rule** (always; the only rule for the first version): the challenger's *mean* score
   must not be worse than the best tuned baseline's mean by more than ``margin``. The mean, not a
   bound: this rule is a floor against regressions below what a user gets for free, not a claim
   of superiority, and a bound over few seeds would reject nearly every honest tie.
3. At least ``min_seeds`` seeds (independent replicates per task): fewer is rejected, because a
   paired interval over one or two seeds says nothing.

Scores where lower is better (iterations to a threshold) are negated into "gain" differences, so
"better by the margin" means the same thing either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

CHALLENGER = "learned"
CHAMPION = "champion"


@dataclass(frozen=True)
class GateDecision:
    """What :func:`decide_gate` concludes, with every number it used (JSON-able via ``to_dict``)."""

    promoted: bool
    decision: str  # promoted | rejected
    reason: str
    numbers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap_lower_bound(differences: Sequence[float], confidence: float, resamples: int, seed: int) -> float:
    """One-sided lower ``confidence`` bound of the mean of ``differences`` (percentile bootstrap,
    resampling the paired units with replacement, seeded)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("differences: got none")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[index].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


def _check(paired: Mapping[str, Sequence[float]], label: str) -> np.ndarray:
    values = np.asarray(paired[label], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"paired[{label!r}]: non-finite scores {values.tolist()}")
    return values


def decide_gate(
    paired: Mapping[str, Sequence[float]],
    *,
    greater_is_better: bool,
    margin: float = 0.0,
    confidence: float = 0.95,
    seeds: int,
    min_seeds: int = 3,
    baselines: Sequence[str] | None = None,
    resamples: int = 10_000,
    seed: int = 0,
) -> GateDecision:
    """The gate's decision from one meta-test run's paired scores (see the module docstring).

    ``paired``: label -> scores, one per unit, the same units in the same order for every label;
    ``learned`` is the challenger, ``champion`` the production version re-evaluated in the same run
    (absent: no production version), ``baselines`` the tuned hand-designed ones (default: every
    other label). ``seeds``: independent replicates per task in the run.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin: got {margin!r}; allowed: a finite number >= 0")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence: got {confidence!r}; allowed: a number in [0.5, 1)")
    if CHALLENGER not in paired:
        raise ValueError(f"paired: no {CHALLENGER!r} scores (the challenger); got {sorted(paired)}")
    baselines = [b for b in paired if b not in (CHALLENGER, CHAMPION)] if baselines is None else list(baselines)
    missing = [b for b in baselines if b not in paired]
    if missing:
        raise ValueError(f"baselines: {missing} have no paired scores; got {sorted(paired)}")
    lengths = {label: len(values) for label, values in paired.items()}
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ValueError(f"paired: every label needs the same non-zero number of units; got {lengths}")
    sign = 1.0 if greater_is_better else -1.0
    better = "higher" if greater_is_better else "lower"
    challenger = _check(paired, CHALLENGER)
    numbers: dict = {
        "units": int(challenger.size), "seeds": int(seeds), "min_seeds": int(min_seeds), "margin": float(margin),
        "confidence": float(confidence), "resamples": int(resamples), "greater_is_better": bool(greater_is_better),
        "challenger_mean": float(challenger.mean()), "champion": CHAMPION in paired,
    }  # fmt: skip
    if seeds < min_seeds:
        reason = f"only {seeds} seed(s); the gate needs at least {min_seeds} for a paired interval (set meta_test seeds)"
        return GateDecision(False, "rejected", reason, numbers)

    reasons: list[str] = []
    promoted = True
    if CHAMPION in paired:
        gain = sign * (challenger - _check(paired, CHAMPION))
        mean_gain = float(gain.mean())
        lower = paired_bootstrap_lower_bound(gain, confidence, resamples, seed)
        numbers.update(champion_mean=float(np.mean(paired[CHAMPION])), mean_difference=mean_gain, lower_bound=lower)
        wins = lower >= margin and mean_gain > 0
        promoted &= wins
        reasons.append(
            f"vs the champion (re-evaluated in this run): mean paired gain {mean_gain:+.4g} ({better} is better), "
            f"{confidence:.0%} lower bound {lower:+.4g} {'>=' if lower >= margin else '<'} margin {margin:g}"
            + ("" if wins or lower < margin else " but no mean gain (a tie keeps the champion)")
        )
    else:
        reasons.append("no production version: held to the baseline rule")
    if baselines:
        means = {b: float(_check(paired, b).mean()) for b in baselines}
        best = max(means, key=lambda b: sign * means[b])
        shortfall = sign * (means[best] - float(challenger.mean()))
        numbers.update(baseline_means=means, best_baseline=best, baseline_shortfall=shortfall)
        floor = shortfall <= margin
        promoted &= floor
        reasons.append(
            f"vs the best tuned baseline {best!r}: mean {float(challenger.mean()):.4g} vs {means[best]:.4g} "
            f"({'within' if floor else 'worse by more than'} the margin {margin:g})"
        )
    decision = "promoted" if promoted else "rejected"
    return GateDecision(promoted, decision, f"{decision}: " + "; ".join(reasons), numbers)


__all__ = ["CHALLENGER", "CHAMPION", "GateDecision", "decide_gate", "paired_bootstrap_lower_bound"]
