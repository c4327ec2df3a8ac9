"""The hard-label Taylor loss as one autograd node: loss and logits gradient in one pass each.

At hard labels the per-class loss is univariate in d = softmax(logits) - c0 (``label_coefficients``
in ``taylor.py``): f(d, y) = sum_i (a_i + y b_i) d^i. Its gradient with respect to the logits is
the softmax Jacobian applied to f'(d), g = p * (F - <p, F>) row by row with F = f'(d) (+ the
labelled increment), so autograd does not need to record the dozen elementwise nodes of an eager
evaluation and replay them backwards.

Exact higher derivatives: ``backward`` is written in differentiable torch operations on the saved
*inputs* (logits, coefficients, c0). When the backward pass itself is being recorded
(``create_graph=True``, ``torch.func.grad`` of a gradient: ITL's Hessian-vector products and mixed
derivatives in the loss parameters) it recomputes the softmax from the logits instead of using the
forward's probabilities, so every second derivative flows through. Works under ``torch.func``
(``setup_context`` style, ``generate_vmap_rule``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["EagerHardLabelTaylor", "HardLabelTaylor", "constant_key", "hard_label_taylor", "softmax_small"]

# Below this many classes, on CPU, four elementwise ops beat torch.softmax's fixed per-call cost
# (measured: 17 us against 51 us at 256 x 10).
SMALL_CLASS_COUNT = 64


def softmax_small(logits: Tensor, inplace: bool = False) -> Tensor:
    """softmax over the last dim; elementwise ops at few classes on CPU, torch.softmax otherwise.

    ``inplace`` reuses the temporaries (only where nothing records the ops: inside ``forward``)."""
    if logits.shape[-1] <= SMALL_CLASS_COUNT and logits.device.type == "cpu":
        # the max-shift has no effect on the value, so its gradient is dropped
        shifted = logits - logits.detach().amax(-1, keepdim=True)
        if inplace:
            shifted.exp_()
            return shifted.div_(shifted.sum(-1, keepdim=True))
        shifted = shifted.exp()
        return shifted / shifted.sum(-1, keepdim=True)
    return torch.softmax(logits, -1)


def constant_key(values: Tensor) -> tuple[float, ...] | None:
    """The values of a small CPU tensor that no gradient flows to, as a hashable key; None where it
    could change under the caller (autograd, torch.func transforms, a device, a batch of them).

    Keying caches on values, not on the tensor, stays right when the values are changed in place
    (an optimiser step, ``.data`` assignments, which bump no version counter)."""
    if values.requires_grad or values.dim() != 1 or values.device.type != "cpu" or torch._C._are_functorch_transforms_active():
        return None
    return tuple(values.tolist())


@functools.lru_cache(maxsize=64)
def _derivative_weights(order: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[2, 3, ..., order, 0]: the coefficients of d^2..d^order, shifted down one power, times their
    power; with the d^1 coefficient as a separate bias they give f'(d)."""
    return torch.tensor([*range(2, order + 1), 0], dtype=dtype, device=device)


def _matrices(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """(weights, bias) of shape (..., 4, order) and (..., 4, 1): ``weights @ [d; d^2; ...] + bias``
    gives f_a(d), f_a'(d), f_b(d), f_b'(d) in its rows (a: every class, b: the labelled class's
    increment)."""
    order = coefficients.shape[-1]
    shifted = torch.cat((coefficients[..., 1:], coefficients[..., :1]), -1)  # c_2 .. c_order, then anything
    slopes = shifted * _derivative_weights(order, coefficients.dtype, coefficients.device)
    weights = torch.stack((coefficients, slopes), -2).flatten(-3, -2)
    bias = torch.stack((torch.zeros_like(coefficients[..., :1]), coefficients[..., :1]), -2).flatten(-3, -2)
    return weights, bias


def _matrices_cpu(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """``_matrices`` for one (2, order) CPU tensor outside autograd, from its values: a fixed loss
    finds its matrices cached instead of building them with seven tiny ops per call (only the
    forward pass uses them; the gradients are analytic)."""
    return _matrices_from_values(tuple(coefficients.flatten().tolist()), coefficients.shape[-1], coefficients.dtype)


@functools.lru_cache(maxsize=32)
def _matrices_from_values(values: tuple[float, ...], order: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _matrices(torch.tensor(values, dtype=dtype).view(2, order))


@functools.lru_cache(maxsize=64)
def _class_range(classes: int, device: torch.device) -> Tensor:
    return torch.arange(classes, device=device)


def _evaluate(logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool, eager: bool = False) -> tuple[Tensor, ...]:
    """(loss, grad_unit, powers, mask, slope): the loss; its gradient with respect to the logits
    for a unit weight on each loss value; d^1..d^order (..., order, N*C), d = softmax(logits) - c0;
    the one-hot labels (..., N, C); and F = f'(d) at the labels (..., N, C). Powers are products
    (no ``pow``, whose derivative at 0 is NaN)."""
    order = coefficients.shape[-1]
    if eager and coefficients.dim() == 2 and coefficients.device.type == "cpu":
        weights, bias = _matrices_cpu(coefficients)
    else:
        weights, bias = _matrices(coefficients)
    p = softmax_small(logits, inplace=eager)
    d = p - c0
    powers = [d]
    for _ in range(order - 1):
        powers.append(powers[-1] * d)
    powers = torch.stack(powers, -3).flatten(-2)  # (..., order, N*C)
    if powers.dim() == 2 and weights.dim() == 2:  # one loss, one batch: plain addmm
        rows = torch.addmm(bias, weights, powers)
    else:
        rows = weights @ powers + bias
    rows = rows.unflatten(-1, d.shape[-2:])  # (..., 4, N, C): f_a, f_a', f_b, f_b'
    mask = (index.unsqueeze(-1) == _class_range(d.shape[-1], d.device)).to(d.dtype)
    # value and slope at the labels: f_a + y f_b, f_a' + y f_b'
    value, slope = torch.addcmul(rows.narrow(-3, 0, 2), rows.narrow(-3, 2, 2), mask.unsqueeze(-3)).unbind(-3)
    loss = value.sum(-1) if per_row else value.sum((-2, -1))
    weighted = p * slope  # the softmax Jacobian: g = p F - p <p, F>
    grad_unit = torch.addcmul(weighted, p, weighted.sum(-1, keepdim=True), value=-1.0)
    return loss, grad_unit, powers, mask, slope


def _loss_forward(logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool, eager: bool):
    """``_evaluate`` inside ``forward`` (nothing recorded); ``eager``: outside torch.func transforms."""
    return _evaluate(logits, coefficients, c0, index, per_row, eager)


def _save(ctx, inputs, output) -> None:
    logits, coefficients, c0, index, per_row = inputs
    _, grad_unit, powers, mask, slope = output
    ctx.save_for_backward(logits, coefficients, c0, index, grad_unit, powers, mask, slope)
    ctx.mark_non_differentiable(grad_unit, powers, mask, slope)
    ctx.set_materialize_grads(False)
    ctx.per_row = per_row


def _loss_backward(ctx, grad_loss: Tensor | None, *_unused: Tensor | None):
    logits, coefficients, c0, index, grad_unit, powers, mask, slope = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    per_row = ctx.per_row
    if torch.is_grad_enabled():  # the backward is being differentiated: recompute, tied to the inputs
        _, grad_unit, powers, mask, slope = _evaluate(logits, coefficients, c0, index, per_row)
    # the loss is linear in its per-value weights: every gradient is the unit one times grad_loss
    weight = grad_loss.unsqueeze(-1) if per_row else grad_loss.unsqueeze(-1).unsqueeze(-1)
    grad_logits = grad_unit * weight
    grad_coefficients = grad_c0 = None
    if ctx.needs_input_grad[1]:  # d loss / d c_i: power sums of every class (row 0), labelled (row 1)
        powers = powers.unflatten(-1, slope.shape[-2:])  # (..., order, N, C)
        sums = torch.stack((powers.sum(-1), (powers * mask.unsqueeze(-3)).sum(-1)), -3)  # (..., 2, order, N)
        if per_row:
            grad = (sums * grad_loss.unsqueeze(-2).unsqueeze(-2)).sum(-1)
        else:
            grad = sums.sum(-1) * grad_loss.unsqueeze(-1).unsqueeze(-1)
        grad_coefficients = grad.sum_to_size(coefficients.shape)
    if ctx.needs_input_grad[2]:  # d = p - c0
        grad_c0 = (-(slope * weight).sum((-2, -1), keepdim=True)).sum_to_size(c0.shape)
    return grad_logits, grad_coefficients, grad_c0, None, None


class HardLabelTaylor(torch.autograd.Function):
    """``sum_{n,c} f(softmax(logits)_{nc} - c0, [c == index_n])`` (summed per row if ``per_row``).

    Inputs: logits (..., N, C); coefficients (B..., 2, order), row 0 the coefficients of d^1..d^order
    at y = 0 and row 1 the increment at y = 1 (sign and reduction factors already folded in); c0
    (B..., 1, 1); index (..., N) int64. B... are the leading dims of the loss parameters, which
    broadcast against logits' leading dims. Returns (loss, *by-products); the by-products (softmax,
    powers of d, power sums) are non-differentiable and kept for the backward pass.

    ``setup_context`` style, for ``torch.func`` transforms; ``hard_label_taylor`` uses the
    equivalent ``EagerHardLabelTaylor`` outside them (``apply`` of a setup_context Function binds its
    arguments through ``inspect.signature`` on every call: ~20 us, a fifth of the loss at 10 classes).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool):
        return _loss_forward(logits, coefficients, c0, index, per_row, eager=False)

    setup_context = staticmethod(_save)
    backward = staticmethod(_loss_backward)


class EagerHardLabelTaylor(torch.autograd.Function):
    """``HardLabelTaylor`` in the ctx-in-forward style: the same computation, cheaper to call."""

    @staticmethod
    def forward(ctx, logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool):
        output = _loss_forward(logits, coefficients, c0, index, per_row, eager=True)
        _save(ctx, (logits, coefficients, c0, index, per_row), output)
        return output

    backward = staticmethod(_loss_backward)


def hard_label_taylor(logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool) -> Tensor:
    """The loss value of ``HardLabelTaylor`` (see there)."""
    # torch's own test for "inside vmap/grad": old-style Functions are refused there
    if torch._C._are_functorch_transforms_active():
        return HardLabelTaylor.apply(logits, coefficients, c0, index, per_row)[0]
    return EagerHardLabelTaylor.apply(logits, coefficients, c0, index, per_row)[0]
