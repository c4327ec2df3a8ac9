"""Hand-designed classification losses: the ARL chapter's competitors (and ITL's ERM baselines); the
plumbing, cross-entropy and the symmetric or bounded losses here, the label-correcting, reweighting
and tempered ones in :mod:`metaopt_core.losses.robust_corrected`.

Every loss is an ``nn.Module`` and a drop-in for ``nn.CrossEntropyLoss``::

    criterion = GeneralizedCrossEntropy(q=0.7)
    loss = criterion(logits, target)

- ``logits``: (N, C) unnormalised scores (any float dtype).
- ``target``: int class indices of shape (N,), or an (N, C) matrix of label probabilities
  (one-hot or soft). Every loss here accepts both; for the losses defined on p_y only (GCE, NCE,
  NFL, focal) a soft target gives the expectation over the label distribution,
  ``sum_c y_c * loss(class c)``, which equals the paper's loss for one-hot targets.
  Soft targets are not checked for summing to one (``F.cross_entropy`` does not check either).
- ``reduction``: "mean" (over examples), "sum" or "none" (a vector of N per-example losses).

Unlike ``nn.CrossEntropyLoss`` there is no ``weight`` or ``ignore_index``, and the class
dimension is the last one of a 2-D ``logits``. The forward passes contain no data-dependent
Python control flow, so the losses also work under ``torch.func.vmap``.

Numerical safety: losses that need log p use ``log_softmax`` (finite for any finite logits);
where a formula divides by p, raises a small p to a power below one, or takes the log of a
mixture, p is clamped as the papers' reference code does (``eps = 1e-7``). All losses return
finite values and gradients at saturated probabilities (tested at logits of +-50 and +-1000).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")

# Clamp used by the robust-loss reference codes (APL, SCE, GCE, Patrini's forward correction).
DEFAULT_EPS = 1e-7


# --------------------------------------------------------------------------------------------
# argument checks and shared plumbing


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: got {reduction!r}; allowed: {list(REDUCTIONS)}")


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """Return ``float(value)`` if it lies in the interval, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}: got {value!r}; allowed: a real number")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: got {value!r}; allowed: {interval}")
    return value


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        kind = f"a {logits.dtype} tensor" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: got {kind}; expected a float tensor of shape (N, C)")
    if logits.dim() != 2:
        raise ValueError(f"logits: got shape {tuple(logits.shape)}; expected (N, C) with classes last")


def target_distribution(target: Tensor, logits: Tensor) -> Tensor:
    """The label distribution y of shape (N, C) in ``logits``' dtype.

    ``target`` is int class indices (N,) (turned into one-hot) or an (N, C) float matrix of
    label probabilities (used as given).
    """
    num_classes = logits.shape[-1]
    if not isinstance(target, Tensor):
        raise ValueError(f"target: got {type(target).__name__}; expected a tensor")
    if target.dtype == torch.bool:
        raise ValueError("target: got a bool tensor; expected int64 class indices or float probabilities")
    if not target.is_floating_point():
        if target.shape != logits.shape[:-1]:
            raise ValueError(
                f"target: got class indices of shape {tuple(target.shape)}; expected {tuple(logits.shape[:-1])} to match logits {tuple(logits.shape)}"
            )
        try:
            one_hot = F.one_hot(target.long(), num_classes)
        except RuntimeError as err:  # out-of-range index: torch's message is about one_hot
            raise ValueError(f"target: class indices must lie in [0, {num_classes - 1}] ({err})") from err
        return one_hot.to(logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(
            f"target: got a float tensor of shape {tuple(target.shape)}; expected int64 class "
            f"indices of shape {tuple(logits.shape[:-1])} or probabilities of shape {tuple(logits.shape)}"
        )
    return target.to(logits.dtype)


def reduce_loss(per_example: Tensor, reduction: Reduction) -> Tensor:
    """Apply ``reduction`` to a vector of per-example losses."""
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction: got {reduction!r}; allowed: {list(REDUCTIONS)}")


class RobustLoss(nn.Module):
    """Base class: validates inputs, builds the label distribution, applies the reduction.

    Subclasses implement ``per_example(logits, y) -> (N,)`` with ``y`` the (N, C) label
    distribution.
    """

    def __init__(self, reduction: Reduction = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement per_example")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits)
        y = target_distribution(target, logits)
        return reduce_loss(self.per_example(logits, y), self.reduction)

    def _hparams(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        items = {**self._hparams(), "reduction": self.reduction}
        return ", ".join(f"{k}={v!r}" for k, v in items.items())


def focal_weight(probs: Tensor, gamma: float, detach: bool, eps: float) -> Tensor:
    """(1 - p)^gamma. 1 - p is clamped at eps so that the derivative of x^gamma (gamma < 1) stays
    finite when p rounds to 1; the value changes by at most eps^gamma times -log p ~ 0."""
    one_minus = 1.0 - (probs.detach() if detach else probs)
    if gamma == 0.0:
        return torch.ones_like(one_minus)
    return one_minus.clamp_min(eps).pow(gamma)


# --------------------------------------------------------------------------------------------
# cross-entropy and label smoothing


class CrossEntropy(RobustLoss):
    """Cross-entropy, -sum_c y_c log p_c. Same values as ``F.cross_entropy`` (which it calls)."""

    def __init__(self, reduction: Reduction = "mean"):
        super().__init__(reduction)

    def _smoothing(self) -> float:
        return 0.0

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=self._smoothing())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits)
        if not target.is_floating_point():
            target_distribution(target, logits)  # validates shape and index range
            target = target.long()
        else:
            target = target_distribution(target, logits)  # shape check; dtype of the logits
        return F.cross_entropy(logits, target, reduction=self.reduction, label_smoothing=self._smoothing())


class LabelSmoothingCrossEntropy(CrossEntropy):
    """Label smoothing (Szegedy et al. 2016): cross-entropy against (1 - eps) y + eps / C.

    The uniform part covers all C classes, including the labelled one (the convention of
    ``F.cross_entropy(label_smoothing=...)``, which computes it).
    """

    def __init__(self, smoothing: float = 0.1, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.smoothing = check_range("smoothing", smoothing, 0.0, 1.0)

    def _smoothing(self) -> float:
        return self.smoothing

    def _hparams(self) -> dict:
        return {"smoothing": self.smoothing}


# --------------------------------------------------------------------------------------------
# GCE, SCE, MAE


class GeneralizedCrossEntropy(RobustLoss):
    """GCE (Zhang & Sabuncu 2018): (1 - p_y^q) / q, q in (0, 1]; q -> 0 gives CE, q = 1 gives 1 - p_y.

    p_y^q is computed as exp(q log p_y) from ``log_softmax``: exact, with a finite derivative
    even when p_y underflows (the reference code clamps p at 1e-7 instead; values differ by at
    most 1e-7^q / q).
    """

    def __init__(self, q: float = 0.7, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.q = check_range("q", q, 0.0, 1.0, low_open=True)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        p_pow_q = torch.exp(self.q * F.log_softmax(logits, dim=-1))
        return (y * (1.0 - p_pow_q)).sum(-1) / self.q

    def _hparams(self) -> dict:
        return {"q": self.q}


def reverse_cross_entropy(logits: Tensor, y: Tensor, log_zero: float) -> Tensor:
    """RCE = -sum_c p_c log y_c with log 0 replaced by ``log_zero`` (Wang et al. 2019's A).

    For a one-hot y this is -A (1 - p_y)."""
    log_y = torch.log(y).clamp_min(log_zero)
    return -(torch.softmax(logits, dim=-1) * log_y).sum(-1)


class SymmetricCrossEntropy(RobustLoss):
    """SCE (Wang et al. 2019): alpha * CE + beta * RCE, RCE with log 0 clamped to A = log_zero.

    Defaults alpha = 0.1, beta = 1.0, A = -4 as in the paper (the authors' code clamps the
    one-hot label at 1e-4 instead, i.e. A = log 1e-4 = -9.21; pass ``log_zero`` to match it).
    """

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.alpha = check_range("alpha", alpha, 0.0, math.inf)
        self.beta = check_range("beta", beta, 0.0, math.inf)
        self.log_zero = check_range("log_zero", log_zero, -math.inf, 0.0, low_open=True, high_open=True)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        ce = -(y * F.log_softmax(logits, dim=-1)).sum(-1)
        return self.alpha * ce + self.beta * reverse_cross_entropy(logits, y, self.log_zero)

    def _hparams(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "log_zero": self.log_zero}


class MeanAbsoluteError(RobustLoss):
    """MAE (Ghosh et al. 2017): the L1 distance sum_c |p_c - y_c|, = 2 - 2 p_y for a one-hot y.

    Scale: this is the full L1 distance of Ghosh et al. The APL reference code (Ma et al. 2020)
    uses the "reduced" 1 - p_y, half of it; ``NCEandMAE``/``NFLandMAE`` follow that code.
    """

    def __init__(self, reduction: Reduction = "mean"):
        super().__init__(reduction)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        return (torch.softmax(logits, dim=-1) - y).abs().sum(-1)


# --------------------------------------------------------------------------------------------
# active-passive losses (Ma et al. 2020)


def normalized_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """NCE = sum_c y_c (-log p_c) / sum_k (-log p_k) (Ma et al. 2020). Needs C >= 2."""
    neg_log_p = -F.log_softmax(logits, dim=-1)
    return (y * neg_log_p).sum(-1) / neg_log_p.sum(-1)


def normalized_focal_loss(logits: Tensor, y: Tensor, gamma: float, detach_focal_weight: bool = True, eps: float = DEFAULT_EPS) -> Tensor:
    """NFL = sum_c y_c FL_c / sum_k FL_k with FL_k = -(1 - p_k)^gamma log p_k (Ma et al. 2020).

    ``detach_focal_weight=True`` treats every (1 - p)^gamma as a constant in backward, as the APL
    reference code does (its ``logpt.data.exp()``); the value is the same either way.
    """
    log_p = F.log_softmax(logits, dim=-1)
    focal = -focal_weight(log_p.exp(), gamma, detach_focal_weight, eps) * log_p
    return (y * focal).sum(-1) / focal.sum(-1)


def _check_two_classes(logits: Tensor, loss: str) -> None:
    if logits.shape[-1] < 2:
        raise ValueError(f"logits: got {logits.shape[-1]} class(es); {loss} needs at least 2 (its normaliser is 0)")


class NCEandMAE(RobustLoss):
    """APL loss NCE+MAE (Ma et al. 2020): alpha * NCE + beta * (1 - p_y).

    The passive term is the reference code's reduced MAE 1 - sum_c y_c p_c (half of
    ``MeanAbsoluteError``). Defaults alpha = beta = 1.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, reduction: Reduction = "mean"):
        super().__init__(reduction)
        self.alpha = check_range("alpha", alpha, 0.0, math.inf)
        self.beta = check_range("beta", beta, 0.0, math.inf)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        _check_two_classes(logits, "NCE")
        mae = 1.0 - (y * torch.softmax(logits, dim=-1)).sum(-1)
        return self.alpha * normalized_cross_entropy(logits, y) + self.beta * mae

    def _hparams(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}


class NFLandMAE(RobustLoss):
    """APL loss NFL+MAE (Ma et al. 2020): alpha * NFL + beta * (1 - p_y), NFL with gamma = 0.5.

    Follows the reference code: reduced MAE (1 - p_y) and focal weights detached in backward
    (``detach_focal_weight=False`` differentiates through them, the paper's formula read literally).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.5,
        detach_focal_weight: bool = True,
        reduction: Reduction = "mean",
    ):
        super().__init__(reduction)
        self.alpha = check_range("alpha", alpha, 0.0, math.inf)
        self.beta = check_range("beta", beta, 0.0, math.inf)
        self.gamma = check_range("gamma", gamma, 0.0, math.inf)
        self.detach_focal_weight = bool(detach_focal_weight)

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        _check_two_classes(logits, "NFL")
        nfl = normalized_focal_loss(logits, y, self.gamma, self.detach_focal_weight)
        mae = 1.0 - (y * torch.softmax(logits, dim=-1)).sum(-1)
        return self.alpha * nfl + self.beta * mae

    def _hparams(self) -> dict:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "detach_focal_weight": self.detach_focal_weight,
        }


__all__ = [
    "check_range",
    "CrossEntropy",
    "focal_weight",
    "GeneralizedCrossEntropy",
    "LabelSmoothingCrossEntropy",
    "MeanAbsoluteError",
    "NCEandMAE",
    "NFLandMAE",
    "normalized_cross_entropy",
    "normalized_focal_loss",
    "reduce_loss",
    "REDUCTIONS",
    "reverse_cross_entropy",
    "RobustLoss",
    "SymmetricCrossEntropy",
    "target_distribution",
]
