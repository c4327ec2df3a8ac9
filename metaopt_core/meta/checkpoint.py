"""Checkpoint files shared by the meta-learners (ITL and MetaMD checkpoints) and the resume check of the driver.

A checkpoint is a directory holding ``state-<step>.safetensors`` (the tensors) and ``state.json``
(everything else, naming the tensor file and its sha256). Writing order makes it crash-safe: the
tensors are written first, then ``state.json`` is replaced atomically, then older tensor files are
removed, so a kill at any point leaves a consistent previous or new checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file, save
from torch import Tensor

from metaopt_core.files import atomic_write_bytes, atomic_write_text

STATE_FILE = "state.json"


def omega_digest(omega: Tensor) -> str:
    """SHA-256 of ω's bytes: names the exact ω a hypergradient or checkpoint belongs to."""
    return hashlib.sha256(omega.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def omega_tensors(omega: Tensor, optimizer: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a checkpoint of ω and its outer optimiser stores as tensors (CPU, contiguous)."""
    out = {"omega": omega.detach().cpu().contiguous()}
    out.update({f"optimizer.{k}": v.detach().cpu().contiguous() for k, v in optimizer.items()})
    return out


def save_checkpoint(directory: str | Path, step: int, doc: dict, tensors: dict[str, Tensor]) -> Path:
    """Write ``tensors`` and ``doc`` (which gains ``tensors`` and ``tensors_sha256``); returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_name = f"state-{step:06d}.safetensors"
    tensor_path = directory / tensor_name
    tensor_bytes = save(tensors)
    atomic_write_bytes(tensor_path, tensor_bytes)
    doc = {**doc, "tensors": tensor_name, "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest()}
    path = atomic_write_text(directory / STATE_FILE, json.dumps(doc))
    for stale in directory.glob("state-*.safetensors"):
        if stale.name != tensor_name:
            stale.unlink(missing_ok=True)
    return path


def load_checkpoint(directory: str | Path, state_format: str, kind: str) -> tuple[dict, dict[str, Tensor], Path]:
    """Read and verify a checkpoint: (JSON document, tensors, path of the JSON). ``kind`` names the
    meta-learner in error messages."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {kind} checkpoint at {path}")
    doc = json.loads(path.read_text())
    if doc.get("format") != state_format:
        raise ValueError(f"{kind} state {path}: format {doc.get('format')!r}; expected {state_format!r}")
    tensor_path = directory / doc["tensors"]
    if not tensor_path.exists():
        raise FileNotFoundError(f"{kind} state {path}: tensor file {tensor_path} is missing")
    if hashlib.sha256(tensor_path.read_bytes()).hexdigest() != doc["tensors_sha256"]:
        raise ValueError(f"{kind} state {path}: {tensor_path.name} does not match its recorded sha256 (corrupted?)")
    return doc, load_file(str(tensor_path)), path


@dataclass
class OmegaState:
    """A learner state that is one flat ω (the driver's ``LearnerState``): ω, the outer optimiser's
    state, the step count and one history row per step, checkpointed as ``state.json`` plus a
    safetensors file. A subclass names its ``state_format`` and ``label`` (in errors), adds its
    ``initial`` and typed config, and may digest ω its own way."""

    config: dict
    omega: Tensor
    optimizer: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0
    history: list[dict] = field(default_factory=list)

    state_format: ClassVar[str] = ""
    label: ClassVar[str] = ""

    @staticmethod
    def digest(omega: Tensor) -> str:
        return omega_digest(omega)

    @property
    def finished(self) -> bool:
        return self.step >= int(self.config["outer"]["steps"])

    def tensors(self) -> dict[str, Tensor]:
        return omega_tensors(self.omega, self.optimizer)

    def save(self, directory: str | Path) -> Path:
        """Write the checkpoint (crash-safe, see above)."""
        doc = {"format": self.state_format, "config": self.config, "step": self.step, "omega_sha256": self.digest(self.omega),
               "optimizer_keys": sorted(self.optimizer), "history": self.history}  # fmt: skip
        return save_checkpoint(directory, self.step, doc, self.tensors())

    @classmethod
    def load(cls, directory: str | Path):  # noqa: ANN206 (the subclass)
        doc, tensors, path = load_checkpoint(directory, cls.state_format, cls.label)
        optimizer = {key: tensors[f"optimizer.{key}"] for key in doc["optimizer_keys"]}
        state = cls(doc["config"], tensors["omega"], optimizer, int(doc["step"]), list(doc["history"]))
        if cls.digest(state.omega) != doc["omega_sha256"]:
            raise ValueError(f"{cls.label} state {path}: omega in {doc['tensors']} does not match the recorded digest")
        return state


def _flatten(doc: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved_config: dict, config: dict, checkpoint_dir: str | Path, resumable: tuple[str, ...]) -> None:
    """Refuse to resume a checkpoint under a config that would change what the run computes;
    only the dotted fields in ``resumable`` may differ."""
    from metaopt_core.config import ConfigError

    saved, wanted = _flatten(saved_config), _flatten(config)
    for key in sorted(set(saved) | set(wanted)):
        if key not in resumable and saved.get(key) != wanted.get(key):
            raise ConfigError(
                f"resume from {checkpoint_dir}: field '{key}': checkpoint has {saved.get(key)!r}, config has "
                f"{wanted.get(key)!r}; only {list(resumable)} may change on resume (or use a new checkpoint_dir)"
            )
