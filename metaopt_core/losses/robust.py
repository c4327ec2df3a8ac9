"""Hand-designed classification losses: the ARL chapter's competitors (and ITL's ERM baselines).

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
from collections.abc import Sequence
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


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
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


def _focal_weight(probs: Tensor, gamma: float, detach: bool, eps: float) -> Tensor:
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
        self.smoothing = _check_range("smoothing", smoothing, 0.0, 1.0)

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
        self.q = _check_range("q", q, 0.0, 1.0, low_open=True)

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
        self.alpha = _check_range("alpha", alpha, 0.0, math.inf)
        self.beta = _check_range("beta", beta, 0.0, math.inf)
        self.log_zero = _check_range("log_zero", log_zero, -math.inf, 0.0, low_open=True, high_open=True)

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
    focal = -_focal_weight(log_p.exp(), gamma, detach_focal_weight, eps) * log_p
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
        self.alpha = _check_range("alpha", alpha, 0.0, math.inf)
        self.beta = _check_range("beta", beta, 0.0, math.inf)

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
        self.alpha = _check_range("alpha", alpha, 0.0, math.inf)
        self.beta = _check_range("beta", beta, 0.0, math.inf)
        self.gamma = _check_range("gamma", gamma, 0.0, math.inf)
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
        self.beta = _check_range("beta", beta, 0.0, 1.0)

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
        self.beta = _check_range("beta", beta, 0.0, 1.0)

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
        self.gamma = _check_range("gamma", gamma, 0.0, math.inf)
        self.detach_focal_weight = bool(detach_focal_weight)
        if alpha is None:
            self.class_weight = None
        elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.class_weight = torch.tensor([_check_range("alpha", alpha, 0.0, math.inf)])
        else:
            weights = torch.as_tensor(alpha, dtype=torch.float64)
            if weights.dim() != 1 or weights.numel() == 0 or not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(f"alpha: got {alpha!r}; allowed: None, a float >= 0, or a sequence of C weights >= 0")
            self.class_weight = weights
        self.alpha = alpha

    def per_example(self, logits: Tensor, y: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        per_class = -_focal_weight(log_p.exp(), self.gamma, self.detach_focal_weight, DEFAULT_EPS) * log_p
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
        self.t1 = _check_range("t1", t1, 0.0, 2.0, high_open=True)
        self.t2 = _check_range("t2", t2, 1.0, math.inf)
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
        self.eps = _check_range("eps", eps, 0.0, 1.0, low_open=True, high_open=True)
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
        self.delta = _check_range("delta", delta, 0.0, math.inf, low_open=True)

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
        self.eps = _check_range("eps", eps, 0.0, 1.0, low_open=True, high_open=True)

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
        quantile = _check_range("quantile", quantile, 0.0, 1.0, low_open=True)
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
    "REDUCTIONS",
    "BaikalLoss",
    "BiTemperedLogisticLoss",
    "CrossEntropy",
    "FocalLoss",
    "ForwardCorrectedCrossEntropy",
    "GeneralizedCrossEntropy",
    "HardBootstrap",
    "HuberProbabilityLoss",
    "LabelSmoothingCrossEntropy",
    "MeanAbsoluteError",
    "NCEandMAE",
    "NFLandMAE",
    "RobustLoss",
    "SoftBootstrap",
    "SymmetricCrossEntropy",
    "estimate_transition_matrix",
    "exp_t",
    "log_t",
    "normalized_cross_entropy",
    "normalized_focal_loss",
    "reduce_loss",
    "reverse_cross_entropy",
    "target_distribution",
    "tempered_normalization",
    "tempered_softmax",
]
