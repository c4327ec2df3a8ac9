"""Inner-loop training of one base model with a given loss and optimiser.

Data are in-memory tensors and minibatches are drawn by a seeded permutation, so a run is
deterministic on CPU for a given seed. A non-finite loss stops training cleanly and marks the run
as diverged (a meta-learner scores such a candidate as the worst, it does not crash).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from metaopt_core.data.sources import ImageData

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
ProgressCallback = Callable[[dict], None]


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer: got {name!r}; allowed: {list(OPTIMIZERS)}")


def minibatches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch of shuffled index batches (the last partial batch included)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, batch_size: int = 1024, device: str | torch.device | None = None) -> float:
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        correct += int((model(x).argmax(-1).cpu() == data.y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(data))


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    diverged: bool = False
    steps: int = 0

    def last(self, key: str, default: float = float("nan")) -> float:
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return default


def fit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train: ImageData,
    *,
    val: ImageData | dict[str, ImageData] | None = None,
    optimizer: str | torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Train ``model`` in place for ``epochs`` epochs or ``steps`` steps (whichever is given;
    with both, whichever ends first). Validation accuracy is recorded after every epoch as
    ``val_acc`` (one set) or ``val_acc/<name>`` (a dict of sets)."""
    if epochs is None and steps is None:
        raise ValueError("fit: give epochs or steps")
    device = torch.device(device) if device else next(model.parameters()).device
    model.to(device).train()
    if isinstance(optimizer, str):
        opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        opt = optimizer(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    val_sets = {"": val} if isinstance(val, ImageData) else dict(val or {})
    result = FitResult()
    max_epochs = epochs if epochs is not None else math.ceil(steps / math.ceil(len(train) / batch_size))
    for epoch in range(1, max_epochs + 1):
        total_loss, correct, seen = 0.0, 0, 0
        for index in minibatches(len(train), batch_size, generator):
            x, y = train.x[index].to(device), train.y[index].to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                result.diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.steps += 1
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(index)
            if steps is not None and result.steps >= steps:
                break
        row = {"epoch": epoch, "step": result.steps, "train_loss": total_loss / max(seen, 1),
               "train_acc": correct / max(seen, 1)}  # fmt: skip
        for name, data in val_sets.items():
            row["val_acc" if not name else f"val_acc/{name}"] = accuracy(model, data, device=device)
        if result.diverged:
            row["diverged"] = True
        result.history.append(row)
        if progress:
            progress(row)
        if result.diverged or (steps is not None and result.steps >= steps):
            break
    return result
