"""The promotion gate: whether a freshly meta-learned version may go to production, decided from one
meta-test run's paired scores (a pure function; no MLflow).

In one meta-test run the challenger (``learned``), the production version (``champion``, when
there is one) and the tuned hand-designed baselines are scored on the same independent units
(task x seed; each seed redraws its own split, label noise and initialisation), in the direction
of the report's metric. The rule, for every version, the first included:

    the challenger is promoted only when it beats EVERY reference (each tuned baseline and the
    champion re-evaluated in the same run) by more than ``margin`` with confidence ``confidence``.

"Beats r by more than m with confidence 1 - α" is a one-sided **exact sign-flip (randomisation)
test** on the paired differences d_u = challenger_u - r_u (negated when lower is better) over the
n units: under H0 "the mean gain is at most m", x_u = d_u - m is symmetric about 0 at the
boundary, so every assignment of signs to the |x_u| is equally likely; the p-value is the share
of the 2^n assignments whose mean is at least the observed mean (enumerated exactly up to
:data:`EXACT_UNITS` units, else a seeded Monte-Carlo estimate with the +1 correction, which
keeps it valid). The version passes a reference when p <= α. Beating every reference is an
intersection-union test: its size is at most α without any multiplicity correction, and "beats
the best baseline" is the same statement as "beats every baseline". Production therefore always
means "better than what the user has for free, with that confidence".

``margin`` has one meaning: the gain required over each reference (0: any gain). The reported
``lower_bound`` of a comparison is the largest margin the test would still pass (the inverted
test: a one-sided ``confidence`` lower confidence bound of the mean gain), so "promoted" and
"lower bound > margin" agree.

Error rates, shown by tests/test_gate.py: the false-promotion rate is at most α for first versions
and challengers (exactly, over the sign assignments, and in simulated meta-tests with task
effects, bounded accuracies and several baselines); the power for a given effect at the demo's
unit count is in docs/pipelines.md ("The promotion gate"). Below ``min_units`` units (or when
2^-n > α, so that no outcome could pass) the version is rejected with that reason.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

CHALLENGER = "learned"
CHAMPION = "champion"
EXACT_UNITS = 20  # enumerate all 2^n sign assignments up to here (2^20 = 1M means)
RESAMPLES = 100_000  # Monte-Carlo sign assignments beyond EXACT_UNITS
MIN_UNITS = 10  # fewer units: rejected (even a clear effect is then rarely detected; the demo uses >= 15)


@dataclass(frozen=True)
class GateDecision:
    """What :func:`decide_gate` concludes, with every number it used (JSON-able via ``to_dict``)."""

    promoted: bool
    decision: str  # promoted | rejected
    reason: str
    numbers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def subset_sums(values: np.ndarray) -> np.ndarray:
    """The sums of all 2^n subsets of ``values`` (index bit u set = unit u in the subset), built by
    doubling: no matrix of sign assignments, O(2^n) additions."""
    sums = np.zeros(1)
    for value in values:
        sums = np.concatenate([sums, sums + value])
    return sums


@functools.lru_cache(maxsize=4)
def _subset_sizes(n: int) -> np.ndarray:
    sizes = subset_sums(np.ones(n))
    sizes.setflags(write=False)
    return sizes


def sign_flip_p_value(differences: Sequence[float], margin: float = 0.0, *, seed: int = 0, resamples: int = RESAMPLES) -> float:
    """One-sided p-value of H0 "mean of ``differences`` <= ``margin``" by the sign-flip test (see the
    module docstring): exact for up to :data:`EXACT_UNITS` values, else Monte-Carlo with
    ``(1 + hits) / (1 + resamples)``. Flipping the units F reaches the observed sum exactly when
    the x_u of F sum to at most 0."""
    x = np.asarray(differences, dtype=np.float64) - float(margin)
    if x.size == 0:
        raise ValueError("differences: got none")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"differences: non-finite values {x.tolist()}")
    tolerance = 1e-12 * max(1.0, float(np.abs(x).sum()))  # equal sums up to rounding count as "at least"
    if x.size <= EXACT_UNITS:
        return float(np.count_nonzero(subset_sums(x) <= tolerance)) / (1 << x.size)
    hits = int(np.count_nonzero(_random_flips(x.size, seed, resamples) @ x.astype(np.float32) <= tolerance))
    return (1 + hits) / (1 + resamples)


@functools.lru_cache(maxsize=2)
def _random_flips(n: int, seed: int, resamples: int) -> np.ndarray:
    """``resamples`` random 0/1 rows (which units a random assignment flips), seeded and reused, so a
    bisection over margins tests one fixed set of assignments."""
    flips = np.random.default_rng(seed).integers(0, 2, size=(resamples, n)).astype(np.float32)
    flips.setflags(write=False)
    return flips


def sign_flip_lower_bound(differences: Sequence[float], confidence: float, *, seed: int = 0, resamples: int = RESAMPLES) -> float:
    """The largest margin m whose test still passes (p <= 1 - confidence): a one-sided lower
    confidence bound of the mean difference; -inf when no margin passes (too few units).

    Exact case: the test of margin m fails once K = floor(alpha 2^n) non-empty subsets F of the
    units have mean(d_F) <= m (flipping F then reaches the observed sum), so the bound is the K-th
    smallest subset mean. Beyond :data:`EXACT_UNITS`: bisection on the Monte-Carlo test."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("differences: got none")
    alpha = 1.0 - confidence
    if values.size <= EXACT_UNITS:
        k = math.floor(alpha * (1 << values.size) + 1e-9)
        if k < 1:
            return -math.inf
        means = subset_sums(values)[1:] / _subset_sizes(values.size)[1:]  # every subset but the empty one
        return float(np.partition(means, k - 1)[k - 1])

    def passes(m: float) -> bool:
        return sign_flip_p_value(values, m, seed=seed, resamples=resamples) <= alpha

    low, high = float(values.min()) - 1.0, float(values.max())  # at max(d) every x <= 0: p = 1
    if not passes(low):
        return -math.inf
    for _ in range(60):  # bisection; p is non-decreasing in m
        middle = 0.5 * (low + high)
        low, high = (middle, high) if passes(middle) else (low, middle)
        if high - low <= 1e-9 * max(1.0, abs(low)):
            break
    return low


def smallest_attainable_p(units: int) -> float:
    """The smallest p-value the exact test can give with ``units`` units: 2^-units."""
    return 2.0 ** (-units)


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
    baselines: Sequence[str] | None = None,
    min_units: int = MIN_UNITS,
    seed: int = 0,
    bounds: bool = True,
    strata: Sequence[str] | None = None,
) -> GateDecision:
    """The gate's decision from one meta-test run's paired scores (see the module docstring).

    ``paired``: label -> scores, one per unit, the same units in the same order for every label;
    ``learned`` is the challenger, ``champion`` the production version re-evaluated in the same run
    (absent: no production version), ``baselines`` the tuned hand-designed ones (default: every
    other label). A version with nothing to compare with is rejected. ``bounds=False`` skips the
    lower bounds (reported as None; the decision does not use them): for simulations.
    ``strata``: one label per unit (e.g. MetaMD's horizons, whose units share seeds): every test is
    then run within each stratum and all must pass (still an intersection-union test), each
    stratum needing ``min_units`` units.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin: got {margin!r}; allowed: a finite number >= 0 (the gain required over every reference)")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence: got {confidence!r}; allowed: a number in [0.5, 1)")
    if isinstance(min_units, bool) or not isinstance(min_units, int) or min_units < 1:
        raise ValueError(f"min_units: got {min_units!r}; allowed: an int >= 1")
    if CHALLENGER not in paired:
        raise ValueError(f"paired: no {CHALLENGER!r} scores (the challenger); got {sorted(paired)}")
    baselines = [b for b in paired if b not in (CHALLENGER, CHAMPION)] if baselines is None else list(baselines)
    missing = [b for b in baselines if b not in paired]
    if missing:
        raise ValueError(f"baselines: {missing} have no paired scores; got {sorted(paired)}")
    lengths = {label: len(values) for label, values in paired.items()}
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ValueError(f"paired: every label needs the same non-zero number of units; got {lengths}")
    if strata is not None and len(strata) != next(iter(lengths.values())):
        raise ValueError(f"strata: got {len(strata)} labels for {next(iter(lengths.values()))} units; allowed: one per unit")
    groups = {str(s): [i for i, t in enumerate(strata) if t == s] for s in dict.fromkeys(strata)} if strata is not None else {"": None}
    sign = 1.0 if greater_is_better else -1.0
    better = "higher" if greater_is_better else "lower"
    challenger = _check(paired, CHALLENGER)
    units = int(challenger.size)
    alpha = 1.0 - confidence
    references = [*baselines, *([CHAMPION] if CHAMPION in paired else [])]
    numbers: dict = {
        "test": "one-sided exact sign-flip test per reference, all must pass (intersection-union)",
        "units": units, "min_units": int(min_units), "margin": float(margin), "confidence": float(confidence),
        "greater_is_better": bool(greater_is_better), "challenger_mean": float(challenger.mean()),
        "champion": CHAMPION in paired, "references": references,
    }  # fmt: skip
    if baselines:
        means = {b: float(_check(paired, b).mean()) for b in baselines}
        numbers.update(baseline_means=means, best_baseline=max(means, key=lambda b: sign * means[b]))
    if CHAMPION in paired:
        champion_scores = _check(paired, CHAMPION)
        numbers.update(champion_mean=float(champion_scores.mean()), mean_difference=float((sign * (challenger - champion_scores)).mean()))
    if not references:
        return GateDecision(False, "rejected", "rejected: the meta-test scored no baseline and no champion to compare with", numbers)
    smallest = min(len(rows) if rows is not None else units for rows in groups.values())
    if smallest < min_units or smallest_attainable_p(smallest) > alpha:
        where = " per stratum" if strata is not None else ""
        reason = (f"rejected: only {smallest} independent unit(s){where}; the gate needs at least {max(min_units, math.ceil(-math.log2(alpha)))} "
                  f"(set more meta_test seeds or tasks)")  # fmt: skip
        return GateDecision(False, "rejected", reason, numbers)

    comparisons: dict[str, dict] = {}
    for stratum, rows in groups.items():
        for reference in references:
            gain = sign * (challenger - _check(paired, reference))
            scores = np.asarray(paired[reference], dtype=np.float64)
            if rows is not None:
                gain, scores = gain[rows], scores[rows]
            p = sign_flip_p_value(gain, margin, seed=seed)
            comparisons[f"{reference} @ {stratum}" if stratum else reference] = {
                "reference": reference, "stratum": stratum or None, "units": int(gain.size), "mean": float(scores.mean()),
                "mean_gain": float(gain.mean()), "lower_bound": sign_flip_lower_bound(gain, confidence, seed=seed) if bounds else None,
                "p_value": p, "passed": bool(p <= alpha), "wins": int((gain > 0).sum()), "losses": int((gain < 0).sum()),
            }  # fmt: skip
    numbers["comparisons"] = comparisons
    if CHAMPION in paired:
        bounds_ = [row["lower_bound"] for row in comparisons.values() if row["reference"] == CHAMPION and row["lower_bound"] is not None]
        numbers["lower_bound"] = min(bounds_, default=None)
    failed = [key for key, row in comparisons.items() if not row["passed"]]
    promoted = not failed
    # the binding comparison: the failed one with the weakest evidence, else the closest pass
    binding = max(failed or comparisons, key=lambda key: comparisons[key]["p_value"])
    numbers.update(binding=binding, binding_lower_bound=comparisons[binding]["lower_bound"], binding_p_value=comparisons[binding]["p_value"])

    def phrase(key: str) -> str:
        row = comparisons[key]
        name = "the champion (re-evaluated in this run)" if row["reference"] == CHAMPION else f"tuned {row['reference']!r}"
        at = f" at {row['stratum']}" if row["stratum"] else ""
        verdict = "beats" if row["passed"] else "does not beat"
        bound = "" if row["lower_bound"] is None else f", {confidence:.0%} lower bound {row['lower_bound']:+.4g}"
        return (f"{verdict} {name}{at}: mean gain {row['mean_gain']:+.4g} ({better} is better; {row['wins']} wins, {row['losses']} losses "
                f"of {row['units']}){bound}, p {row['p_value']:.3g} vs margin {margin:g}")  # fmt: skip

    ordered = sorted(comparisons, key=lambda key: -comparisons[key]["p_value"])  # weakest evidence first
    head = "promoted" if promoted else "rejected"
    scope = "every reference" if promoted else f"{len(failed)} of {len(comparisons)} comparison(s)"
    if not promoted:
        scope = f"not better in {scope}"
    reason = f"{head}: {scope} with {confidence:.0%} confidence over {units} units: " + "; ".join(phrase(k) for k in ordered)
    if CHAMPION not in paired:
        reason += " (no production version yet)"
    return GateDecision(promoted, head, reason, numbers)


def decide_recorded(record: Mapping, *, margin: float = 0.0, confidence: float = 0.95) -> GateDecision:
    """The gate on a meta-test's recorded gate inputs (``MetaTestReport.gate_inputs()``, what the
    pipeline stores as ``gate_inputs.json`` and the registry as ``gate.json``): the one rule the
    pipelines and ``metaopt models promote`` apply. Units that carry a ``stratum`` are tested
    within each stratum. No paired scores: rejected, with the reason."""
    paired = dict(record.get("paired") or {})
    if CHALLENGER not in paired:
        return GateDecision(False, "rejected", "rejected: the meta-test gave no paired per-unit scores to gate on")
    units = list(record.get("units") or [])
    strata = [str(u["stratum"]) for u in units] if units and all(isinstance(u, Mapping) and "stratum" in u for u in units) else None
    return decide_gate(paired, greater_is_better=bool(record.get("greater_is_better", True)), margin=margin, confidence=confidence, strata=strata)


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXACT_UNITS",
    "MIN_UNITS",
    "GateDecision",
    "decide_gate",
    "decide_recorded",
    "sign_flip_lower_bound",
    "sign_flip_p_value",
    "smallest_attainable_p",
]
