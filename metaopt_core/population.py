"""Train many (model, loss-parameter) members in one process, in lockstep.

A *member* is one inner training run of ARL's Cartesian product population × pool: an
architecture, a noisy training set, a clean validation set, a vector of loss parameters and two
seeds (initial weights, minibatch order). :func:`train_population` trains a list of members and
returns each one's clean validation accuracy.

Batched path (the default): members that share an architecture, an input shape and a class count
are stacked with ``torch.func.stack_module_state``; ``vmap`` over ``functional_call`` computes all
their losses in one batched forward pass and ordinary autograd differentiates that batched graph
(measured faster on CPU than ``vmap(grad(...))``). Each member keeps

* its own loss parameters (a (P, n) block, vmapped with the weights),
* its own minibatch order (per-member seeded permutations, stacked to a (P, B) index tensor and
  gathered from the concatenated training sets — so the datasets of a DR pool batch together
  when their image shapes agree; sets of different length are padded and the padding carries
  zero weight, and a member whose set ran out that epoch does not move),
* its own SGD-with-momentum state, updated in place on the stacked tensors with
  ``torch.optim.SGD``'s own ``_foreach`` arithmetic,
* its own divergence flag: a member whose loss turns non-finite gets no gradient and keeps the
  weights it had at that step — exactly where :func:`metaopt_core.train.fit` stops; the others go
  on (members never mix in any operation, so NaNs cannot leak; tested bit for bit).

Sequential path: :func:`metaopt_core.train.fit` per member. It is used for architectures with
running statistics (BatchNorm: ``cnn4``, ``jocor``, the torchvision models — their batch
statistics and buffer updates do not vmap cleanly; use the GroupNorm variants ``cnn4_gn`` /
``small_cnn`` to batch) and as the reference the batched path is tested against: the same member
seeds give the same minibatches, the same initial weights and the same SGD arithmetic, so results
agree up to floating-point reassociation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from metaopt_core.data.sources import ImageData
from metaopt_core.losses.taylor import Form, normalisation_scale, num_params, taylor_loss
from metaopt_core.models import VMAP_FRIENDLY, build_model
from metaopt_core.train import accuracy, fit

ProgressCallback = Callable[[dict], None]


class LossFamily(Protocol):
    """A parametric loss the population trainer can vmap over: per-member parameters and scale."""

    @property
    def num_params(self) -> int: ...

    def scales(self, params: Tensor) -> Tensor:
        """(P, n) parameters -> (P,) constant multipliers, fixed for the whole inner run."""
        ...

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        """One member: (n,) params, scalar scale, (B, C) logits, (B,) labels or (B, C) one-hot
        targets -> (B,) losses. Must work under ``vmap`` with one-hot targets."""
        ...


@dataclass(frozen=True)
class TaylorFamily:
    """The Taylor-polynomial loss (:mod:`metaopt_core.losses.taylor`), optionally with the A.3
    scale normalisation (the scale is computed once per member from its parameters)."""

    order: int = 4
    form: Form = "taylor"
    normalise: bool = False
    eta: float = 1.0

    @property
    def num_params(self) -> int:
        return num_params(self.order)

    def scales(self, params: Tensor) -> Tensor:
        if not self.normalise:
            return torch.ones(params.shape[0], dtype=params.dtype, device=params.device)
        return normalisation_scale(params, self.order, self.form, self.eta)

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return taylor_loss(params, logits, target, self.order, self.form, scale, reduction="none")


@dataclass(frozen=True)
class Schedule:
    """Inner training: SGD with (heavy-ball) momentum, PyTorch's convention, for ``epochs`` epochs."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 1000

    def __post_init__(self):
        for name in ("lr",):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: got {value!r}; allowed: a finite number > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: got {self.momentum!r}; allowed: a number in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: got {self.weight_decay!r}; allowed: >= 0")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 1")


@dataclass
class Member:
    """One inner training run. ``train`` carries the (noisy) training labels, ``val`` the clean ones."""

    model: str
    train: ImageData
    val: ImageData
    loss_params: Tensor
    init_seed: int = 0
    data_seed: int = 0
    model_options: dict = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        channels, height, width = self.train.shape
        if height != width:
            raise ValueError(f"member {self.model}: images must be square, got {height}x{width}")
        return build_model(self.model, channels, height, self.train.num_classes, seed=self.init_seed, **self.model_options)

    def batch_key(self) -> tuple:
        """Members with equal keys can share one vmapped model."""
        return (self.model, tuple(sorted(self.model_options.items())), self.train.shape, self.train.num_classes)


@dataclass
class MemberResult:
    val_accuracy: float
    diverged: bool
    steps: int  # optimiser steps taken (a diverged member stops counting where it froze)
    train_loss: float  # mean training loss over the last epoch it trained (nan if none)
    batched: bool
    weights: dict[str, Tensor] | None = None  # final state_dict on the CPU, with keep_weights=True


def can_batch(model: str) -> bool:
    """Whether an architecture trains on the batched path (no running statistics)."""
    return model in VMAP_FRIENDLY


def train_population(
    members: Sequence[Member],
    family: LossFamily,
    schedule: Schedule,
    *,
    batched: bool = True,
    max_batch: int | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    keep_weights: bool = False,
) -> list[MemberResult]:
    """Train every member and return its result, in the order given.

    ``batched=True`` stacks members with the same :meth:`Member.batch_key` (and a vmap-friendly
    architecture) into groups of at most ``max_batch`` members and trains each group in lockstep;
    everything else goes through the sequential path. ``progress`` receives one dict per group
    epoch (``group``, ``epoch``, ``members``, ``alive``) or per sequential member.
    ``keep_weights`` returns each member's trained weights (for checks; costs a copy per member).
    """
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch: got {max_batch!r}; allowed: None or an integer >= 1")
    for position, member in enumerate(members):
        if member.loss_params.shape != (family.num_params,):
            raise ValueError(
                f"members[{position}].loss_params: got shape {tuple(member.loss_params.shape)}; "
                f"the loss family needs ({family.num_params},)"
            )
    device = torch.device(device)
    results: list[MemberResult | None] = [None] * len(members)
    groups: dict[tuple, list[int]] = {}
    sequential: list[int] = []
    for position, member in enumerate(members):
        if batched and can_batch(member.model):
            groups.setdefault(member.batch_key(), []).append(position)
        else:
            sequential.append(position)
    group_number = 0
    for positions in groups.values():
        size = max_batch or len(positions)
        for start in range(0, len(positions), size):
            chunk = positions[start : start + size]
            for position, result in zip(chunk, _train_batched([members[i] for i in chunk], family, schedule, device, progress, group_number, keep_weights)):
                results[position] = result
            group_number += 1
    for position in sequential:
        results[position] = _train_sequential(members[position], family, schedule, device, keep_weights)
        if progress:
            progress({"member": position, "model": members[position].model, "diverged": results[position].diverged})
    return results  # type: ignore[return-value]


def _train_sequential(member: Member, family: LossFamily, schedule: Schedule, device: torch.device, keep_weights: bool) -> MemberResult:
    model = member.build().to(device)
    params = member.loss_params.detach().to(device=device, dtype=torch.float32)
    scale = family.scales(params.unsqueeze(0))[0]

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        return family.per_example(params, scale, logits, target).mean()

    outcome = fit(
        model, loss_fn, member.train, optimizer="sgd", lr=schedule.lr, momentum=schedule.momentum,
        weight_decay=schedule.weight_decay, epochs=schedule.epochs, batch_size=schedule.batch_size,
        seed=member.data_seed, device=device,
    )  # fmt: skip
    acc = accuracy(model, member.val, batch_size=schedule.eval_batch_size, device=device)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep_weights else None
    train_loss = outcome.last("train_loss") if outcome.steps else float("nan")
    return MemberResult(acc, outcome.diverged, outcome.steps, train_loss, batched=False, weights=weights)


def _concatenate(sets: list[ImageData], device: torch.device) -> tuple[Tensor, Tensor, dict[int, int]]:
    """Distinct datasets (by identity) -> one x, one y on the device, and each set's offset."""
    offsets: dict[int, int] = {}
    xs, ys, total = [], [], 0
    for data in sets:
        if id(data) in offsets:
            continue
        offsets[id(data)] = total
        xs.append(data.x)
        ys.append(data.y)
        total += len(data)
    return torch.cat(xs).to(device), torch.cat(ys).to(device), offsets


def _padded_indices(orders: list[Tensor], offsets: list[int], width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-member index rows (into the concatenated data) padded to ``width``, with 0/1 weights."""
    index = torch.zeros(len(orders), width, dtype=torch.long)
    weight = torch.zeros(len(orders), width)
    for row, (order, offset) in enumerate(zip(orders, offsets)):
        index[row, : len(order)] = order + offset
        weight[row, : len(order)] = 1.0
    return index.to(device), weight.to(device)


def _train_batched(
    members: list[Member],
    family: LossFamily,
    schedule: Schedule,
    device: torch.device,
    progress: ProgressCallback | None,
    group_number: int,
    keep_weights: bool,
) -> list[MemberResult]:
    count = len(members)
    models = [member.build() for member in members]
    stacked_params, stacked_buffers = stack_module_state(models)
    params = {name: value.detach().to(device) for name, value in stacked_params.items()}
    buffers = {name: value.to(device) for name, value in stacked_buffers.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")
    del models
    loss_params = torch.stack([m.loss_params.detach().to(torch.float32) for m in members]).to(device)
    scales = family.scales(loss_params)

    train_x, train_y, train_offsets = _concatenate([m.train for m in members], device)
    val_x, val_y, val_offsets = _concatenate([m.val for m in members], device)
    member_train_offset = [train_offsets[id(m.train)] for m in members]
    member_val_offset = [val_offsets[id(m.val)] for m in members]
    train_sizes = [len(m.train) for m in members]
    num_classes = members[0].train.num_classes

    def member_loss(p, b, lp, scale, x, y, w):
        logits = functional_call(skeleton, (p, b), (x,))
        per_example = family.per_example(lp, scale, logits, y)
        # weighted mean = fit's batch mean; padding slots (w = 0) contribute nothing
        return (per_example * w).sum() / w.sum().clamp_min(1.0)

    # vmap the forward only and let ordinary autograd differentiate the batched graph: measured
    # faster than vmap(grad(...)) on CPU (MLP 15 %, grouped convolutions 2x)
    losses_of = vmap(member_loss)
    names = list(params)
    weights = [params[name].requires_grad_(True) for name in names]
    momentum_buffers = [torch.zeros_like(w) for w in weights] if schedule.momentum else []
    diverged = torch.zeros(count, dtype=torch.bool, device=device)
    frozen: dict[int, list[Tensor]] = {}  # member -> its weights at the step its loss went non-finite
    steps_taken = torch.zeros(count, dtype=torch.long, device=device)
    last_epoch_loss = torch.full((count,), float("nan"), dtype=torch.float64)
    generators = [torch.Generator().manual_seed(m.data_seed) for m in members]
    batch = schedule.batch_size
    lr, momentum, weight_decay = schedule.lr, schedule.momentum, schedule.weight_decay

    for epoch in range(1, schedule.epochs + 1):
        # the same permutations fit() draws: one randperm per epoch from the member's generator
        orders = [torch.randperm(n, generator=g) for n, g in zip(train_sizes, generators)]
        steps_in_epoch = max(math.ceil(n / batch) for n in train_sizes)
        index, weight = _padded_indices(orders, member_train_offset, steps_in_epoch * batch, device)
        loss_sum = torch.zeros(count, dtype=torch.float64, device=device)
        seen = torch.zeros(count, dtype=torch.float64, device=device)
        for position in range(steps_in_epoch):
            start = position * batch
            counts = [max(0, min(batch, n - start)) for n in train_sizes]
            width = max(counts)
            batch_index = index[:, start : start + width]
            batch_weight = weight[:, start : start + width]
            # one-hot outside vmap: F.one_hot checks the label range, a data-dependent op vmap rejects
            targets = F.one_hot(train_y[batch_index], num_classes).to(train_x.dtype)
            losses = losses_of(params, buffers, loss_params, scales, train_x[batch_index], targets, batch_weight)
            finite = torch.isfinite(losses.detach())
            # a non-finite member gets no gradient signal; members never mix, so it cannot leak
            grads = list(torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), weights))
            with torch.no_grad():
                active = torch.tensor([c > 0 for c in counts], device=device)
                newly_diverged = active & ~diverged & ~finite
                if bool(newly_diverged.any()):
                    # fit() stops such a member before its update: keep these weights for it
                    for member in newly_diverged.nonzero().flatten().tolist():
                        frozen[member] = [w[member].clone() for w in weights]
                    diverged |= newly_diverged
                update = active & ~diverged
                if all(counts):
                    # every member takes a step: torch.optim.SGD's own (foreach) arithmetic, in
                    # place on the stacks; diverged members are updated too but restored at the end
                    if weight_decay:
                        torch._foreach_add_(grads, weights, alpha=weight_decay)
                    if momentum:
                        torch._foreach_mul_(momentum_buffers, momentum)
                        torch._foreach_add_(momentum_buffers, grads)
                        torch._foreach_add_(weights, momentum_buffers, alpha=-lr)
                    else:
                        torch._foreach_add_(weights, grads, alpha=-lr)
                else:  # a shorter dataset ran out this epoch: those members must not move at all
                    for i, w in enumerate(weights):
                        mask = active.view(count, *([1] * (w.dim() - 1)))
                        grad = grads[i] + weight_decay * w if weight_decay else grads[i]
                        if momentum:
                            new_buffer = momentum * momentum_buffers[i] + grad
                            momentum_buffers[i].copy_(torch.where(mask, new_buffer, momentum_buffers[i]))
                            grad = new_buffer
                        w.copy_(torch.where(mask, w - lr * grad, w))
                steps_taken += update.long()
                counted = batch_weight.sum(1).double()
                loss_sum += torch.where(update, losses.detach().double() * counted, torch.zeros_like(loss_sum))
                seen += torch.where(update, counted, torch.zeros_like(seen))
        trained = (seen > 0).cpu()
        last_epoch_loss = torch.where(trained, (loss_sum / seen.clamp_min(1)).cpu(), last_epoch_loss)
        if progress:
            progress({"group": group_number, "epoch": epoch, "members": count, "alive": int((~diverged).sum())})

    with torch.no_grad():
        for member, kept in frozen.items():
            for w, value in zip(weights, kept):
                w[member] = value
    params = {name: w.detach() for name, w in zip(names, weights)}
    correct = _batched_correct(skeleton, params, buffers, val_x, val_y, member_val_offset, [len(m.val) for m in members], schedule.eval_batch_size, device)
    return [
        MemberResult(
            val_accuracy=float(correct[i]) / max(1, len(m.val)),
            diverged=bool(diverged[i]),
            steps=int(steps_taken[i]),
            train_loss=float(last_epoch_loss[i]),
            batched=True,
            weights={k: v[i].detach().cpu().clone() for k, v in {**params, **buffers}.items()} if keep_weights else None,
        )
        for i, m in enumerate(members)
    ]


@torch.no_grad()
def _batched_correct(skeleton, params, buffers, val_x, val_y, offsets, sizes, chunk, device) -> Tensor:
    forward = vmap(lambda p, b, x: functional_call(skeleton, (p, b), (x,)))
    orders = [torch.arange(n) for n in sizes]
    longest = max(sizes)
    chunk = max(1, chunk // len(sizes))  # the whole stack at once holds no more than one member's eval batch
    index, weight = _padded_indices(orders, offsets, longest, device)
    correct = torch.zeros(len(sizes), dtype=torch.long, device=device)
    for start in range(0, longest, chunk):
        part, mask = index[:, start : start + chunk], weight[:, start : start + chunk] > 0
        predictions = forward(params, buffers, val_x[part]).argmax(-1)
        correct += ((predictions == val_y[part]) & mask).sum(1)
    return correct.cpu()
