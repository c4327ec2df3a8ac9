"""Train many (model, loss-parameter) members in one process, in lockstep.

A *member* is one inner training run of ARL's Cartesian product population × pool: an
architecture, a noisy training set, a clean validation set, a vector of loss parameters and two
seeds (initial weights, minibatch order). :func:`train_population` trains a list of members and
returns each one's clean validation accuracy.

:func:`train_batched` is the project's one batched inner trainer: ARL's population (through
:func:`train_population`) and ITL's leave-one-domain-out models (``metaopt_core.meta.itl.inner``)
both use it, ITL adding a gradient-norm convergence check.

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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from metaopt_core.data.sources import ImageData
from metaopt_core.losses.families import LossFamily
from metaopt_core.models import VMAP_FRIENDLY, build_model
from metaopt_core.train import accuracy, fit

ProgressCallback = Callable[[dict], None]


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
            raise ValueError(f"members[{position}].loss_params: got shape {tuple(member.loss_params.shape)}; the loss family needs ({family.num_params},)")
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
            for position, result in zip(chunk, _train_group([members[i] for i in chunk], family, schedule, device, progress, group_number, keep_weights)):
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
    scale = family.scales(params.unsqueeze(0), member.train.num_classes)[0]

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


def concatenate_sets(sets: list[ImageData], device: torch.device) -> tuple[Tensor, Tensor, dict[int, int]]:
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


def _padded(rows: Sequence[Tensor], device: torch.device, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Index rows of unequal length -> (P, width) indices padded with 0, and 0/1 weights."""
    width = max(len(row) for row in rows) if width is None else width
    index = torch.zeros(len(rows), width, dtype=torch.long)
    weight = torch.zeros(len(rows), width)
    for position, row in enumerate(rows):
        index[position, : len(row)] = row
        weight[position, : len(row)] = 1.0
    return index.to(device), weight.to(device)


def _train_group(
    members: list[Member],
    family: LossFamily,
    schedule: Schedule,
    device: torch.device,
    progress: ProgressCallback | None,
    group_number: int,
    keep_weights: bool,
) -> list[MemberResult]:
    """One vmapped group of population members: :func:`train_batched`, then clean validation accuracy."""
    train_x, train_y, train_offsets = concatenate_sets([m.train for m in members], device)
    val_x, val_y, val_offsets = concatenate_sets([m.val for m in members], device)
    # a member trains on its own set's rows of the concatenation
    sources = [torch.arange(len(m.train)) + train_offsets[id(m.train)] for m in members]
    loss_params = torch.stack([m.loss_params.detach().to(torch.float32) for m in members])

    def report(info: dict) -> None:
        if progress:  # in a population only divergence freezes a member: active == alive
            progress({"group": group_number, "epoch": info["epoch"], "members": info["members"], "alive": info["active"]})

    trained = train_batched(
        [m.build() for m in members], family, loss_params, train_x, train_y, sources, [m.data_seed for m in members],
        schedule, num_classes=members[0].train.num_classes, progress=report,
    )  # fmt: skip
    val_sources = [torch.arange(len(m.val)) + val_offsets[id(m.val)] for m in members]
    correct = batched_correct(trained.skeleton, trained.params, trained.buffers, val_x, val_y, val_sources, schedule.eval_batch_size, device)
    state = {**trained.params, **trained.buffers}
    return [
        MemberResult(
            val_accuracy=float(correct[i]) / max(1, len(m.val)),
            diverged=trained.diverged[i],
            steps=trained.steps[i],
            train_loss=trained.train_loss[i],
            batched=True,
            weights={k: v[i].detach().cpu().clone() for k, v in state.items()} if keep_weights else None,
        )
        for i, m in enumerate(members)
    ]


@dataclass
class BatchedTraining:
    """What :func:`train_batched` returns: the members' trained weights, stacked, and how each
    member's training went (lists indexed by member)."""

    skeleton: torch.nn.Module  # the architecture on the meta device: functional_call(skeleton, ...)
    params: dict[str, Tensor]  # (P, ...) trained weights, detached
    buffers: dict[str, Tensor]  # (P, ...)
    steps: list[int]  # optimiser steps taken (a frozen member stops counting)
    epochs: list[int]  # epochs begun unfrozen and finished without diverging
    diverged: list[bool]  # its loss turned non-finite: weights are those before that step
    converged: list[bool]  # its check-subset gradient norm fell to grad_tol after some epoch
    grad_norms: list[list[float]]  # check-subset gradient norm after each epoch it trained
    train_loss: list[float]  # mean training loss over the last epoch it trained (nan if none)

    def member(self, index: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(params, buffers) of one member, as views into the stacks."""
        return {k: v[index] for k, v in self.params.items()}, {k: v[index] for k, v in self.buffers.items()}


def train_batched(
    models: Sequence[torch.nn.Module],
    family: LossFamily,
    loss_params: Tensor,
    x: Tensor,
    y: Tensor,
    sources: Sequence[Tensor],
    data_seeds: Sequence[int],
    schedule: Schedule,
    *,
    num_classes: int,
    check: Sequence[Tensor] | None = None,
    grad_tol: float = 0.0,
    progress: ProgressCallback | None = None,
    epoch_end: Callable[[int, dict[str, Tensor], dict[str, Tensor], Tensor], None] | None = None,
) -> BatchedTraining:
    """Train P models of one architecture in lockstep with SGD (momentum, weight decay) for
    ``schedule.epochs`` epochs: ARL's population and ITL's leave-one-domain-out models.

    Member i starts from ``models[i]``'s weights, minimises the mean of
    ``family.per_example(loss_params[i], scale_i, logits, one_hot(y))`` over minibatches of the
    rows ``sources[i]`` of ``x``/``y`` (on the training device), drawn each epoch — frozen or not,
    as its sequential run would — as ``sources[i][randperm(len, generator seeded data_seeds[i])]``.
    Rows of different lengths are padded with zero-weight slots; a member whose rows ran out for
    the epoch does not move. A member *freezes*, keeping its weights of that moment, when its loss
    turns non-finite (``diverged``, before that step's update) or, with ``check`` and
    ``grad_tol > 0``, when after an epoch the gradient norm of its objective on the rows
    ``check[i]`` (weight decay included) is ``<= grad_tol`` (``converged``); training stops once
    every member is frozen. ``progress`` gets ``{"epoch", "members", "active"}`` per epoch;
    ``epoch_end(epoch, params, buffers, diverged)`` sees the stacked weights (detached; a diverged
    member's are not meaningful) after every epoch, e.g. to score every member per epoch.
    """
    count = len(models)
    device = x.device
    if not (len(sources) == len(data_seeds) == loss_params.shape[0] == count) or (check is not None and len(check) != count):
        raise ValueError(f"train_batched: got {count} models but {len(sources)} sources, {len(data_seeds)} seeds, {loss_params.shape[0]} loss parameter rows")
    stacked_params, stacked_buffers = stack_module_state(list(models))
    params = {name: value.detach().to(device) for name, value in stacked_params.items()}
    buffers = {name: value.to(device) for name, value in stacked_buffers.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")
    loss_params = loss_params.detach().to(device)
    scales = family.scales(loss_params, num_classes)

    def member_loss(p, b, lp, scale, inputs, targets, w):
        logits = functional_call(skeleton, (p, b), (inputs,))
        per_example = family.per_example(lp, scale, logits, targets)
        # weighted mean = the sequential batch mean; padding slots (w = 0) contribute nothing
        return (per_example * w).sum() / w.sum().clamp_min(1.0)

    # vmap the forward only and let ordinary autograd differentiate the batched graph: measured
    # faster than vmap(grad(...)) on CPU (MLP 15 %, grouped convolutions 2x). Members never mix
    # in any operation, so one backward of the summed losses gives every member its own gradient.
    losses_of = vmap(member_loss)
    names = list(params)
    weights = [params[name].requires_grad_(True) for name in names]
    momentum_buffers = [torch.zeros_like(w) for w in weights] if schedule.momentum else []
    frozen = torch.zeros(count, dtype=torch.bool, device=device)
    diverged = torch.zeros(count, dtype=torch.bool, device=device)
    converged = torch.zeros(count, dtype=torch.bool, device=device)
    kept: dict[int, list[Tensor]] = {}  # frozen member -> its weights at the moment it froze
    epochs = torch.zeros(count, dtype=torch.long)
    steps_taken = torch.zeros(count, dtype=torch.long, device=device)
    last_epoch_loss = torch.full((count,), float("nan"), dtype=torch.float64)
    norms: list[list[float]] = [[] for _ in range(count)]
    generators = [torch.Generator().manual_seed(seed) for seed in data_seeds]
    sizes = [len(source) for source in sources]
    batch = schedule.batch_size
    if check is not None and grad_tol > 0:
        check_index, check_weight = _padded(check, device)
        check_targets = F.one_hot(y[check_index], num_classes).to(x.dtype)

    def freeze(members: Tensor) -> None:
        for member in members.nonzero().flatten().tolist():
            kept[member] = [w[member].clone() for w in weights]

    for epoch in range(1, schedule.epochs + 1):
        # the same permutations the sequential paths draw: one randperm per epoch from the member's generator
        orders = [source[torch.randperm(len(source), generator=g)] for source, g in zip(sources, generators)]
        index, weight = _padded(orders, device, width=math.ceil(max(sizes) / batch) * batch)
        active_epoch = ~frozen
        loss_sum = torch.zeros(count, dtype=torch.float64, device=device)
        seen = torch.zeros(count, dtype=torch.float64, device=device)
        for start in range(0, index.shape[1], batch):
            counts = [max(0, min(batch, n - start)) for n in sizes]
            width = max(counts)
            batch_index = index[:, start : start + width]
            batch_weight = weight[:, start : start + width]
            # one-hot outside vmap: F.one_hot checks the label range, a data-dependent op vmap rejects
            targets = F.one_hot(y[batch_index], num_classes).to(x.dtype)
            losses = losses_of(params, buffers, loss_params, scales, x[batch_index], targets, batch_weight)
            finite = torch.isfinite(losses.detach())
            # a non-finite member gets no gradient signal; members never mix, so it cannot leak
            grads = list(torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), weights))
            with torch.no_grad():
                has_data = torch.tensor([c > 0 for c in counts], device=device)
                newly_diverged = has_data & ~frozen & ~finite
                if bool(newly_diverged.any()):
                    freeze(newly_diverged)  # the sequential paths stop such a member before its update
                    diverged |= newly_diverged
                    frozen |= newly_diverged
                update = has_data & ~frozen
                # frozen members move too (cheaper than masking); their kept weights are restored at the end
                _sgd_step(weights, grads, momentum_buffers, schedule, None if all(counts) else has_data)
                steps_taken += update.long()
                counted = batch_weight.sum(1).double()
                loss_sum += torch.where(update, losses.detach().double() * counted, torch.zeros_like(loss_sum))
                seen += torch.where(update, counted, torch.zeros_like(seen))
        trained = (seen > 0).cpu()
        last_epoch_loss = torch.where(trained, (loss_sum / seen.clamp_min(1)).cpu(), last_epoch_loss)
        epochs += (active_epoch & ~diverged).cpu().long()
        if check is not None and grad_tol > 0:
            epoch_norms = _grad_norms(losses_of, weights, params, buffers, loss_params, scales,
                                      x[check_index], check_targets, check_weight, schedule.weight_decay)  # fmt: skip
            measured = active_epoch & ~diverged
            for member in measured.nonzero().flatten().tolist():
                norms[member].append(float(epoch_norms[member]))
            newly_converged = (epoch_norms <= grad_tol) & measured
            freeze(newly_converged)
            converged |= newly_converged
            frozen |= newly_converged
        if progress:
            progress({"epoch": epoch, "members": count, "active": int((~frozen).sum())})
        if epoch_end:
            epoch_end(epoch, {name: w.detach() for name, w in zip(names, weights)}, buffers, diverged.clone())
        if bool(frozen.all()):
            break

    with torch.no_grad():
        for member, weights_then in kept.items():
            for w, value in zip(weights, weights_then):
                w[member] = value
    return BatchedTraining(
        skeleton=skeleton,
        params={name: w.detach() for name, w in zip(names, weights)},
        buffers=buffers,
        steps=steps_taken.tolist(),
        epochs=epochs.tolist(),
        diverged=diverged.tolist(),
        converged=converged.tolist(),
        grad_norms=norms,
        train_loss=last_epoch_loss.tolist(),
    )


def _sgd_step(weights: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], schedule: Schedule, mask: Tensor | None) -> None:
    """One SGD-with-momentum step on the stacked weights, in place; ``mask`` (P,) selects the
    members that move (None: all of them)."""
    lr, momentum, weight_decay = schedule.lr, schedule.momentum, schedule.weight_decay
    if mask is None:  # torch.optim.SGD's own (foreach) arithmetic
        if weight_decay:
            torch._foreach_add_(grads, weights, alpha=weight_decay)
        if momentum:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, grads)
            torch._foreach_add_(weights, momentum_buffers, alpha=-lr)
        else:
            torch._foreach_add_(weights, grads, alpha=-lr)
        return
    for i, w in enumerate(weights):
        member_mask = mask.view(len(mask), *([1] * (w.dim() - 1)))
        grad = grads[i] + weight_decay * w if weight_decay else grads[i]
        if momentum:
            new_buffer = momentum * momentum_buffers[i] + grad
            momentum_buffers[i].copy_(torch.where(member_mask, new_buffer, momentum_buffers[i]))
            grad = new_buffer
        w.copy_(torch.where(member_mask, w - lr * grad, w))


def _grad_norms(losses_of, weights, params, buffers, loss_params, scales, x, targets, weight, weight_decay) -> Tensor:
    """(P,) norm of each member's gradient of its objective (loss + weight decay) on the given rows."""
    losses = losses_of(params, buffers, loss_params, scales, x, targets, weight)
    finite = torch.isfinite(losses.detach())
    grads = torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), weights)
    with torch.no_grad():
        # the objective SGD with weight decay minimises includes (decay / 2) ||w||^2
        squares = [((g + weight_decay * w) if weight_decay else g).pow(2).flatten(1).sum(1) for g, w in zip(grads, weights)]
        return torch.where(finite, torch.stack(squares).sum(0).sqrt(), float("nan"))


@torch.no_grad()
def batched_correct(skeleton, params, buffers, val_x, val_y, sources, chunk, device) -> Tensor:
    """(P,) correct predictions of each member on its own validation rows."""
    forward = vmap(lambda p, b, x: functional_call(skeleton, (p, b), (x,)))
    longest = max(len(source) for source in sources)
    chunk = max(1, chunk // len(sources))  # the whole stack at once holds no more than one member's eval batch
    index, weight = _padded(sources, device, width=longest)
    correct = torch.zeros(len(sources), dtype=torch.long, device=device)
    for start in range(0, longest, chunk):
        part, mask = index[:, start : start + chunk], weight[:, start : start + chunk] > 0
        predictions = forward(params, buffers, val_x[part]).argmax(-1)
        correct += ((predictions == val_y[part]) & mask).sum(1)
    return correct.cpu()
