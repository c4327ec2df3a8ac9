"""The pyfunc flavour of a registered metaopt loss or optimiser ("models from code": no pickle).

``register_export`` logs *this file* as the model's code
(``mlflow.pyfunc.log_model(python_model=<path of this file>, artifacts=...)``). MLflow copies it
into the model and, on ``mlflow.pyfunc.load_model(uri)``, executes it and takes the object given
to ``mlflow.models.set_model`` below. Nothing is unpickled: the model's state is the white-box
export (``export.json`` naming its kind, and the kind's files: ``loss.json``, or
``divergence/divergence.safetensors`` + ``manifest.json``, ...), read in ``load_context``, after
checking them against the registered version's sha256 tags (the same check and error as
``load_loss``; ``metaopt_core.mlops.registry.integrity``). It therefore needs ``metaopt_core``
importable where it is loaded (the ``metaopt-core`` distribution, which
its logged requirements pin), like any code model.

Inputs and outputs (also recorded as the model signature):

- loss: a DataFrame with ``probabilities`` (one array of class probabilities per example,
  summing to 1) and ``label`` (the class index) -> ``loss`` (the per-example loss value, as the
  loss module with ``reduction="none"`` computes it from logits ``log(probabilities)``).
- optimiser: a DataFrame with ``parameter`` (a parameter name of the meta-trained architecture)
  and ``gradient`` (that parameter's gradient, flattened row-major) -> ``direction``
  (M^{-1} g, the mirror-descent step direction before the learning rate; parameters not listed
  count as zero gradient).

Keep this file importable on its own (absolute imports only): MLflow loads it as a free module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd


class MetaoptPyfuncModel(mlflow.pyfunc.PythonModel):
    """Evaluates a registered metaopt loss (per-example values) or optimiser (step directions).
    The model's artifacts are an export folder (``export.json`` and the export kind's files,
    ``metaopt_core.exports``): its kind reads them, so any registered kind serves."""

    def load_context(self, context: Any) -> None:
        from metaopt_core import exports

        artifacts = dict(context.artifacts or {})
        if exports.EXPORT_FILE not in artifacts:
            raise ValueError(f"model artifacts: got {sorted(artifacts)}; a metaopt model has {exports.EXPORT_FILE!r} and its export kind's files")
        folder = Path(artifacts[exports.EXPORT_FILE]).parent
        kind = exports.kind_of(folder)
        _verify(folder, kind.files)  # the sha256 tags of the registered version, as load_loss / load_optimizer check them
        self.kind = kind.role
        if kind.role == "loss":
            self.loss = kind.build(folder, reduction="none")
        else:
            self.divergence, self.manifest = kind.read(folder)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if self.kind == "loss":
            return pd.DataFrame({"loss": loss_values(self.loss, frame)})
        return pd.DataFrame({"direction": step_directions(self.divergence, frame)})


def _verify(folder: Path, files: tuple[str, ...]) -> None:
    """Refuse artifacts changed since registration (``metaopt_core.mlops.registry.integrity``).
    ``folder`` is the model's ``artifacts/``."""
    from metaopt_core.mlops.registry.integrity import verify_model_dir

    verify_model_dir(folder.parent, list(files))


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        raise ValueError(f"model_input: column {name!r} is missing; got columns {list(frame.columns)}")
    return frame[name]


def loss_values(loss: Any, frame: pd.DataFrame) -> list[float]:
    """Per-example loss for rows of (probabilities, label); rows may differ in their number of classes."""
    import torch

    probabilities = _column(frame, "probabilities")
    labels = _column(frame, "label")
    out = [math.nan] * len(frame)
    by_classes: dict[int, list[int]] = {}
    rows: list[np.ndarray] = []
    for i, p in enumerate(probabilities):
        row = np.asarray(p, dtype=np.float64).reshape(-1)
        if row.size < 2 or not np.all(np.isfinite(row)) or row.min() < 0 or abs(row.sum() - 1.0) > 1e-3:
            raise ValueError(f"model_input row {i}: probabilities {row.tolist()[:10]} must be >= 0, finite, at least 2 classes, and sum to 1")
        label = labels.iloc[i]
        if isinstance(label, (bool, np.bool_)) or not float(label).is_integer() or not 0 <= int(label) < row.size:
            raise ValueError(f"model_input row {i}: label {label!r} is not a class index in [0, {row.size})")
        rows.append(row)
        by_classes.setdefault(row.size, []).append(i)
    with torch.no_grad():
        for _, indices in sorted(by_classes.items()):
            p = torch.tensor(np.stack([rows[i] for i in indices]), dtype=torch.float32)
            # log p as logits: softmax(log p) = p, so the loss sees exactly these probabilities
            logits = torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))
            target = torch.tensor([int(labels.iloc[i]) for i in indices], dtype=torch.int64)
            values = loss(logits, target).reshape(-1)
            for i, v in zip(indices, values.tolist()):
                out[i] = float(v)
    return out


def step_directions(divergence: Any, frame: pd.DataFrame) -> list[list[float]]:
    """M^{-1} g for each (parameter, gradient) row; all rows together form one gradient."""
    import torch

    names = _column(frame, "parameter")
    gradients = _column(frame, "gradient")
    position = {name: k for k, name in enumerate(divergence.param_names)}
    full = [torch.zeros(shape, dtype=torch.float64) for shape in divergence.param_shapes]
    seen: dict[str, int] = {}
    for i, (name, g) in enumerate(zip(names, gradients)):
        if name not in position:
            raise ValueError(f"model_input row {i}: parameter {name!r} unknown; allowed: {list(divergence.param_names)}")
        if name in seen:
            raise ValueError(f"model_input row {i}: parameter {name!r} appears twice (first in row {seen[name]})")
        seen[name] = i
        k = position[name]
        flat = torch.as_tensor(np.asarray(g, dtype=np.float64).reshape(-1))
        expected = int(np.prod(divergence.param_shapes[k]))
        if flat.numel() != expected:
            raise ValueError(
                f"model_input row {i}: gradient of {name!r} has {flat.numel()} values; its shape {tuple(divergence.param_shapes[k])} needs {expected}"
            )
        full[k] = flat.reshape(divergence.param_shapes[k])
    with torch.no_grad():
        steps = divergence.to(torch.float64).precondition(full)
    return [steps[position[name]].reshape(-1).tolist() for name in names]


mlflow.models.set_model(MetaoptPyfuncModel())
