"""The ``neural-loss`` export kind: a learned neural loss as ``loss.json`` (the document's
architecture, header, ``lr_scale`` and provenance) and ``loss.safetensors`` (ω as named tensors,
one per layer weight and bias, and the skip). White-box, nothing pickled; the in-memory artifact is
the complete loss document (ω inline as ``params``), so the loaders, the meta-test and the pyfunc
model build it like any other loss document."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load, save

from metaopt_core.exports import ExportError, LossExport
from metaopt_core.files import atomic_write_bytes, atomic_write_text
from metaopt_core.meta.ml3.family import layer_names

TENSOR_FILE = "loss.safetensors"


class NeuralLossExport(LossExport):
    name = "neural-loss"
    files = ("loss.json", TENSOR_FILE)

    def write(self, directory: Path, artifact: Mapping[str, Any]) -> None:
        from metaopt_core.losses.document import validate_loss_document

        doc = validate_loss_document(artifact, "export")
        names = layer_names(doc["hidden"])
        flat = torch.tensor(doc.pop("params"), dtype=torch.float32)
        tensors, offset = {}, 0
        for name, shape in names:
            size = int(torch.Size(shape).numel())
            tensors[name] = flat[offset : offset + size].reshape(shape).contiguous()
            offset += size
        data = save(tensors)
        atomic_write_bytes(directory / TENSOR_FILE, data)
        doc["tensors"] = {"file": TENSOR_FILE, "sha256": hashlib.sha256(data).hexdigest(), "order": [name for name, _ in names]}
        atomic_write_text(directory / self.document_file, json.dumps(doc, indent=2) + "\n")

    def read(self, directory: Path, source: str | None = None) -> dict:
        from metaopt_core.losses.document import validate_loss_document

        label = f"{source}: {self.document_file}" if source else str(directory / self.document_file)
        try:
            doc = json.loads((directory / self.document_file).read_text(encoding="utf-8"))
            data = (directory / TENSOR_FILE).read_bytes()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{label}: not a readable neural loss ({exc})") from None
        stored = doc.pop("tensors", None)
        if not isinstance(stored, Mapping) or stored.get("sha256") != hashlib.sha256(data).hexdigest():
            raise ExportError(f"{label}: {TENSOR_FILE} does not match the sha256 its document records (corrupted or replaced)")
        tensors = load(data)
        order = list(stored.get("order") or [])
        if sorted(order) != sorted(tensors):
            raise ExportError(f"{label}: {TENSOR_FILE} holds {sorted(tensors)}; the document orders {order}")
        doc["params"] = [float(v) for name in order for v in tensors[name].reshape(-1)]
        return validate_loss_document(doc, label)


__all__ = ["NeuralLossExport", "TENSOR_FILE"]
