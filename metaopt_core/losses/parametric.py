"""The built-in parametric loss families of the representation table
(:mod:`metaopt_core.losses.families`): the Taylor polynomial and iSCE.

Families:

- :class:`TaylorFamily` — the Taylor polynomial of :mod:`metaopt_core.losses.taylor`, any order
  2–5, Taylor-factor or plain-monomial form; ω is the polynomial's parameter vector
  ``[c0, c1, θ2, …]``.
- :class:`ISCEFamily` — "iSCE" (thesis §4.4): Symmetric Cross-Entropy's (α, β) learned. ω is
  unconstrained, ``(α, β) = softplus(ω)`` keeps both weights positive.

``"ce-like"`` start of the Taylor family: the Taylor expansion of cross-entropy's per-class term.
With the package's sign convention (loss = −Σ_c f(ŷ_c, y_c)), CE is f = y log ŷ. Expanding
around (c0, c1 = 0) — so e = y — and dropping terms without d = ŷ − c0:

    y log ŷ ≈ Σ_{k=1}^{order−1} (−1)^{k+1} / (k c0^k) · d^k e

i.e. the (k, 1) monomials get (−1)^{k+1} / (k c0^k) (times k! in the Taylor-factor form, whose
terms carry 1/(k! 1!)); everything else is 0. For one-hot labels this is exactly y times the
(order−1)-degree Taylor polynomial of log ŷ at c0: CE near ŷ = c0, bounded (robust) near ŷ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt_core.losses.document import field_error, is_finite_number
from metaopt_core.losses.families import CE_LIKE, InitSpec, as_vector, one_hot_if_indices, softplus_inverse
from metaopt_core.losses.robust import SymmetricCrossEntropy, reverse_cross_entropy
from metaopt_core.losses.taylor import (
    DEFAULT_CLASS_REDUCTION,
    ORDERS,
    PRESETS,
    Form,
    TaylorLoss,
    exponents,
    normalisation_scale,
    num_params,
    taylor_loss,
)

TAYLOR_FORMS = ("taylor", "monomial")
TAYLOR_SIGN = "negative-sum-over-classes"
CLASS_REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------------------------- Taylor


@dataclass(frozen=True)
class TaylorFamily:
    """The Taylor-polynomial loss of any order (2–5) and form ("taylor" factors or plain "monomial").

    ``ce_centre`` is the expansion point c0 of the ``"ce-like"`` start (see the module docstring).
    ``normalise``, ``eta`` and ``class_reduction`` are those of ``TaylorLoss`` (a family read back
    from a document keeps them, so ``to_module`` rebuilds the same loss).
    """

    order: int = 4
    form: Form = "taylor"
    ce_centre: float = 0.5
    normalise: bool = False
    eta: float = 1.0
    class_reduction: Literal["sum", "mean"] = DEFAULT_CLASS_REDUCTION
    kind: str = "taylor"
    export_kind: ClassVar[str] = "loss-document"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order: got {self.order!r}; allowed: {list(ORDERS)}")
        if self.form not in ("taylor", "monomial"):
            raise ValueError(f"form: got {self.form!r}; allowed: ['taylor', 'monomial']")
        if not (isinstance(self.ce_centre, (int, float)) and 0.0 < self.ce_centre <= 1.0):
            raise ValueError(f"ce_centre: got {self.ce_centre!r}; allowed: a number in (0, 1]")
        if not isinstance(self.normalise, bool):
            raise ValueError(f"normalise: got {self.normalise!r}; allowed: true or false")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not (0 < self.eta < math.inf):
            raise ValueError(f"eta: got {self.eta!r}; allowed: a finite number > 0")
        if self.class_reduction not in ("sum", "mean"):
            raise ValueError(f"class_reduction: got {self.class_reduction!r}; allowed: ['sum', 'mean']")

    @property
    def scale_indices(self) -> slice:
        """The parameters the loss is linear in (the coefficients; not the two centres): scaling them
        scales the loss, which under SGD is the lr's job."""
        return slice(2, None)

    @property
    def num_params(self) -> int:
        return num_params(self.order)

    def init(self, spec: InitSpec) -> Tensor:
        """ω to start from: a Taylor preset name (its order and form must match; the preset's
        ``loss_params()``, i.e. with its ``sign`` applied, as ``TaylorLoss.from_preset`` uses it),
        ``"ce-like"`` or ``num_params`` explicit numbers."""
        if isinstance(spec, str):
            if spec == CE_LIKE:
                return self.ce_like()
            if spec not in PRESETS:
                raise ValueError(f"init: got {spec!r}; allowed: {CE_LIKE!r}, {sorted(PRESETS)} or a list of {self.num_params} numbers")
            preset = PRESETS[spec]
            if self.order != 4 or preset.form != self.form:
                raise ValueError(f"init: preset {spec!r} is order 4, form {preset.form!r}; the family is order {self.order}, form {self.form!r}")
            return torch.tensor(preset.loss_params(), dtype=torch.float32)
        return as_vector(spec, self.num_params, "init")

    def ce_like(self) -> Tensor:
        """The Taylor expansion of cross-entropy at (c0, c1) = (ce_centre, 0) (module docstring)."""
        c0 = float(self.ce_centre)
        params = [c0, 0.0]
        for i, j in exponents(self.order):
            if j == 1:
                coefficient = (-1) ** (i + 1) / (i * c0**i)
                if self.form == "taylor":  # the term is multiplied by 1 / (i! 1!)
                    coefficient *= math.factorial(i)
                params.append(coefficient)
            else:
                params.append(0.0)
        return torch.tensor(params, dtype=torch.float32)

    def functional(self, params: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        scale = 1.0
        if self.normalise:
            scale = normalisation_scale(params, self.order, self.form, self.eta, classes=logits.shape[-1], class_reduction=self.class_reduction)
        return taylor_loss(params, logits, target, self.order, self.form, scale, "mean", self.class_reduction)

    def scales(self, params: Tensor, classes: int) -> Tensor:
        if self.normalise:
            return normalisation_scale(params, self.order, self.form, self.eta, classes=classes, class_reduction=self.class_reduction)
        return torch.ones(params.shape[0], dtype=params.dtype, device=params.device)

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return taylor_loss(params, logits, target, self.order, self.form, scale, "none", self.class_reduction)

    def to_module(self, params: Tensor | Sequence[float]) -> TaylorLoss:
        return TaylorLoss(
            as_vector(params, self.num_params),
            order=self.order,
            form=self.form,
            normalise=self.normalise,
            eta=self.eta,
            class_reduction=self.class_reduction,
        )

    def to_dict(self, params: Tensor | Sequence[float]) -> dict:
        return self.to_module(params).to_dict()

    def describe(self) -> dict:
        described = {"kind": "taylor", "order": self.order, "form": self.form, "ce_centre": self.ce_centre}
        if self.normalise or self.class_reduction != "sum":  # the defaults stay out: older descriptions match
            described.update(normalise=self.normalise, eta=self.eta, class_reduction=self.class_reduction)
        return described

    # ------------------------------------------------------------------ documents of family "taylor"

    @classmethod
    def validate_document(cls, doc: Mapping[str, Any], source: str) -> None:
        """``order`` in ORDERS, ``form`` in TAYLOR_FORMS, ``params`` a list of ``order (order + 1)
        / 2 + 2`` finite numbers; optional ``sign`` (only TAYLOR_SIGN), ``class_reduction``
        (CLASS_REDUCTIONS, default sum), ``normalisation`` (``{enabled: bool, eta: number > 0}``
        or null; default disabled, eta 1)."""
        order = doc.get("order")
        if isinstance(order, bool) or not isinstance(order, int) or order not in ORDERS:
            raise field_error(source, "order", order, f"one of {list(ORDERS)}")
        if doc.get("form") not in TAYLOR_FORMS:
            raise field_error(source, "form", doc.get("form"), " or ".join(repr(f) for f in TAYLOR_FORMS))
        params = doc.get("params")
        n = num_params(order)
        if not isinstance(params, list) or len(params) != n:
            got = f"{len(params)} values" if isinstance(params, list) else params
            raise field_error(source, "params", got, f"a list of {n} numbers (order {order})")
        for k, value in enumerate(params):
            if not is_finite_number(value):
                raise field_error(source, f"params[{k}]", value, "a finite number")
        if "sign" in doc and doc["sign"] != TAYLOR_SIGN:
            raise field_error(source, "sign", doc["sign"], repr(TAYLOR_SIGN))
        if doc.get("class_reduction", "sum") not in CLASS_REDUCTIONS:
            raise field_error(source, "class_reduction", doc.get("class_reduction"), " or ".join(repr(r) for r in CLASS_REDUCTIONS))
        norm = doc.get("normalisation", {"enabled": False, "eta": 1.0})
        if norm is not None:
            if not isinstance(norm, Mapping):
                raise field_error(source, "normalisation", norm, "an object {enabled: bool, eta: number > 0}")
            if not isinstance(norm.get("enabled", False), bool):
                raise field_error(source, "normalisation.enabled", norm.get("enabled"), "true or false")
            eta = norm.get("eta", 1.0)
            if not is_finite_number(eta) or eta <= 0:
                raise field_error(source, "normalisation.eta", eta, "a finite number > 0")

    @classmethod
    def module_from_document(cls, doc: Mapping[str, Any], reduction: str, source: str) -> TaylorLoss:
        return TaylorLoss.from_dict(dict(doc), reduction=reduction)  # type: ignore[arg-type]

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> tuple[TaylorFamily, Tensor]:
        taylor = TaylorLoss.from_dict(dict(doc))
        rebuilt = cls(order=taylor.order, form=taylor.form, normalise=taylor.normalise, eta=taylor.eta, class_reduction=taylor.class_reduction)
        return rebuilt, taylor.params.detach().clone()


# --------------------------------------------------------------------------------------------- iSCE


@dataclass(frozen=True)
class ISCEFamily:
    """iSCE: ``softplus(ω0) · CE + softplus(ω1) · RCE`` (SCE of Wang et al. 2019 with learned weights).

    RCE uses log 0 := ``log_zero`` (A = −4 as in the SCE paper). Starts: ``"sce"`` (α = 0.1,
    β = 1, the paper's setting), ``"ce-like"`` (α = 1, β = 0.01: CE with a trace of RCE — β = 0
    is out of reach of the softplus) or explicit ``[α, β]`` (both > 0; *natural* values, the
    raw ω is their softplus inverse).
    """

    log_zero: float = -4.0
    kind: str = "isce"
    export_kind: ClassVar[str] = "loss-document"

    def __post_init__(self):
        if not (isinstance(self.log_zero, (int, float)) and self.log_zero < 0 and math.isfinite(self.log_zero)):
            raise ValueError(f"log_zero: got {self.log_zero!r}; allowed: a finite number < 0")

    @property
    def num_params(self) -> int:
        return 2

    def init(self, spec: InitSpec) -> Tensor:
        if isinstance(spec, str):
            starts = {"sce": (0.1, 1.0), CE_LIKE: (1.0, 0.01)}
            if spec not in starts:
                raise ValueError(f"init: got {spec!r}; allowed for family 'isce': {sorted(starts)} or [alpha, beta] (both > 0)")
            natural = starts[spec]
        else:
            natural = [float(v) for v in spec]
            if len(natural) != 2 or any(not (v > 0 and math.isfinite(v)) for v in natural):
                raise ValueError(f"init: got {list(spec)!r}; family 'isce' needs [alpha, beta], both finite and > 0")
        return torch.tensor([softplus_inverse(v) for v in natural], dtype=torch.float32)

    @staticmethod
    def weights(params: Tensor) -> tuple[Tensor, Tensor]:
        """(α, β) = softplus(ω), differentiable."""
        positive = F.softplus(params)
        return positive[..., 0], positive[..., 1]

    def _per_example(self, params: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        y = one_hot_if_indices(target, logits)
        alpha, beta = self.weights(params)
        ce = -(y * F.log_softmax(logits, dim=-1)).sum(-1)
        return alpha * ce + beta * reverse_cross_entropy(logits, y, self.log_zero)

    def functional(self, params: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return self._per_example(params, logits, target).mean(-1)

    def scales(self, params: Tensor, classes: int) -> Tensor:
        return torch.ones(params.shape[0], dtype=params.dtype, device=params.device)

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return self._per_example(params, logits, target) * scale

    def natural(self, params: Tensor | Sequence[float]) -> tuple[float, float]:
        alpha, beta = self.weights(as_vector(params, 2).double())
        return float(alpha), float(beta)

    def to_module(self, params: Tensor | Sequence[float]) -> SymmetricCrossEntropy:
        alpha, beta = self.natural(params)
        return SymmetricCrossEntropy(alpha=alpha, beta=beta, log_zero=self.log_zero)

    def to_dict(self, params: Tensor | Sequence[float]) -> dict:
        """``{"family": "sce", "params": {alpha, beta, log_zero}}`` — what the registry's
        ``loss_from_document`` builds through ``get_loss`` — plus the raw ω for exact reloading."""
        alpha, beta = self.natural(params)
        return {
            "family": "sce",
            "params": {"alpha": alpha, "beta": beta, "log_zero": self.log_zero},
            "learned_as": {"family": "isce", "parameterisation": "(alpha, beta) = softplus(raw)",
                           "raw": [float(v) for v in as_vector(params, 2)]},
        }  # fmt: skip

    def describe(self) -> dict:
        return {"kind": "isce", "log_zero": self.log_zero}

    # ------------------------------------------------------------------ documents (stored as "sce")

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> tuple[ISCEFamily, Tensor]:
        """An ``sce`` document with ``learned_as.raw`` (exact ω), else its natural (α, β)."""
        learned = doc.get("learned_as") or {}
        params = doc.get("params") or {}
        isce = cls(log_zero=float(params.get("log_zero", -4.0)))
        if "raw" in learned:
            return isce, as_vector(learned["raw"], 2, "learned_as.raw")
        return isce, isce.init([float(params.get("alpha", 0.1)), float(params.get("beta", 1.0))])


__all__ = ["CLASS_REDUCTIONS", "ISCEFamily", "TAYLOR_FORMS", "TAYLOR_SIGN", "TaylorFamily"]
