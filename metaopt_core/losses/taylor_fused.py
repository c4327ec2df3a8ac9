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

__all__ = ["EagerHardLabelTaylor", "HardLabelTaylor", "hard_label_taylor", "softmax_small"]

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


@functools.lru_cache(maxsize=64)
def _derivative_weights(order: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[2, 3, ..., order, 0]: the coefficients of d^2..d^order, shifted down one power, times their
    power; with the d^1 coefficient as a separate bias they give f'(d)."""
    return torch.tensor([*range(2, order + 1), 0], dtype=dtype, device=device)


def _matrices(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """(weights, bias) of shape (..., 2 [all classes, labelled], 2 [value, slope], order) and
    (..., 2, 2, 1): ``weights @ [d; d^2; ...] + bias`` gives f(d) in row 0 and f'(d) in row 1."""
    order = coefficients.shape[-1]
    shifted = torch.cat((coefficients[..., 1:], coefficients[..., :1]), -1)  # c_2 .. c_order, then anything
    slopes = shifted * _derivative_weights(order, coefficients.dtype, coefficients.device)
    weights = torch.stack((coefficients, slopes), -2)
    bias = torch.stack((torch.zeros_like(coefficients[..., :1]), coefficients[..., :1]), -2)
    return weights, bias


def _matrices_cpu(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """``_matrices`` for one (2, order) CPU tensor outside autograd: built from Python floats (two
    ops instead of seven; only the forward pass uses it, the gradients are analytic)."""
    rows = coefficients.tolist()
    weights = [[row, [i * c for i, c in enumerate(row[1:], start=2)] + [0.0]] for row in rows]
    bias = [[[0.0], [row[0]]] for row in rows]
    return (
        torch.tensor(weights, dtype=coefficients.dtype),
        torch.tensor(bias, dtype=coefficients.dtype),
    )


def _evaluate(
    logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool, inplace: bool = False
) -> tuple[Tensor, ...]:
    """(loss, grad_unit, powers, labelled, slope): the loss; its gradient with respect to the
    logits for a unit weight on each loss value; d^1..d^order of every class (..., order, N*C) and
    of the labelled class (..., order, N), d = softmax(logits) - c0; and F = f'(d) (+ the labelled
    increment), (..., N, C). Powers are products (no ``pow``, whose derivative at 0 is NaN)."""
    order = coefficients.shape[-1]
    if inplace and coefficients.dim() == 2 and coefficients.device.type == "cpu":
        weights, bias = _matrices_cpu(coefficients)
    else:
        weights, bias = _matrices(coefficients)
    p = softmax_small(logits, inplace)
    d = p - c0
    powers = [d]
    for _ in range(order - 1):
        powers.append(powers[-1] * d)
    stacked = torch.stack(powers, -3)  # (..., order, N, C)
    where = index.unsqueeze(-1).unsqueeze(-3).expand(*index.shape[:-1], order, index.shape[-1], 1)
    labelled = stacked.gather(-1, where).squeeze(-1)  # (..., order, N)
    powers = stacked.flatten(-2)  # (..., order, N*C)
    if powers.dim() == 2 and weights.dim() == 3:  # one loss, one batch: plain addmm
        every = torch.addmm(bias[0], weights[0], powers)
        label = torch.addmm(bias[1], weights[1], labelled)
    else:
        every = weights[..., 0, :, :] @ powers + bias[..., 0, :, :]  # (..., 2, N*C)
        label = weights[..., 1, :, :] @ labelled + bias[..., 1, :, :]  # (..., 2, N)
    every = every.unflatten(-1, d.shape[-2:])  # (..., 2, N, C)
    if per_row:
        loss = every[..., 0, :, :].sum(-1) + label[..., 0, :]
    else:
        loss = every[..., 0, :, :].sum((-2, -1)) + label[..., 0, :].sum(-1)
    slope = every[..., 1, :, :].scatter_add(-1, index.unsqueeze(-1), label[..., 1, :].unsqueeze(-1))
    weighted = p * slope  # the softmax Jacobian: g = p F - p <p, F>
    grad_unit = torch.addcmul(weighted, p, weighted.sum(-1, keepdim=True), value=-1.0)
    return loss, grad_unit, powers, labelled, slope


def _loss_forward(logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool):
    return _evaluate(logits, coefficients, c0, index, per_row, inplace=True)

def _save(ctx, inputs, output) -> None:
    logits, coefficients, c0, index, per_row = inputs
    _, grad_unit, powers, labelled, slope = output
    ctx.save_for_backward(logits, coefficients, c0, index, grad_unit, powers, labelled, slope)
    ctx.mark_non_differentiable(grad_unit, powers, labelled, slope)
    ctx.set_materialize_grads(False)
    ctx.per_row = per_row


def _loss_backward(ctx, grad_loss: Tensor | None, *_unused: Tensor | None):
    logits, coefficients, c0, index, grad_unit, powers, labelled, slope = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    per_row = ctx.per_row
    if torch.is_grad_enabled():  # the backward is being differentiated: recompute, tied to the inputs
        _, grad_unit, powers, labelled, slope = _evaluate(logits, coefficients, c0, index, per_row)
    # the loss is linear in its per-value weights: every gradient is the unit one times grad_loss
    weight = grad_loss.unsqueeze(-1) if per_row else grad_loss.unsqueeze(-1).unsqueeze(-1)
    grad_logits = grad_unit * weight
    grad_coefficients = grad_c0 = None
    if ctx.needs_input_grad[1]:  # d loss / d c_i: power sums of every class (row 0), labelled (row 1)
        every = powers.unflatten(-1, slope.shape[-2:]).sum(-1)  # (..., order, N)
        sums = torch.stack((every, labelled), -3)  # (..., 2, order, N)
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
        return _loss_forward(logits, coefficients, c0, index, per_row)

    setup_context = staticmethod(_save)
    backward = staticmethod(_loss_backward)


class EagerHardLabelTaylor(torch.autograd.Function):
    """``HardLabelTaylor`` in the ctx-in-forward style: the same computation, cheaper to call."""

    @staticmethod
    def forward(ctx, logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool):
        output = _loss_forward(logits, coefficients, c0, index, per_row)
        _save(ctx, (logits, coefficients, c0, index, per_row), output)
        return output

    backward = staticmethod(_loss_backward)


def hard_label_taylor(logits: Tensor, coefficients: Tensor, c0: Tensor, index: Tensor, per_row: bool) -> Tensor:
    """The loss value of ``HardLabelTaylor`` (see there)."""
    # torch's own test for "inside vmap/grad": old-style Functions are refused there
    if torch._C._are_functorch_transforms_active():
        return HardLabelTaylor.apply(logits, coefficients, c0, index, per_row)[0]
    return EagerHardLabelTaylor.apply(logits, coefficients, c0, index, per_row)[0]
