"""Saving and loading a learned divergence: ``divergence.safetensors`` + ``manifest.json``.

White-box and safe to load (no pickle, no ``torch.load``): the tensors are safetensors, the layout
is JSON. The manifest records

    format, format_version, kind, options, parameters [{name, shape}], blocks (which factor acts on
    which parameter), lr (the learning rate the divergence was meta-trained with, or null),
    tensors {key: {shape, dtype}}, tensor_file, tensor_sha256, metadata (free-form JSON)

``load_divergence`` validates all of it (and the tensor file's sha256) and raises
``DivergenceFormatError`` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from metaopt_core.files import atomic_write_bytes, atomic_write_text

from .divergence import DenseBregman, DiagonalBregman, Divergence, ShapeMismatchError
from .kronecker import KroneckerBregman

# The families a manifest's ``kind`` may name.
DIVERGENCE_KINDS: dict[str, type[Divergence]] = {cls.kind: cls for cls in (KroneckerBregman, DiagonalBregman, DenseBregman)}

FORMAT = "metaopt.divergence"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
TENSOR_FILE = "divergence.safetensors"
MANIFEST_FILE = "manifest.json"


class DivergenceFormatError(ValueError):
    """A saved divergence's manifest or tensor file is missing, malformed or inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_divergence(
    div: Divergence,
    directory: str | PathLike[str],
    *,
    lr: float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``div`` to ``directory`` (created if needed) as safetensors + JSON manifest; return the directory.

    ``lr`` is the learning rate the divergence was meta-trained with (``MirrorDescent.from_pretrained``
    uses it by default). ``metadata`` is free-form JSON (e.g. the meta-training run id).
    """
    if not isinstance(div, Divergence):
        raise TypeError(f"div: got {type(div).__name__}; allowed: a metaopt_core.optim.Divergence")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise ValueError(f"lr: got {lr!r}; allowed: a finite float > 0, or None")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata: not JSON-serialisable ({exc})") from None

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in div.state_dict().items()}
    tensor_path = directory / TENSOR_FILE
    atomic_write_bytes(tensor_path, save(tensors, metadata={"format": FORMAT, "kind": div.kind}))

    description = div.description()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": div.kind,
        "options": description["options"],
        "parameters": [{"name": n, "shape": list(s)} for n, s in div.names_and_shapes],
        "blocks": description["blocks"],
        "lr": None if lr is None else float(lr),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "tensor_file": TENSOR_FILE,
        "tensor_sha256": _sha256(tensor_path),
        "metadata": metadata,
    }
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return directory


def _field(manifest: Mapping[str, Any], key: str, types: type | tuple[type, ...], allowed: str) -> Any:
    if key not in manifest:
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field {key!r} is missing; allowed: {allowed}")
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, types):  # JSON true/false is never a valid field here
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field {key!r} is {value!r}; allowed: {allowed}")
    return value


def _validate_manifest(manifest: Any) -> list[tuple[str, list[int]]]:
    if not isinstance(manifest, dict):
        raise DivergenceFormatError(f"{MANIFEST_FILE}: got a JSON {type(manifest).__name__}; allowed: an object")
    fmt = _field(manifest, "format", str, repr(FORMAT))
    if fmt != FORMAT:
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field 'format' is {fmt!r}; allowed: {FORMAT!r}")
    version = _field(manifest, "format_version", int, f"one of {list(SUPPORTED_FORMAT_VERSIONS)}")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field 'format_version' is {version!r}; allowed: {list(SUPPORTED_FORMAT_VERSIONS)}")
    kind = _field(manifest, "kind", str, f"one of {sorted(DIVERGENCE_KINDS)}")
    if kind not in DIVERGENCE_KINDS:
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field 'kind' is {kind!r}; allowed: {sorted(DIVERGENCE_KINDS)}")
    _field(manifest, "options", dict, "an object")
    _field(manifest, "blocks", list, "a list of block objects")
    _field(manifest, "tensors", dict, "an object {key: {shape, dtype}}")
    _field(manifest, "tensor_sha256", str, "a hex sha256 digest")
    tensor_file = _field(manifest, "tensor_file", str, repr(TENSOR_FILE))
    if tensor_file != TENSOR_FILE:
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field 'tensor_file' is {tensor_file!r}; allowed: {TENSOR_FILE!r}")
    lr = manifest.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise DivergenceFormatError(f"{MANIFEST_FILE}: field 'lr' is {lr!r}; allowed: a finite number > 0, or null")
    parameters = _field(manifest, "parameters", list, "a non-empty list of {name, shape}")
    names_and_shapes: list[tuple[str, list[int]]] = []
    for k, entry in enumerate(parameters):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
        )
        if not ok:
            raise DivergenceFormatError(f"{MANIFEST_FILE}: parameters[{k}] is {entry!r}; allowed: {{'name': str, 'shape': [non-negative ints]}}")
        names_and_shapes.append((entry["name"], entry["shape"]))
    return names_and_shapes


def load_divergence(directory: str | PathLike[str]) -> tuple[Divergence, dict[str, Any]]:
    """Read a divergence written by ``save_divergence``; return ``(divergence on CPU, manifest dict)``."""
    directory = Path(directory)
    manifest_path, tensor_path = directory / MANIFEST_FILE, directory / TENSOR_FILE
    for path in (manifest_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a saved divergence holds {MANIFEST_FILE} and {TENSOR_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DivergenceFormatError(f"{manifest_path}: not valid JSON ({exc})") from None
    names_and_shapes = _validate_manifest(manifest)

    digest = _sha256(tensor_path)
    if digest != manifest["tensor_sha256"]:
        raise DivergenceFormatError(
            f"{tensor_path}: sha256 {digest} does not match the manifest's tensor_sha256 {manifest['tensor_sha256']} (the file was modified or corrupted)"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DivergenceFormatError(f"{tensor_path}: not a readable safetensors file ({exc})") from None

    cls = DIVERGENCE_KINDS[manifest["kind"]]
    try:
        div = cls.from_description(names_and_shapes, {"options": manifest["options"], "blocks": manifest["blocks"]})
    except ValueError as exc:
        raise DivergenceFormatError(f"{MANIFEST_FILE}: {exc}") from None

    expected = div.state_dict()
    for key in sorted(set(expected) | set(tensors) | set(manifest["tensors"])):
        if key not in tensors:
            raise DivergenceFormatError(f"{tensor_path}: tensor {key!r} is missing")
        if key not in expected:
            raise DivergenceFormatError(f"{tensor_path}: unexpected tensor {key!r} for a {manifest['kind']} divergence")
        declared = manifest["tensors"].get(key)
        t: Tensor = tensors[key]
        if not isinstance(declared, dict) or declared.get("shape") != list(t.shape):
            raise DivergenceFormatError(f"{MANIFEST_FILE}: tensors[{key!r}] is {declared!r}; the tensor file has shape {list(t.shape)}")
        if t.shape != expected[key].shape:
            raise DivergenceFormatError(f"{tensor_path}: tensor {key!r} has shape {list(t.shape)}; the layout needs {list(expected[key].shape)}")
        if not t.is_floating_point():
            raise DivergenceFormatError(f"{tensor_path}: tensor {key!r} has dtype {t.dtype}; allowed: floating point")
        if not torch.isfinite(t).all():
            raise DivergenceFormatError(f"{tensor_path}: tensor {key!r} holds non-finite values")
    div = div.to(dtype=next(iter(tensors.values())).dtype)
    with torch.no_grad():
        div.load_state_dict(tensors)
    return div, manifest


def attach(div: Divergence, model: nn.Module, *, partial: bool = False) -> Divergence:
    """Check that ``div`` fits ``model`` (shapes, by position) and move it to the model's device.

    Raises ``ShapeMismatchError`` naming the first mismatching parameter (name, expected, got), the
    architecture the divergence fits and the model's. Parameter names need not match (a DDP/compile
    wrapper prefixes them). Returns ``div``.

    ``partial=True``: a model the divergence fits only in part gets a divergence over its own
    parameters with the learned metric on the layers that fit and the identity metric on the
    others (:func:`metaopt_core.optim.fit.fit_divergence`); its ``learned_parameters`` and
    ``identity_parameters`` say which. No layer that fits is still an error.
    """
    from .fit import describe_architecture, describe_model, fit_divergence

    named = list(model.named_parameters())
    if partial:
        fitted, learned, identity = fit_divergence(div, model)
        if not learned:
            raise ShapeMismatchError(f"partial=True: no layer of the model fits the divergence, which fits {describe_architecture(div.names_and_shapes)}; "
                                     f"the model is {describe_model(model)}")  # fmt: skip
        fitted.learned_parameters, fitted.identity_parameters = learned, identity
        return fitted.to(device=named[0][1].device)
    try:
        div.check_shapes([(n, p.shape) for n, p in named], what="model")
    except ShapeMismatchError as exc:
        raise ShapeMismatchError(
            f"{exc}. The divergence fits {describe_architecture(div.names_and_shapes)}; the model is {describe_model(model)}. "
            "partial=True applies it to the layers that fit and plain mirror descent (the identity metric) to the others"
        ) from None
    div.learned_parameters, div.identity_parameters = [n for n, _ in named], []
    return div.to(device=named[0][1].device)
