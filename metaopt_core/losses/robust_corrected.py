"""Robust losses that correct, reweight or temper what a noisy label says (the other half of the
ARL chapter's competitors; the plumbing, cross-entropy and the symmetric/bounded losses are in
:mod:`metaopt_core.losses.robust`, whose conventions hold here too):

- bootstrapping (Reed et al. 2015) and focal loss (Lin et al. 2017);
- the bi-tempered logistic loss (Amid et al. 2019);
- Baikal (Gonzalez & Miikkulainen 2020) and Huber on probabilities;
- forward loss correction with a transition matrix (Patrini et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt_core.losses.robust import (
    DEFAULT_EPS,
    Reduction,
    RobustLoss,
    check_range,
    focal_weight,
)

# --------------------------------------------------------------------------------------------
# bootstrapping (Reed et al. 2015) and focal loss (Lin et al. 2017)


class SoftBootstrap(RobustLoss):
    """Soft bootstrapping (Reed et al. 2015): -sum_c (beta y_c + (1 - beta) p_c) log p_c.

    The prediction in the target is *not* detached: Reed et al. present the soft variant as CE
    plus minimum-entropy regularisation, which is this objective differentiated through p.
    Default beta = 0.95 (the paper's and the thesis's value).
    """

    def __init__(self, beta: float = 0.95, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.beta = check_range("beta", beta, 0.0, 1.0)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        mixed = self.beta * y + (1.0 - self.beta) * log_p.exp()
        return -(mixed * log_p).sum(-1)

    def _hparams(self) -> dict:
        return {"beta": self.beta}


class HardBootstrap(RobustLoss):
    """Hard bootstrapping (Reed et al. 2015): -sum_c (beta y_c + (1 - beta) z_c) log p_c with
    z = one-hot of argmax p. Default beta = 0.8, the value Reed et al. use for the hard variant
    (0.95 is their soft-variant value)."""

    def __init__(self, beta: float = 0.8, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.beta = check_range("beta", beta, 0.0, 1.0)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        predicted = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        mixed = self.beta * y + (1.0 - self.beta) * predicted
        return -(mixed * log_p).sum(-1)

    def _hparams(self) -> dict:
        return {"beta": self.beta}


class FocalLoss(RobustLoss):
    """Focal loss (Lin et al. 2017): -sum_c alpha_c y_c (1 - p_c)^gamma log p_c; default gamma = 2.

    ``alpha``: None (no class weights), a float (one weight for every class) or a sequence of C
    per-class weights. Gradients flow through (1 - p)^gamma as in the paper; pass
    ``detach_focal_weight=True`` for the variant of common reference code that detaches it.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        detach_focal_weight: bool = False,
        reduction: Reduction = "mean",
    ):
        super().__init__(reduction)
        self.gamma = check_range("gamma", gamma, 0.0, math.inf)
        self.detach_focal_weight = bool(detach_focal_weight)
        if alpha is None:
            self.class_weight = None
        elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.class_weight = torch.tensor([check_range("alpha", alpha, 0.0, math.inf)])
        else:
            weights = torch.as_tensor(alpha, dtype=torch.float64)
            if weights.dim() != 1 or weights.numel() == 0 or not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(f"alpha: got {alpha!r}; allowed: None, a float >= 0, or a sequence of C weights >= 0")
            self.class_weight = weights
        self.alpha = alpha

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        per_class = -focal_weight(log_p.exp(), self.gamma, self.detach_focal_weight, DEFAULT_EPS) * log_p
        if self.class_weight is not None:
            weights = self.class_weight.to(device=logits.device, dtype=logits.dtype)
            if weights.numel() not in (1, logits.shape[-1]):
                raise ValueError(f"alpha: got {weights.numel()} class weights; logits have {logits.shape[-1]} classes")
            per_class = per_class * weights
        return (y * per_class).sum(-1)

    def _hparams(self) -> dict:
        return {"gamma": self.gamma, "alpha": self.alpha, "detach_focal_weight": self.detach_focal_weight}


# --------------------------------------------------------------------------------------------
# bi-tempered logistic loss (Amid et al. 2019)


def log_t(x: Tensor, t: float) -> Tensor:
    """Tempered logarithm (x^(1-t) - 1) / (1 - t); log at t = 1."""
    if t == 1.0:
        return torch.log(x)
    return (x.pow(1.0 - t) - 1.0) / (1.0 - t)


def exp_t(x: Tensor, t: float) -> Tensor:
    """Tempered exponential [1 + (1 - t) x]_+^(1/(1-t)); exp at t = 1."""
    if t == 1.0:
        return torch.exp(x)
    return torch.relu(1.0 + (1.0 - t) * x).pow(1.0 / (1.0 - t))


def tempered_normalization(logits: Tensor, t: float, num_iters: int = 5) -> Tensor:
    """lambda(a) with sum_c exp_t(a_c - lambda) = 1, for t >= 1; shape (..., 1).

    Value: the fixed-point iteration of Amid et al. 2019 (their Algorithm 1 / reference code),
    run without autograd. Gradient: exact, by the implicit function theorem,
    d lambda / d a_c = exp_t(a_c - lambda)^t / sum_k exp_t(a_k - lambda)^t, so it does not depend
    on how far the iteration went (first derivatives only; the weights are held constant).
    """
    if t == 1.0:
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    with torch.no_grad():
        mu = logits.max(dim=-1, keepdim=True).values
        shifted = logits - mu
        normalized = shifted
        for _ in range(num_iters):
            partition = exp_t(normalized, t).sum(-1, keepdim=True)
            normalized = shifted * partition.pow(1.0 - t)
        partition = exp_t(normalized, t).sum(-1, keepdim=True)
        lam = -log_t(1.0 / partition, t) + mu
        weights = exp_t(logits - lam, t).pow(t)
        weights = weights / weights.sum(-1, keepdim=True)
    # value lam, gradient sum_c weights_c * d a_c
    return lam + (weights * (logits - logits.detach())).sum(-1, keepdim=True)


def tempered_softmax(logits: Tensor, t: float, num_iters: int = 5) -> Tensor:
    """Tempered softmax exp_t(a - lambda(a)) (Amid et al. 2019), t >= 1 (t = 1: softmax)."""
    if t < 1.0:
        raise ValueError(f"t: got {t!r}; allowed: t >= 1 (the fixed-point normalisation needs t >= 1)")
    return exp_t(logits - tempered_normalization(logits, t, num_iters), t)


class BiTemperedLogisticLoss(RobustLoss):
    """Bi-tempered logistic loss (Amid et al. 2019), defaults t1 = 0.8 < 1 < t2 = 1.2.

    Per example: sum_c [ y_c log_t1(y_c) - y_c log_t1(yhat_c) - (y_c^(2-t1) - yhat_c^(2-t1)) / (2 - t1) ]
    with yhat the tempered softmax at t2 (``num_iters`` fixed-point iterations; 5 as in the
    reference code). t1 = t2 = 1 gives cross-entropy minus the label entropy (CE for one-hot).
    log_t1(y) uses y + 1e-10 and log_t1(yhat) a yhat clamped at 1e-10, as the reference does
    for y, so that the derivative of log_t1 (x^-t1) stays finite.
    """

    def __init__(self, t1: float = 0.8, t2: float = 1.2, num_iters: int = 5, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.t1 = check_range("t1", t1, 0.0, 2.0, high_open=True)
        self.t2 = check_range("t2", t2, 1.0, math.inf)
        if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"num_iters: got {num_iters!r}; allowed: an int >= 1")
        self.num_iters = num_iters

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        probs = tempered_softmax(logits, self.t2, self.num_iters)
        t1, power = self.t1, 2.0 - self.t1
        per_class = y * log_t(y + 1e-10, t1) - y * log_t(probs.clamp_min(1e-10), t1) - y.pow(power) / power + probs.pow(power) / power
        return per_class.sum(-1)

    def _hparams(self) -> dict:
        return {"t1": self.t1, "t2": self.t2, "num_iters": self.num_iters}


# --------------------------------------------------------------------------------------------
# Baikal (Gonzalez & Miikkulainen 2020) and Huber


class BaikalLoss(RobustLoss):
    """Baikal (Gonzalez & Miikkulainen 2020): -sum_c (log p_c - y_c / p_c).

    For a one-hot y: -sum_c log p_c + 1 / p_y. Its minimum is not at p_y = 1 (the -sum log p
    term pulls towards uniform): an implicit regulariser, the property the GLO paper reports.
    ``class_reduction="sum"`` follows THESIS-NOTES and the TaylorGLO convention of this
    package; GLO writes a 1/n (mean over the n classes) in front: ``class_reduction="mean"``.
    p is clamped to [eps, 1] before log and reciprocal (1/p_y would overflow float32 at
    p_y < 3e-39, and gives exploding gradients well before): with eps = 1e-7 the 1/p_y term
    is at most 1e7 and has zero gradient below eps.
    """

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        class_reduction: Literal["sum", "mean"] = "sum",
        reduction: Reduction = "mean",
    ):
        super().__init__(reduction)
        self.eps = check_range("eps", eps, 0.0, 1.0, low_open=True, high_open=True)
        if class_reduction not in ("sum", "mean"):
            raise ValueError(f"class_reduction: got {class_reduction!r}; allowed: ['sum', 'mean']")
        self.class_reduction = class_reduction

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        probs = torch.softmax(logits, dim=-1).clamp(self.eps, 1.0)
        per_class = -(torch.log(probs) - y / probs)
        return per_class.sum(-1) if self.class_reduction == "sum" else per_class.mean(-1)

    def _hparams(self) -> dict:
        return {"eps": self.eps, "class_reduction": self.class_reduction}


class HuberProbabilityLoss(RobustLoss):
    """The Huber loss (Huber 1964; Hastie et al. 2009, the thesis's citation) of the softmax
    probabilities against the label distribution, summed over classes:

        h(r) = r^2 / 2 if |r| <= delta else delta (|r| - delta / 2),   r = p_c - y_c.

    This is ``F.huber_loss`` per element (ESL writes 2x this; the scale only rescales the
    learning rate). Residuals lie in [-1, 1], so delta >= 1 (default 1.0, torch's default) is
    half the squared error (Brier score / 2) everywhere; delta < 1 makes large residuals
    linear, i.e. less weight on confidently contradicted (possibly noisy) labels.
    The "Huberised CE" of Menon et al. 2020 is a different loss (not cited by the thesis).
    """

    def __init__(self, delta: float = 1.0, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.delta = check_range("delta", delta, 0.0, math.inf, low_open=True)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        probs = torch.softmax(logits, dim=-1)
        return F.huber_loss(probs, y, reduction="none", delta=self.delta).sum(-1)

    def _hparams(self) -> dict:
        return {"delta": self.delta}


# --------------------------------------------------------------------------------------------
# forward loss correction (Patrini et al. 2017)


def _check_transition_matrix(matrix: Tensor | Sequence[Sequence[float]]) -> Tensor:
    # nested lists are kept in float64 (converted to the logits' dtype at use) so no precision is lost
    matrix = matrix if isinstance(matrix, Tensor) else torch.tensor(matrix, dtype=torch.float64)
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"transition_matrix: got shape {tuple(matrix.shape)}; expected a square (C, C) matrix")
    if not torch.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("transition_matrix: entries must be finite and >= 0 (T[i, j] = P(noisy = j | clean = i))")
    row_sums = matrix.sum(-1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3):
        raise ValueError(
            f"transition_matrix: rows must sum to 1 (row-stochastic, T[i, j] = P(noisy = j | clean = i)); got row sums {[round(float(s), 4) for s in row_sums]}"
        )
    return matrix.detach().clone()


class ForwardCorrectedCrossEntropy(RobustLoss):
    """Forward loss correction (Patrini et al. 2017): CE(log(softmax(logits) @ T), noisy target).

    T is row-stochastic, T[i, j] = P(noisy label = j | clean label = i), so softmax @ T models
    the noisy-label posterior. With T = I this is CE. The corrected probabilities are clamped
    at ``eps`` before the log (Patrini's code clips the softmax at 1e-7 before the product), so
    a noisy label that T makes impossible costs at most -log eps.

    Two-stage recipe (as in the thesis's FW competitor): train with CE on the noisy labels,
    ``T = estimate_transition_matrix(softmax of that model on the training inputs)``, then
    train a fresh model with ``ForwardCorrectedCrossEntropy(T)``.
    """

    def __init__(
        self,
        transition_matrix: Tensor | Sequence[Sequence[float]],
        eps: float = DEFAULT_EPS,
        reduction: Reduction = "mean",
    ):
        super().__init__(reduction)
        self.register_buffer("transition_matrix", _check_transition_matrix(transition_matrix))
        self.eps = check_range("eps", eps, 0.0, 1.0, low_open=True, high_open=True)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        matrix = self.transition_matrix
        if matrix.shape[0] != logits.shape[-1]:
            raise ValueError(f"logits: got {logits.shape[-1]} classes; transition_matrix is {tuple(matrix.shape)}")
        noisy_probs = torch.softmax(logits, dim=-1) @ matrix.to(device=logits.device, dtype=logits.dtype)
        return -(y * torch.log(noisy_probs.clamp_min(self.eps))).sum(-1)

    def extra_repr(self) -> str:
        return f"num_classes={self.transition_matrix.shape[0]}, eps={self.eps!r}, reduction={self.reduction!r}"


def estimate_transition_matrix(probs: Tensor, quantile: float | None = 0.97) -> Tensor:
    """Anchor-point estimate of the noise transition matrix (Patrini et al. 2017).

    ``probs``: (N, C) predicted noisy-label posteriors p(noisy = j | x) of a model trained on the
    noisy labels (softmax outputs on the training inputs). For each class i the anchor is the
    example most confidently predicted as i; row i of T is that example's prediction
    (at a perfect anchor x, p(noisy = j | x) = T[i, j]).

    ``quantile``: Patrini's outlier filter. For each class, examples whose p_i is at or above
    the ``quantile`` quantile of p_i (upper value, numpy's ``interpolation="higher"``) are
    discarded and the anchor is the most confident of the rest; ``None`` takes the plain argmax.
    (Unlike the reference code, the filter of one class does not alter the probabilities used
    for the others: it zeroes a numpy view of the shared array.) If the filter would discard
    every example (all p_i equal), the plain argmax is used.

    Returns a (C, C) tensor of ``probs``' dtype and device.
    """
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.dim() != 2 or probs.shape[0] < 1:
        got = f"shape {tuple(probs.shape)}, dtype {probs.dtype}" if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs: got {got}; expected a float tensor (N, C) of predicted probabilities, N >= 1")
    if not torch.isfinite(probs).all() or (probs < 0).any() or (probs > 1 + 1e-6).any():
        raise ValueError("probs: entries must be probabilities in [0, 1] (softmax outputs, not logits)")
    if quantile is not None:
        quantile = check_range("quantile", quantile, 0.0, 1.0, low_open=True)
    probs = probs.detach()
    num_examples, num_classes = probs.shape
    anchors = []
    for i in range(num_classes):
        column = probs[:, i]
        best = int(column.argmax())
        if quantile is not None:
            # "higher" quantile = the order statistic at ceil(q (N - 1)) (0-based), as numpy does
            rank = math.ceil(quantile * (num_examples - 1))
            threshold = column.kthvalue(rank + 1).values
            kept = column < threshold
            if kept.any():
                best = int(torch.where(kept, column, torch.full_like(column, -1.0)).argmax())
        anchors.append(best)
    return probs[torch.tensor(anchors, device=probs.device)].clone()


__all__ = [
    "BaikalLoss",
    "BiTemperedLogisticLoss",
    "FocalLoss",
    "ForwardCorrectedCrossEntropy",
    "HardBootstrap",
    "HuberProbabilityLoss",
    "SoftBootstrap",
    "estimate_transition_matrix",
    "exp_t",
    "log_t",
    "tempered_normalization",
    "tempered_softmax",
]
