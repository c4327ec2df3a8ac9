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
from typing import Literal

import torch
from torch import Tensor, nn

from .presets import PRESETS, Form
from .taylor_fused import SMALL_CLASS_COUNT, constant_key, hard_label_taylor

Reduction = Literal["mean", "sum", "none"]
ORDERS = (2, 3, 4, 5)

# Class reduction: thesis eqs 3.4 and 4.8 average over the C classes (1/C sum); the default here sums.
# Measured (mnist5k, mlp2, SGD-M lr 0.01, batch 32, 3 epochs, the ITL configs' inner loop; command
# in docs/presets.md): the ce-like start reaches val acc 0.884 summed (CE itself 0.884) but 0.602
# averaged, and averaged at lr 0.1 repeats the summed lr-0.01 run exactly: the mean is the sum at
# lr/C. Summing keeps the ce-like start at CE's gradient scale, so every lr in configs/, the presets
# and the evaluation demo (tuned at CE-like scales) stays valid; under A.3 normalisation (what ARL
# trains with) the choice has no effect (the factor is taken over the loss as reduced).
DEFAULT_CLASS_REDUCTION: Literal["sum", "mean"] = "sum"

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


@functools.cache
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
        raise ValueError(f"params: got shape {tuple(params.shape)}; order {order} needs (..., {num_params(order)})")


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
        raise ValueError(f"y_hat: got shape {tuple(y_hat.shape)}; needs at least the batch dims of params {tuple(params.shape[:-1])}")
    c0 = _lead(params[..., 0], extra)
    c1 = _lead(params[..., 1], extra)
    return _bivariate(params, y_hat - c0, y - c1, order, form)


def _loss_factor(scale: Tensor | float, params: Tensor, logits: Tensor, reduction: str, class_reduction: str) -> tuple[Tensor | float, Tensor | float]:
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
    class_reduction: Literal["sum", "mean"] = DEFAULT_CLASS_REDUCTION,
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
    params: Tensor,
    logits: Tensor,
    target: Tensor,
    order: int,
    form: Form,
    c0: Tensor,
    factor: Tensor | float,
    reduction: str,
) -> Tensor:
    """Integer labels: at y in {0, 1} the loss is univariate in d, f(d, y) = sum_i (a_i + y b_i) d^i
    with a, b cheap functions of params (``label_coefficients``). Up to ``SMALL_CLASS_COUNT``
    classes one autograd node (``HardLabelTaylor``) evaluates it and returns the logits gradient
    analytically, g = p * (f' - <p, f'>), with a differentiable backward (exact second derivatives
    for ITL); above, eager Horner passes (autograd-recorded, equally exact).
    """
    index = target.long().expand(logits.shape[:-1])
    if logits.shape[-1] > SMALL_CLASS_COUNT:
        # many classes: memory passes, not op count, cost; eager Horner with shared scalar
        # coefficients touches the (N, C) data least (the fused node stacks d^1..d^order)
        coefficients = (label_coefficients(params, order, form) * factor).unsqueeze(-1).unsqueeze(-1)
        d = _centred_softmax(logits, c0)
        unlabelled = _reduce(_horner(coefficients[..., 0, :, :, :].unbind(-3), d), d, reduction)
        labelled_d = d.gather(-1, index.expand(d.shape[:-1]).unsqueeze(-1))  # (..., N, 1)
        labelled = _reduce(_horner(coefficients[..., 1, :, :, :].unbind(-3), labelled_d), labelled_d, reduction)
        return unlabelled + labelled
    key = constant_key(params) if isinstance(factor, float) else None
    if key is not None:  # a fixed loss: the coefficients are a function of the values alone
        coefficients, c0 = _fixed_coefficients(key, order, form, factor, params.dtype)
    else:
        coefficients = label_coefficients(params, order, form) * factor  # (..., 2, order)
    return hard_label_taylor(logits, coefficients, c0, index, reduction == "none")


@functools.lru_cache(maxsize=32)
def _fixed_coefficients(key: tuple[float, ...], order: int, form: Form, factor: float, dtype: torch.dtype):
    params = torch.tensor(key, dtype=dtype)
    return label_coefficients(params, order, form) * factor, params[0].reshape(1, 1)


def _soft_label_loss(
    params: Tensor,
    logits: Tensor,
    target: Tensor,
    order: int,
    form: Form,
    c0: Tensor,
    factor: Tensor | float,
    reduction: str,
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


# A.3 samples "random points satisfying {(y_hat, y) | y_hat_i >= 0, sum_i y_hat_i = 1; y_i in {0, 1},
# sum_i y_i = 1}". The loss is symmetric under a permutation of the classes, so the label is fixed to
# class 0; ``SIMPLEX_SAMPLES`` draws per exponent p of normalised Exp(1)^p: p = 1 is uniform on the
# simplex, larger p puts the points nearer the faces and vertices, where a polynomial's extremes lie
# that uniform draws in C = 10 dimensions never reach (their largest coordinate is rarely above 0.5).
SIMPLEX_SAMPLES = 1024
SIMPLEX_EXPONENTS = (1.0, 3.0, 10.0)
SIMPLEX_SEED = 0


@functools.lru_cache(maxsize=16)
def simplex_points(classes: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """(S, classes) deterministic points of the probability simplex the A.3 extremes are taken over
    (label: class 0): the segments from the two kinds of vertex (e_0, the label's, and e_1, a wrong
    class's) through the centre, and ``SIMPLEX_SAMPLES`` normalised Exp(1)^p draws per p in ``SIMPLEX_EXPONENTS`` from a generator
    seeded ``SIMPLEX_SEED`` (drawn in float64 on the CPU: the same points on every machine)."""
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ValueError(f"classes: got {classes!r}; allowed: an integer >= 2")
    generator = torch.Generator().manual_seed(SIMPLEX_SEED)
    # the segments from the label's vertex e_0 and from a wrong vertex e_1 to the opposite faces'
    # centres (one class at t, the others equal): vertices, centre and the symmetric interior
    t = torch.linspace(0.0, 1.0, SIMPLEX_SAMPLES + 1, dtype=torch.float64).unsqueeze(-1)
    rest = (1.0 - t) / (classes - 1)
    draws = []
    for vertex in (0, 1):
        line = rest.expand(-1, classes).clone()
        line[:, vertex] = t[:, 0]
        draws.append(line)
    for exponent in SIMPLEX_EXPONENTS:
        weights = torch.empty(SIMPLEX_SAMPLES, classes, dtype=torch.float64).exponential_(generator=generator).pow(exponent)
        draws.append(weights / weights.sum(-1, keepdim=True))
    return torch.cat(draws).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def simplex_power_sums(classes: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(M, label): M (S, max(ORDERS) + 1) the power sums sum_c y_hat_c^k, k = 0, 1, ..., of the
    ``simplex_points``, and label (S,) their class-0 coordinate. Independent of the loss: with them
    a loss's values at every point cost O(order^2), not O(classes)."""
    points = simplex_points(classes, torch.float64, "cpu")
    powers = [torch.ones_like(points)]
    for _ in range(max(ORDERS)):
        powers.append(powers[-1] * points)
    sums = torch.stack([p.sum(-1) for p in powers], -1)
    return sums.to(dtype=dtype, device=device), points[:, 0].to(dtype=dtype, device=device)


def normalisation_range(params: Tensor, order: int, form: Form, classes: int, class_reduction: Literal["sum", "mean"] = "sum") -> tuple[Tensor, Tensor]:
    """f_min, f_max of A.3: the extremes of the per-example loss -reduce_c f(y_hat_c, y_c) (sum or
    mean over the ``classes`` classes, as the loss reduces them) over y_hat on the probability
    simplex and y one-hot, approximated on the fixed points of ``simplex_points`` (the label is
    class 0; by symmetry any label gives the same values). ``params`` (n,) or (P, n) -> (), (P,).

    At hard labels f(y_hat, y) = sum_i (a_i + y b_i) d^i (``label_coefficients``), so the sum over
    classes is sum_i a_i sum_c d_c^i + sum_i b_i d_0^i, and sum_c (y_hat_c - c0)^i follows from the
    loss-independent power sums of y_hat by the binomial theorem."""
    _check_order_form(order, form)
    _num_params_check(params, order)
    if class_reduction not in ("sum", "mean"):
        raise ValueError(f"class_reduction: got {class_reduction!r}; allowed: ['sum', 'mean']")
    moments, label = simplex_power_sums(classes, params.dtype, params.device)  # (S, K + 1), (S,)
    coefficients = label_coefficients(params, order, form)  # (..., 2, order)
    c0 = params[..., 0]
    minus_c0 = [torch.ones_like(c0), -c0]
    while len(minus_c0) <= order:
        minus_c0.append(minus_c0[-1] * -c0)
    # binomial[..., k, i - 1] = C(i, k) (-c0)^(i - k): sum_c d_c^i = sum_k binomial[k, i - 1] M_k
    binomial = torch.stack(
        [torch.stack([math.comb(i, k) * minus_c0[i - k] if k <= i else torch.zeros_like(c0) for i in range(1, order + 1)], -1)
         for k in range(order + 1)], -2,
    )  # fmt: skip
    every_class = (moments[:, : order + 1] @ binomial) @ coefficients[..., 0, :].unsqueeze(-1)  # (..., S, 1)
    d0 = label - _lead(c0, 1)  # (..., S)
    labelled = _horner(_lead(coefficients[..., 1, :], 1).unbind(-2), d0) * d0
    values = -(every_class.squeeze(-1) + labelled)
    if class_reduction == "mean":
        values = values / classes
    return values.amin(-1), values.amax(-1)


def normalisation_scale(params: Tensor, order: int, form: Form, eta: float = 1.0, *, classes: int, class_reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """The factor eta / (f_max - f_min) of A.3 for a ``classes``-class problem (the offset f_min
    has no gradient, so only the scale matters for training). The normalised loss is the same
    whether the classes are summed or averaged. Detached: it rescales the search space, it is not
    learned through. Computed in float64: the span of a loss like arl-dr-s80's (~1e3 on values of
    ~1e6 at 100 classes) cancels to a 1e-4 relative error in float32."""
    with torch.no_grad():
        f_min, f_max = normalisation_range(params.detach().to(torch.float64), order, form, classes, class_reduction)
        return (eta / (f_max - f_min).clamp_min(1e-8)).to(params.dtype)


@functools.lru_cache(maxsize=32)
def _fixed_normalisation_scale(key: tuple[float, ...], order: int, form: Form, eta: float, classes: int, class_reduction: str, dtype: torch.dtype) -> float:
    params = torch.tensor(key, dtype=dtype)
    return float(normalisation_scale(params, order, form, eta, classes=classes, class_reduction=class_reduction))  # type: ignore[arg-type]


class TaylorLoss(nn.Module):
    """Drop-in replacement for ``nn.CrossEntropyLoss`` with a learnable Taylor-polynomial loss.

    ``normalise=True`` applies the scale normalisation of A.3: the loss times eta / (f_max - f_min),
    the extremes of the per-example loss over the probability simplex for the logits' class count
    (``normalisation_range``; recomputed from the current parameters on every call, cached for a
    fixed loss, treated as constants).
    """

    def __init__(
        self,
        params: Tensor | list[float] | tuple[float, ...] | None = None,
        order: int = 4,
        form: Form = "taylor",
        reduction: Reduction = "mean",
        normalise: bool = False,
        eta: float = 1.0,
        class_reduction: Literal["sum", "mean"] = DEFAULT_CLASS_REDUCTION,  # sum, not the thesis's mean: see DEFAULT_CLASS_REDUCTION
        compile: bool | str = False,
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
        # torch.compile of the loss (True: inductor; a string names another backend). Off by
        # default: on the 2-core CPU the compiled loss measured slower than eager (docs/benchmarks.md).
        self._loss = torch.compile(taylor_loss, backend="inductor" if compile is True else compile) if compile else taylor_loss

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> TaylorLoss:
        """The published parameters of ``PRESETS[name]`` (theta negated for a preset whose ``sign``
        is +1). Keyword arguments go to the constructor; ``normalise`` is not switched on for you:
        see the preset's ``normalise`` and ``lr`` for the convention it trains under."""
        if name not in PRESETS:
            raise KeyError(f"preset: got {name!r}; allowed: {sorted(PRESETS)}")
        preset = PRESETS[name]
        return cls(list(preset.loss_params()), order=4, form=preset.form, **kwargs)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        scale = 1.0
        if self.normalise:
            classes = logits.shape[-1]
            key = constant_key(self.params)
            if key is None:
                scale = normalisation_scale(self.params, self.order, self.form, self.eta, classes=classes, class_reduction=self.class_reduction)
            else:  # a fixed loss on CPU: the A.3 factor (~3,000 simplex points) depends on the values alone
                scale = _fixed_normalisation_scale(key, self.order, self.form, self.eta, classes, self.class_reduction, self.params.dtype)
        return self._loss(self.params, logits, target, self.order, self.form, scale, self.reduction, self.class_reduction)

    def curve(self, y_hat: Tensor, labelled: bool = True, classes: int = 10) -> Tensor:
        """Per-class loss -f(y_hat, y) for y = 1 (labelled class) or y = 0: the Figure 3.2 view.
        With ``normalise``, times the A.3 factor of the whole loss of a ``classes``-class problem."""
        y = torch.full_like(y_hat, 1.0 if labelled else 0.0)
        values = -polynomial(self.params.detach(), y_hat, y, self.order, self.form)
        if self.normalise:
            values = values * normalisation_scale(self.params, self.order, self.form, self.eta, classes=classes, class_reduction=self.class_reduction)
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
    def from_dict(cls, doc: dict, reduction: Reduction = "mean") -> TaylorLoss:
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
            class_reduction=doc.get("class_reduction", DEFAULT_CLASS_REDUCTION),
        )

    def extra_repr(self) -> str:
        return f"order={self.order}, form={self.form!r}, reduction={self.reduction!r}, normalise={self.normalise}"
