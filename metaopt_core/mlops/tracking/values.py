"""Turning configs, metrics, tables and histories into what MLflow and the plots accept: flattened
params, JSON-ready copies, numeric metrics with valid keys, Markdown tables, plot inputs."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

# MLflow's limits (mlflow.utils.validation): 100 params/tags per batch, 1000 metrics per batch,
# 6000 characters per param value, 8000 per run tag value, 250 per key.
MAX_BATCH_PARAMS = 100
MAX_BATCH_METRICS = 1000
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
# Keys that carry the outer-step index inside a callback's metric dict.
STEP_KEYS = ("step", "outer_step", "generation", "iteration", "epoch")
_METRIC_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")


def flatten(config: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings (and pydantic models / dataclasses) to ``{"a.b.c": leaf}``; lists stay leaves."""
    config = plain(config)
    if not isinstance(config, Mapping):
        return {prefix or "value": config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        value = plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def plain(value: Any) -> Any:
    """pydantic model / dataclass -> JSON-like dict; anything else unchanged."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy: pydantic models and dataclasses become dicts, tuples lists, numpy/torch
    scalars and arrays numbers and lists, paths strings (anything else: ``str``)."""
    value = plain(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy arrays / scalars, torch tensors
        return to_jsonable(value.tolist())
    return str(value)


def param_value(value: Any) -> str:
    """How a config leaf is shown as an MLflow param: JSON for lists/None/bools, str otherwise."""
    if isinstance(value, (list, tuple, dict, bool)) or value is None:
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def metric_key(key: str) -> str:
    """A metric name MLflow accepts (alphanumerics, ``_ - . / : space``); other characters become ``_``."""
    return _METRIC_KEY_BAD_CHARS.sub("_", str(key))[:MAX_KEY]


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metric dict as floats; strings and other objects are skipped.

    Tensors / numpy scalars with one element count as numbers. NaN and inf are kept (MLflow stores them;
    a diverged outer step should be visible, not silently dropped).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}" if not prefix else f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name))
            continue
        number = as_number(value)
        if number is not None:
            out[metric_key(name)] = number
    return out


def as_number(value: Any) -> float | None:
    """A float for a number, bool or one-element tensor/array; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item"):  # torch tensor
        return float(value.item()) if value.numel() == 1 else None
    if hasattr(value, "size") and hasattr(value, "item") and getattr(value, "size", 0) == 1:  # numpy
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; floats shown with ``digits`` decimals, missing cells empty."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(str(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_rows(table: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]], index: str = "name") -> list[dict]:
    """Rows from a list of dicts, or from ``{row_name: {column: value}}`` (the row name goes to ``index``)."""
    if isinstance(table, Mapping):
        return [{index: name, **dict(row)} for name, row in table.items()]
    if isinstance(table, (list, tuple)) and all(isinstance(r, Mapping) for r in table):
        return [dict(r) for r in table]
    raise TypeError(f"table: got {type(table).__name__}; allowed: a list of row dicts or a mapping {{row name: row dict}}")


def loss_curves_input(losses: Mapping[str, Any], *, compare_ce: bool = True) -> dict[str, Any]:
    """Label -> loss module for ``plots.plot_loss_curves``: loss documents built, cross-entropy added."""
    import torch

    modules = {str(label): _as_loss_module(loss) for label, loss in losses.items()}
    if compare_ce:
        modules.setdefault("cross-entropy", torch.nn.CrossEntropyLoss())
    return modules


def history_rows(history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[float]]) -> tuple[list[dict], list[str]]:
    """Rows for ``plots.plot_history`` and the numeric keys worth plotting (step keys excluded).

    Named series ``{"MetaMD": [f0, f1, ...], ...}`` become rows ``{"step": k, "MetaMD": f_k, ...}``."""
    if isinstance(history, Mapping):
        length = max((len(v) for v in history.values()), default=0)
        rows = [{"step": k, **{str(name): float(v[k]) for name, v in history.items() if k < len(v)}} for k in range(length)]
        return rows, [str(name) for name in history]
    rows = [dict(row) for row in history]
    keys = [
        k
        for k in dict.fromkeys(k for row in rows for k in row)
        if k not in STEP_KEYS and any(isinstance(as_number(row.get(k)), float) and not isinstance(row.get(k), bool) for row in rows)
    ]
    return rows, keys


def _as_loss_module(loss: Any) -> Any:
    if isinstance(loss, Mapping):
        from metaopt_core.losses.document import loss_from_document

        return loss_from_document(loss)
    return loss


__all__ = [
    "MAX_BATCH_METRICS",
    "MAX_BATCH_PARAMS",
    "MAX_KEY",
    "MAX_PARAM_VALUE",
    "MAX_TAG_VALUE",
    "STEP_KEYS",
    "as_number",
    "flatten",
    "history_rows",
    "loss_curves_input",
    "markdown_table",
    "metric_key",
    "numeric_metrics",
    "param_value",
    "plain",
    "table_rows",
    "to_jsonable",
]
