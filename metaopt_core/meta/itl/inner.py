"""ITL's inner training: a fresh model per held-out domain, trained on the other domains with the
current loss ω until its gradient norm falls to ``inner.grad_tol`` or ``inner.max_epochs`` ran.

The jobs of one step share an architecture, so they train *batched* through the project's one
batched trainer, :func:`metaopt_core.population.train_batched` (``vmap`` over the models, each
with its own initial weights, data and minibatch stream), when the architecture has no running
statistics; otherwise, and as the reference the batched path is tested against, sequentially
(``nn.Module`` + ``torch.optim.SGD``). A batched chunk that does not fit in memory is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt_core.meta.itl.config import ITLConfig
from metaopt_core.meta.itl.domains import DomainSet, InnerJob
from metaopt_core.models import VMAP_FRIENDLY, build_model
from metaopt_core.population import train_batched

ProgressCallback = Callable[[dict], None]


@dataclass
class TrainedModel:
    """An inner model after training: its weights and how the training went."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    epochs: int
    steps: int
    converged: bool
    diverged: bool
    grad_norms: list[float]  # check-subset gradient norm after each epoch (when grad_tol > 0)


def build_inner_model(config: ITLConfig, data: DomainSet, job: InnerJob) -> nn.Module:
    channels, height, width = data.shape
    if height != width:
        raise ValueError(f"data: images must be square, got {height}x{width}")
    return build_model(config.inner.model, channels, height, data.num_classes, seed=job.init_seed, **config.inner.model_options)


def _epoch_order(job: InnerJob, generator: torch.Generator) -> Tensor:
    """This epoch's minibatch stream of one job: a permutation of its source indices."""
    return job.source[torch.randperm(len(job.source), generator=generator)]


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(labels, num_classes).to(dtype)


def train_job_sequential(
    config: ITLConfig, data: DomainSet, job: InnerJob, family, omega: Tensor, device: torch.device,
    progress: Callable[[dict], None] | None = None,
) -> TrainedModel:  # fmt: skip
    """Reference inner loop: an ``nn.Module`` and ``torch.optim.SGD`` (works for any architecture)."""
    inner = config.inner
    model = build_inner_model(config, data, job).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=inner.lr, momentum=inner.momentum, weight_decay=inner.weight_decay)
    omega = omega.detach().to(device)
    x_all, y_all = data.tensors_on(device)
    generator = torch.Generator().manual_seed(job.data_seed)
    epochs = steps = 0
    converged = diverged = False
    norms: list[float] = []
    for epoch in range(1, inner.max_epochs + 1):
        order = _epoch_order(job, generator).to(device)
        for start in range(0, len(order), inner.batch_size):
            index = order[start : start + inner.batch_size]
            loss = family.functional(omega, model(x_all[index]), one_hot(y_all[index], data.num_classes, x_all.dtype))
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        if diverged:
            break
        epochs = epoch
        if inner.grad_tol > 0:
            check = job.check.to(device)
            loss = family.functional(omega, model(x_all[check]), one_hot(y_all[check], data.num_classes, x_all.dtype))
            weights = list(model.parameters())
            grads = torch.autograd.grad(loss, weights)
            if inner.weight_decay:  # the inner objective includes the decay term (see inner_objective)
                grads = [g + inner.weight_decay * w.detach() for g, w in zip(grads, weights)]
            norms.append(float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))))
            converged = norms[-1] <= inner.grad_tol
        if progress:
            progress({"domain": job.name, "epoch": epoch, "grad_norm": norms[-1] if norms else None})
        if converged:
            break
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    buffers = {name: value.detach().clone() for name, value in model.named_buffers()}
    return TrainedModel(params, buffers, epochs, steps, converged, diverged, norms)


def train_jobs_batched(
    config: ITLConfig, data: DomainSet, jobs: Sequence[InnerJob], family, omega: Tensor, device: torch.device,
    progress: ProgressCallback | None = None,
) -> list[TrainedModel]:  # fmt: skip
    """All jobs in lockstep on :func:`metaopt_core.population.train_batched`: each with its own
    initial weights and minibatch stream over its source rows, all with the loss ω; a job that
    converged (or diverged) is frozen from then on."""
    x, y = data.tensors_on(device)

    def report(info: dict) -> None:
        if progress:
            progress({"epoch": info["epoch"], "jobs": info["members"], "active": info["active"]})

    trained = train_batched(
        [build_inner_model(config, data, job) for job in jobs], family, omega.detach().to(device).expand(len(jobs), -1),
        x, y, [job.source for job in jobs], [job.data_seed for job in jobs], config.inner.schedule(),
        num_classes=data.num_classes, check=[job.check for job in jobs], grad_tol=config.inner.grad_tol, progress=report,
    )  # fmt: skip
    results = []
    for position in range(len(jobs)):
        params, buffers = trained.member(position)
        results.append(
            TrainedModel(
                params={name: value.clone() for name, value in params.items()},
                buffers={name: value.clone() for name, value in buffers.items()},
                epochs=trained.epochs[position],
                steps=trained.steps[position],
                converged=trained.converged[position],
                diverged=trained.diverged[position],
                grad_norms=trained.grad_norms[position],
            )
        )
    return results


def can_batch(config: ITLConfig) -> bool:
    """Whether the inner trainings of ``config`` run on the batched (vmap) path."""
    return config.batched and config.inner.model in VMAP_FRIENDLY


def train_inner(
    config: ITLConfig, data: DomainSet, jobs: Sequence[InnerJob], omega: Tensor, *, batched: bool | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[TrainedModel]:  # fmt: skip
    """Train the inner model of every job with the loss ω: batched when the config allows (in
    chunks of ``max_batch``), else one after another. ``batched`` overrides the config.

    A batched chunk that does not fit in memory is split in halves and retried (down to one job
    per chunk, i.e. sequential); results do not depend on the chunking beyond float reassociation."""
    device = torch.device(config.device)
    family = config.loss_family()
    use_batched = can_batch(config) if batched is None else (batched and config.inner.model in VMAP_FRIENDLY)
    if not use_batched:
        return [train_job_sequential(config, data, job, family, omega, device, progress) for job in jobs]
    size = config.max_batch or len(jobs)
    trained: list[TrainedModel] = []
    for start in range(0, len(jobs), size):
        trained += _train_fitting(config, data, list(jobs[start : start + size]), family, omega, device, progress)
    return trained


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or "can't allocate memory" in message


def _train_fitting(config, data, jobs, family, omega, device, progress) -> list[TrainedModel]:
    try:
        return train_jobs_batched(config, data, jobs, family, omega, device, progress)
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        if len(jobs) == 1:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return [train_job_sequential(config, data, jobs[0], family, omega, device, progress)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(jobs) // 2
    return _train_fitting(config, data, jobs[:half], family, omega, device, progress) + _train_fitting(
        config, data, jobs[half:], family, omega, device, progress
    )
