"""Turn a ``DataSpec`` into prepared splits: noisy train / clean validation for label-noise tasks,
per-domain train / validation for domain-shift tasks. A prepared dataset has a content fingerprint
(sha256 of its tensors and spec) for provenance and for "re-meta-train only on new data", and
saves to safetensors + JSON (no pickles), which is what the pipeline passes between steps."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from metaopt_core.config import DataSpec
from metaopt_core.data.domains import colored_domains, rotated_domains
from metaopt_core.data.noise import add_label_noise
from metaopt_core.data.sources import ImageData, load_image_folder, load_source


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(count * val_fraction)))
    return order[n_val:], order[:n_val]


@dataclass
class PreparedData:
    """Named splits. Label-noise tasks: ``train`` (noisy labels; clean ones in ``clean_labels``)
    and ``val`` (clean). Domain tasks: ``<domain>/train`` and ``<domain>/val`` per domain."""

    splits: dict[str, ImageData]
    spec: dict
    num_classes: int
    domains: list[str] = field(default_factory=list)
    clean_labels: Tensor | None = None
    transition: Tensor | None = None
    fingerprint: str = ""

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = self.compute_fingerprint()

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, split in self.splits.items():
            out[f"{name}::x"] = split.x.contiguous()
            out[f"{name}::y"] = split.y.contiguous()
        if self.clean_labels is not None:
            out["clean_labels"] = self.clean_labels.contiguous()
        if self.transition is not None:
            out["transition"] = self.transition.contiguous()
        return out

    def compute_fingerprint(self) -> str:
        # ``root`` says where the raw files were read from, not what the data are: the same data
        # staged elsewhere (laptop vs cluster) must keep its fingerprint
        spec = {key: value for key, value in self.spec.items() if key != "root"}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for key, tensor in sorted(self.tensors().items()):
            digest.update(key.encode())
            digest.update(tensor.cpu().numpy().tobytes())
        return digest.hexdigest()

    def domain(self, name: str) -> tuple[ImageData, ImageData]:
        if name not in self.domains:
            raise KeyError(f"domain: got {name!r}; allowed: {self.domains}")
        return self.splits[f"{name}/train"], self.splits[f"{name}/val"]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(directory / "data.safetensors"))
        manifest = {
            "spec": self.spec,
            "num_classes": self.num_classes,
            "domains": self.domains,
            "splits": {name: {"name": s.name, "num_classes": s.num_classes} for name, s in self.splits.items()},
            "fingerprint": self.fingerprint,
        }
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PreparedData":
        directory = Path(directory)
        if not (directory / "manifest.json").exists():
            raise FileNotFoundError(f"no prepared dataset at {directory} (manifest.json missing)")
        manifest = json.loads((directory / "manifest.json").read_text())
        tensors = load_file(str(directory / "data.safetensors"))
        splits = {
            name: ImageData(tensors[f"{name}::x"], tensors[f"{name}::y"], info["num_classes"], info["name"])
            for name, info in manifest["splits"].items()
        }
        data = cls(
            splits,
            manifest["spec"],
            manifest["num_classes"],
            manifest["domains"],
            tensors.get("clean_labels"),
            tensors.get("transition"),
            fingerprint=manifest["fingerprint"],
        )
        if data.compute_fingerprint() != data.fingerprint:
            raise ValueError(f"prepared dataset at {directory} does not match its recorded fingerprint (corrupted?)")
        return data


def _limit(data: ImageData, max_examples: int | None, seed: int) -> ImageData:
    if max_examples is None or max_examples >= len(data):
        return data
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7))[:max_examples]
    return data.subset(index)


def prepare(spec: DataSpec | dict) -> PreparedData:
    """Build the splits a ``DataSpec`` describes."""
    spec = spec if isinstance(spec, DataSpec) else DataSpec.model_validate(spec)
    spec_doc = spec.model_dump(mode="json")
    if spec.source.startswith("folder:"):
        folder = load_image_folder(spec.source.removeprefix("folder:"))
        splits = {}
        for name, domain in folder.items():
            domain = _limit(domain, spec.max_examples, spec.seed)
            train, val = split_indices(len(domain), spec.val_fraction, spec.seed)
            splits[f"{name}/train"], splits[f"{name}/val"] = domain.subset(train), domain.subset(val)
        num_classes = next(iter(folder.values())).num_classes
        return PreparedData(splits, spec_doc, num_classes, list(folder))

    source = _limit(load_source(spec.source, spec.root), spec.max_examples, spec.seed)
    if spec.domains != "none":
        built = (
            rotated_domains(source, spec.angles, spec.seed)
            if spec.domains == "rotated"
            else colored_domains(source, seed=spec.seed)
        )
        splits = {}
        for domain in built:
            train, val = split_indices(len(domain), spec.val_fraction, spec.seed)
            splits[f"{domain.name}/train"], splits[f"{domain.name}/val"] = domain.subset(train), domain.subset(val)
        return PreparedData(splits, spec_doc, built[0].num_classes, [d.name for d in built])

    train_index, val_index = split_indices(len(source), spec.val_fraction, spec.seed)
    train, val = source.subset(train_index, f"{source.name}-train"), source.subset(val_index, f"{source.name}-val")
    noisy = add_label_noise(train.y, spec.noise.kind, spec.noise.rate, source.num_classes, spec.seed, source.name)
    clean = train.y
    train = ImageData(train.x, noisy.labels, source.num_classes, train.name)
    transition = noisy.transition.float() if spec.noise.kind != "none" else None
    return PreparedData({"train": train, "val": val}, spec_doc, source.num_classes, [], clean, transition)
