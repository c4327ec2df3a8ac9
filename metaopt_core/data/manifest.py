"""The split manifest: which examples of which source, and which domains, each phase of a run
touches, and the check that the meta-test shares none of them with meta-training.

Phases (a learner declares which splits of which prepared dataset each one reads):

- ``inner_training``: what the base models of meta-training are trained on;
- ``outer_objective``: what the outer step scores them on (ARL's fitness, ITL's held-out loss,
  MetaMD's trajectory objective);
- ``monitoring``: curves logged during meta-training that choose nothing;
- ``meta_test_training``: what the meta-test trains fresh models on (with each candidate);
- ``lr_selection``: where the meta-test chooses each candidate's learning rate;
- ``meta_test``: what the reported (and promotion-deciding) scores are computed on.

The rules, enforced before any training: ``meta_test`` shares no example (same source
fingerprint, same id) and no domain with ``inner_training``, ``outer_objective`` or
``monitoring`` (meta-training may not even look at the meta-test); ``meta_test_training`` shares
no example with meta-training (its domains may be the meta-training kind: that is the
domain-generalisation protocol); within each meta-test **unit** (one independent replicate with its
own split: entries carry its index), ``lr_selection`` shares no example with ``meta_test`` (units
redraw their splits from one pool, so one unit's test examples may train another). The manifest
lists every entry's ids, so anyone can re-check it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MANIFEST_FORMAT = "metaopt.split-manifest/1"
PHASES = ("inner_training", "outer_objective", "monitoring", "meta_test_training", "lr_selection", "meta_test")
META_TRAINING = ("inner_training", "outer_objective")
# (phase a, phase b, whether domains must differ too, whether only entries of the same unit are compared)
RULES = (
    ("inner_training", "meta_test", True, False),
    ("outer_objective", "meta_test", True, False),
    ("monitoring", "meta_test", True, False),
    ("inner_training", "meta_test_training", False, False),
    ("outer_objective", "meta_test_training", False, False),
    ("lr_selection", "meta_test", False, True),
)


class SplitOverlapError(ValueError):
    """Two phases that must be disjoint share examples or domains; the message names both and the count."""


@dataclass
class ManifestEntry:
    """One split of one prepared dataset, as one phase reads it."""

    phase: str
    source: str
    source_fingerprint: str
    dataset_fingerprint: str
    split: str
    domain: str | None
    ids: list[int] = field(default_factory=list)
    unit: int | None = None  # the meta-test unit (replicate) it belongs to; None: the whole run

    def to_dict(self) -> dict:
        digest = hashlib.sha256(",".join(map(str, self.ids)).encode()).hexdigest()
        return {"phase": self.phase, "source": self.source, "source_fingerprint": self.source_fingerprint,
                "dataset_fingerprint": self.dataset_fingerprint, "split": self.split, "domain": self.domain,
                "examples": len(self.ids), "ids_sha256": digest, "unit": self.unit, "ids": self.ids}  # fmt: skip


def _domain_of(split: str) -> str | None:
    return split.split("/", 1)[0] if "/" in split else None


def _base_domain(domain: str | None) -> str | None:
    """``mnist5k-rot75`` -> ``rot75``: domains built on different parts of one source keep their kind."""
    return domain.rsplit("-", 1)[-1] if domain else None


@dataclass
class SplitManifest:
    entries: list[ManifestEntry] = field(default_factory=list)
    generated: dict[str, Any] = field(default_factory=dict)  # tasks generated from the config (e.g. quadratics)

    def add(self, phase: str, data: Any, splits: Iterable[str] | None = None, unit: int | None = None) -> SplitManifest:
        """Record that ``phase`` reads ``splits`` (default: all) of the prepared dataset ``data``
        (for meta-test unit ``unit``, when the meta-test has several independent ones)."""
        if phase not in PHASES:
            raise ValueError(f"phase: got {phase!r}; allowed: {list(PHASES)}")
        for split in sorted(splits if splits is not None else data.splits):
            if split not in data.splits:
                raise KeyError(f"split: got {split!r}; the dataset has {sorted(data.splits)}")
            ids = data.splits[split].ids
            self.entries.append(ManifestEntry(phase, str(data.spec.get("source")), data.source_fingerprint, data.fingerprint, split,
                                              _domain_of(split), sorted(int(i) for i in torch.as_tensor(ids).tolist()), unit))  # fmt: skip
        return self

    def phase(self, name: str) -> list[ManifestEntry]:
        return [entry for entry in self.entries if entry.phase == name]

    def check(self) -> SplitManifest:
        """Refuse overlaps between phases that must be disjoint (see the module docstring)."""
        for first, second, domains_too, per_unit in RULES:
            pairs = [(self.phase(first), self.phase(second), "")]
            if per_unit:
                units = sorted({e.unit for e in self.phase(second)}, key=lambda u: -1 if u is None else u)
                pairs = [([e for e in self.phase(first) if e.unit == u], [e for e in self.phase(second) if e.unit == u], "" if u is None else f" in unit {u}")
                         for u in units]  # fmt: skip
            overlap = {(key, where): count for a, b, where in pairs for key, count in _shared_examples(a, b).items()}
            for ((source, fingerprint), where), count in overlap.items():
                raise SplitOverlapError(
                    f"split manifest: phases '{first}' and '{second}' share {count} example(s) of source {source!r}{where} "
                    f"(fingerprint {fingerprint[:12]}); split the source into meta-train and meta-test parts "
                    f"(data part: meta-train / meta-test) or meta-test on another source"
                )
            if domains_too:
                shared = sorted({_base_domain(e.domain) for e in self.phase(first) if e.domain} & {
                    _base_domain(e.domain) for e in self.phase(second) if e.domain})  # fmt: skip
                if shared:
                    raise SplitOverlapError(
                        f"split manifest: phases '{first}' and '{second}' share {len(shared)} domain(s) {shared}; "
                        f"meta-training must not see the domains the meta-test holds out"
                    )
        return self

    def summary(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for phase in PHASES:
            entries = self.phase(phase)
            if entries:
                out[phase] = {"examples": sum(len(e.ids) for e in entries), "sources": sorted({e.source for e in entries}),
                              "domains": sorted({e.domain for e in entries if e.domain})}  # fmt: skip
        return out

    def to_dict(self) -> dict:
        return {"format": MANIFEST_FORMAT, "summary": self.summary(), "generated": self.generated,
                "entries": [entry.to_dict() for entry in self.entries]}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SplitManifest:
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"split manifest: format {doc.get('format')!r}; expected {MANIFEST_FORMAT!r}")
        entries = [ManifestEntry(e["phase"], e["source"], e["source_fingerprint"], e["dataset_fingerprint"], e["split"], e["domain"],
                                 list(e["ids"]), e.get("unit")) for e in doc.get("entries", [])]  # fmt: skip
        return cls(entries, dict(doc.get("generated") or {}))


def _shared_examples(first: Sequence[ManifestEntry], second: Sequence[ManifestEntry]) -> dict[tuple[str, str], int]:
    by_source: dict[tuple[str, str], set[int]] = {}
    for entry in first:
        by_source.setdefault((entry.source, entry.source_fingerprint), set()).update(entry.ids)
    shared: dict[tuple[str, str], set[int]] = {}
    for entry in second:
        key = (entry.source, entry.source_fingerprint)
        if key in by_source:
            common = by_source[key].intersection(entry.ids)
            if common:
                shared.setdefault(key, set()).update(common)
    return {key: len(ids) for key, ids in shared.items()}


__all__ = ["MANIFEST_FORMAT", "META_TRAINING", "PHASES", "ManifestEntry", "SplitManifest", "SplitOverlapError"]
