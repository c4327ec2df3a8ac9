"""The outer optimiser of the gradient-based meta-learners (ITL, MetaMD): Adam or SGD on the flat
meta-parameter vector ω, written functionally so its state is part of the serialisable
meta-training state (and a resumed run steps exactly as an uninterrupted one)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def optimizer_step(omega: Tensor, gradient: Tensor, optimizer_state: Mapping[str, Tensor], step: int, outer: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """One Adam or SGD step on ω (``step`` = 1-based step count), functional and in the same
    arithmetic as ``torch.optim.Adam`` / ``torch.optim.SGD``. ``outer`` carries optimizer, lr,
    betas, eps and momentum (an ``OuterConfig``). Returns (new ω, new optimiser state)."""
    omega = omega.detach().clone()
    gradient = gradient.detach().to(omega.dtype)
    if outer.optimizer == "adam":
        beta1, beta2 = outer.betas
        exp_avg = optimizer_state.get("exp_avg", torch.zeros_like(omega)).clone()
        exp_avg_sq = optimizer_state.get("exp_avg_sq", torch.zeros_like(omega)).clone()
        exp_avg.lerp_(gradient, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(outer.eps)
        omega.addcdiv_(exp_avg, denom, value=-outer.lr / bias_correction1)
        return omega, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if outer.optimizer == "sgd":
        if not outer.momentum:
            return omega - outer.lr * gradient, {}
        previous = optimizer_state.get("momentum_buffer")
        buffer = gradient.clone() if previous is None else previous * outer.momentum + gradient
        return omega - outer.lr * buffer, {"momentum_buffer": buffer}
    raise ValueError(f"outer.optimizer: got {outer.optimizer!r}; allowed: ['adam', 'sgd']")


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there are none): diverged tasks drop out of summaries."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")
