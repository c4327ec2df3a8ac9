"""The 2-D quadratic task family of MetaMD's synthetic experiment (thesis section 5.6.1, Fig 5.1/5.2).

A task is ``min_θ f(θ) = θᵀQθ − bᵀθ`` with ``Q = C Cᵀ`` for a random lower-triangular 2×2 ``C`` and
``b ~ N([1, 1], I)``. So ``∇f(θ) = 2Qθ − b``, the minimiser is ``θ* = (2Q)⁻¹ b`` and the minimum
``f* = −¼ bᵀ Q⁻¹ b``. The entries of ``C`` are Gaussian, ``C₀₀ ~ N(3, 0.3)``, ``C₁₀ ~ N(0, 0.1)``,
``C₁₁ ~ N(0.3, 0.03)`` by default (the planning probe of THESIS-NOTES): the Hessian 2Q has eigenvalues
near 18 and 0.18, a condition number of about 100, which is what makes plain SGD slow. A flatter
family (Fig 5.2) is the same with a smaller ``C₁₁``.

Every optimiser starts every task at the same point (``start``, default the origin) and is stopped at
the first iterate whose gradient norm is below ``tol``: :func:`iterations_to_threshold` counts the
updates needed, for many tasks and many learning rates at once (numpy, float64). Meta-train and
held-out problems come from disjoint seed streams of one family (:func:`split`); learning rates of
the hand-designed baselines are tuned on the meta-train problems (:func:`tune_lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor

from metaopt_core.config import StrictModel

OPTIMIZERS = ("sgd", "sgd-m", "adam", "rmsprop", "metamd")
NOT_CONVERGED = -1  # iteration count of a run that did not reach the threshold (or blew up)


class QuadraticFamily(StrictModel):
    """A family of 2-D quadratic problems and the convergence test applied to them.

    ``c00``, ``c10``, ``c11``: (mean, std) of the entries of the lower-triangular C (Q = C Cᵀ);
    ``b_mean``, ``b_std``: b ~ N(b_mean, b_std² I). ``meta_train`` / ``held_out``: sizes of the two
    disjoint problem sets drawn with ``seed``. ``tol``: gradient-norm threshold; ``max_iters``: where a
    run that has not reached it is cut off.
    """

    c00: tuple[float, float] = (3.0, 0.3)
    c10: tuple[float, float] = (0.0, 0.1)
    c11: tuple[float, float] = (0.3, 0.03)
    b_mean: tuple[float, float] = (1.0, 1.0)
    b_std: float = Field(1.0, ge=0.0)
    start: tuple[float, float] = (0.0, 0.0)
    meta_train: int = Field(100, ge=1)
    held_out: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    tol: float = Field(1e-3, gt=0.0)
    max_iters: int = Field(20000, ge=1)

    @field_validator("c00", "c10", "c11")
    @classmethod
    def _std_non_negative(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] < 0:
            raise ValueError(f"(mean, std): got std {value[1]}; allowed: std >= 0")
        return value


@dataclass
class QuadraticProblems:
    """A batch of n problems f_i(θ) = θᵀQ_iθ − b_iᵀθ: ``Q`` (n, 2, 2) and ``b`` (n, 2), float64."""

    Q: Tensor
    b: Tensor
    start: Tensor  # (2,): the common starting point θ_1

    def __post_init__(self) -> None:
        if self.Q.dim() != 3 or self.Q.shape[1:] != (2, 2) or self.b.shape != (self.Q.shape[0], 2):
            raise ValueError(f"Q, b: got shapes {tuple(self.Q.shape)}, {tuple(self.b.shape)}; allowed: (n, 2, 2), (n, 2)")

    def __len__(self) -> int:
        return int(self.Q.shape[0])

    def subset(self, index: Sequence[int] | Tensor) -> QuadraticProblems:
        index = torch.as_tensor(index, dtype=torch.long)
        return QuadraticProblems(self.Q[index], self.b[index], self.start)

    def loss(self, theta: Tensor) -> Tensor:
        """f_i(θ_i) for θ of shape (n, 2) (or (2,) broadcast to every problem): shape (n,)."""
        theta = theta.expand(len(self), 2) if theta.dim() == 1 else theta
        return torch.einsum("ni,nij,nj->n", theta, self.Q.to(theta.dtype), theta) - (self.b.to(theta.dtype) * theta).sum(-1)

    def grad(self, theta: Tensor) -> Tensor:
        """∇f_i(θ_i) = 2 Q_i θ_i − b_i: shape (n, 2)."""
        theta = theta.expand(len(self), 2) if theta.dim() == 1 else theta
        return 2.0 * torch.einsum("nij,nj->ni", self.Q.to(theta.dtype), theta) - self.b.to(theta.dtype)

    def optimum(self) -> Tensor:
        """θ*_i = (2Q_i)⁻¹ b_i: shape (n, 2)."""
        return torch.linalg.solve(2.0 * self.Q, self.b)

    def optimal_value(self) -> Tensor:
        """f*_i = −¼ b_iᵀ Q_i⁻¹ b_i: shape (n,)."""
        return -0.25 * (self.b * torch.linalg.solve(self.Q, self.b)).sum(-1)

    def hessian_eigenvalues(self) -> Tensor:
        """Eigenvalues of the Hessians 2Q_i, ascending: shape (n, 2)."""
        return torch.linalg.eigvalsh(2.0 * self.Q)


def sample_problems(family: QuadraticFamily, count: int, seed: int) -> QuadraticProblems:
    """``count`` problems of ``family`` drawn with ``seed`` (float64)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: got {count!r}; allowed: an int >= 1")
    rng = np.random.default_rng(seed)
    C = np.zeros((count, 2, 2))
    C[:, 0, 0] = rng.normal(family.c00[0], family.c00[1], count)
    C[:, 1, 0] = rng.normal(family.c10[0], family.c10[1], count)
    C[:, 1, 1] = rng.normal(family.c11[0], family.c11[1], count)
    b = rng.normal(np.asarray(family.b_mean), family.b_std, (count, 2))
    Q = C @ C.transpose(0, 2, 1)
    return QuadraticProblems(torch.from_numpy(Q), torch.from_numpy(b), torch.tensor(family.start, dtype=torch.float64))


def split(family: QuadraticFamily) -> tuple[QuadraticProblems, QuadraticProblems]:
    """(meta-train problems, held-out problems): two disjoint seed streams of ``family.seed``."""
    train_seed, held_out_seed = np.random.SeedSequence([family.seed, 0x51AD]).generate_state(2)
    return sample_problems(family, family.meta_train, int(train_seed)), sample_problems(family, family.held_out, int(held_out_seed))


# ============================================================================= iterations to threshold


def iterations_to_threshold(
    problems: QuadraticProblems,
    optimizer: Literal["sgd", "sgd-m", "adam", "rmsprop", "metamd"],
    lrs: float | Sequence[float],
    *,
    tol: float = 1e-3,
    max_iters: int = 20000,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    alpha: float = 0.99,
    eps: float = 1e-8,
    metric: Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """Updates each optimiser run needs before ‖∇f(θ_t)‖ < ``tol``; ``NOT_CONVERGED`` (-1) if it never
    gets there within ``max_iters`` updates (or blows up).

    Args:
        problems: the n problems; every run starts at ``problems.start``.
        optimizer: ``sgd`` (θ −= lr g), ``sgd-m`` (heavy ball, PyTorch's convention, ``momentum``),
            ``adam`` (``betas``, ``eps``, PyTorch's arithmetic), ``rmsprop`` (smoothing ``alpha``),
            ``metamd`` (θ −= lr M⁻¹ g for the 2×2 ``metric`` M, thesis App C.1).
        lrs: one learning rate or several (evaluated together).

    Returns:
        int array of shape (len(lrs), n) (or (n,) for a single float ``lrs``).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: got {optimizer!r}; allowed: {list(OPTIMIZERS)}")
    single = isinstance(lrs, (int, float))
    lr = np.atleast_1d(np.asarray(lrs, dtype=np.float64))
    if lr.ndim != 1 or not np.all(np.isfinite(lr)) or np.any(lr <= 0):
        raise ValueError(f"lrs: got {lrs!r}; allowed: finite numbers > 0")
    if optimizer == "metamd":
        if metric is None:
            raise ValueError("metric: the 'metamd' optimiser needs the 2x2 matrix M of its divergence")
        M = np.asarray(metric.detach().cpu().double() if isinstance(metric, Tensor) else metric, dtype=np.float64)
        if M.shape != (2, 2):
            raise ValueError(f"metric: got shape {M.shape}; allowed: (2, 2)")
        M_inv = np.linalg.inv(M)
    Q = problems.Q.numpy()
    q00, q01, q11 = 2.0 * Q[:, 0, 0], 2.0 * Q[:, 0, 1], 2.0 * Q[:, 1, 1]  # the Hessian 2Q, symmetric
    b0, b1 = problems.b.numpy()[:, 0], problems.b.numpy()[:, 1]
    n, k = len(problems), len(lr)
    start = problems.start.numpy()
    # two coordinates as separate (k, n) arrays: a 2-vector per run makes einsum/matmul pure overhead
    x0, x1 = np.full((k, n), start[0]), np.full((k, n), start[1])
    lr_ = lr[:, None]
    m0, m1, v0, v1 = (np.zeros((k, n)) for _ in range(4))
    if optimizer == "metamd":
        a00, a01, a10, a11 = M_inv[0, 0], M_inv[0, 1], M_inv[1, 0], M_inv[1, 1]
    result = np.full((k, n), NOT_CONVERGED, dtype=np.int64)
    active = np.ones((k, n), dtype=bool)
    tol_sq = tol * tol
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(max_iters + 1):
            g0 = q00 * x0 + q01 * x1 - b0
            g1 = q01 * x0 + q11 * x1 - b1
            norm_sq = g0 * g0 + g1 * g1
            done = active & (norm_sq < tol_sq)
            result[done] = t
            # a run that reached the threshold or blew up is finished
            active &= ~done & (norm_sq < 1e30)
            if t == max_iters or not active.any():
                break
            if optimizer == "sgd":
                d0, d1 = g0, g1
            elif optimizer == "sgd-m":
                m0, m1 = (g0, g1) if t == 0 else (momentum * m0 + g0, momentum * m1 + g1)
                d0, d1 = m0, m1
            elif optimizer == "adam":
                step = t + 1
                m0 = betas[0] * m0 + (1 - betas[0]) * g0
                m1 = betas[0] * m1 + (1 - betas[0]) * g1
                v0 = betas[1] * v0 + (1 - betas[1]) * g0 * g0
                v1 = betas[1] * v1 + (1 - betas[1]) * g1 * g1
                c1, c2 = 1 - betas[0] ** step, math.sqrt(1 - betas[1] ** step)
                d0 = (m0 / c1) / (np.sqrt(v0) / c2 + eps)
                d1 = (m1 / c1) / (np.sqrt(v1) / c2 + eps)
            elif optimizer == "rmsprop":
                v0 = alpha * v0 + (1 - alpha) * g0 * g0
                v1 = alpha * v1 + (1 - alpha) * g1 * g1
                d0, d1 = g0 / (np.sqrt(v0) + eps), g1 / (np.sqrt(v1) + eps)
            else:  # metamd: M^{-1} g
                d0, d1 = a00 * g0 + a01 * g1, a10 * g0 + a11 * g1
            # finished runs stay where they are (keeps blown-up runs from overflowing further)
            x0 = np.where(active, x0 - lr_ * d0, x0)
            x1 = np.where(active, x1 - lr_ * d1, x1)
    return result[0] if single else result


def summarise(iterations: np.ndarray, max_iters: int) -> dict[str, float]:
    """Median and mean iterations (a run that did not converge counts as ``max_iters``) and the
    fraction of runs that converged, over the last axis."""
    counted = np.where(iterations == NOT_CONVERGED, max_iters, iterations)
    return {
        "median": float(np.median(counted)),
        "mean": float(np.mean(counted)),
        "converged": float(np.mean(iterations != NOT_CONVERGED)),
    }


def default_lr_grid(optimizer: str) -> np.ndarray:
    """Log-spaced learning rates, 8 per decade, 1e-4 … 10^0.5 (the same grid for every optimiser)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: got {optimizer!r}; allowed: {list(OPTIMIZERS)}")
    return np.logspace(-4, 0.5, 37)


def tune_lr(
    problems: QuadraticProblems,
    optimizer: str,
    lrs: Sequence[float] | None = None,
    *,
    tol: float = 1e-3,
    max_iters: int = 20000,
    criterion: Literal["mean", "median"] = "mean",
    **options,
) -> tuple[float, dict[float, dict[str, float]]]:
    """The learning rate with the fewest iterations to threshold on ``problems`` (mean by default,
    a non-converged run counting as ``max_iters``) and the whole table {lr: summary}."""
    if criterion not in ("mean", "median"):
        raise ValueError(f"criterion: got {criterion!r}; allowed: ['mean', 'median']")
    grid = np.asarray(default_lr_grid(optimizer) if lrs is None else lrs, dtype=np.float64)
    counts = iterations_to_threshold(problems, optimizer, list(grid), tol=tol, max_iters=max_iters, **options)
    table = {float(lr): summarise(row, max_iters) for lr, row in zip(grid, counts)}
    best = min(table, key=lambda lr: (table[lr][criterion], table[lr]["mean"], lr))
    return best, table


def trajectory(
    problems: QuadraticProblems,
    index: int,
    optimizer: str,
    lr: float,
    *,
    steps: int,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    metric: Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """The iterates θ_0 … θ_steps of one optimiser on problem ``index`` (for plots): (steps + 1, 2)."""
    one = problems.subset([index])
    Q, b = one.Q.numpy()[0], one.b.numpy()[0]
    theta = one.start.numpy().copy()
    buf, sq = np.zeros(2), np.zeros(2)
    M_inv = np.linalg.inv(np.asarray(metric.detach().double() if isinstance(metric, Tensor) else metric)) if optimizer == "metamd" else None
    points = [theta.copy()]
    for t in range(steps):
        g = 2.0 * Q @ theta - b
        if optimizer == "sgd":
            theta = theta - lr * g
        elif optimizer == "sgd-m":
            buf = g if t == 0 else momentum * buf + g
            theta = theta - lr * buf
        elif optimizer == "adam":
            buf = betas[0] * buf + (1 - betas[0]) * g
            sq = betas[1] * sq + (1 - betas[1]) * g * g
            theta = theta - (lr / (1 - betas[0] ** (t + 1))) * buf / (np.sqrt(sq) / math.sqrt(1 - betas[1] ** (t + 1)) + eps)
        elif optimizer == "metamd":
            theta = theta - lr * (M_inv @ g)
        else:
            raise ValueError(f"optimizer: got {optimizer!r}; allowed: ['sgd', 'sgd-m', 'adam', 'metamd']")
        points.append(theta.copy())
    return np.stack(points)


__all__ = [
    "NOT_CONVERGED",
    "OPTIMIZERS",
    "QuadraticFamily",
    "QuadraticProblems",
    "default_lr_grid",
    "iterations_to_threshold",
    "sample_problems",
    "split",
    "summarise",
    "trajectory",
    "tune_lr",
]
