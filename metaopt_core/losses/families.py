"""The representation table: which parametric loss families a meta-learner can learn, found by name.

A *family* fixes the form of a loss; a flat float vector ω (the meta-parameters) picks one member.
The learners (ARL's CMA-ES, ITL's implicit hypergradients, ML3's unrolled ones, and the batched
inner trainer of :mod:`metaopt_core.population`) only ever use a family through
:class:`LossFamily`, and the loss document (:mod:`metaopt_core.losses.document`) names its family,
which this table resolves; nothing else branches on a family's name.

The built-in families are ``taylor`` (Taylor-polynomial coefficients, order 2-5) and ``isce``
(SCE's (α, β) = softplus(ω)), both in :mod:`metaopt_core.losses.parametric`; :data:`FAMILIES`
lists every registered one.

A family is a frozen dataclass whose fields are its options (``build_family("taylor", order=3)``);
it offers

- ``init(spec)``: the starting ω (a preset name, ``"ce-like"``, or explicit numbers);
- ``functional(params, logits, target)``: the mean loss, differentiable in ω and in the logits,
  free of data-dependent Python control flow (works under ``torch.func.vmap`` and inside double
  backward for implicit hypergradients);
- ``per_example(params, scale, logits, target)`` and ``scales(params, classes)``: the same loss in
  the shape :mod:`metaopt_core.population` vmaps over;
- ``to_module(params)``: a drop-in ``nn.Module`` for ``nn.CrossEntropyLoss``;
- ``to_dict(params)`` / :func:`family_from_dict`: the white-box loss document and back;
- class methods the document layer calls for documents whose ``family`` is the family's name:
  ``validate_document(doc, source)`` and ``module_from_document(doc, reduction, source)``;
- ``export_kind``: the name of the export kind (:mod:`metaopt_core.exports`) that stores its
  documents.

Other packages add a family with :func:`register_family` (or one line in :data:`FAMILIES`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt_core.tables import LazyTable

InitSpec = str | Sequence[float]
CE_LIKE = "ce-like"

FAMILIES: dict[str, str] = {
    "taylor": "metaopt_core.losses.parametric:TaylorFamily",
    "isce": "metaopt_core.losses.parametric:ISCEFamily",
    "neural": "metaopt_core.meta.ml3.family:NeuralLossFamily",
}


class LossFamily(Protocol):
    """What a meta-learner needs from a parametric loss family (see the module docstring)."""

    kind: str
    export_kind: ClassVar[str]

    @property
    def num_params(self) -> int: ...

    def init(self, spec: InitSpec) -> Tensor: ...

    def functional(self, params: Tensor, logits: Tensor, target: Tensor) -> Tensor: ...

    def scales(self, params: Tensor, classes: int) -> Tensor: ...

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor: ...

    def to_module(self, params: Tensor | Sequence[float]) -> nn.Module: ...

    def to_dict(self, params: Tensor | Sequence[float]) -> dict: ...

    def describe(self) -> dict: ...


# --------------------------------------------------------------------------------------------- the table


_TABLE = LazyTable("loss family", FAMILIES)


def names() -> list[str]:
    """Every family name of the table."""
    return _TABLE.names()


def register_family(name: str, reference: str, *, replace: bool = False) -> None:
    """Add a family: ``reference`` is ``"package.module:FamilyClass"`` (imported on first use)."""
    _TABLE.register(name, reference, replace=replace)


def family_class(name: str) -> type:
    """The family class called ``name`` (``ValueError`` naming the families there are)."""
    return _TABLE.get(name)


def has_family(name: Any) -> bool:
    return name in _TABLE


def options_of(name: str) -> tuple[str, ...]:
    """The options ``build_family(name, ...)`` accepts (the family's dataclass fields)."""
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(family_class(name)) if f.name != "kind")


def build_family(name: str, **options: Any) -> Any:
    """A family by name: ``build_family("taylor", order=4, form="monomial")``, ``build_family("isce")``."""
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"family {name!r}: unknown option(s) {unknown}; accepted: {sorted(allowed)}")
    return family_class(name)(**options)


def document_family_name(doc: Mapping[str, Any]) -> str:
    """The family a learned loss document was learned as: ``learned_as.family`` when the document
    stores it as another (iSCE as ``sce``), else its ``family``."""
    learned = doc.get("learned_as") if isinstance(doc.get("learned_as"), Mapping) else {}
    return str(learned.get("family") or doc.get("family"))


def family_from_dict(doc: Mapping[str, Any]) -> tuple[Any, Tensor]:
    """Inverse of ``to_dict``: the family and its ω from a white-box document (schema:
    :mod:`metaopt_core.losses.document`; raises its ``LossDocumentError``, a ValueError)."""
    from metaopt_core.losses.document import validate_loss_document

    doc = validate_loss_document(doc)
    name = document_family_name(doc)
    if not has_family(name):
        raise ValueError(f"family: got {name!r}; allowed: the learned families {names()} (iSCE documents are stored as 'sce')")
    return family_class(name).from_document(doc)


# --------------------------------------------------------------------------------------------- shared helpers


def as_vector(params: Tensor | Sequence[float], length: int, name: str = "params") -> Tensor:
    """``params`` as a finite float32 vector of ``length`` values (a copy)."""
    vector = params.detach() if isinstance(params, Tensor) else torch.as_tensor(list(params), dtype=torch.float64)
    vector = vector.reshape(-1).to(torch.float32).clone()
    if vector.numel() != length:
        raise ValueError(f"{name}: got {vector.numel()} values; this family needs {length}")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{name}: got non-finite values {vector.tolist()}; allowed: finite numbers")
    return vector


def one_hot_if_indices(target: Tensor, logits: Tensor) -> Tensor:
    if target.is_floating_point():
        return target.to(logits.dtype)
    return F.one_hot(target.long(), logits.shape[-1]).to(logits.dtype)


def softplus_inverse(value: float) -> float:
    """x with softplus(x) = value (> 0), computed stably for large values."""
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"softplus_inverse: got {value!r}; allowed: a finite number > 0")
    return value + math.log(-math.expm1(-value))


__all__ = [
    "CE_LIKE",
    "FAMILIES",
    "InitSpec",
    "LossFamily",
    "as_vector",
    "build_family",
    "document_family_name",
    "family_class",
    "family_from_dict",
    "has_family",
    "names",
    "one_hot_if_indices",
    "options_of",
    "register_family",
    "softplus_inverse",
]
