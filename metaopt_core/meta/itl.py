"""ITL — Implicit Taylor Loss (thesis chapter 4, Algorithms 7 and 8).

A parametric loss L_ω (:mod:`metaopt_core.meta.loss_families`: the Taylor polynomial of any order,
or iSCE) is meta-learned for domain generalisation by gradient descent on ω:

    outer:  min_ω  M(θ*(ω)) = cross-entropy of θ*(ω) on a held-out domain
    inner:  θ*(ω) = argmin_θ L_ω(θ; source domains)

Every outer step holds each of the m domains out in turn (leave-one-domain-out): a fresh model is
trained on the other m − 1 domains with the current loss — at most ``inner.max_epochs`` epochs of
SGD, stopping early once the gradient norm of the inner objective falls to ``inner.grad_tol`` —
then the implicit-function-theorem hypergradient dM/dω is computed with Hessian-vector products
only (:func:`metaopt_core.hypergrad.implicit_hypergradient`, truncated Neumann series or CG).
The m hypergradients are combined by PCGrad (or their mean) and an outer optimiser (Adam or SGD)
updates ω.

The outer loop is two pure steps over a serialisable :class:`ITLState`, the same shape as ARL's
ask/evaluate/tell, so a pipeline can fan the inner trainings out::

    grads = [inner_hypergrad(state, domain) for domain in domains]   # any machines
    state = outer_update(state, grads)                               # PCGrad + Adam on ω

:func:`inner_hypergrads` computes several held-out domains in one process; the m inner trainings
share an architecture, so they train *batched* with ``torch.func`` (``vmap`` over the m models,
each with its own initial weights, data and minibatch stream) when the architecture has no
running statistics, and sequentially (``nn.Module`` + ``torch.optim.SGD``, the reference the
batched path is tested against) otherwise. :func:`run` chains the steps, checkpoints after every
outer step and resumes from a checkpoint.

Determinism and resume. Everything random in a step — initial weights, minibatch order, the
hypergradient's data subsets, PCGrad's visiting order — is seeded from (seed, step, domain), and
the outer optimiser's state is part of :class:`ITLState` (saved as JSON + safetensors). A run
killed at any point and resumed from its checkpoint therefore ends exactly as an uninterrupted
one (on CPU; the batched and sequential paths agree up to float reassociation, so switching
between them on resume is allowed but not bitwise).

Which data each number uses (for domain d held out):

- inner training, the convergence check and the hypergradient's inner loss: the *train* splits of
  the other domains (the check/hypergradient use a fixed seeded subset of ``inner_examples``);
- the outer objective M (whose gradient drives ω): d's *train* split (subset ``outer_examples``);
- reported ``heldout_ce`` / ``heldout_acc``: d's *val* split, never used for a gradient;
- reported ``source_acc``: the other domains' *val* splits.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

from metaopt_core.config import DataSpec, StrictModel, validate
from metaopt_core.data.prepare import PreparedData, prepare
from metaopt_core.data.sources import ImageData
from metaopt_core.hypergrad import implicit_hypergradient, pcgrad
from metaopt_core.losses.taylor import ORDERS
from metaopt_core.meta.checkpoint import STATE_FILE, check_resumable, load_checkpoint, save_checkpoint
from metaopt_core.meta.outer import nanmean as _nanmean
from metaopt_core.meta.outer import optimizer_step
from metaopt_core.meta.loss_families import ISCEFamily, TaylorFamily
from metaopt_core.models import VMAP_FRIENDLY, build_model

STATE_FORMAT = "metaopt.itl.state/1"
HYPERGRAD_FORMAT = "metaopt.itl.hypergradient/1"
# Fields that may change on resume without changing what the run computes (the last three only
# up to float reassociation between the batched and sequential paths / devices).
RESUMABLE_CHANGES = ("outer.steps", "device", "max_batch", "batched")

ProgressReporter = Callable[[str], None]
MetricsCallback = Callable[[dict], None]


# ============================================================================= configuration


class FamilyConfig(StrictModel):
    """The loss family whose parameters ω are meta-learned.

    ``taylor``: ``order`` 2–5, ``form`` "monomial" (ITL, eq B.1) or "taylor" (ARL's factors,
    eq 3.5); ``ce_centre`` is the expansion point of the ``"ce-like"`` start. ``isce``: SCE's
    (α, β) = softplus(ω), ``log_zero`` = RCE's A.
    """

    kind: Literal["taylor", "isce"] = "taylor"
    order: int = 4
    form: Literal["taylor", "monomial"] = "monomial"
    ce_centre: float = Field(0.5, gt=0.0, le=1.0)
    log_zero: float = Field(-4.0, lt=0.0)

    @field_validator("order")
    @classmethod
    def _known_order(cls, value: int) -> int:
        if value not in ORDERS:
            raise ValueError(f"order {value!r} is not supported; allowed: {list(ORDERS)}")
        return value

    def build(self) -> TaylorFamily | ISCEFamily:
        if self.kind == "taylor":
            return TaylorFamily(order=self.order, form=self.form, ce_centre=self.ce_centre)
        return ISCEFamily(log_zero=self.log_zero)


class InnerConfig(StrictModel):
    """Inner training of one base model: SGD (heavy-ball momentum, PyTorch's convention) until the
    gradient norm of the inner objective on the check subset is ``<= grad_tol`` (checked after
    every epoch; 0 disables the check) or ``max_epochs`` epochs have run."""

    model: str = "mlp_itl"
    model_options: dict[str, int | float] = {}
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(10, ge=1)
    grad_tol: float = Field(1e-3, ge=0.0)
    eval_batch_size: int = Field(1000, ge=1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from metaopt_core.models import MODEL_NAMES

        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; allowed: {list(MODEL_NAMES)}")
        return value


class HypergradConfig(StrictModel):
    """The implicit hypergradient (thesis Alg 8): ``neumann`` (J = ``terms``, step ``alpha``) or
    ``cg`` (at most ``terms`` iterations). ``inner_examples``: size of the seeded source subset the
    inner loss's derivatives (and the convergence check) use; ``outer_examples``: size of the
    held-out subset for ∂M/∂θ (None = all)."""

    method: Literal["neumann", "cg"] = "neumann"
    terms: int = Field(15, ge=0)
    alpha: float = Field(0.01, gt=0.0)
    damping: float = Field(0.0, ge=0.0)
    inner_examples: int | None = Field(1024, ge=1)
    outer_examples: int | None = Field(None, ge=1)


class OuterConfig(StrictModel):
    """Aggregation of the m hypergradients and the optimiser on ω."""

    aggregation: Literal["pcgrad", "mean"] = "pcgrad"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam only
    eps: float = Field(1e-8, gt=0.0)  # adam only
    clip_norm: float | None = Field(None, gt=0.0)  # rescale the aggregated hypergradient to at most this norm
    steps: int = Field(200, ge=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must both lie in [0, 1); got {list(value)}")
        return value


class ITLConfig(StrictModel):
    """One ITL meta-training run (``algorithm: itl`` in a YAML config).

    ``init``: where ω starts — a Taylor preset name (``itl``, …; its order/form must match the
    family), ``ce-like`` (the Taylor expansion of CE, or α = 1, β = 0.01 for iSCE), ``sce``
    (iSCE only: α = 0.1, β = 1) or explicit numbers (Taylor: the parameter vector; iSCE: [α, β]).
    """

    algorithm: Literal["itl"] = "itl"
    name: str = "itl"
    data: DataSpec = DataSpec(source="mnist5k", domains="rotated")
    family: FamilyConfig = FamilyConfig()
    init: str | list[float] = "itl"
    inner: InnerConfig = InnerConfig()
    hypergrad: HypergradConfig = HypergradConfig()
    outer: OuterConfig = OuterConfig()
    seed: int = Field(0, ge=0)
    batched: bool = True
    max_batch: int | None = Field(None, ge=1)
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"device {value!r} is not a torch device; allowed e.g. 'cpu', 'cuda', 'cuda:1'") from None
        return value

    @field_validator("data")
    @classmethod
    def _has_domains(cls, value: DataSpec) -> DataSpec:
        if value.domains == "none" and not value.source.startswith("folder:"):
            raise ValueError("ITL needs several domains: set domains: rotated | colored (or use a folder: source)")
        if value.domains == "rotated" and len(value.angles) < 2:
            raise ValueError(f"angles: got {value.angles}; leave-one-domain-out needs at least 2 domains")
        return value

    @model_validator(mode="after")
    def _init_fits_family(self) -> "ITLConfig":
        try:
            self.family.build().init(self.init)
        except ValueError as error:
            raise ValueError(str(error)) from None
        return self

    def loss_family(self) -> TaylorFamily | ISCEFamily:
        return self.family.build()

    def initial_omega(self) -> Tensor:
        return self.loss_family().init(self.init)


def _as_config(config: ITLConfig | Mapping[str, Any], source: str = "config") -> ITLConfig:
    return config if isinstance(config, ITLConfig) else validate(ITLConfig, dict(config), source=source)  # type: ignore[return-value]


# ============================================================================= data


@dataclass
class DomainSet:
    """The domains of a prepared dataset laid out for leave-one-domain-out training: all train
    splits concatenated (each domain a contiguous range), the val splits kept per domain."""

    names: list[str]
    x: Tensor
    y: Tensor
    ranges: list[tuple[int, int]]
    val: list[ImageData]
    num_classes: int
    fingerprint: str
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (x, y)

    @classmethod
    def from_prepared(cls, data: PreparedData) -> "DomainSet":
        if len(data.domains) < 2:
            raise ValueError(f"data: got domains {data.domains}; leave-one-domain-out needs at least 2")
        xs, ys, ranges, val, start = [], [], [], [], 0
        for name in data.domains:
            train_split, val_split = data.domain(name)
            xs.append(train_split.x)
            ys.append(train_split.y)
            ranges.append((start, start + len(train_split)))
            start += len(train_split)
            val.append(val_split)
        return cls(list(data.domains), torch.cat(xs), torch.cat(ys), ranges, val, data.num_classes, data.fingerprint)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def tensors_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(x, y) on ``device``, copied once per device and kept (a GPU step reuses them)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.x.to(device), self.y.to(device))
        return self._on_device[key]

    def index(self, domain: str | int) -> int:
        """Position of a domain given by index, full name, or name without the source prefix."""
        if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool):
            if 0 <= int(domain) < len(self.names):
                return int(domain)
            raise ValueError(f"held_out_domain: got index {domain}; allowed: 0..{len(self.names) - 1}")
        for position, name in enumerate(self.names):
            if domain == name or name.endswith("-" + str(domain)):
                return position
        raise ValueError(f"held_out_domain: got {domain!r}; allowed: {self.names} (or their suffixes, or an index)")

    def train_indices(self, domain: int) -> Tensor:
        start, end = self.ranges[domain]
        return torch.arange(start, end)

    def source_indices(self, held_out: int) -> Tensor:
        return torch.cat([self.train_indices(d) for d in range(len(self.names)) if d != held_out])


_PREPARED_CACHE: dict[str, DomainSet] = {}


def domain_set(config: ITLConfig, data: PreparedData | DomainSet | None = None) -> DomainSet:
    """The config's domains: ``data`` if given (the pipeline passes the prepared artifact), else
    prepared here (cached per data spec within the process)."""
    if isinstance(data, DomainSet):
        return data
    if isinstance(data, PreparedData):
        return DomainSet.from_prepared(data)
    if data is not None:
        raise TypeError(f"data: got {type(data).__name__}; allowed: PreparedData, DomainSet or None")
    key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
    if key not in _PREPARED_CACHE:
        if len(_PREPARED_CACHE) >= 2:
            _PREPARED_CACHE.clear()
        _PREPARED_CACHE[key] = DomainSet.from_prepared(prepare(config.data))
    return _PREPARED_CACHE[key]


# ============================================================================= one inner job


def job_seeds(seed: int, step: int, domain: int) -> tuple[int, int, int]:
    """(initial weights, minibatch order, data subsets) seeds of the inner job holding ``domain``
    out at outer step ``step``: fresh every step, independent of which machine computes it."""
    init_seed, data_seed, subset_seed = np.random.SeedSequence([seed, step, domain, 0x171]).generate_state(3)
    return int(init_seed), int(data_seed), int(subset_seed)


@dataclass
class InnerJob:
    """Everything one leave-one-domain-out inner training needs (indices into ``DomainSet.x``)."""

    domain: int
    name: str
    source: Tensor  # train indices of the other domains
    check: Tensor  # subset of source: convergence check and the hypergradient's inner loss
    target: Tensor  # subset of the held-out domain's train split: the outer objective M
    init_seed: int
    data_seed: int


def make_job(config: ITLConfig, data: DomainSet, step: int, domain: int) -> InnerJob:
    init_seed, data_seed, subset_seed = job_seeds(config.seed, step, domain)
    generator = torch.Generator().manual_seed(subset_seed)
    source = data.source_indices(domain)
    target = data.train_indices(domain)
    inner_n = config.hypergrad.inner_examples or len(source)
    outer_n = config.hypergrad.outer_examples or len(target)
    check = source[torch.randperm(len(source), generator=generator)[: min(inner_n, len(source))]]
    target = target[torch.randperm(len(target), generator=generator)[: min(outer_n, len(target))]]
    return InnerJob(domain, data.names[domain], source, check, target, init_seed, data_seed)


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


def _build(config: ITLConfig, data: DomainSet, job: InnerJob) -> nn.Module:
    channels, height, width = data.shape
    if height != width:
        raise ValueError(f"data: images must be square, got {height}x{width}")
    return build_model(config.inner.model, channels, height, data.num_classes, seed=job.init_seed, **config.inner.model_options)


def _epoch_order(job: InnerJob, generator: torch.Generator) -> Tensor:
    """This epoch's minibatch stream of one job: a permutation of its source indices."""
    return job.source[torch.randperm(len(job.source), generator=generator)]


def _one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(labels, num_classes).to(dtype)


def _train_sequential(
    config: ITLConfig, data: DomainSet, job: InnerJob, family, omega: Tensor, device: torch.device,
    progress: Callable[[dict], None] | None = None,
) -> TrainedModel:  # fmt: skip
    """Reference inner loop: an ``nn.Module`` and ``torch.optim.SGD`` (works for any architecture)."""
    inner = config.inner
    model = _build(config, data, job).to(device).train()
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
            loss = family.functional(omega, model(x_all[index]), _one_hot(y_all[index], data.num_classes, x_all.dtype))
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
            loss = family.functional(omega, model(x_all[check]), _one_hot(y_all[check], data.num_classes, x_all.dtype))
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


def _padded(rows: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Index rows of unequal length -> (P, width) indices padded with 0 and 0/1 weights."""
    width = max(len(row) for row in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    weight = torch.zeros(len(rows), width)
    for position, row in enumerate(rows):
        index[position, : len(row)] = row
        weight[position, : len(row)] = 1.0
    return index.to(device), weight.to(device)


def _train_batched(
    config: ITLConfig, data: DomainSet, jobs: Sequence[InnerJob], family, omega: Tensor, device: torch.device,
    progress: Callable[[dict], None] | None = None,
) -> list[TrainedModel]:  # fmt: skip
    """All jobs in lockstep: ``vmap`` over the stacked models, each with its own minibatch stream;
    a job that converged (or diverged) is frozen — its updates masked out — from then on."""
    inner = config.inner
    count = len(jobs)
    models = [_build(config, data, job) for job in jobs]
    stacked_params, stacked_buffers = stack_module_state(models)
    params = {name: value.detach().to(device) for name, value in stacked_params.items()}
    buffers = {name: value.to(device) for name, value in stacked_buffers.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")
    del models
    omega = omega.detach().to(device)
    scale = torch.ones((), dtype=omega.dtype, device=device)
    x_all, y_all = data.tensors_on(device)
    num_classes = data.num_classes

    def member_loss(p, b, x, y, w):
        logits = functional_call(skeleton, (p, b), (x,))
        per_example = family.per_example(omega, scale, logits, y)
        # weighted mean = the sequential batch mean; padding slots (w = 0) contribute nothing
        return (per_example * w).sum() / w.sum().clamp_min(1.0)

    def member_grad_norm(p, b, x, y, w):
        grads = grad(member_loss)(p, b, x, y, w)
        if inner.weight_decay:  # the inner objective includes the decay term (see inner_objective)
            grads = {name: g + inner.weight_decay * p[name] for name, g in grads.items()}
        return torch.sqrt(sum((g**2).sum() for g in grads.values()))

    step_fn = vmap(grad_and_value(member_loss))
    norm_fn = vmap(member_grad_norm)
    momentum_buffers = {name: torch.zeros_like(value) for name, value in params.items()}
    frozen = torch.zeros(count, dtype=torch.bool, device=device)
    diverged = torch.zeros(count, dtype=torch.bool, device=device)
    converged = torch.zeros(count, dtype=torch.bool, device=device)
    epochs = torch.zeros(count, dtype=torch.long)
    steps = torch.zeros(count, dtype=torch.long, device=device)
    norms: list[list[float]] = [[] for _ in jobs]
    generators = [torch.Generator().manual_seed(job.data_seed) for job in jobs]
    check_index, check_weight = _padded([job.check for job in jobs], device)
    check_targets = _one_hot(y_all[check_index], num_classes, x_all.dtype)
    batch = inner.batch_size

    for epoch in range(1, inner.max_epochs + 1):
        # every job draws its permutation each epoch, frozen or not, exactly as its sequential run would
        orders = [_epoch_order(job, g) for job, g in zip(jobs, generators)]
        index, weight = _padded(orders, device)
        width = index.shape[1]
        active_epoch = ~frozen
        for start in range(0, width, batch):
            batch_index = index[:, start : start + batch]
            batch_weight = weight[:, start : start + batch]
            targets = _one_hot(y_all[batch_index], num_classes, x_all.dtype)
            grads, losses = step_fn(params, buffers, x_all[batch_index], targets, batch_weight)
            has_data = batch_weight.sum(1) > 0
            newly_diverged = has_data & ~frozen & ~torch.isfinite(losses)
            diverged |= newly_diverged
            frozen |= newly_diverged
            update = has_data & ~frozen
            all_update = bool(update.all())
            for name, value in params.items():
                g = grads[name]
                if inner.weight_decay:
                    g = g + inner.weight_decay * value
                if inner.momentum:
                    # buffers start at 0, so the first step's buffer is the gradient itself, as in torch.optim.SGD
                    buffer = momentum_buffers[name]
                    if all_update:  # the common case: in place, no masking
                        buffer.mul_(inner.momentum).add_(g)
                        value.add_(buffer, alpha=-inner.lr)
                        continue
                    mask = update.view(count, *([1] * (value.dim() - 1)))
                    new_buffer = inner.momentum * buffer + g
                    momentum_buffers[name] = torch.where(mask, new_buffer, buffer)
                    params[name] = torch.where(mask, value - inner.lr * new_buffer, value)
                elif all_update:
                    value.add_(g, alpha=-inner.lr)
                else:
                    mask = update.view(count, *([1] * (value.dim() - 1)))
                    params[name] = torch.where(mask, value - inner.lr * g, value)
            steps += update.long()
        epochs += (active_epoch & ~diverged).cpu().long()
        if inner.grad_tol > 0:
            with torch.no_grad():
                epoch_norms = norm_fn(params, buffers, x_all[check_index], check_targets, check_weight).cpu()
            for position in range(count):
                if bool(active_epoch[position]) and not bool(diverged[position]):
                    norms[position].append(float(epoch_norms[position]))
            newly_converged = (epoch_norms.to(device) <= inner.grad_tol) & active_epoch & ~diverged
            converged |= newly_converged
            frozen |= newly_converged
        if progress:
            progress({"epoch": epoch, "jobs": count, "active": int((~frozen).sum())})
        if bool(frozen.all()):
            break

    results = []
    for position in range(count):
        results.append(
            TrainedModel(
                params={name: value[position].clone() for name, value in params.items()},
                buffers={name: value[position].clone() for name, value in buffers.items()},
                epochs=int(epochs[position]),
                steps=int(steps[position]),
                converged=bool(converged[position]),
                diverged=bool(diverged[position]),
                grad_norms=norms[position],
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
        return [_train_sequential(config, data, job, family, omega, device, progress) for job in jobs]
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
        return _train_batched(config, data, jobs, family, omega, device, progress)
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        if len(jobs) == 1:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return [_train_sequential(config, data, jobs[0], family, omega, device, progress)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(jobs) // 2
    return _train_fitting(config, data, jobs[:half], family, omega, device, progress) + _train_fitting(
        config, data, jobs[half:], family, omega, device, progress
    )


# ============================================================================= hypergradient


@dataclass
class Hypergradient:
    """dM/dω for one held-out domain at one outer step, and how the inner job went.

    ``omega`` is the loss the inner model was trained with (``outer_update`` checks it). A diverged
    inner training yields a zero hypergradient with ``diverged = True``; it is left out of the
    aggregation.
    """

    step: int
    domain: str
    omega: list[float]
    grad: list[float]
    diverged: bool
    metrics: dict

    def to_dict(self) -> dict:
        return {"format": HYPERGRAD_FORMAT, "step": self.step, "domain": self.domain, "omega": self.omega,
                "grad": self.grad, "diverged": self.diverged, "metrics": self.metrics}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: Mapping) -> "Hypergradient":
        if doc.get("format") != HYPERGRAD_FORMAT:
            raise ValueError(f"hypergradient: format {doc.get('format')!r}; expected {HYPERGRAD_FORMAT!r}")
        return cls(int(doc["step"]), str(doc["domain"]), [float(v) for v in doc["omega"]],
                   [float(v) for v in doc["grad"]], bool(doc["diverged"]), dict(doc["metrics"]))  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Hypergradient":
        return cls.from_dict(json.loads(Path(path).read_text()))


@torch.no_grad()
def _scores(model_fn: Callable[[Tensor], Tensor], data: ImageData, chunk: int, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a model on a split."""
    total_ce, correct = 0.0, 0
    for start in range(0, len(data), chunk):
        x = data.x[start : start + chunk].to(device)
        y = data.y[start : start + chunk].to(device)
        logits = model_fn(x)
        total_ce += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    count = max(1, len(data))
    return total_ce / count, correct / count


def _concat_splits(parts: Sequence[ImageData]) -> ImageData:
    return ImageData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes, "sources-val")


def hypergradient_of(
    config: ITLConfig, data: DomainSet, job: InnerJob, trained: TrainedModel, omega: Tensor, step: int, seconds: float = 0.0
) -> Hypergradient:
    """The IFT hypergradient of the held-out cross-entropy w.r.t. ω at the trained model, plus the
    job's metrics (see the module docstring for which split each number uses)."""
    device = torch.device(config.device)
    family = config.loss_family()
    started = time.perf_counter()
    skeleton = _build(config, data, job).to(device).eval()
    names = list(trained.params)
    buffers = {name: value.to(device) for name, value in trained.buffers.items()}

    def forward(params_by_name: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(skeleton, ({**params_by_name}, buffers), (x,))

    frozen = {name: value.to(device) for name, value in trained.params.items()}
    chunk = config.inner.eval_batch_size
    heldout_ce, heldout_acc = _scores(lambda x: forward(frozen, x), data.val[job.domain], chunk, device)
    source_val = _concat_splits([data.val[d] for d in range(len(data.names)) if d != job.domain])
    _, source_acc = _scores(lambda x: forward(frozen, x), source_val, chunk, device)
    metrics: dict[str, Any] = {
        "heldout_ce": heldout_ce, "heldout_acc": heldout_acc, "source_acc": source_acc,
        "epochs": trained.epochs, "steps": trained.steps, "converged": trained.converged,
        "epoch_grad_norms": list(trained.grad_norms),
    }  # fmt: skip
    omega_list = [float(v) for v in omega.detach().cpu()]
    if trained.diverged:
        metrics.update(inner_grad_norm=float("nan"), outer_objective=float("nan"), hypergrad_norm=0.0,
                       seconds=seconds + time.perf_counter() - started)  # fmt: skip
        return Hypergradient(step, job.name, omega_list, [0.0] * len(omega_list), True, metrics)

    params = [frozen[name].clone().requires_grad_(True) for name in names]
    meta = omega.detach().to(device).clone().requires_grad_(True)
    x_all, y_all = data.tensors_on(device)
    x_check = x_all[job.check.to(device)]
    y_check = _one_hot(y_all[job.check.to(device)], data.num_classes, x_all.dtype)
    x_target, y_target = x_all[job.target.to(device)], y_all[job.target.to(device)]

    decay = config.inner.weight_decay

    def inner_loss() -> Tensor:
        # the objective SGD with weight decay minimises: L_ω + (decay / 2) ||θ||² (its stationary
        # point is where the IFT is applied)
        value = family.functional(meta, forward(dict(zip(names, params)), x_check), y_check)
        if decay:
            value = value + 0.5 * decay * sum((p**2).sum() for p in params)
        return value

    def outer_loss() -> Tensor:
        return F.cross_entropy(forward(dict(zip(names, params)), x_target), y_target)

    hyper = config.hypergrad
    # The solver warns when the Neumann series grows (alpha too large, or negative curvature at an
    # unconverged inner model) or CG meets negative curvature: record it per job instead of
    # printing it six times per step; the residual below measures the damage.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = implicit_hypergradient(
            inner_loss, outer_loss, params, [meta], method=hyper.method, terms=hyper.terms, alpha=hyper.alpha, damping=hyper.damping
        )
    solver_warnings = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    with torch.no_grad():
        outer_value = float(outer_loss())
    gradient = result.grads[0].detach().cpu()
    finite = bool(torch.isfinite(gradient).all())
    metrics.update(
        inner_grad_norm=result.inner_grad_norm,
        outer_grad_norm=result.outer_grad_norm,
        outer_objective=outer_value,
        hypergrad_norm=float(gradient.norm()) if finite else float("nan"),
        direct_norm=float(result.direct[0].norm()),
        indirect_norm=float(result.indirect[0].norm()),
        solve_iterations=result.iterations,
        solve_rel_residual=result.solve_rel_residual,
        solver_warning=solver_warnings[0] if solver_warnings else None,
        seconds=seconds + time.perf_counter() - started,
    )
    if not finite:  # a blown-up Neumann series: treat like a divergence rather than poison ω
        metrics["nonfinite_hypergradient"] = True
        return Hypergradient(step, job.name, omega_list, [0.0] * len(omega_list), True, metrics)
    return Hypergradient(step, job.name, omega_list, [float(v) for v in gradient], False, metrics)


# ============================================================================= state


def _config_of(state: "ITLState") -> ITLConfig:
    return _as_config(state.config, source="state.config")


@dataclass
class ITLState:
    """Everything the meta-training needs to continue: ω, the outer optimiser's state, the step
    count and the history. Saved as ``state.json`` (config, history, readable ω) plus a
    safetensors file (ω and optimiser tensors, exact)."""

    config: dict
    omega: Tensor
    optimizer: dict[str, Tensor] = field(default_factory=dict)  # adam: exp_avg, exp_avg_sq; sgd: momentum_buffer
    step: int = 0  # completed outer steps
    history: list[dict] = field(default_factory=list)
    domains: list[str] | None = None  # the dataset's domains: every step needs one hypergradient each

    @classmethod
    def initial(cls, config: ITLConfig | Mapping[str, Any]) -> "ITLState":
        config = _as_config(config)
        return cls(config=config.model_dump(mode="json"), omega=config.initial_omega().to(torch.float32))

    @property
    def itl_config(self) -> ITLConfig:
        return _config_of(self)

    @property
    def finished(self) -> bool:
        return self.step >= int(self.config["outer"]["steps"])

    def loss(self) -> nn.Module:
        """The current loss as a drop-in module."""
        return self.itl_config.loss_family().to_module(self.omega)

    def tensors(self) -> dict[str, Tensor]:
        out = {"omega": self.omega.detach().cpu().contiguous()}
        out.update({f"optimizer.{k}": v.detach().cpu().contiguous() for k, v in self.optimizer.items()})
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the checkpoint (crash-safe; see :mod:`metaopt_core.meta.checkpoint`)."""
        doc = {
            "format": STATE_FORMAT,
            "config": self.config,
            "step": self.step,
            "omega": [float(v) for v in self.omega],
            "optimizer_keys": sorted(self.optimizer),
            "domains": self.domains,
            "history": self.history,
        }
        return save_checkpoint(directory, self.step, doc, self.tensors())

    @classmethod
    def load(cls, directory: str | Path) -> "ITLState":
        doc, tensors, path = load_checkpoint(directory, STATE_FORMAT, "ITL")
        tensor_path = Path(directory) / doc["tensors"]
        optimizer = {key: tensors[f"optimizer.{key}"] for key in doc["optimizer_keys"]}
        state = cls(doc["config"], tensors["omega"], optimizer, int(doc["step"]), list(doc["history"]), doc.get("domains"))
        if [float(v) for v in state.omega] != [float(v) for v in doc["omega"]]:
            raise ValueError(f"ITL state {path}: omega in the JSON and in {tensor_path.name} differ")
        return state


# ============================================================================= outer step


def inner_hypergrads(
    state: ITLState,
    held_out_domains: Sequence[str | int] | None = None,
    *,
    data: PreparedData | DomainSet | None = None,
    batched: bool | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[Hypergradient]:
    """The hypergradients of the next outer step for the given held-out domains (default: every
    domain), their inner trainings batched together when the config allows. The result for a
    domain does not depend on which other domains are computed alongside it."""
    config = state.itl_config
    if state.finished:
        raise ValueError(f"inner_hypergrads: the run is finished (step {state.step} of {config.outer.steps})")
    domains = domain_set(config, data)
    if state.domains is not None and state.domains != domains.names:
        raise ValueError(f"data: domains {domains.names} differ from the state's {state.domains} (another dataset?)")
    chosen = list(range(len(domains.names))) if held_out_domains is None else [domains.index(d) for d in held_out_domains]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"held_out_domains: got duplicates in {list(held_out_domains or [])}")
    jobs = [make_job(config, domains, state.step, d) for d in chosen]
    started = time.perf_counter()
    trained = train_inner(config, domains, jobs, state.omega, batched=batched, progress=progress)
    train_seconds = (time.perf_counter() - started) / max(1, len(jobs))
    return [hypergradient_of(config, domains, job, model, state.omega, state.step, train_seconds) for job, model in zip(jobs, trained)]


def inner_hypergrad(
    state: ITLState, held_out_domain: str | int, *, data: PreparedData | DomainSet | None = None
) -> Hypergradient:
    """Train a fresh model on every domain but ``held_out_domain`` with the current loss, then the
    IFT hypergradient of that domain's cross-entropy w.r.t. ω (one job of the pipeline's fan-out)."""
    return inner_hypergrads(state, [held_out_domain], data=data)[0]


def aggregate(gradients: Sequence[Tensor], method: str, seed: int, step: int) -> Tensor:
    """Combine per-domain hypergradients: PCGrad (visiting order seeded by (seed, step)) or mean."""
    stacked = torch.stack([g.to(torch.float32) for g in gradients])
    if method == "mean":
        return stacked.mean(0)
    if method == "pcgrad":
        pc_seed = int(np.random.SeedSequence([seed, step, 0x9C]).generate_state(1)[0] % (2**31))
        return pcgrad(stacked, seed=pc_seed)
    raise ValueError(f"aggregation: got {method!r}; allowed: ['pcgrad', 'mean']")


def outer_update(state: ITLState, hypergradients: Sequence[Hypergradient]) -> ITLState:
    """Aggregate one step's hypergradients (one per domain, each exactly once) and take an outer
    optimiser step on ω. Returns a new state; the input is not modified."""
    config = state.itl_config
    if state.finished:
        raise ValueError(f"outer_update: the run is finished (step {state.step} of {config.outer.steps})")
    if not hypergradients:
        raise ValueError("outer_update: got no hypergradients")
    omega_now = [float(v) for v in state.omega]
    for item in hypergradients:
        if item.step != state.step:
            raise ValueError(f"outer_update: hypergradient for domain {item.domain!r} is from step {item.step}; the state is at step {state.step}")
        if item.omega != omega_now:
            raise ValueError(f"outer_update: hypergradient for domain {item.domain!r} was computed at another ω than the state's")
    names = [item.domain for item in hypergradients]
    if len(set(names)) != len(names):
        raise ValueError(f"outer_update: domains given more than once: {sorted({n for n in names if names.count(n) > 1})}")
    expected = state.domains
    if expected is not None and sorted(names) != sorted(expected):
        raise ValueError(f"outer_update: got hypergradients for {sorted(names)}; every step needs exactly {sorted(expected)}")
    # a fixed order (not arrival order) so the aggregation is the same however the fan-out returned
    ordered = sorted(hypergradients, key=lambda h: names.index(h.domain) if expected is None else expected.index(h.domain))
    usable = [h for h in ordered if not h.diverged]
    if not usable:
        raise RuntimeError(f"outer_update: every inner training of step {state.step} diverged or gave a non-finite hypergradient; lower inner.lr or change the loss's start")
    gradients = [torch.tensor(h.grad, dtype=torch.float32) for h in usable]
    combined = aggregate(gradients, config.outer.aggregation, config.seed, state.step)
    raw_norm = float(combined.norm())
    if config.outer.clip_norm is not None and raw_norm > config.outer.clip_norm:
        combined = combined * (config.outer.clip_norm / raw_norm)
    omega, optimizer = optimizer_step(state.omega, combined, state.optimizer, state.step + 1, config.outer)

    metrics = [h.metrics for h in ordered]
    row = {
        "step": state.step + 1,
        "heldout_ce": _nanmean([m["heldout_ce"] for m in metrics]),
        "heldout_acc": _nanmean([m["heldout_acc"] for m in metrics]),
        "source_acc": _nanmean([m["source_acc"] for m in metrics]),
        "outer_objective": _nanmean([m["outer_objective"] for m in metrics]),
        "inner_grad_norm": _nanmean([m["inner_grad_norm"] for m in metrics]),
        "inner_grad_norm_max": max((m["inner_grad_norm"] for m in metrics if math.isfinite(m["inner_grad_norm"])), default=float("nan")),
        "hypergrad_norm": raw_norm,
        "domain_hypergrad_norm": _nanmean([m["hypergrad_norm"] for m in metrics]),
        "solve_rel_residual": _nanmean([m.get("solve_rel_residual", float("nan")) for m in metrics]),
        "epochs": _nanmean([float(m["epochs"]) for m in metrics]),
        "converged": sum(bool(m["converged"]) for m in metrics),
        "solver_warnings": sum(bool(m.get("solver_warning")) for m in metrics),
        "diverged": sum(h.diverged for h in ordered),
        "seconds": float(sum(m.get("seconds", 0.0) for m in metrics)),
        "omega_before": omega_now,
        "omega": [float(v) for v in omega],
        "update": [float(v) for v in combined],
        "per_domain": {h.domain: {k: v for k, v in h.metrics.items() if k != "epoch_grad_norms"} | {"grad": h.grad} for h in ordered},
    }
    return ITLState(copy.deepcopy(state.config), omega, optimizer, state.step + 1, [*state.history, row], state.domains)


def with_domains(state: ITLState, data: PreparedData | DomainSet | None = None) -> ITLState:
    """Record the dataset's domain names in the state (so ``outer_update`` can insist on one
    hypergradient per domain). :func:`run` does this; a pipeline does it once after preparing data."""
    domains = domain_set(state.itl_config, data)
    if state.domains is not None and state.domains != domains.names:
        raise ValueError(f"data: domains {domains.names} differ from the state's {state.domains} (another dataset?)")
    state.domains = list(domains.names)
    return state


# ============================================================================= run


# Keys of a history row that are per-step scalars (what a tracker logs as metrics).
SCALAR_METRICS = ("heldout_ce", "heldout_acc", "source_acc", "outer_objective", "inner_grad_norm", "inner_grad_norm_max",
                  "hypergrad_norm", "domain_hypergrad_norm", "solve_rel_residual", "epochs", "converged", "diverged", "solver_warnings",
                  "seconds")  # fmt: skip


@dataclass
class ITLResult:
    """The learned loss (a module and its white-box document) and the meta-training history."""

    loss: nn.Module
    document: dict  # the family's to_dict() plus "meta"
    history: list[dict]
    state: ITLState

    def save(self, directory: str | Path) -> dict[str, Path]:
        """``loss.json`` (the registry artifact: JSON only) and ``history.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"loss": directory / "loss.json", "history": directory / "history.json"}
        paths["loss"].write_text(json.dumps(self.document, indent=2))
        paths["history"].write_text(json.dumps(self.history, indent=2))
        return paths


def result_of(state: ITLState, fingerprint: str | None = None) -> ITLResult:
    """The current loss of a state as an :class:`ITLResult`."""
    config = state.itl_config
    family = config.loss_family()
    document = family.to_dict(state.omega)
    history = state.history
    document["meta"] = {
        "algorithm": "itl",
        "name": config.name,
        "family": family.describe(),
        "init": config.init,
        "initial_params": [float(v) for v in config.initial_omega()],
        "outer_steps": state.step,
        "domains": state.domains,
        "heldout_ce_first": history[0]["heldout_ce"] if history else None,
        "heldout_ce_last": history[-1]["heldout_ce"] if history else None,
        "heldout_acc_first": history[0]["heldout_acc"] if history else None,
        "heldout_acc_last": history[-1]["heldout_acc"] if history else None,
        "metrics_convention": "history row k: inner models trained with omega_before of step k; heldout_* on the held-out domain's val split",
        "data_fingerprint": fingerprint,
        "config": state.config,
    }
    return ITLResult(family.to_module(state.omega), document, list(history), state)


def _resume_state(config: ITLConfig, checkpoint_dir: Path) -> ITLState:
    state = ITLState.load(checkpoint_dir)
    check_resumable(state.config, config.model_dump(mode="json"), checkpoint_dir, RESUMABLE_CHANGES)
    state.config = config.model_dump(mode="json")
    return state


def run(
    config: ITLConfig | Mapping[str, Any],
    checkpoint_dir: str | Path | None = None,
    progress: ProgressReporter | None = None,
    callback: MetricsCallback | None = None,
    *,
    data: PreparedData | DomainSet | None = None,
) -> ITLResult:
    """Meta-train a loss: ``inner_hypergrads`` → ``outer_update`` for ``outer.steps`` steps.

    With ``checkpoint_dir`` the state is saved after every outer step and an existing checkpoint
    there is resumed. ``progress`` receives one human-readable line per step; ``callback``
    receives that step's scalar metrics (``step`` plus :data:`SCALAR_METRICS`) after the
    checkpoint is written, so an exception raised there loses nothing.
    """
    config = _as_config(config)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    domains = domain_set(config, data)
    if checkpoint is not None and (checkpoint / STATE_FILE).exists():
        state = _resume_state(config, checkpoint)
        if progress:
            progress(f"itl: resumed from {checkpoint} at step {state.step}/{config.outer.steps}")
    else:
        state = ITLState.initial(config)
    state = with_domains(state, domains)
    while not state.finished:
        gradients = inner_hypergrads(state, data=domains)
        state = outer_update(state, gradients)
        if checkpoint is not None:
            state.save(checkpoint)
        row = state.history[-1]
        if progress:
            progress(
                f"itl: step {row['step']}/{config.outer.steps}: held-out CE {row['heldout_ce']:.4f} acc {row['heldout_acc']:.4f} "
                f"source acc {row['source_acc']:.4f} inner |g| {row['inner_grad_norm']:.2e} |hypergrad| {row['hypergrad_norm']:.2e} "
                f"epochs {row['epochs']:.1f} converged {row['converged']}/{len(row['per_domain'])} ({row['seconds']:.1f}s)"
            )
        if callback:
            callback({"step": row["step"], **{key: row[key] for key in SCALAR_METRICS}})
    return result_of(state, domains.fingerprint)


__all__ = [
    "FamilyConfig",
    "HypergradConfig",
    "Hypergradient",
    "ITLConfig",
    "ITLResult",
    "ITLState",
    "InnerConfig",
    "OuterConfig",
    "DomainSet",
    "InnerJob",
    "TrainedModel",
    "aggregate",
    "can_batch",
    "domain_set",
    "hypergradient_of",
    "inner_hypergrad",
    "inner_hypergrads",
    "job_seeds",
    "make_job",
    "optimizer_step",
    "outer_update",
    "result_of",
    "run",
    "train_inner",
    "with_domains",
]
