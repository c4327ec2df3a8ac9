"""Export kinds: what a learner hands downstream, as objects that name their files and say how the
artifact is written, read, given its deployment settings, described, plotted and built.

A learner's ``export(state, data)`` returns ``(kind name, artifact)``; :func:`write` stores it in a
folder (the kind's files plus ``export.json``, which names the kind). From then on everything reads
the folder, ``artifact_dir``, through its kind and never by a kind-specific key: the meta-test
(the learned artifact and the champion), the registry (:func:`metaopt_core.mlops.registry.register_export`
logs ``files`` with their sha256 and bakes the meta-test's deployment settings in), the loaders
(``load_loss`` / ``load_optimizer`` build through ``build``), the pyfunc model ``mlflow models serve``
runs, and the pipeline's plots and reports.

The built-in kinds (:data:`EXPORT_KINDS` lists every registered one):

==================  =========  =========================================================  ==============================
kind                role       files                                                      artifact (in memory)
==================  =========  =========================================================  ==============================
``loss-document``   loss       ``loss.json``                                              the loss document (a dict)
``mirror-descent``  optimizer  ``divergence/divergence.safetensors``, ``.../manifest.json``  :class:`LearnedDivergence`
==================  =========  =========================================================  ==============================

Other packages add a kind with one line in :data:`EXPORT_KINDS` or :func:`register_kind`. ``role`` is what the artifact is for: ``loss`` (``load_loss``, a drop-in
for ``nn.CrossEntropyLoss``) or ``optimizer`` (``load_optimizer``, a ``torch.optim.Optimizer``).
Nothing here imports kfp, mlflow or boto3; nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Protocol

from metaopt_core.files import atomic_write_text
from metaopt_core.tables import LazyTable

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "metaopt.export/1"
EXPORT_KINDS: dict[str, str] = {
    "loss-document": "metaopt_core.exports:LossDocumentExport",
    "mirror-descent": "metaopt_core.exports:MirrorDescentExport",
    "neural-loss": "metaopt_core.meta.ml3.export:NeuralLossExport",
}
# A folder without export.json (written before export kinds, or a version registered then) is
# read as the kind its role had then.
LEGACY_KINDS = {"loss": "loss-document", "optimizer": "mirror-descent"}


class ExportError(ValueError):
    """An export folder is missing, names an unknown kind, or its files do not read."""


class ExportKind(Protocol):
    """One kind of exported artifact (see the module docstring). ``describe`` gives what is shown
    downstream (its ``family`` becomes the registered version's ``metaopt.family`` tag);
    ``deployment_keys`` are the settings ``bake`` writes into the files (a meta-test's
    ``MetaTestReport.deployment``); ``check`` raises when the files do not make a working artifact."""

    name: str
    role: Literal["loss", "optimizer"]
    files: tuple[str, ...]  # relative paths, what is registered (each with its sha256)
    deployment_keys: tuple[str, ...]

    def write(self, directory: Path, artifact: Any) -> None: ...
    def read(self, directory: Path, source: str | None = None) -> Any: ...  # source: where the folder came from, for errors
    def check(self, directory: Path) -> None: ...
    def bake(self, directory: Path, deployment: Mapping[str, Any]) -> dict[str, Any]: ...
    def describe(self, directory: Path) -> dict[str, Any]: ...
    def plot(self, directory: Path, path: Path, title: str) -> Path | None: ...
    def build(self, directory: Path, *, source: str | None = None, **options: Any) -> Any: ...


# --------------------------------------------------------------------------------------------- the table


_TABLE = LazyTable("export kind", EXPORT_KINDS, ExportError, make=lambda cls: cls())


def names() -> list[str]:
    return _TABLE.names()


def register_kind(name: str, reference: str, *, replace: bool = False) -> None:
    """Add an export kind: ``reference`` is ``"package.module:KindClass"`` (imported on first use)."""
    _TABLE.register(name, reference, replace=replace)


def get(name: str) -> ExportKind:
    """The export kind called ``name`` (``ExportError`` naming the kinds there are)."""
    return _TABLE.get(name)


# --------------------------------------------------------------------------------------------- folders


def write(directory: str | Path, kind_name: str, artifact: Any) -> ExportKind:
    """Store ``artifact`` in ``directory`` as export kind ``kind_name`` (its files and ``export.json``)."""
    kind = get(kind_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind.write(directory, artifact)
    mark(directory, kind)
    return kind


def save(directory: str | Path, kind_name: str, artifact: Any, history: list | None = None) -> Path:
    """:func:`write`, plus the meta-training history as ``history.json`` (not part of the artifact)."""
    write(directory, kind_name, artifact)
    if history is not None:
        atomic_write_text(Path(directory) / "history.json", json.dumps(list(history), indent=2))
    return Path(directory)


def mark(directory: str | Path, kind: ExportKind) -> Path:
    """Write ``export.json``: which kind the folder's files are."""
    doc = {"format": EXPORT_FORMAT, "kind": kind.name, "role": kind.role, "files": list(kind.files)}
    return atomic_write_text(Path(directory) / EXPORT_FILE, json.dumps(doc, indent=2) + "\n")


def kind_of(directory: str | Path, role: str | None = None) -> ExportKind:
    """The kind of the export in ``directory``: its ``export.json``, else (an older folder) the
    legacy kind of ``role`` whose files are there. ``role`` given: the kind must have that role."""
    directory = Path(directory)
    marker = directory / EXPORT_FILE
    if marker.exists():
        doc = json.loads(marker.read_text())
        if doc.get("format") != EXPORT_FORMAT:
            raise ExportError(f"{marker}: format {doc.get('format')!r}; expected {EXPORT_FORMAT!r}")
        kind = get(doc.get("kind"))
    else:
        candidates = [get(LEGACY_KINDS[r]) for r in ([role] if role in LEGACY_KINDS else LEGACY_KINDS)]
        found = [k for k in candidates if all((directory / f).is_file() for f in k.files)]
        if not found:
            raise ExportError(f"{directory}: no {EXPORT_FILE} and no {' or '.join(str(list(k.files)) for k in candidates)}: not an export folder")
        kind = found[0]
    if role is not None and kind.role != role:
        raise ExportError(f"{directory}: holds a {kind.role} ({kind.name}), not a {role}")
    return kind


def bake(directory: str | Path, deployment: Mapping[str, Any] | None) -> dict[str, Any]:
    """Write ``deployment`` (e.g. ``{"lr_scale": 0.3}``) into the export's files; what was set.
    A key the kind does not take is an error naming the keys it takes."""
    kind = kind_of(directory)
    deployment = dict(deployment or {})
    unknown = sorted(set(deployment) - set(kind.deployment_keys))
    if unknown:
        raise ExportError(f"deployment: got {unknown} for a {kind.name}; allowed: {list(kind.deployment_keys)}")
    return kind.bake(Path(directory), deployment) if deployment else {}


def read(directory: str | Path, role: str | None = None) -> Any:
    """The artifact in ``directory`` (read through its kind)."""
    return kind_of(directory, role).read(Path(directory))


def copy(source: str | Path, destination: str | Path, role: str | None = None) -> ExportKind:
    """Copy an export's files (and ``export.json``) from ``source`` to ``destination``."""
    source, destination = Path(source), Path(destination)
    kind = kind_of(source, role)
    for relative in kind.files:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target)
    mark(destination, kind)
    return kind


# --------------------------------------------------------------------------------------------- losses


class LossExport:
    """What every loss kind shares: ``loss.json`` holds the document's header, so the deployment
    setting ``lr_scale`` is baked there (covered by its sha256), and the loaders build the module
    through :func:`~metaopt_core.losses.document.loss_from_document`. A subclass with more files
    overrides ``files``, ``write`` and ``read`` (the in-memory document is complete)."""

    name: ClassVar[str]
    role: ClassVar[Literal["loss"]] = "loss"
    files: ClassVar[tuple[str, ...]] = ("loss.json",)
    deployment_keys: ClassVar[tuple[str, ...]] = ("lr_scale",)
    document_file: ClassVar[str] = "loss.json"

    def write(self, directory: Path, artifact: Mapping[str, Any]) -> None:
        from metaopt_core.losses.document import validate_loss_document

        doc = validate_loss_document(artifact, "export")
        atomic_write_text(directory / self.document_file, json.dumps(doc, indent=2) + "\n")

    def read(self, directory: Path, source: str | None = None) -> dict:
        from metaopt_core.losses.document import validate_loss_document

        path = directory / self.document_file
        label = f"{source}: {self.document_file}" if source else str(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{label}: not a readable JSON loss document ({exc})") from None
        return validate_loss_document(doc, label)

    def check(self, directory: Path) -> None:
        self.build(directory)  # the document builds (e.g. a named loss's keyword arguments)

    def bake(self, directory: Path, deployment: Mapping[str, Any]) -> dict[str, Any]:
        """``lr_scale`` (the meta-test's measured lr relation to cross-entropy) into the document's
        header (``loss.json``: every loss kind keeps its header there)."""
        from metaopt_core.losses.document import field_error, is_finite_number

        if "lr_scale" not in deployment:
            return {}
        path = directory / self.document_file
        scale = deployment["lr_scale"]
        if not is_finite_number(scale) or scale <= 0:
            raise field_error(f"deployment for {path}", "lr_scale", scale, "a finite number > 0 (the loss's multiplier)")
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["lr_scale"] = float(scale)
        atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
        self.read(directory)  # still a valid export
        return {"lr_scale": doc["lr_scale"]}

    def describe(self, directory: Path) -> dict[str, Any]:
        """The document's fields worth showing (long parameter lists shortened)."""
        doc = self.read(directory)
        shown: dict[str, Any] = {"kind": self.name}
        for key, value in doc.items():
            if key in ("format", "format_version", "meta", "learned_as"):
                continue
            text = json.dumps(value)
            shown[key] = value if len(text) <= 400 else f"{text[:200]}... ({len(text)} characters)"
        return shown

    def build(self, directory: Path, *, reduction: str = "mean", source: str | None = None, **options: Any) -> Any:
        from metaopt_core.losses.document import loss_from_document

        label = f"{source}: {self.document_file}" if source else str(directory / self.document_file)
        return loss_from_document(self.read(directory, source), reduction=reduction, source=label)

    def plot(self, directory: Path, path: Path, title: str) -> Path:
        """The learned loss beside cross-entropy, over the probability of the labelled class."""
        import torch

        from metaopt_core.plots import plot_loss_curves

        return plot_loss_curves({"learned": self.build(directory), "cross-entropy": torch.nn.CrossEntropyLoss()}, path, title=title)


class LossDocumentExport(LossExport):
    """A white-box loss document (Taylor, a named loss such as iSCE's ``sce``): ``loss.json`` only."""

    name = "loss-document"


# --------------------------------------------------------------------------------------------- optimisers


@dataclass
class LearnedDivergence:
    """MetaMD's artifact: the Bregman divergence, the lr it was meta-trained at, provenance."""

    divergence: Any  # metaopt_core.optim.Divergence
    lr: float | None = None
    metadata: dict = field(default_factory=dict)


class MirrorDescentExport:
    """A mirror-descent optimiser: the divergence's tensors (safetensors) and its JSON manifest
    (layer shapes, the lr); ``load_optimizer`` builds ``MirrorDescent`` over a model's parameters."""

    name = "mirror-descent"
    role: ClassVar[Literal["optimizer"]] = "optimizer"
    folder: ClassVar[str] = "divergence"
    files: ClassVar[tuple[str, ...]] = ("divergence/divergence.safetensors", "divergence/manifest.json")
    deployment_keys: ClassVar[tuple[str, ...]] = ("lr",)

    def write(self, directory: Path, artifact: LearnedDivergence) -> None:
        from metaopt_core.optim import save_divergence

        save_divergence(artifact.divergence, directory / self.folder, lr=artifact.lr, metadata=artifact.metadata)

    def read(self, directory: Path, source: str | None = None) -> tuple[Any, dict]:
        """(divergence, manifest)."""
        from metaopt_core.optim.io import DivergenceFormatError, load_divergence

        try:
            return load_divergence(directory / self.folder)
        except DivergenceFormatError as exc:
            raise ExportError(f"{source or directory / self.folder}: {exc}") from None

    def check(self, directory: Path) -> None:
        self.read(directory)

    def bake(self, directory: Path, deployment: Mapping[str, Any]) -> dict[str, Any]:
        """``lr`` (the meta-test's chosen lr) into the manifest: ``load_optimizer``'s default."""
        import math

        if "lr" not in deployment:
            return {}
        lr = deployment["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ExportError(f"deployment: field 'lr': got {lr!r}; allowed: a finite number > 0")
        path = directory / self.folder / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["lr"] = float(lr)
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
        return {"lr": float(lr)}

    def describe(self, directory: Path) -> dict[str, Any]:
        from metaopt_core.optim.fit import describe_architecture

        divergence, manifest = self.read(directory)
        return {"kind": self.name, "family": divergence.kind, "lr": manifest.get("lr"), "parameters": len(manifest["parameters"]),
                "fits": describe_architecture((p["name"], p["shape"]) for p in manifest["parameters"])}  # fmt: skip

    def build(self, directory: Path, *, model: Any, lr: float | None = None, weight_decay: float = 0.0, partial: bool = False,
              source: str | None = None, **options: Any) -> Any:  # fmt: skip
        from metaopt_core.optim.io import DivergenceFormatError
        from metaopt_core.optim.mirror_descent import MirrorDescent

        try:
            return MirrorDescent.from_pretrained(directory / self.folder, model, lr=lr, weight_decay=weight_decay, partial=partial)
        except DivergenceFormatError as exc:
            raise ExportError(f"{source or directory / self.folder}: {exc}") from None

    def plot(self, directory: Path, path: Path, title: str) -> None:
        return None  # the meta-training curves show what it learned


__all__ = [
    "EXPORT_FILE",
    "EXPORT_KINDS",
    "EXPORT_FORMAT",
    "ExportError",
    "ExportKind",
    "LEGACY_KINDS",
    "LearnedDivergence",
    "LossDocumentExport",
    "LossExport",
    "MirrorDescentExport",
    "bake",
    "copy",
    "get",
    "kind_of",
    "mark",
    "names",
    "read",
    "register_kind",
    "save",
    "write",
]
