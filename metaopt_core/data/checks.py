"""What a prepared dataset must hold before anything trains on it.

A meta-training on one class learns nothing, and a meta-test on one image scores every candidate
1.0 or 0.0: both used to pass quietly (and could be promoted). :func:`check_prepared` refuses
them before any training, naming the split, its counts and what to do:

- every dataset has at least :data:`MIN_CLASSES` classes;
- every split a phase of the run reads (the split manifest: meta-training, the meta-test's
  training, lr selection and scoring) has at least :data:`MIN_EXAMPLES_PER_SPLIT` examples;
- every split that is trained or scored on holds at least :data:`MIN_CLASSES` different labels.
"""

from __future__ import annotations

from collections import Counter

from metaopt_core.data.folders import DatasetError

MIN_CLASSES = 2
MIN_EXAMPLES_PER_SPLIT = 2


def _counts(labels: list[int], names: list[str] | None) -> str:
    counter = Counter(labels)
    return ", ".join(f"{names[label] if names and label < len(names) else label}: {count}" for label, count in sorted(counter.items()))


def _where(data: object) -> str:
    spec = getattr(data, "spec", {}) or {}
    return f"{spec.get('source')} ({spec.get('part', 'all')} part)"


# Phases that train on a split or score on it: a single class there makes the result meaningless.
LABELLED_PHASES = ("inner_training", "outer_objective", "meta_test_training", "meta_test")
HINT = "add images, or give that split a larger share (the data spec's val_fraction, meta_test_fraction, max_examples)"


def check_prepared(datasets: list, manifest: object) -> None:
    """Raise :class:`DatasetError` when a prepared dataset, or what some phase reads (the split
    manifest's entries; ``monitoring`` chooses nothing and is not checked), is too small to train
    or score on: the message names the dataset, the splits, the phase and the counts. A phase of
    one meta-test unit reads its splits together (training on the training domains' splits,
    scoring on every split of a held-out domain), so they are checked together."""
    by_fingerprint = {data.fingerprint: data for data in datasets}
    for data in datasets:
        if data.num_classes < MIN_CLASSES:
            raise DatasetError(f"{_where(data)}: {data.num_classes} class; at least {MIN_CLASSES} are needed (a loss or optimiser "
                               "learned or tested on one class means nothing): add a folder per class")  # fmt: skip
    groups: dict[tuple, list[str]] = {}
    for entry in manifest.entries:
        if entry.dataset_fingerprint in by_fingerprint and entry.phase != "monitoring":
            key = (entry.dataset_fingerprint, entry.phase, entry.unit if entry.unit is not None else entry.split)
            groups.setdefault(key, []).append(entry.split)
    for (fingerprint, phase_name, _), splits in groups.items():
        data = by_fingerprint[fingerprint]
        phase = phase_name.replace("_", " ")
        labels = [label for split in splits for label in data.splits[split].y.tolist()]
        named = f"split '{splits[0]}'" if len(splits) == 1 else f"splits {', '.join(repr(s) for s in splits)} together"
        hold = "holds" if len(splits) == 1 else "hold"
        if len(labels) < MIN_EXAMPLES_PER_SPLIT:
            raise DatasetError(f"{_where(data)}: {named} ({phase}) {hold} {len(labels)} example(s); at least "
                               f"{MIN_EXAMPLES_PER_SPLIT} are needed: {HINT}")  # fmt: skip
        if phase_name in LABELLED_PHASES and len(set(labels)) < MIN_CLASSES:
            classes = list((getattr(data, "content", None) or {}).get("classes") or []) or None
            raise DatasetError(f"{_where(data)}: {named} ({phase}) {hold} {len(set(labels))} class ({_counts(labels, classes)}) "
                               f"of {data.num_classes}; at least {MIN_CLASSES} are needed: {HINT}")  # fmt: skip


__all__ = ["LABELLED_PHASES", "MIN_CLASSES", "MIN_EXAMPLES_PER_SPLIT", "check_prepared"]
