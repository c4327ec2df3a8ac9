"""Gradient surgery: PCGrad (Yu et al. 2020), used by ITL to combine leave-one-domain-out
hypergradients (thesis Alg 7, line 15)."""

from __future__ import annotations

from typing import Sequence, overload

import torch
from torch import Tensor

__all__ = ["pcgrad"]


def _pcgrad_matrix(stacked: Tensor, order: list[list[int]]) -> Tensor:
    """PCGrad on an (m, n) matrix of task gradients, visiting others in ``order[i]`` for task i."""
    originals = stacked
    squared_norms = (originals * originals).sum(dim=1)
    projected = []
    for i in range(originals.shape[0]):
        g = originals[i].clone()
        for j in order[i]:
            if squared_norms[j] == 0:
                continue  # a zero gradient conflicts with nothing
            dot = torch.dot(g, originals[j])
            if dot < 0:
                # Project g_i (as modified so far) onto the normal plane of the ORIGINAL g_j.
                g = g - (dot / squared_norms[j]) * originals[j]
        projected.append(g)
    return torch.stack(projected).mean(dim=0)


def _visit_orders(m: int, seed: int | None, shuffle: bool) -> list[list[int]]:
    if not shuffle:
        return [[j for j in range(m) if j != i] for i in range(m)]
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    orders = []
    for i in range(m):
        permutation = torch.randperm(m, generator=generator).tolist()  # global RNG when seed is None
        orders.append([j for j in permutation if j != i])
    return orders


@overload
def pcgrad(grads: Tensor, *, seed: int | None = None, shuffle: bool = True) -> Tensor: ...
@overload
def pcgrad(grads: Sequence[Sequence[Tensor]], *, seed: int | None = None, shuffle: bool = True) -> tuple[Tensor, ...]: ...


def pcgrad(grads: Sequence[Sequence[Tensor]] | Tensor, *, seed: int | None = None, shuffle: bool = True) -> tuple[Tensor, ...] | Tensor:
    """Combine per-task gradients by PCGrad: remove pairwise conflicts, then average.

    For each task i, starting from g_i, for every other task j (in random order): if
    g_i · g_j < 0, g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j, always projecting against the original
    g_j. The result is the mean of the projected gradients; with no conflicts it is the plain
    mean.

    Args:
        grads: either a stacked (m, n) tensor (one row per task), or m per-task sequences of
            tensors with identical shapes across tasks (e.g. ``HypergradResult.grads`` of each
            held-out domain); the latter are flattened, combined and unflattened.
        seed: seed for the visiting order (deterministic given a seed); None draws from torch's
            global RNG.
        shuffle: False visits the other tasks in their natural order (0, 1, …).

    Returns:
        An (n,) tensor for stacked input, else a tuple of tensors shaped like one task's list.
    """
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")

    if isinstance(grads, Tensor):
        if grads.dim() != 2 or grads.shape[0] == 0:
            raise ValueError(f"grads as a tensor must be 2-D (tasks, n) with at least one task, got shape {tuple(grads.shape)}")
        if not grads.is_floating_point():
            raise TypeError(f"grads must have a floating dtype, got {grads.dtype}")
        return _pcgrad_matrix(grads.detach(), _visit_orders(grads.shape[0], seed, shuffle))

    tasks = [list(task) for task in grads]
    if not tasks:
        raise ValueError("grads must hold at least one task's gradients, got an empty sequence")
    reference = tasks[0]
    if not reference:
        raise ValueError("grads[0] is empty: each task needs at least one gradient tensor")
    for i, task in enumerate(tasks):
        if len(task) != len(reference):
            raise ValueError(f"grads[{i}] has {len(task)} tensors, grads[0] has {len(reference)}: every task needs one gradient per meta-parameter")
        for k, (t, r) in enumerate(zip(task, reference)):
            if not isinstance(t, Tensor):
                raise TypeError(f"grads[{i}][{k}] must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != r.shape:
                raise ValueError(f"grads[{i}][{k}] has shape {tuple(t.shape)}, grads[0][{k}] has {tuple(r.shape)}")
    stacked = torch.stack([torch.cat([t.detach().reshape(-1) for t in task]) for task in tasks])
    if not stacked.is_floating_point():
        raise TypeError(f"grads must have a floating dtype, got {stacked.dtype}")
    combined = _pcgrad_matrix(stacked, _visit_orders(len(tasks), seed, shuffle))
    pieces, offset = [], 0
    for r in reference:
        pieces.append(combined[offset : offset + r.numel()].reshape(r.shape))
        offset += r.numel()
    return tuple(pieces)
