"""What meta-training reads, prepared once and handed from step to step: the datasets (in the
learner's order) with one content fingerprint, saved as ``inputs.json`` plus one folder per
dataset (safetensors, no pickle)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from metaopt_core.data.prepare import PreparedData

INPUTS_FORMAT = "metaopt.pipeline.inputs/1"


def integral_floats_to_int(value: Any) -> Any:
    """``8.0`` -> ``8`` throughout nested dicts and lists. Kubeflow passes dict parameters as
    protobuf Structs, whose numbers are all doubles; an int field then receives ``8.0``. Every float
    field of the configs accepts an int, so the conversion is safe for validation."""
    if isinstance(value, Mapping):
        return {str(k): integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [integral_floats_to_int(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


@dataclass
class PreparedInputs:
    """What a run reads, prepared once, before any training.

    ``datasets``: what meta-training reads (ARL: the pool's datasets in pool order; ITL, MetaMD:
    the domain dataset; none for tasks generated from the config). ``meta_test``: what the
    meta-test reads, prepared from examples meta-training never touches. ``meta_test_settings``:
    the settings those were prepared for. ``manifest``: the split manifest (which examples and
    domains each phase touches; checked disjoint). ``fingerprint`` identifies the content: a single
    dataset's own fingerprint, else the sha256 of the parts' fingerprints."""

    learner: str  # the registry name of the learner the inputs were prepared for
    datasets: list[PreparedData]
    fingerprint: str
    details: dict = field(default_factory=dict)
    meta_test: list[PreparedData] = field(default_factory=list)
    meta_test_settings: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        groups = {}
        for group, items in (("datasets", self.datasets), ("meta_test", self.meta_test)):
            entries = []
            for position, data in enumerate(items):
                name = f"{'dataset' if group == 'datasets' else 'meta-test'}-{position}"
                data.save(directory / name)
                entries.append({"dir": name, "fingerprint": data.fingerprint, "spec": data.spec, "domains": data.domains})
            groups[group] = entries
        doc = {"format": INPUTS_FORMAT, "learner": self.learner, "fingerprint": self.fingerprint, **groups, "details": self.details,
               "meta_test_settings": self.meta_test_settings}  # fmt: skip
        (directory / "inputs.json").write_text(json.dumps(doc, indent=2))
        (directory / "split_manifest.json").write_text(json.dumps(self.manifest))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> PreparedInputs:
        directory = Path(directory)
        path = directory / "inputs.json"
        if not path.exists():
            raise FileNotFoundError(f"no prepared inputs at {directory} (inputs.json missing)")
        doc = json.loads(path.read_text())
        if doc.get("format") != INPUTS_FORMAT:
            raise ValueError(f"prepared inputs {path}: format {doc.get('format')!r}; expected {INPUTS_FORMAT!r}")
        loaded = {}
        for group in ("datasets", "meta_test"):
            loaded[group] = [PreparedData.load(directory / entry["dir"]) for entry in doc.get(group, [])]
            for entry, data in zip(doc.get(group, []), loaded[group]):
                if data.fingerprint != entry["fingerprint"]:
                    raise ValueError(f"prepared inputs {path}: {entry['dir']} has fingerprint {data.fingerprint}, recorded {entry['fingerprint']}")
        manifest_path = directory / "split_manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        return cls(doc["learner"], loaded["datasets"], doc["fingerprint"], dict(doc.get("details") or {}), loaded["meta_test"],
                   dict(doc.get("meta_test_settings") or {}), manifest)  # fmt: skip

    def summary(self) -> str:
        if not self.datasets:
            return f"{self.details.get('kind', 'generated tasks')} (fingerprint {self.fingerprint[:12]})"
        parts = []
        for data in self.datasets:
            sizes = sum(len(split) for split in data.splits.values())
            where = f"{len(data.domains)} domains" if data.domains else "train/val"
            parts.append(f"{data.spec.get('source')} ({where}, {sizes} images)")
        held_out = sum(len(split) for data in self.meta_test for split in data.splits.values())
        tail = f"; meta-test {held_out} unseen images" if self.meta_test else ""
        return f"{', '.join(parts)}{tail} (fingerprint {self.fingerprint[:12]})"


def combine_fingerprints(fingerprints: Sequence[str]) -> str:
    """One fingerprint for several: a single one unchanged, else sha256 over them in order."""
    if not fingerprints:
        raise ValueError("fingerprints: got none")
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256(("\n".join(["metaopt.inputs/1", *fingerprints])).encode()).hexdigest()


__all__ = ["INPUTS_FORMAT", "PreparedInputs", "combine_fingerprints", "integral_floats_to_int"]
