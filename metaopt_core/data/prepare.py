"""Turn a ``DataSpec`` into prepared splits: noisy train / clean validation for label-noise tasks,
per-domain train / validation for domain-shift tasks. A prepared dataset has a content fingerprint
(sha256 of its tensors and spec) for provenance and for "re-meta-train only on new data", and
saves to safetensors + JSON (no pickles), which is what the pipeline passes between steps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from metaopt_core.config import DataSpec
from metaopt_core.data.domains import colored_domains, rotated_domains
from metaopt_core.data.folders import folder_content, is_folder_source, read_classes, read_domains
from metaopt_core.data.noise import add_label_noise
from metaopt_core.data.sources import ImageData, load_source, resized

CONTENT_MANIFEST = "content_manifest.json"  # a folder source's content manifest, beside the tensors


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
    source_fingerprint: str = ""  # of the whole source before any part/limit/split: ids index into it
    # Folder sources (folder:, s3://): the content manifest of what was read (keys, sizes, sha256)
    content: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = self.compute_fingerprint()

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, split in self.splits.items():
            out[f"{name}::x"] = split.x.contiguous()
            out[f"{name}::y"] = split.y.contiguous()
            out[f"{name}::ids"] = split.ids.contiguous()
        if self.clean_labels is not None:
            out["clean_labels"] = self.clean_labels.contiguous()
        if self.transition is not None:
            out["transition"] = self.transition.contiguous()
        return out

    def compute_fingerprint(self) -> str:
        # ``root`` says where the raw files were read from, not what the data are: the same data
        # staged elsewhere (laptop vs cluster) must keep its fingerprint
        spec = {key: value for key, value in self.spec.items() if key != "root"}
        if self.content:  # a folder source is its content, wherever it is (path, bucket, volume)
            spec["source"] = f"content:{self.content['fingerprint']}"
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
            "source_fingerprint": self.source_fingerprint,
        }
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if self.content:
            (directory / CONTENT_MANIFEST).write_text(json.dumps(self.content, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        directory = Path(directory)
        if not (directory / "manifest.json").exists():
            raise FileNotFoundError(f"no prepared dataset at {directory} (manifest.json missing)")
        manifest = json.loads((directory / "manifest.json").read_text())
        tensors = load_file(str(directory / "data.safetensors"))
        splits = {
            name: ImageData(tensors[f"{name}::x"], tensors[f"{name}::y"], info["num_classes"], info["name"], ids=tensors.get(f"{name}::ids"))
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
            source_fingerprint=manifest.get("source_fingerprint", ""),
            content=json.loads((directory / CONTENT_MANIFEST).read_text()) if (directory / CONTENT_MANIFEST).exists() else {},
        )
        if data.compute_fingerprint() != data.fingerprint:
            raise ValueError(f"prepared dataset at {directory} does not match its recorded fingerprint (corrupted?)")
        return data


def _limit(data: ImageData, max_examples: int | None, seed: int) -> ImageData:
    if max_examples is None or max_examples >= len(data):
        return data
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7))[:max_examples]
    return data.subset(index)


# The meta-train/meta-test cut is a property of each example: a hash of its id (its row in a
# packaged source, a hash of its key in a folder or bucket). Two specs of one source with the same
# meta_test_fraction always agree on it, whatever their seed, learner or max_examples, and an
# example never changes sides when images are added to a growing bucket.
PART_HASH = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive ids uniformly over [0, 1)


def meta_test_mask(ids: Tensor, meta_test_fraction: float) -> Tensor:
    """True for the examples of the meta-test part."""
    mixed = (ids.numpy().astype(np.uint64) * np.uint64(PART_HASH)) >> np.uint64(40)
    return torch.from_numpy(mixed.astype(np.float64) / float(1 << 24) < meta_test_fraction)


def part_of(data: ImageData, part: str, meta_test_fraction: float) -> ImageData:
    """The ``meta-train`` or ``meta-test`` part of a source (disjoint, together the whole), or all of it."""
    if part == "all":
        return data
    mask = meta_test_mask(data.ids, meta_test_fraction)
    chosen = torch.nonzero(mask if part == "meta-test" else ~mask).squeeze(1)
    if len(chosen) == 0:
        raise ValueError(f"part {part!r}: no example of {data.name!r} ({len(data)} examples) falls in it at meta_test_fraction {meta_test_fraction}")
    return data.subset(chosen)


def source_fingerprint(name: str, parts: Sequence[ImageData]) -> str:
    """sha256 of a source's raw examples (what its ``ids`` index), independent of how it is used."""
    digest = hashlib.sha256(f"metaopt.source/1:{name}".encode())
    for data in parts:
        digest.update(data.x.contiguous().numpy().tobytes())
        digest.update(data.y.contiguous().numpy().tobytes())
    return digest.hexdigest()


def domain_matches(domain: str, name: str) -> bool:
    """``rot75`` names ``mnist5k-rot75``; a full name names itself."""
    return domain == name or domain.endswith(f"-{name}")


class UnknownDomainsError(ValueError):
    """``exclude_domains`` names domains the source does not have (``unknown``; ``available``)."""

    def __init__(self, message: str, unknown: list[str], available: list[str]) -> None:
        super().__init__(message)
        self.unknown, self.available = unknown, available


def _without(domains: dict[str, ImageData], excluded: Sequence[str]) -> dict[str, ImageData]:
    unknown = [name for name in excluded if not any(domain_matches(d, name) for d in domains)]
    if unknown:
        raise UnknownDomainsError(f"exclude_domains: got {unknown}; allowed: domains of the source {sorted(domains)} (or their suffixes)",
                                  unknown, sorted(domains))  # fmt: skip
    kept = {d: data for d, data in domains.items() if not any(domain_matches(d, name) for name in excluded)}
    if not kept:
        raise ValueError(f"exclude_domains: {list(excluded)} leaves no domain of {sorted(domains)}")
    return kept


def _domain_splits(domains: dict[str, ImageData], spec: DataSpec) -> dict[str, ImageData]:
    splits = {}
    for name, domain in domains.items():
        train, val = split_indices(len(domain), spec.val_fraction, spec.seed)
        splits[f"{name}/train"], splits[f"{name}/val"] = domain.subset(train), domain.subset(val)
    return splits


def prepare(spec: DataSpec | dict) -> PreparedData:
    """Build the splits a ``DataSpec`` describes: the source cut into its ``part``, limited to
    ``max_examples``, then domains / label noise and train/val splits built on that."""
    spec = spec if isinstance(spec, DataSpec) else DataSpec.model_validate(spec)
    spec_doc = spec.model_dump(mode="json")
    content: dict = {}
    if is_folder_source(spec.source):
        staged = folder_content(spec.source)
        content, origin = staged.manifest(), staged.fingerprint  # ids index the content, wherever it lives
        if staged.layout == "domains":
            folder = {name: resized(domain, spec.image_size) for name, domain in read_domains(staged).items()}
            domains = {name: _limit(part_of(domain, spec.part, spec.meta_test_fraction), spec.max_examples, spec.seed) for name, domain in folder.items()}
            domains = _without(domains, spec.exclude_domains)
            num_classes = next(iter(folder.values())).num_classes
            return PreparedData(_domain_splits(domains, spec), spec_doc, num_classes, list(domains), source_fingerprint=origin, content=content)
        raw = resized(read_classes(staged), spec.image_size)
    else:
        raw = load_source(spec.source, spec.root, image_size=spec.image_size)
        origin = source_fingerprint(spec.source, [raw])
    source = _limit(part_of(raw, spec.part, spec.meta_test_fraction), spec.max_examples, spec.seed)
    if spec.domains != "none":
        built = rotated_domains(source, spec.angles, spec.seed) if spec.domains == "rotated" else colored_domains(source, seed=spec.seed)
        domains = _without({d.name: d for d in built}, spec.exclude_domains)
        return PreparedData(_domain_splits(domains, spec), spec_doc, built[0].num_classes, list(domains), source_fingerprint=origin, content=content)
    if spec.exclude_domains:
        raise ValueError(f"exclude_domains: got {spec.exclude_domains}; the source {spec.source!r} has no domains (domains: none)")

    train_index, val_index = split_indices(len(source), spec.val_fraction, spec.seed)
    train, val = source.subset(train_index, f"{source.name}-train"), source.subset(val_index, f"{source.name}-val")
    noisy = add_label_noise(train.y, spec.noise.kind, spec.noise.rate, source.num_classes, spec.seed, source.name)
    clean = train.y
    train = ImageData(train.x, noisy.labels, source.num_classes, train.name, ids=train.ids)
    transition = noisy.transition.float() if spec.noise.kind != "none" else None
    return PreparedData({"train": train, "val": val}, spec_doc, source.num_classes, [], clean, transition, source_fingerprint=origin, content=content)
