"""Exact hypergradients of a finite inner optimisation, by reverse or forward mode.

The inner problem is T steps of (heavy-ball) SGD in functional form, PyTorch's convention:

    g_t = D(∂L_t/∂θ(θ_t)),  b_{t+1} = μ b_t + g_t (b_0 = 0),  θ_{t+1} = θ_t − η b_{t+1}

where D is an optional ``precondition`` map (identity by default; MetaMD's M⁻¹, which may depend
on ω). The meta-objective is F(ω) = M(θ_T) + Σ_{t=1..T} R(θ_t, t) with M = ``outer_loss`` and the
optional per-iterate R = ``trajectory_loss``. Both functions return dF/dω exactly (up to
floating point) for that finite T; they differ only in how:

* :func:`unrolled_hypergradient` — reverse mode (RMD): records all T steps with
  ``create_graph=True`` and back-propagates once. Cost ≈ 3× training, memory O(T).
* :func:`forward_mode_hypergradient` — forward mode (FMD, Franceschi et al. 2017; thesis eq C.17):
  propagates the tangent dθ_t/dω_k alongside the iterate with ``torch.autograd.forward_ad``
  (forward-over-reverse), one pass per scalar meta-parameter. Memory O(1) in T, cost
  ∝ number of meta-parameter scalars: meant for tiny meta-models and for validation.

The initial parameters are constants with respect to ω in both (they are detached).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .implicit import _check_tensor_list, _scalar_loss, _zeros_if_none

__all__ = ["unrolled_hypergradient", "forward_mode_hypergradient"]

InnerStepLoss = Callable[[list[Tensor], int], Tensor]
OuterLoss = Callable[[list[Tensor]], Tensor]
TrajectoryLoss = Callable[[list[Tensor], int], Tensor]
Precondition = Callable[[list[Tensor], int], Sequence[Tensor]]


def _check_schedule(steps: int, lr: float, momentum: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")


def _sgd_step(
    params: list[Tensor],
    buffers: list[Tensor] | None,
    step: int,
    inner_step_loss: InnerStepLoss,
    lr: float,
    momentum: float,
    precondition: Precondition | None,
    create_graph: bool,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """One functional (momentum) SGD step; returns new params and new momentum buffers."""
    loss = _scalar_loss("inner_step_loss", inner_step_loss(params, step))
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    else:
        grads = (None,) * len(params)
    directions = _zeros_if_none(grads, params)
    if precondition is not None:
        directions = list(precondition(directions, step))
        if len(directions) != len(params) or any(d.shape != p.shape for d, p in zip(directions, params)):
            raise ValueError(
                "precondition must return one tensor per parameter with the parameter's shape; got "
                f"shapes {[tuple(d.shape) for d in directions]} for params {[tuple(p.shape) for p in params]}"
            )
    if momentum:
        buffers = directions if buffers is None else [momentum * b + d for b, d in zip(buffers, directions)]
        directions = buffers
    return [p - lr * d for p, d in zip(params, directions)], buffers


def _objective(outer_loss: OuterLoss | None, params: list[Tensor], trajectory_total: Tensor | None) -> Tensor:
    total = trajectory_total
    if outer_loss is not None:
        outer = _scalar_loss("outer_loss", outer_loss(params))
        total = outer if total is None else total + outer
    assert total is not None  # guaranteed by the argument checks
    return total


def _initial(init_params: Sequence[Tensor]) -> list[Tensor]:
    init = _check_tensor_list("init_params", init_params, need_grad=False)
    return [p.detach().clone() for p in init]


def unrolled_hypergradient(
    init_params: Sequence[Tensor],
    inner_step_loss: InnerStepLoss,
    outer_loss: OuterLoss | None,
    meta_params: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    precondition: Precondition | None = None,
    trajectory_loss: TrajectoryLoss | None = None,
) -> tuple[Tensor, ...]:
    """Exact dF/dω by reverse-mode differentiation through ``steps`` steps of (momentum) SGD.

    Args:
        init_params: θ_0 (treated as constants w.r.t. ω; copied, never modified).
        inner_step_loss: ``(params, t) -> L_t``: the inner loss at step t (t = 0..steps-1) for the
            given parameter list; ω enters through the closure. Use t to pick a mini-batch.
        outer_loss: ``params -> M(θ_T)``, evaluated at the last iterate (may use ω: direct term).
            May be None when ``trajectory_loss`` is given.
        meta_params: ω (requires_grad).
        steps: T, the number of inner steps.
        lr: inner learning rate η.
        momentum: heavy-ball μ in [0, 1) (PyTorch SGD convention, no dampening).
        precondition: optional ``(grads, t) -> directions`` applied to the gradient before the
            momentum/lr step (e.g. MetaMD's M⁻¹∇L, differentiable in ω).
        trajectory_loss: optional ``(params, t) -> R_t`` added for every iterate θ_t, t = 1..T
            (e.g. the mean-loss-along-the-trajectory objective).

    Returns:
        dF/dω, one tensor per meta-parameter (zeros where F does not depend on it), detached.

    Memory grows linearly with ``steps`` (the whole trajectory's graph is kept).
    """
    _check_schedule(steps, lr, momentum)
    meta_params = _check_tensor_list("meta_params", meta_params, need_grad=True)
    if outer_loss is None and trajectory_loss is None:
        raise ValueError("outer_loss may be None only when trajectory_loss is given")
    params = [p.requires_grad_(True) for p in _initial(init_params)]
    buffers: list[Tensor] | None = None
    trajectory_total: Tensor | None = None
    for t in range(steps):
        params, buffers = _sgd_step(params, buffers, t, inner_step_loss, lr, momentum, precondition, True)
        if trajectory_loss is not None:
            r = _scalar_loss("trajectory_loss", trajectory_loss(params, t + 1))
            trajectory_total = r if trajectory_total is None else trajectory_total + r
    objective = _objective(outer_loss, params, trajectory_total)
    if not objective.requires_grad:
        return tuple(torch.zeros_like(m) for m in meta_params)
    grads = torch.autograd.grad(objective, meta_params, allow_unused=True)
    return tuple(g.detach() for g in _zeros_if_none(grads, meta_params))


def forward_mode_hypergradient(
    init_params: Sequence[Tensor],
    inner_step_loss: InnerStepLoss,
    outer_loss: OuterLoss | None,
    meta_params: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    precondition: Precondition | None = None,
    trajectory_loss: TrajectoryLoss | None = None,
) -> tuple[Tensor, ...]:
    """The same dF/dω as :func:`unrolled_hypergradient`, by forward-mode differentiation.

    For every scalar ω_k, the tangents dθ_t/dω_k (and of the momentum buffer) are carried along
    the T steps with ``torch.autograd.forward_ad`` dual tensors; each step's gradient ∂L/∂θ is
    taken by reverse mode on detached iterates (forward-over-reverse), so nothing of earlier
    steps is kept: memory is flat in T, and the work is (#scalars in ω) inner runs.

    To reach the ω captured by the closures, each meta-parameter tensor is given its tangent in
    place (a value-preserving ``copy_`` under ``no_grad``); this bumps its autograd version
    counter, so do not call this between building a graph that saved ω and back-propagating it.
    Ops used by the losses need forward-mode AD formulas (standard torch ops have them).
    """
    _check_schedule(steps, lr, momentum)
    meta_params = _check_tensor_list("meta_params", meta_params, need_grad=True)
    if outer_loss is None and trajectory_loss is None:
        raise ValueError("outer_loss may be None only when trajectory_loss is given")
    init = _initial(init_params)
    originals = [m.detach().clone(memory_format=torch.contiguous_format) for m in meta_params]
    results = [torch.zeros_like(m, memory_format=torch.contiguous_format) for m in meta_params]
    try:
        with warnings.catch_warnings():
            # torch's first make_dual loads its JVP decompositions through torch.jit.script,
            # which warns about its own deprecation; that is torch-internal noise.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            for which, meta in enumerate(meta_params):
                for flat_index in range(meta.numel()):
                    results[which].view(-1)[flat_index] = _one_tangent_run(
                        init,
                        meta_params,
                        originals,
                        which,
                        flat_index,
                        inner_step_loss,
                        outer_loss,
                        trajectory_loss,
                        steps,
                        lr,
                        momentum,
                        precondition,
                    )
    finally:
        with torch.no_grad():  # leave ω bit-identical and tangent-free
            for meta, original in zip(meta_params, originals):
                meta.copy_(original)
    return tuple(results)


def _one_tangent_run(
    init: list[Tensor],
    meta_params: list[Tensor],
    originals: list[Tensor],
    which: int,
    flat_index: int,
    inner_step_loss: InnerStepLoss,
    outer_loss: OuterLoss | None,
    trajectory_loss: TrajectoryLoss | None,
    steps: int,
    lr: float,
    momentum: float,
    precondition: Precondition | None,
) -> float:
    """dF/dω_k for one scalar k = meta_params[which].view(-1)[flat_index]."""
    with fwAD.dual_level():
        with torch.no_grad():
            for i, (meta, original) in enumerate(zip(meta_params, originals)):
                tangent = torch.zeros_like(original)
                if i == which:
                    tangent.view(-1)[flat_index] = 1.0
                meta.copy_(fwAD.make_dual(original.clone(), tangent))

        def dual(primal: Tensor, tangent: Tensor, need_grad: bool) -> Tensor:
            return fwAD.make_dual(primal.detach().requires_grad_(need_grad), tangent)

        def split(tensors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
            out = []
            for t in tensors:
                unpacked = fwAD.unpack_dual(t)
                tangent = unpacked.tangent if unpacked.tangent is not None else torch.zeros_like(t)
                out.append((unpacked.primal.detach(), tangent.detach()))
            return out

        state = [(p, torch.zeros_like(p)) for p in init]
        buffer_state: list[tuple[Tensor, Tensor]] | None = None
        total = 0.0
        for t in range(steps):
            params = [dual(p, dp, True) for p, dp in state]
            buffers = None if buffer_state is None else [dual(b, db, False) for b, db in buffer_state]
            # create_graph=False: forward AD differentiates the backward pass itself, and the
            # reverse graph of this step is dropped right after.
            new_params, new_buffers = _sgd_step(params, buffers, t, inner_step_loss, lr, momentum, precondition, False)
            state = split(new_params)
            buffer_state = None if new_buffers is None else split(new_buffers)
            if trajectory_loss is not None:
                r = _scalar_loss("trajectory_loss", trajectory_loss([dual(p, dp, False) for p, dp in state], t + 1))
                total += _tangent_value(r)
        if outer_loss is not None:
            outer = _scalar_loss("outer_loss", outer_loss([dual(p, dp, False) for p, dp in state]))
            total += _tangent_value(outer)
    return total


def _tangent_value(value: Tensor) -> float:
    tangent = fwAD.unpack_dual(value).tangent
    return 0.0 if tangent is None else float(tangent.detach())
