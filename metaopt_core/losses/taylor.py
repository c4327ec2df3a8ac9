"""The Taylor-polynomial loss family shared by ARL (chapter 3) and ITL (chapter 4).

One class-separable term per class, a bivariate polynomial in (y_hat, y) centred at (c0, c1):

    f(y_hat, y) = sum_k w_k * theta_k * d^i_k * e^j_k,   d = y_hat - c0,  e = y - c1

where y_hat is the softmax probability of a class and y its (possibly noisy) label. Terms without
d are dropped (they carry no gradient to the network). The parameter vector is
``[c0, c1, theta_2, ..., theta_{n-1}]`` with ``n = beta (beta + 1) / 2 + 2``.

Convention (the reference implementation, TaylorGLO; verified by experiment, see ``PRESETS`` and
docs/presets.md): the loss of one example is ``-sum_c f(y_hat_c, y_c)`` and the batch loss is its
mean. Without the minus sign four of the five published presets train to chance accuracy (the
fifth, arl-ar-a40, is the other way round; ``Preset.sign`` records it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .taylor_fused import SMALL_CLASS_COUNT, hard_label_taylor

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




@functools.lru_cache(maxsize=None)
def _layout(order: int, form: Form) -> tuple[Tensor, Tensor]:
    """Constant maps, built once per (order, form), from the parameters to polynomial coefficients.

    ``theta_to_grid`` (n-2, order*order): theta @ it = G with G[j, i-1] the coefficient of d^i e^j
    (Taylor factors included).

    ``label_maps`` (order, n, 2*order): at hard labels e is -c1 (y = 0) or 1 - c1 (y = 1), so the
    coefficient of d^i is a polynomial in c1 of degree < order, linear in theta:
    ``params @ sum_m c1^m label_maps[m]`` gives [a_1 .. a_order, b_1 .. b_order] with a the
    coefficients at y = 0 and b the change at y = 1 (from (-c1)^j and the binomial (1 - c1)^j).
    """
    exps = exponents(order)
    factors = term_factors(order, form)
    n = num_params(order)
    theta_to_grid = torch.zeros(len(exps), order, order, dtype=torch.float64)
    label_maps = torch.zeros(order, n, 2 * order, dtype=torch.float64)
    for k, ((i, j), factor) in enumerate(zip(exps, factors)):
        theta_to_grid[k, j, i - 1] = factor
        label_maps[j, 2 + k, i - 1] += factor * (-1) ** j  # (-c1)^j
        for m in range(j + 1):  # (1 - c1)^j = sum_m C(j, m) (-c1)^m
            label_maps[m, 2 + k, order + i - 1] += factor * math.comb(j, m) * (-1) ** m
        label_maps[j, 2 + k, order + i - 1] -= factor * (-1) ** j
    return theta_to_grid.reshape(len(exps), order * order), label_maps


@functools.lru_cache(maxsize=64)
def _constants(order: int, form: Form, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    theta_to_grid, label_maps = _layout(order, form)
    return theta_to_grid.to(dtype=dtype, device=device), label_maps.to(dtype=dtype, device=device)


def _check_order_form(order: int, form: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: got {order!r}; allowed: {list(ORDERS)}")
    if form not in ("taylor", "monomial"):
        raise ValueError(f"form: got {form!r}; allowed: ['taylor', 'monomial']")


def _num_params_check(params: Tensor, order: int) -> None:
    if params.dim() < 1 or params.shape[-1] != num_params(order):
        raise ValueError(
            f"params: got shape {tuple(params.shape)}; order {order} needs (..., {num_params(order)})"
        )


def coefficient_grid(params: Tensor, order: int = 4, form: Form = "taylor") -> Tensor:
    """(..., order, order) grid G with G[..., j, i-1] the coefficient of d^i e^j (factors included)."""
    _check_order_form(order, form)
    _num_params_check(params, order)
    theta_to_grid, _ = _constants(order, form, params.dtype, params.device)
    return (params[..., 2:] @ theta_to_grid).unflatten(-1, (order, order))


def label_coefficients(params: Tensor, order: int = 4, form: Form = "taylor") -> Tensor:
    """(..., 2, order) coefficients of d^1 ... d^order of the univariate polynomials the loss becomes
    at hard labels: row 0 is f(., y=0), row 1 is f(., y=1) - f(., y=0).

    A Horner evaluation in c1 of constant matrices, then one matmul with ``params``: few ops (this
    runs on every loss call), exact, and differentiable in ``params`` to any order (no ``pow``,
    whose double backward is NaN at 0).
    """
    _check_order_form(order, form)
    _num_params_check(params, order)
    _, label_maps = _constants(order, form, params.dtype, params.device)
    c1 = params[..., 1, None, None]
    matrix = label_maps[-1]
    for constant in reversed(label_maps[:-1]):
        matrix = torch.addcmul(constant, c1, matrix)  # (..., n, 2 * order)
    if params.dim() == 1:
        flat = params @ matrix
    else:
        flat = (params.unsqueeze(-2) @ matrix).squeeze(-2)
    return flat.unflatten(-1, (2, order))


def _lead(t: Tensor, trailing: int) -> Tensor:
    """Append ``trailing`` singleton dims so a per-parameter-vector tensor broadcasts over data dims."""
    return t.reshape(*t.shape, *([1] * trailing))


def _horner(coefficients: tuple[Tensor, ...], x: Tensor) -> Tensor:
    """sum_{i>=1} coefficients[i-1] * x^i, as x * (c1 + x (c2 + ...)): addcmul steps, last multiply left
    to the caller (returns the bracket)."""
    result = torch.addcmul(coefficients[-2], x, coefficients[-1])
    for coefficient in reversed(coefficients[:-2]):
        result = torch.addcmul(coefficient, result, x)
    return result


def _centred_softmax(logits: Tensor, c0: Tensor) -> Tensor:
    """softmax(logits) - c0, with ``c0`` broadcastable to logits."""
    if logits.shape[-1] <= SMALL_CLASS_COUNT and logits.device.type == "cpu":
        # max-shift for stability; the shift has no effect on the value, so its gradient is dropped
        shifted = (logits - logits.detach().amax(-1, keepdim=True)).exp()
        return torch.addcdiv(-c0, shifted, shifted.sum(-1, keepdim=True))
    return torch.softmax(logits, -1) - c0


def _bivariate(params: Tensor, d: Tensor, e: Tensor, order: int, form: Form) -> Tensor:
    """f(d, e) elementwise for arbitrary e: the per-element coefficients p_i(e) = sum_j G[j, i] e^j
    come from one matmul of e's powers with the grid, then a Horner evaluation in d."""
    grid = coefficient_grid(params, order, form)
    grid = grid.reshape(*grid.shape[:-2], *([1] * (d.dim() - (params.dim() - 1) - 1)), order, order)
    e_powers = [torch.ones_like(e), e]
    while len(e_powers) < order:
        e_powers.append(e_powers[-1] * e)
    per_power = torch.stack(e_powers[:order], -1) @ grid  # (..., order_i): p_i(e) = sum_j G[j, i] e^j
    return _horner(per_power.unbind(-1), d) * d


def polynomial(params: Tensor, y_hat: Tensor, y: Tensor, order: int = 4, form: Form = "taylor") -> Tensor:
    """f(y_hat, y) elementwise (no sign).

    ``params`` has shape (n,) or (..., n) broadcasting against the leading dims of ``y_hat``
    after unsqueezing: a (P, n) parameter block pairs with (P, N, C) probabilities.
    """
    _check_order_form(order, form)
    _num_params_check(params, order)
    extra = y_hat.dim() - (params.dim() - 1)
    if extra < 0:
        raise ValueError(
            f"y_hat: got shape {tuple(y_hat.shape)}; needs at least the batch dims of params {tuple(params.shape[:-1])}"
        )
    c0 = _lead(params[..., 0], extra)
    c1 = _lead(params[..., 1], extra)
    return _bivariate(params, y_hat - c0, y - c1, order, form)


def _loss_factor(
    scale: Tensor | float, params: Tensor, logits: Tensor, reduction: str, class_reduction: str
) -> tuple[Tensor | float, Tensor | float]:
    """The constant multiplier of the loss: -scale (sign convention), /N for a batch mean, /C for a
    class mean. Returned as (factor folded into the coefficients, factor applied to the output):
    folding into the (tiny) coefficient tensor saves a pass over the (N, C) data."""
    factor = -1.0
    if reduction == "mean":
        factor /= logits.shape[-2]
    if class_reduction == "mean":
        factor /= logits.shape[-1]
    if not isinstance(scale, Tensor):
        return factor * float(scale), 1.0
    if scale.shape == params.shape[:-1]:
        return _lead(scale * factor, 2), 1.0
    return factor, scale


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
    """Functional Taylor loss ``reduce_n(-scale * sum_c f(softmax(logits)_c, y_c))``.

    ``params`` (n,) with logits (N, C), or (P, n) with logits (P, N, C) (one loss per population
    member; the result then has shape (P,) or (P, N)). Works under ``torch.func.vmap``.
    ``target``: integer class indices of shape logits.shape[:-1] (or (N,), shared by the population),
    or float probabilities of logits' shape (or (N, C), shared).

    Hard labels take the fused path: f(., y) is a univariate polynomial in d = y_hat - c0 for y in
    {0, 1}, evaluated with its analytic logits gradient as one autograd node (``HardLabelTaylor``,
    exact to any derivative order). Soft targets evaluate the bivariate polynomial eagerly.
    """
    _check_order_form(order, form)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")
    if class_reduction not in ("sum", "mean"):
        raise ValueError(f"class_reduction: got {class_reduction!r}; allowed: ['sum', 'mean']")
    _num_params_check(params, order)
    if logits.dim() < 2:
        raise ValueError(f"logits: got shape {tuple(logits.shape)}; expected (..., N, C)")
    coefficient_factor, output_factor = _loss_factor(scale, params, logits, reduction, class_reduction)
    c0 = _lead(params[..., 0], 2)
    if not target.is_floating_point() and not target.is_complex() and target.dtype != torch.bool:
        if target.shape not in (logits.shape[:-1], logits.shape[-2:-1]):
            raise ValueError(
                f"target: got integer class indices of shape {tuple(target.shape)}; expected "
                f"{tuple(logits.shape[:-1])} (or probabilities of shape {tuple(logits.shape)})"
            )
        loss = _hard_label_loss(params, logits, target, order, form, c0, coefficient_factor, reduction)
    elif target.is_floating_point():
        if target.shape not in (logits.shape, logits.shape[-2:]):
            raise ValueError(
                f"target: got a float tensor of shape {tuple(target.shape)}; expected int64 class "
                f"indices of shape {tuple(logits.shape[:-1])} or probabilities of shape {tuple(logits.shape)}"
            )
        loss = _soft_label_loss(params, logits, target, order, form, c0, coefficient_factor, reduction)
    else:
        raise ValueError(f"target: got dtype {target.dtype}; expected integer class indices or float probabilities")
    return loss if isinstance(output_factor, float) else loss * output_factor


def _reduce(bracket: Tensor, d: Tensor, reduction: str) -> Tensor:
    """sum over classes (and over the batch unless ``reduction == "none"``) of bracket * d."""
    if reduction == "none":
        return torch.linalg.vecdot(bracket, d)
    if bracket.dim() == 2:
        return torch.dot(bracket.flatten(), d.flatten())
    return torch.linalg.vecdot(bracket.flatten(-2), d.flatten(-2))


def _hard_label_loss(
    params: Tensor, logits: Tensor, target: Tensor, order: int, form: Form, c0: Tensor,
    factor: Tensor | float, reduction: str,
) -> Tensor:
    """Integer labels: at y in {0, 1} the loss is univariate in d, f(d, y) = sum_i (a_i + y b_i) d^i
    with a, b cheap functions of params (``label_coefficients``). One autograd node
    (``HardLabelTaylor``) evaluates it and returns the logits gradient analytically,
    g = p * (f' - <p, f'>), with a differentiable backward (exact second derivatives for ITL).
    """
    index = target.long().expand(logits.shape[:-1])
    coefficients = label_coefficients(params, order, form) * factor  # (..., 2, order)
    return hard_label_taylor(logits, coefficients, c0, index, reduction == "none")


def _soft_label_loss(
    params: Tensor, logits: Tensor, target: Tensor, order: int, form: Form, c0: Tensor,
    factor: Tensor | float, reduction: str,
) -> Tensor:
    """Arbitrary y: per-element coefficients p_i(e) = sum_j G[j, i] e^j from one matmul of e's
    powers (laid out (order, N*C) so each p_i is contiguous), then Horner in d."""
    d = _centred_softmax(logits, c0)
    e = target.to(logits.dtype) - _lead(params[..., 1], 2)
    grid = coefficient_grid(params, order, form) * factor  # (..., order_j, order_i)
    e_powers = [torch.ones_like(e), e]
    while len(e_powers) < order:
        e_powers.append(e_powers[-1] * e)
    stacked = torch.stack(e_powers[:order], -3).flatten(-2)  # (..., order_j, N*C)
    per_element = (grid.transpose(-1, -2) @ stacked).unflatten(-1, e.shape[-2:])  # (..., order_i, N, C)
    return _reduce(_horner(per_element.unbind(-3), d), d, reduction)


def normalisation_range(params: Tensor, order: int, form: Form, points: int = 1001) -> tuple[Tensor, Tensor]:
    """f_min, f_max of A.3 over the loss's domain: y_hat in [0, 1] (any class on the simplex), y in {0, 1}.

    A dense grid replaces the thesis's random sampling: same quantity, deterministic.
    """
    coefficients = label_coefficients(params, order, form)  # (..., 2, order)
    at_zero = coefficients[..., 0, :]
    at_one = at_zero + coefficients[..., 1, :]
    grid = torch.linspace(0.0, 1.0, points, dtype=params.dtype, device=params.device)
    d = grid - params[..., 0:1]  # (..., points)
    values = []
    for row in (at_zero, at_one):
        values.append(-_horner(row.unsqueeze(-1).unbind(-2), d) * d)
    values = torch.cat(values, -1)
    return values.amin(-1), values.amax(-1)


def normalisation_scale(params: Tensor, order: int, form: Form, eta: float = 1.0) -> Tensor:
    """The factor eta / (f_max - f_min) of A.3 (the offset f_min has no gradient, so only the scale
    matters for training). Detached: it rescales the search space, it is not learned through."""
    with torch.no_grad():
        f_min, f_max = normalisation_range(params.detach(), order, form)
        return eta / (f_max - f_min).clamp_min(1e-8)


@dataclass(frozen=True)
class Preset:
    """Published parameters plus the convention under which they were found to train
    (``docs/presets.md``, ``scripts/preset_convention.py``). ``lr``, ``normalise`` and
    ``batch_size`` are recommendations for SGD with momentum 0.9; ``sign`` is -1 when the numbers
    train as published under TaylorLoss's minus sign, +1 when they train only with every
    coefficient theta negated (``from_preset`` applies that; ``params`` stays the published table)."""

    params: tuple[float, ...]
    form: Form
    source: str
    lr: float | None = None
    normalise: bool = False
    batch_size: int | None = None
    sign: int = -1

    def loss_params(self) -> tuple[float, ...]:
        """The parameter vector TaylorLoss should use: ``params``, with theta negated if ``sign`` is +1."""
        if self.sign == -1:
            return self.params
        return self.params[:2] + tuple(-v for v in self.params[2:])


# Published parameters (THESIS-NOTES), and the convention each trains under, found by experiment
# (scripts/preset_convention.py; full tables in docs/presets.md). Setting: mnist5k, 80 % symmetric
# noise, mlp2, SGD momentum 0.9, 30 epochs, accuracy on the clean split at the last epoch, seeds 0/1.
# - Sign: minus (loss = -sum_c f, batch mean) for itl, arl-ar-s80, arl-dr-a40, arl-dr-s80; with +
#   they reach chance (0.01-0.12). arl-ar-a40 is the opposite: chance (0.093) under minus at every
#   lr, scaling and batch size tried, 0.460/0.579 under + (sum, lr 0.01, batch 128): its
#   per-example loss, as published, is lowest with all mass on a wrong class.
# - Scaling: with SGD and no weight decay, mean over classes (= loss / C) and A.3 normalisation
#   (= loss * eta/(f_max - f_min)) are exactly learning-rate factors. All five train best at a
#   small effective step: normalised (eta = 1) at lr 0.03-0.1. The DR presets need it (raw: f spans
#   ~1e4, chance accuracy at every lr tried).
# - Best final accuracy, seeds 0/1: itl normalised lr 0.1 b128 0.571/0.617; arl-ar-s80 normalised
#   lr 0.03 b128 0.565/0.647; arl-dr-a40 normalised lr 0.1 b32 0.557/0.629; arl-dr-s80 normalised
#   lr 0.03 b32 0.514/0.647. CE: 0.411/0.486 at lr 0.01 b128 (its best of 0.01/0.03/0.1), but
#   0.550/0.674 at lr 0.003: CE tuned to a small lr matches the presets at 30 epochs, and at 100
#   epochs all of them fit the noise (itl 0.331/0.342, arl-ar-s80 0.389/0.433, CE lr 0.003
#   0.422/0.478). The presets' advantage is the thesis protocol's (one lr for all losses), not a
#   robustness that survives tuning CE or training longer.
PRESETS: dict[str, Preset] = {
    "itl": Preset(
        (-2.0193, -1.2234, 0.1363, 0.1269, -0.4566, -0.1016, -0.2545, 1.0971, -0.9203, 0.2368, 0.4795, 0.9975),
        "monomial",
        "ITL, Table B.1 (plain monomials, eq B.1)",
        lr=0.1,
        normalise=True,
        batch_size=128,
    ),
    "arl-ar-a40": Preset(
        (0.4397, 0.9187, -0.4554, 6.0881, -0.5869, 1.6765, -2.8526, 0.5748, -4.2756, 1.3126, -0.3326, 1.7649),
        "taylor",
        "ARL AR, 40% asymmetric noise, Table A.2 (Taylor factors, eq 3.5); trains only with theta negated",
        lr=0.01,
        normalise=False,
        batch_size=128,
        sign=1,
    ),
    "arl-dr-a40": Preset(
        (1.3754, 25.9954, 8.7507, 3.6501, 9.1560, -2.8144, -5.4006, -7.9342, -8.3143, 6.5751, 3.6237, -2.3279),
        "taylor",
        "ARL DR, 40% asymmetric noise, Table A.2 (Taylor factors, eq 3.5)",
        lr=0.1,
        normalise=True,
        batch_size=32,
    ),
    "arl-ar-s80": Preset(
        (0.7043, -0.4858, -0.0541, -1.8132, 2.2370, 2.4009, 1.4415, 6.4514, -2.7152, -2.6928, -3.2049, -0.5511),
        "taylor",
        "ARL AR, 80% symmetric noise, Table A.2 (Taylor factors, eq 3.5)",
        lr=0.03,
        normalise=True,
        batch_size=128,
    ),
    "arl-dr-s80": Preset(
        (2.7187, 25.0616, -23.2701, 17.0804, -21.4348, 44.8821, -13.6956, 27.6005, -17.3943, 43.7386, 7.2981, -17.5286),
        "taylor",
        "ARL DR, 80% symmetric noise, Table A.2 (Taylor factors, eq 3.5)",
        lr=0.03,
        normalise=True,
        batch_size=32,
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
        """The published parameters of ``PRESETS[name]`` (theta negated for a preset whose ``sign``
        is +1). Keyword arguments go to the constructor; ``normalise`` is not switched on for you:
        see the preset's ``normalise`` and ``lr`` for the convention it trains under."""
        if name not in PRESETS:
            raise KeyError(f"preset: got {name!r}; allowed: {sorted(PRESETS)}")
        preset = PRESETS[name]
        return cls(list(preset.loss_params()), order=4, form=preset.form, **kwargs)

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
