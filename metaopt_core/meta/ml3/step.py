"""One ML3 outer step: the step's tasks, one hypergradient per task by differentiating through the
unrolled inner SGD steps, and the update of ω.

For a task (a fresh base model from its seed, a minibatch stream from its seed), with the current
loss L_ω::

    θ_0 = init;  θ_{t+1} = θ_t − η ∇_θ L_ω(f_θt(x_t), y_t)      t = 0 … T−1 (SGD, optional momentum)
    M(ω) = CE(f_θT(x_val), y_val)                              the task loss of the updated model
    dM/dω by reverse-mode differentiation through the T steps (hypergrad.unrolled_hypergradient)

The step's hypergradients are averaged (diverged tasks left out), clipped to ``outer.clip_norm``
and taken by the outer optimiser (Adam or SGD on ω, functional: its state is checkpointed).

Which data each number uses: the inner steps read the meta-train part's *train* split, the outer
objective a seeded minibatch of its *val* split; the meta-test reads neither (another part).
Besides M, each task reports what the same T steps of plain cross-entropy reach on the same
minibatches (``outer_ce_with_ce``): the learned loss's advantage over CE within the horizon.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from metaopt_core.data.sources import ImageData
from metaopt_core.hypergrad import unrolled_hypergradient
from metaopt_core.meta.ml3.config import ML3Config
from metaopt_core.meta.ml3.state import Hypergradient, ML3State, omega_digest
from metaopt_core.meta.outer import nanmean, optimizer_step
from metaopt_core.models import build_model
from metaopt_core.train import minibatches

# the per-step numbers of a history row (what the tracker logs)
SCALAR_METRICS = ("outer_ce", "outer_ce_with_ce", "advantage_over_ce", "outer_ce_start", "outer_acc", "hypergrad_norm", "clipped",
                  "diverged", "seconds")  # fmt: skip


def jobs_for_step(config: ML3Config, step: int) -> list[dict]:
    """The tasks of outer step ``step``: a function of (seed, step) only, so any shard rebuilds them."""
    out = []
    for slot in range(config.outer.tasks_per_step):
        init_seed, data_seed = np.random.SeedSequence([config.seed, step, slot, 0x3113]).generate_state(2)
        out.append({"slot": slot, "init_seed": int(init_seed), "data_seed": int(data_seed)})
    return out


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """``steps`` minibatches from seeded epoch permutations."""
    out: list[Tensor] = []
    while len(out) < steps:
        out += list(minibatches(count, batch_size, generator))
    return out[:steps]


def hypergradient(config: ML3Config, omega: Tensor, job: dict, train: ImageData, val: ImageData, step: int) -> Hypergradient:
    """The hypergradient of one task (see the module docstring) at ω, with its metrics."""
    started = time.perf_counter()
    device = torch.device(config.device)
    family = config.family()
    channels, height, _ = train.shape
    model = build_model(config.inner.model, channels, height, train.num_classes, seed=job["init_seed"], **config.inner.model_options).to(device)
    names = [name for name, _ in model.named_parameters()]
    init = [p.detach().clone() for p in model.parameters()]
    buffers = dict(model.named_buffers())
    generator = torch.Generator().manual_seed(job["data_seed"])
    batches = [b.to(device) for b in _batches(len(train), config.inner.batch_size, config.inner.steps, generator)]
    held = torch.randperm(len(val), generator=generator)[: config.outer.batch_size].to(device)
    x, y = train.x.to(device), train.y.to(device)
    x_val, y_val = val.x.to(device)[held], val.y.to(device)[held]
    omega_t = omega.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)

    def logits(params: Sequence[Tensor], inputs: Tensor) -> Tensor:
        return functional_call(model, ({**dict(zip(names, params)), **buffers}), (inputs,))

    def outer_ce(params: Sequence[Tensor]) -> Tensor:
        return F.cross_entropy(logits(params, x_val), y_val)

    seen: dict[str, float] = {}

    def outer_loss(params: list[Tensor]) -> Tensor:
        value = outer_ce(params)
        with torch.no_grad():
            seen["outer_ce"] = float(value)
            seen["outer_acc"] = float((logits(params, x_val).argmax(-1) == y_val).float().mean())
        return value

    (grad,) = unrolled_hypergradient(
        init, lambda params, t: family.functional(omega_t, logits(params, x[batches[t]]), y[batches[t]]), outer_loss, [omega_t],
        steps=config.inner.steps, lr=config.inner.lr, momentum=config.inner.momentum,
    )  # fmt: skip
    with torch.no_grad():
        start = float(outer_ce(init))
    with_ce = _outer_ce_after_ce_training(init, logits, outer_ce, x, y, batches, config)
    grad = grad.detach().cpu()
    diverged = not (torch.isfinite(grad).all() and math.isfinite(seen.get("outer_ce", math.nan)))
    metrics = {"outer_ce": seen.get("outer_ce", math.nan), "outer_acc": seen.get("outer_acc", math.nan), "outer_ce_start": start,
               "outer_ce_with_ce": with_ce, "seconds": time.perf_counter() - started}  # fmt: skip
    values = [0.0] * grad.numel() if diverged else [float(v) for v in grad]
    return Hypergradient(step, int(job["slot"]), omega_digest(omega), values, bool(diverged), metrics)


def _outer_ce_after_ce_training(init, logits, outer_ce, x, y, batches, config: ML3Config) -> float:
    """The outer objective after the same T steps with plain cross-entropy (the reference)."""
    params = [p.clone().requires_grad_(True) for p in init]
    buffers_of_momentum: list[Tensor] | None = None
    for index in batches:
        grads = torch.autograd.grad(F.cross_entropy(logits(params, x[index]), y[index]), params)
        with torch.no_grad():
            if config.inner.momentum:
                buffers_of_momentum = (
                    list(grads) if buffers_of_momentum is None else [config.inner.momentum * b + g for b, g in zip(buffers_of_momentum, grads)]
                )
                grads = buffers_of_momentum
            params = [(p - config.inner.lr * g).requires_grad_(True) for p, g in zip(params, grads)]
    with torch.no_grad():
        return float(outer_ce(params))


def outer_update(state: ML3State, grads: Sequence[Hypergradient]) -> ML3State:
    """Average the step's hypergradients (diverged ones left out), clip, take the outer optimiser's
    step on ω; a new state with the step's history row. Every task of the step must be there once,
    computed at this state's ω."""
    config = state.ml3_config
    slots = sorted(g.slot for g in grads)
    if slots != list(range(config.outer.tasks_per_step)):
        raise ValueError(f"outer_update: got tasks {slots}; step {state.step} needs exactly one of each of 0..{config.outer.tasks_per_step - 1}")
    digest = omega_digest(state.omega)
    if any(g.step != state.step or g.omega_sha256 != digest for g in grads):
        raise ValueError(f"outer_update: hypergradients from step {sorted({g.step for g in grads})} or another ω; the state is at step {state.step}")
    kept = [g for g in grads if not g.diverged]
    if not kept:
        raise RuntimeError(f"outer_update: every task diverged at step {state.step} (lower inner.lr or outer.lr)")
    mean = torch.tensor([g.grad for g in kept], dtype=torch.float32).mean(0)
    norm = float(mean.norm())
    clipped = config.outer.clip_norm is not None and norm > config.outer.clip_norm
    if clipped:
        mean = mean * (config.outer.clip_norm / norm)
    omega, optimizer = optimizer_step(state.omega, mean, state.optimizer, state.step + 1, config.outer)

    def average(key: str) -> float:
        return nanmean([g.metrics[key] for g in kept])

    row: dict[str, Any] = {"step": state.step + 1, **{key: average(key) for key in ("outer_ce", "outer_ce_with_ce", "outer_ce_start", "outer_acc")},
                           "hypergrad_norm": norm, "clipped": int(clipped), "diverged": len(grads) - len(kept),
                           "seconds": sum(g.metrics["seconds"] for g in grads)}  # fmt: skip
    row["advantage_over_ce"] = row["outer_ce_with_ce"] - row["outer_ce"]
    return ML3State(state.config, omega, optimizer, state.step + 1, [*state.history, row])


__all__ = ["SCALAR_METRICS", "hypergradient", "jobs_for_step", "outer_update"]
