"""Hypergradients on network tasks (a base model trained on one domain): forward mode and unrolled
reverse mode through the T mirror-descent steps, the implicit eq 5.28 at the trained θ_T, and plain
training with :class:`~metaopt_core.optim.MirrorDescent` (also the held-out evaluation's inner run)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from metaopt_core.config import ConfigError
from metaopt_core.hypergrad import HypergradResult, forward_mode_hypergradient, unrolled_hypergradient
from metaopt_core.meta.metamd.config import MetaMDConfig
from metaopt_core.meta.metamd.divergence import flatten_grads, implicit_bregman_hypergradient
from metaopt_core.meta.metamd.tasks import NetworkTask
from metaopt_core.optim import Divergence, MirrorDescent


def _network_closures(config: MetaMDConfig, concrete: NetworkTask):
    """(cross-entropy of params on an index batch, the inner step's loss at step t with decay)."""
    model, names = concrete.model, concrete.names
    wd = config.inner.weight_decay

    def data_loss(params: Sequence[Tensor], index: Tensor) -> Tensor:
        logits = functional_call(model, dict(zip(names, params)), (concrete.x[index],))
        return F.cross_entropy(logits, concrete.y[index])

    def step_loss(params: list[Tensor], t: int) -> Tensor:
        value = data_loss(params, concrete.batches[t])
        if wd:
            value = value + 0.5 * wd * sum((p**2).sum() for p in params)
        return value

    return data_loss, step_loss


def _primal(value: Tensor) -> Tensor:
    """The value of a (possibly forward-mode dual) tensor."""
    return fwAD.unpack_dual(value).primal.detach()


def network_hypergradient(config: MetaMDConfig, div: Divergence, concrete: NetworkTask, method: str) -> tuple[Tensor, float, dict]:
    """The hypergradient of one network task's term of the meta-objective (ω-only terms excluded).
    Returns (flat gradient on CPU, value, metrics)."""
    steps, eta = config.inner.steps, config.inner.lr
    data_loss, step_loss = _network_closures(config, concrete)
    meta = list(div.parameters())
    precondition = lambda grads, t: div.precondition(grads)  # noqa: E731
    trajectory_terms: list[float] = []
    metrics: dict[str, Any] = {}
    start = concrete.init
    if method in ("forward", "unrolled"):
        if config.objective.kind == "trajectory":

            def trajectory_loss(params: list[Tensor], t: int) -> Tensor:
                value = data_loss(params, concrete.batches[t])
                trajectory_terms.append(float(_primal(value)))
                return value / steps

            outer_loss = None
        else:
            trajectory_loss = None
            final: list[float] = []

            def outer_loss(params: list[Tensor]) -> Tensor:
                value = div.bregman(params, start)
                final.append(float(_primal(value)))
                return value

        if method == "forward":
            count = sum(p.numel() for p in meta)
            if count > config.hypergrad.max_forward_scalars:
                raise ConfigError(
                    f"hypergrad.method: 'forward' runs the inner loop once per scalar of ω; this divergence has {count} "
                    f"(hypergrad.max_forward_scalars = {config.hypergrad.max_forward_scalars}); use 'unrolled' or 'implicit'"
                )
            grads = forward_mode_hypergradient(start, step_loss, outer_loss, meta, steps=steps, lr=eta,
                                               precondition=precondition, trajectory_loss=trajectory_loss)  # fmt: skip
        else:
            grads = unrolled_hypergradient(start, step_loss, outer_loss, meta, steps=steps, lr=eta,
                                           precondition=precondition, trajectory_loss=trajectory_loss)  # fmt: skip
        if config.objective.kind == "trajectory":
            terms = trajectory_terms[:steps]  # forward mode evaluates the trajectory once per scalar
            value = float(sum(terms) / steps)
            metrics.update(first_loss=terms[0], final_loss=terms[-1])
        else:
            value = final[0]
        return flatten_grads(grads).cpu(), value, metrics
    if method != "implicit":
        raise ValueError(f"method: got {method!r}; allowed: ['forward', 'unrolled', 'implicit']")
    result, metrics, theta_T, losses = network_implicit(config, div, concrete)
    with torch.no_grad():
        value = float(div.bregman(theta_T, start))
    metrics.update(first_loss=losses[0], final_loss=losses[-1])
    return flatten_grads(result.grads).cpu(), value, metrics


def network_implicit(config: MetaMDConfig, div: Divergence, concrete: NetworkTask) -> tuple[HypergradResult, dict[str, Any], list[Tensor], list[float]]:
    """Train with MirrorDescent for T steps, then eq 5.28 at θ_T with L_tr = the task's cross-entropy on
    its check subset (+ the decay term SGD-with-decay minimises). Returns (HypergradResult, metrics,
    θ_T, losses along the run)."""
    theta_T, losses = train_with_mirror_descent(config, div, concrete)
    params = [t.clone().requires_grad_(True) for t in theta_T]
    data_loss, _ = _network_closures(config, concrete)
    wd = config.inner.weight_decay

    def train_loss() -> Tensor:
        value = data_loss(params, concrete.check)
        if wd:
            value = value + 0.5 * wd * sum((p**2).sum() for p in params)
        return value

    result, metrics = implicit_bregman_hypergradient(config, div, params, concrete.init, train_loss)
    return result, metrics, theta_T, losses


def train_with_mirror_descent(config: MetaMDConfig, div: Divergence, concrete: NetworkTask, steps: int | None = None) -> tuple[list[Tensor], list[float]]:
    """Train the task's base model from its init with :class:`MirrorDescent` (η, wd of the config)
    for T steps on its minibatch stream; returns (θ_T, [L(θ_t; batch_t) for t = 1..T])."""
    steps = config.inner.steps if steps is None else steps
    model = concrete.model
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), concrete.init):
            p.copy_(p0)
    optimizer = MirrorDescent(model.parameters(), div, lr=config.inner.lr, weight_decay=config.inner.weight_decay)
    losses: list[float] = []
    for t in range(steps):
        index = concrete.batches[t]
        loss = F.cross_entropy(model(concrete.x[index]), concrete.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            next_index = concrete.batches[t + 1] if t + 1 < len(concrete.batches) else index
            losses.append(float(F.cross_entropy(model(concrete.x[next_index]), concrete.y[next_index])))
    return [p.detach().clone() for p in model.parameters()], losses


__all__ = ["network_hypergradient", "network_implicit", "train_with_mirror_descent"]
