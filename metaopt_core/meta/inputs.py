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
    """What meta-training reads, prepared once: ARL's pool datasets (in pool order), ITL's domain
    dataset, MetaMD's domain dataset (network tasks) or nothing (quadratic tasks, generated from the
    config). ``fingerprint`` identifies the content: a single dataset's own fingerprint, else the
    sha256 of the parts' fingerprints (quadratics: of the generated problems)."""

    learner: str  # the registry name of the learner the inputs were prepared for
    datasets: list[PreparedData]
    fingerprint: str
    details: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for position, data in enumerate(self.datasets):
            name = f"dataset-{position}"
            data.save(directory / name)
            entries.append({"dir": name, "fingerprint": data.fingerprint, "spec": data.spec, "domains": data.domains})
        doc = {"format": INPUTS_FORMAT, "learner": self.learner, "fingerprint": self.fingerprint,
               "datasets": entries, "details": self.details}  # fmt: skip
        (directory / "inputs.json").write_text(json.dumps(doc, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PreparedInputs":
        directory = Path(directory)
        path = directory / "inputs.json"
        if not path.exists():
            raise FileNotFoundError(f"no prepared inputs at {directory} (inputs.json missing)")
        doc = json.loads(path.read_text())
        if doc.get("format") != INPUTS_FORMAT:
            raise ValueError(f"prepared inputs {path}: format {doc.get('format')!r}; expected {INPUTS_FORMAT!r}")
        datasets = [PreparedData.load(directory / entry["dir"]) for entry in doc["datasets"]]
        for entry, data in zip(doc["datasets"], datasets):
            if data.fingerprint != entry["fingerprint"]:
                raise ValueError(f"prepared inputs {path}: {entry['dir']} has fingerprint {data.fingerprint}, recorded {entry['fingerprint']}")
        return cls(doc["learner"], datasets, doc["fingerprint"], dict(doc.get("details") or {}))

    def summary(self) -> str:
        if not self.datasets:
            return f"{self.details.get('kind', 'generated tasks')} (fingerprint {self.fingerprint[:12]})"
        parts = []
        for data in self.datasets:
            sizes = sum(len(split) for split in data.splits.values())
            where = f"{len(data.domains)} domains" if data.domains else "train/val"
            parts.append(f"{data.spec.get('source')} ({where}, {sizes} images)")
        return f"{', '.join(parts)} (fingerprint {self.fingerprint[:12]})"


def combine_fingerprints(fingerprints: Sequence[str]) -> str:
    """One fingerprint for several: a single one unchanged, else sha256 over them in order."""
    if not fingerprints:
        raise ValueError("fingerprints: got none")
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256(("\n".join(["metaopt.inputs/1", *fingerprints])).encode()).hexdigest()


__all__ = ["INPUTS_FORMAT", "PreparedInputs", "combine_fingerprints", "integral_floats_to_int"]
