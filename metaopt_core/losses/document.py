"""The white-box loss document: the JSON that describes a learned or hand-designed loss.

One schema, used by the model registry (``loss.json``), the meta-learners' exported results and
the evaluation configs. A document is plain JSON, nothing executable::

    {"format": "metaopt.loss", "format_version": 1,          # optional (older documents lack them)
     "family": "taylor", "order": 4, "form": "monomial",
     "sign": "negative-sum-over-classes", "class_reduction": "sum",
     "params": [c0, c1, theta_2, ...],
     "normalisation": {"enabled": true, "eta": 1.0},
     "lr_scale": 0.1,                                          # optional, default 1 (see below)
     "meta": {...}}                                            # optional provenance, not interpreted

``lr_scale`` (any family; a finite number > 0, default 1) multiplies the loss: a learned loss's
scale acts as a learning rate under SGD, so the registry stores the scale at which the loss trains
well at the lr the user tuned for cross-entropy (measured in its meta-test: the learned loss's
chosen lr over CE's). The loader applies it (:class:`ScaledLoss`), so the served loss is a drop-in
at CE's lr. Scale-invariant optimisers (Adam) are unaffected by it.

``family`` names either a family of the representation table (:mod:`metaopt_core.losses.families`:
``taylor``, ...), which validates the rest of the document and builds its module (the Taylor
family's fields: ``TaylorFamily.validate_document`` in :mod:`metaopt_core.losses.parametric`), or
a loss name of :func:`metaopt_core.losses.registry.get_loss` (``gce``, ``sce``, ``taylor:itl`` ...)
with ``params`` a JSON object of its keyword arguments. A learned iSCE is stored as ``sce`` plus
``learned_as`` (its raw meta-parameters, read by ``families.family_from_dict``). Nothing here
branches on a family's name: the table is looked up.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from metaopt_core.losses.registry import get_loss, hand_designed_losses, list_losses, loss_parameters

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LossDocumentError",
    "ScaledLoss",
    "REDUCTIONS",
    "SUPPORTED_FORMAT_VERSIONS",
    "document_of_loss",
    "field_error",
    "is_finite_number",
    "loss_from_document",
    "validate_loss_document",
]

FORMAT = "metaopt.loss"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
REDUCTIONS = ("mean", "sum", "none")
_MAX_SHOWN = 200  # characters of an offending value quoted in an error


class LossDocumentError(ValueError):
    """A loss document is malformed; the message names the field, the value found and what is allowed."""


def field_error(source: str, field: str, value: Any, allowed: str) -> LossDocumentError:
    """The error for a bad field: the source, the field, the value found (cut short) and what is allowed."""
    shown = repr(value)
    shown = shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "..."
    return LossDocumentError(f"{source}: field {field!r}: got {shown}; allowed: {allowed}")


def is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _named_families() -> list[str]:
    from metaopt_core.losses.families import has_family

    return [name for name in list_losses() if not has_family(name)]


def validate_loss_document(doc: Any, source: str = "loss document") -> dict:
    """Check ``doc`` against the schema (module docstring) and return it as a plain dict (a copy,
    otherwise unchanged). Raises :class:`LossDocumentError` naming the first bad field, the value
    found and the allowed values; ``source`` (e.g. a path) starts the message."""
    if not isinstance(doc, Mapping):
        raise LossDocumentError(f"{source}: got a JSON {type(doc).__name__}; allowed: an object")
    if "format" in doc and doc["format"] != FORMAT:
        raise field_error(source, "format", doc["format"], repr(FORMAT))
    if "format_version" in doc and (isinstance(doc["format_version"], bool) or doc["format_version"] not in SUPPORTED_FORMAT_VERSIONS):
        raise field_error(source, "format_version", doc["format_version"], f"one of {list(SUPPORTED_FORMAT_VERSIONS)}")
    from metaopt_core.losses.families import family_class, has_family, names

    family = doc.get("family")
    if not isinstance(family, str) or not family:
        raise field_error(source, "family", family, f"a loss family {names()} or a loss name of metaopt_core.losses.registry")
    if "meta" in doc and doc["meta"] is not None and not isinstance(doc["meta"], Mapping):
        raise field_error(source, "meta", doc["meta"], "an object (free-form provenance) or null")
    if "lr_scale" in doc and (not is_finite_number(doc["lr_scale"]) or doc["lr_scale"] <= 0):
        raise field_error(source, "lr_scale", doc["lr_scale"], "a finite number > 0 (the loss's multiplier; default 1)")
    if has_family(family):
        family_class(family).validate_document(doc, source)
        return dict(doc)
    known = _named_families()
    if family.strip().lower() not in known:
        raise field_error(source, "family", family, f"a loss family {names()} or one of {known}")
    params = doc.get("params", {})
    if not isinstance(params, Mapping):
        raise field_error(source, "params", params, f"an object of keyword arguments of the {family!r} loss")
    return dict(doc)


class ScaledLoss(nn.Module):
    """``lr_scale`` times ``loss``: what a document with an ``lr_scale`` other than 1 loads as."""

    def __init__(self, loss: nn.Module, lr_scale: float) -> None:
        super().__init__()
        if not is_finite_number(lr_scale) or lr_scale <= 0:
            raise ValueError(f"lr_scale: got {lr_scale!r}; allowed: a finite number > 0")
        self.loss, self.lr_scale = loss, float(lr_scale)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.lr_scale * self.loss(logits, target)

    def extra_repr(self) -> str:
        return f"lr_scale={self.lr_scale:g}"


def loss_from_document(doc: Any, reduction: str = "mean", source: str = "loss document", *, apply_lr_scale: bool = True) -> nn.Module:
    """The loss module ``doc`` describes: a ``TaylorLoss`` or a named loss from ``get_loss``,
    wrapped in :class:`ScaledLoss` when the document has an ``lr_scale`` other than 1 (unless
    ``apply_lr_scale`` is False: the meta-test tunes the raw loss's lr itself).

    ``reduction`` (mean | sum | none) is the batch reduction of the built module; a named loss's
    own ``params.reduction``, if the document has one, wins. Raises :class:`LossDocumentError`
    for a malformed document or keyword arguments the named loss does not accept.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: got {reduction!r}; allowed: {list(REDUCTIONS)}")
    doc = validate_loss_document(doc, source)
    module = _unscaled_loss(doc, reduction, source)
    scale = float(doc.get("lr_scale", 1.0))
    return ScaledLoss(module, scale) if apply_lr_scale and scale != 1.0 else module


def _unscaled_loss(doc: dict, reduction: str, source: str) -> nn.Module:
    from metaopt_core.losses.families import family_class, has_family

    if has_family(doc["family"]):
        return family_class(doc["family"]).module_from_document(doc, reduction, source)
    kwargs = dict(doc.get("params") or {})
    kwargs.setdefault("reduction", reduction)
    try:
        return get_loss(doc["family"], **kwargs)
    except (TypeError, ValueError) as exc:
        raise LossDocumentError(f"{source}: field 'params': {exc}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def document_of_loss(loss: nn.Module) -> dict:
    """The document of a learned family's module (one with ``to_dict()``: ``TaylorLoss``, ...) or of
    a hand-designed loss of ``get_loss`` (its name and constructor arguments, without
    ``reduction``, which is chosen when loading). The inverse of :func:`loss_from_document`;
    raises ``TypeError`` for any other module."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if isinstance(loss, ScaledLoss):
        return {**document_of_loss(loss.loss), "lr_scale": loss.lr_scale}
    if callable(getattr(loss, "to_dict", None)):
        return validate_loss_document({**header, **loss.to_dict()}, f"{type(loss).__name__}.to_dict()")
    for name, cls in hand_designed_losses().items():
        if type(loss) is cls:
            params = {}
            for parameter, default in loss_parameters(name).items():
                if parameter == "reduction":
                    continue
                if not hasattr(loss, parameter):
                    if default is inspect.Parameter.empty:
                        raise TypeError(f"loss: {cls.__name__} does not expose its argument {parameter!r}")
                    continue
                params[parameter] = _jsonable(getattr(loss, parameter))
            return {**header, "family": name, "params": params}
    known = sorted(cls.__name__ for cls in hand_designed_losses().values())
    raise TypeError(f"loss: got {type(loss).__name__}; allowed: a learned family's module (with to_dict()) or one of {known}")
