"""The Taylor-polynomial loss family shared by ARL (chapter 3) and ITL (chapter 4).

One class-separable term per class, a bivariate polynomial in (y_hat, y) centred at (c0, c1):

    f(y_hat, y) = sum_k w_k * theta_k * d^i_k * e^j_k,   d = y_hat - c0,  e = y - c1

where y_hat is the softmax probability of a class and y its (possibly noisy) label. Terms without
d are dropped (they carry no gradient to the network). The parameter vector is
``[c0, c1, theta_2, ..., theta_{n-1}]`` with ``n = beta (beta + 1) / 2 + 2``.

Convention (the reference implementation, TaylorGLO; verified by the preset tests): the loss of
one example is ``-sum_c f(y_hat_c, y_c)`` and the batch loss is its mean. Without the minus sign
the published presets train to chance accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Form = Literal["taylor", "monomial"]
Reduction = Literal["mean", "sum", "none"]
ORDERS = (2, 3, 4, 5)

# TaylorGLO / thesis ordering of the mixed terms up to degree 4 (eq 3.5, eq B.1); degree 5 terms,
# used only by the beta=5 ablation, follow in increasing power of d.
_MIXED_UP_TO_4 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2)]


def exponents(order: int) -> list[tuple[int, int]]:
    """(i, j) powers of (d, e) for the coefficients theta_2 ... in parameter order."""
    if order not in ORDERS:
        raise ValueError(f"order: got {order!r}; allowed: {list(ORDERS)}")
    pure = [(i, 0) for i in range(1, order + 1)]
    mixed = [(i, j) for (i, j) in _MIXED_UP_TO_4 if i + j <= order]
    for degree in range(5, order + 1):
        mixed += [(i, degree - i) for i in range(1, degree)]
    return pure + mixed


def num_params(order: int) -> int:
    return order * (order + 1) // 2 + 2


def term_factors(order: int, form: Form) -> list[float]:
    """Multipliers of each coefficient: 1/(i! j!) in the Taylor form (eq 3.5), 1 in the monomial one."""
    if form == "monomial":
        return [1.0] * len(exponents(order))
    if form == "taylor":
        return [1.0 / (math.factorial(i) * math.factorial(j)) for i, j in exponents(order)]
    raise ValueError(f"form: got {form!r}; allowed: ['taylor', 'monomial']")


def _coefficient_grid(params: Tensor, order: int, form: Form) -> Tensor:
    """Scatter the coefficients into a (..., order+1, order+1) grid G[i, j] for Horner evaluation."""
    exps = exponents(order)
    factors = torch.tensor(term_factors(order, form), dtype=params.dtype, device=params.device)
    coeffs = params[..., 2:] * factors  # (..., n-2)
    index = torch.tensor([i * (order + 1) + j for i, j in exps], device=params.device)
    # one-hot scatter matrix keeps this differentiable and vmap-friendly (no in-place writes)
    scatter = F.one_hot(index, (order + 1) ** 2).to(params.dtype)  # (n-2, (order+1)^2)
    grid = coeffs @ scatter
    return grid.reshape(*params.shape[:-1], order + 1, order + 1)


def polynomial(params: Tensor, y_hat: Tensor, y: Tensor, order: int = 4, form: Form = "taylor") -> Tensor:
    """f(y_hat, y) elementwise, by nested Horner in d (outer) and e (inner).

    ``params`` has shape (n,) or (..., n) broadcasting against the leading dims of ``y_hat``
    after unsqueezing: a (P, n) parameter block pairs with (P, N, C) probabilities.
    """
    grid = _coefficient_grid(params, order, form)
    extra = y_hat.dim() - (params.dim() - 1)
    grid = grid.reshape(*grid.shape[:-2], *([1] * extra), order + 1, order + 1)
    c0 = params[..., 0].reshape(*params.shape[:-1], *([1] * extra))
    c1 = params[..., 1].reshape(*params.shape[:-1], *([1] * extra))
    d = y_hat - c0
    e = y - c1
    result = torch.zeros_like(d)
    for i in range(order, 0, -1):  # f = d (p1(e) + d (p2(e) + ...)); p_i(e) by Horner in e
        inner = torch.zeros_like(e)
        for j in range(order - i, -1, -1):
            inner = inner * e + grid[..., i, j]
        result = (result + inner) * d
    return result


def taylor_loss(
    params: Tensor,
    logits: Tensor,
    target: Tensor,
    order: int = 4,
    form: Form = "taylor",
    scale: Tensor | float = 1.0,
    reduction: Reduction = "mean",
    class_reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Functional Taylor loss. ``params`` (n,) with logits (N, C), or (P, n) with logits (P, N, C).

    Works under ``torch.func.vmap`` (vmap over a leading population dim of params and logits).
    ``target``: int64 class indices of shape logits.shape[:-1], or probabilities of logits' shape.
    """
    y = _as_probabilities(target, logits)
    y_hat = torch.softmax(logits, dim=-1)
    per_class = polynomial(params, y_hat, y, order, form)
    per_example = per_class.sum(-1) if class_reduction == "sum" else per_class.mean(-1)
    per_example = -per_example * scale
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum(-1)
    if reduction == "mean":
        return per_example.mean(-1)
    raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")


def _as_probabilities(target: Tensor, logits: Tensor) -> Tensor:
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.one_hot(target.long(), logits.shape[-1]).to(logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(
            f"target: got a float tensor of shape {tuple(target.shape)}; expected int64 class "
            f"indices of shape {tuple(logits.shape[:-1])} or probabilities of shape {tuple(logits.shape)}"
        )
    return target.to(logits.dtype)


def normalisation_range(params: Tensor, order: int, form: Form, points: int = 1001) -> tuple[Tensor, Tensor]:
    """f_min, f_max of A.3 over the loss's domain: y_hat in [0, 1] (any class on the simplex), y in {0, 1}.

    A dense grid replaces the thesis's random sampling: same quantity, deterministic.
    """
    y_hat = torch.linspace(0.0, 1.0, points, dtype=params.dtype, device=params.device)
    y_hat = torch.cat([y_hat, y_hat])
    y = torch.cat([torch.zeros(points), torch.ones(points)]).to(params)
    values = -polynomial(params, y_hat.expand(*params.shape[:-1], -1), y.expand(*params.shape[:-1], -1), order, form)
    return values.amin(-1), values.amax(-1)


def normalisation_scale(params: Tensor, order: int, form: Form, eta: float = 1.0) -> Tensor:
    """The factor eta / (f_max - f_min) of A.3 (the offset f_min has no gradient, so only the scale
    matters for training). Detached: it rescales the search space, it is not learned through."""
    f_min, f_max = normalisation_range(params.detach(), order, form)
    return eta / (f_max - f_min).clamp_min(1e-8)


@dataclass(frozen=True)
class Preset:
    params: tuple[float, ...]
    form: Form
    source: str


# Published parameters (THESIS-NOTES). All use the TaylorGLO sign (-sum over classes, batch mean).
PRESETS: dict[str, Preset] = {
    "itl": Preset(
        (-2.0193, -1.2234, 0.1363, 0.1269, -0.4566, -0.1016, -0.2545, 1.0971, -0.9203, 0.2368, 0.4795, 0.9975),
        "monomial",
        "ITL, Table B.1 (plain monomials, eq B.1)",
    ),
    "arl-ar-a40": Preset(
        (0.4397, 0.9187, -0.4554, 6.0881, -0.5869, 1.6765, -2.8526, 0.5748, -4.2756, 1.3126, -0.3326, 1.7649),
        "taylor",
        "ARL AR, 40% asymmetric noise, Table A.2 (Taylor factors, eq 3.5)",
    ),
    "arl-dr-a40": Preset(
        (1.3754, 25.9954, 8.7507, 3.6501, 9.1560, -2.8144, -5.4006, -7.9342, -8.3143, 6.5751, 3.6237, -2.3279),
        "taylor",
        "ARL DR, 40% asymmetric noise, Table A.2 (Taylor factors, eq 3.5)",
    ),
    "arl-ar-s80": Preset(
        (0.7043, -0.4858, -0.0541, -1.8132, 2.2370, 2.4009, 1.4415, 6.4514, -2.7152, -2.6928, -3.2049, -0.5511),
        "taylor",
        "ARL AR, 80% symmetric noise, Table A.2 (Taylor factors, eq 3.5)",
    ),
    "arl-dr-s80": Preset(
        (2.7187, 25.0616, -23.2701, 17.0804, -21.4348, 44.8821, -13.6956, 27.6005, -17.3943, 43.7386, 7.2981, -17.5286),
        "taylor",
        "ARL DR, 80% symmetric noise, Table A.2 (Taylor factors, eq 3.5)",
    ),
}


class TaylorLoss(nn.Module):
    """Drop-in replacement for ``nn.CrossEntropyLoss`` with a learnable Taylor-polynomial loss.

    ``normalise=True`` applies the scale normalisation of A.3 (f_min/f_max recomputed from the
    current parameters on every call, treated as constants).
    """

    def __init__(
        self,
        params: Tensor | list[float] | tuple[float, ...] | None = None,
        order: int = 4,
        form: Form = "taylor",
        reduction: Reduction = "mean",
        normalise: bool = False,
        eta: float = 1.0,
        class_reduction: Literal["sum", "mean"] = "sum",
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order: got {order!r}; allowed: {list(ORDERS)}")
        if form not in ("taylor", "monomial"):
            raise ValueError(f"form: got {form!r}; allowed: ['taylor', 'monomial']")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")
        if class_reduction not in ("sum", "mean"):
            raise ValueError(f"class_reduction: got {class_reduction!r}; allowed: ['sum', 'mean']")
        n = num_params(order)
        if params is None:
            params = torch.zeros(n)
        params = torch.as_tensor(params, dtype=torch.float32).detach().clone()
        if params.shape != (n,):
            raise ValueError(f"params: got shape {tuple(params.shape)}; order {order} needs ({n},)")
        self.params = nn.Parameter(params)
        self.order, self.form, self.reduction = order, form, reduction
        self.normalise, self.eta, self.class_reduction = normalise, eta, class_reduction

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "TaylorLoss":
        if name not in PRESETS:
            raise KeyError(f"preset: got {name!r}; allowed: {sorted(PRESETS)}")
        preset = PRESETS[name]
        return cls(list(preset.params), order=4, form=preset.form, **kwargs)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        scale = normalisation_scale(self.params, self.order, self.form, self.eta) if self.normalise else 1.0
        return taylor_loss(
            self.params, logits, target, self.order, self.form, scale, self.reduction, self.class_reduction
        )

    def curve(self, y_hat: Tensor, labelled: bool = True) -> Tensor:
        """Per-class loss -f(y_hat, y) for y = 1 (labelled class) or y = 0: the Figure 3.2 view."""
        y = torch.full_like(y_hat, 1.0 if labelled else 0.0)
        values = -polynomial(self.params.detach(), y_hat, y, self.order, self.form)
        if self.normalise:
            values = values * normalisation_scale(self.params, self.order, self.form, self.eta)
        return values

    def to_dict(self) -> dict:
        """White-box description: everything needed to rebuild the loss, nothing executable."""
        return {
            "family": "taylor",
            "order": self.order,
            "form": self.form,
            "sign": "negative-sum-over-classes",
            "class_reduction": self.class_reduction,
            "params": [float(v) for v in self.params.detach().cpu()],
            "normalisation": {"enabled": self.normalise, "eta": self.eta},
        }

    @classmethod
    def from_dict(cls, doc: dict, reduction: Reduction = "mean") -> "TaylorLoss":
        if doc.get("family") != "taylor":
            raise ValueError(f"family: got {doc.get('family')!r}; allowed: ['taylor']")
        norm = doc.get("normalisation", {}) or {}
        return cls(
            doc["params"],
            order=int(doc.get("order", 4)),
            form=doc.get("form", "taylor"),
            reduction=reduction,
            normalise=bool(norm.get("enabled", False)),
            eta=float(norm.get("eta", 1.0)),
            class_reduction=doc.get("class_reduction", "sum"),
        )

    def extra_repr(self) -> str:
        return f"order={self.order}, form={self.form!r}, reduction={self.reduction!r}, normalise={self.normalise}"
