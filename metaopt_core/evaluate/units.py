"""The loss meta-test's engine: every (candidate loss, lr, unit) trained in batched passes, scored on
every epoch, then read out under the three protocols a user can mean by "this loss trains better".

A **unit** is one independent replicate of a task: its own split of the data (train / selection /
test), its own label noise, its own initial weights and minibatch order (``init_seed``,
``data_seed``). Within a unit every candidate and every lr start from the same weights and see the
same minibatches (common random numbers), so the paired differences between candidates measure the
losses, not the draw.

Training: SGD with momentum for ``epochs`` epochs, each (candidate, unit, lr) one member of
:func:`metaopt_core.population.train_batched` (members of one candidate and one architecture are
stacked into one vmapped model; the lr enters as a per-member multiplier on the loss, exactly
SGD-with-momentum at that lr when there is no weight decay). Architectures with running statistics
(BatchNorm) go through :func:`metaopt_core.train.fit`, the reference the batched path matches.
Every epoch scores each member on its unit's selection and test splits.

The protocols (:data:`PROTOCOLS`), read from the same curves:

- ``fixed``: the thesis's Table 3.1 recipe: one lr for every loss (``recipe_lr``), the last epoch
  ("at convergence", no early stopping);
- ``tuned``: each (candidate, unit) at the grid's lr with the best last-epoch selection accuracy,
  scored at the last epoch;
- ``early-stop``: the thesis's Table 3.3: each (candidate, unit) at the (lr, epoch) with the best
  selection accuracy (earliest epoch, then first lr in grid order, on ties), scored at that epoch.

A run whose loss turned non-finite is *diverged*: it scores chance at the last epoch, and early
stopping may still pick an epoch completed before the divergence. Nothing here looks at a test
split to choose anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from metaopt_core.data.sources import ImageData

PROTOCOLS = ("early-stop", "tuned", "fixed")
PROTOCOL_TEXT = {
    "early-stop": "lr and epoch chosen on the selection split (noisy validation / source-domain validation), thesis Table 3.3",
    "tuned": "lr chosen on the selection split's last-epoch accuracy, scored at convergence",
    "fixed": "one lr for every loss (the recipe's), scored at convergence, no early stopping, thesis Table 3.1",
}
ProgressCallback = Callable[[dict], None]


@dataclass
class Unit:
    """One independent meta-test replicate of a task (see the module docstring)."""

    task: str  # e.g. "digits · symmetric 80% · mlp2"
    seed: int
    train: ImageData
    select: ImageData
    test: ImageData
    model: str
    init_seed: int
    data_seed: int
    model_options: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def build(self) -> nn.Module:
        from metaopt_core.models import build_model

        channels, size, _ = self.train.shape
        return build_model(self.model, channels, size, self.num_classes, seed=self.init_seed, **self.model_options)

    def batch_key(self) -> tuple:
        return (self.model, tuple(sorted(self.model_options.items())), self.train.shape, self.num_classes)

    def describe(self) -> dict:
        return {"task": self.task, "seed": self.seed, "model": self.model, "train": len(self.train), "select": len(self.select),
                "test": len(self.test), "init_seed": self.init_seed, "data_seed": self.data_seed}  # fmt: skip


@dataclass
class Curve:
    """One (candidate, unit, lr) training: accuracy on the selection and test splits after every
    completed epoch (a diverged run's curve stops before the epoch it diverged in)."""

    select: list[float]
    test: list[float]
    diverged: bool
    epochs: int  # epochs trained (the protocol's budget)


@dataclass
class Training:
    """What :func:`train_units` returns: the curve of every (label, unit index, lr)."""

    curves: dict[tuple[str, int, float], Curve]
    labels: list[str]
    lr_grid: list[float]
    units: list[Unit]
    seconds: float = 0.0
    batched_members: int = 0
    sequential_members: int = 0

    def curve(self, label: str, unit: int, lr: float) -> Curve:
        return self.curves[(label, unit, lr)]


class LrScaledFamily:
    """A :class:`~metaopt_core.population.LossFamily` with one extra parameter per member, the last,
    that multiplies its loss: the member's lr when the schedule's lr is 1 (with SGD and momentum
    and no weight decay that is exactly training at that lr), so members at different lrs stack."""

    def __init__(self, family: Any) -> None:
        self.family = family

    @property
    def num_params(self) -> int:
        return self.family.num_params + 1

    def scales(self, params: Tensor, classes: int) -> Tensor:
        return self.family.scales(params[:, :-1], classes) * params[:, -1]

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return self.family.per_example(params[:-1], scale, logits, target)


class ModuleFamily:
    """A fixed loss module (reduction 'none') as a parameterless loss family."""

    num_params = 0

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def scales(self, params: Tensor, classes: int) -> Tensor:
        return torch.ones(params.shape[0], dtype=params.dtype, device=params.device)

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        # one-hot targets under vmap; every loss of the registry takes class indices
        return scale * self.module(logits, target.argmax(-1))


def _per_example(loss: nn.Module) -> nn.Module:
    """The loss with reduction 'none' (a loss document's module, or a registry loss)."""
    if hasattr(loss, "reduction"):
        import copy

        loss = copy.deepcopy(loss)
        loss.reduction = "none"
        return loss
    from metaopt_core.losses.document import ScaledLoss

    if isinstance(loss, ScaledLoss):
        return ScaledLoss(_per_example(loss.loss), loss.lr_scale)
    raise TypeError(f"loss: {type(loss).__name__} has no 'reduction'; the meta-test needs per-example losses")


def train_members(
    family: Any,
    params: Tensor,
    units: Sequence[Unit],
    lrs: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    max_batch: int | None = None,
) -> list[Curve]:
    """Member m: the loss ``family`` with parameters ``params[m]`` trained at ``lrs[m]`` on
    ``units[m]``; its per-epoch curve. Members whose units share an architecture and image shape
    train in one vmapped group (at most ``max_batch`` members; with weight decay, which an lr
    multiplier on the loss would not scale, one group per lr); architectures with running
    statistics train one by one through :func:`metaopt_core.train.fit`."""
    from metaopt_core.models import VMAP_FRIENDLY
    from metaopt_core.population import Schedule

    if not (len(units) == len(lrs) == params.shape[0]):
        raise ValueError(f"train_members: got {params.shape[0]} parameter rows, {len(units)} units, {len(lrs)} lrs")
    device = torch.device(device or "cpu")
    curves: list[Curve | None] = [None] * len(units)
    groups: dict[tuple, list[int]] = {}
    for m, unit in enumerate(units):
        key = (*unit.batch_key(), float(lrs[m]) if weight_decay else None) if unit.model in VMAP_FRIENDLY else ("sequential", m)
        groups.setdefault(key, []).append(m)
    for key, members in groups.items():
        if key[0] == "sequential":
            [m] = members
            curves[m] = _train_sequential(_FamilyLoss(family, params[m]), units[m], float(lrs[m]), epochs, batch_size, momentum, weight_decay, device)
            continue
        size = max_batch or len(members)
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            scale, lr = ([1.0] * len(chunk), float(lrs[chunk[0]])) if weight_decay else ([float(lrs[m]) for m in chunk], 1.0)
            rows = torch.cat([params[chunk].to(torch.float32), torch.tensor(scale).unsqueeze(1)], dim=1)
            schedule = Schedule(lr=lr, momentum=momentum, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size)
            for m, curve in zip(chunk, _train_batched(LrScaledFamily(family), rows, [units[m] for m in chunk], schedule, device)):
                curves[m] = curve
    return curves  # type: ignore[return-value]


class _FamilyLoss(nn.Module):
    """One member's loss as a module (the sequential path)."""

    def __init__(self, family: Any, params: Tensor) -> None:
        super().__init__()
        self.family, self.params = family, params.detach().to(torch.float32)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        import torch.nn.functional as F

        scale = self.family.scales(self.params.unsqueeze(0), logits.shape[-1])[0]
        return self.family.per_example(self.params, scale, logits, F.one_hot(target, logits.shape[-1]).to(logits.dtype)).mean()


def train_units(
    losses: Mapping[str, nn.Module],
    units: Sequence[Unit],
    lr_grid: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    device: str | torch.device | None = None,
    max_batch: int | None = None,
    progress: ProgressCallback | None = None,
) -> Training:
    """Train every loss of ``losses`` (label -> loss module) at every lr of ``lr_grid`` on every
    unit for ``epochs`` epochs; score every epoch (see the module docstring)."""
    grid = [float(lr) for lr in lr_grid]
    if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"lr_grid: got {list(lr_grid)}; allowed: distinct finite numbers > 0")
    if not units:
        raise ValueError("units: got none")
    started = time.perf_counter()
    training = Training({}, list(losses), grid, list(units))
    members = [(u, lr) for u in range(len(units)) for lr in grid]
    for done, (label, loss) in enumerate(losses.items(), start=1):
        family = ModuleFamily(_per_example(loss).to(torch.device(device or "cpu")))
        _warm_up(family.module, {unit.num_classes for unit in units}, device)
        curves = train_members(family, torch.zeros(len(members), 0), [units[u] for u, _ in members], [lr for _, lr in members], epochs=epochs,
                               batch_size=batch_size, momentum=momentum, device=device, max_batch=max_batch)  # fmt: skip
        for (u, lr), curve in zip(members, curves):
            training.curves[(label, u, lr)] = curve
        if progress:
            progress({"label": label, "done": done * len(members), "total": len(losses) * len(members)})
    from metaopt_core.models import VMAP_FRIENDLY

    training.batched_members = sum(len(grid) * len(losses) for unit in units if unit.model in VMAP_FRIENDLY)
    training.sequential_members = len(units) * len(grid) * len(losses) - training.batched_members
    training.seconds = time.perf_counter() - started
    return training


@torch.no_grad()
def _warm_up(module: nn.Module, class_counts: set[int], device: str | torch.device | None) -> None:
    """One call outside vmap per class count: what a loss computes once and caches (the A.3
    normalisation of a fixed Taylor loss samples the simplex, a random operation vmap refuses)."""
    for classes in sorted(class_counts):
        module(torch.zeros(2, classes, device=device or "cpu"), torch.zeros(2, dtype=torch.long, device=device or "cpu"))


def _train_batched(family: Any, params: Tensor, units: list[Unit], schedule: Any, device: torch.device) -> list[Curve]:
    from metaopt_core.population import batched_correct, concatenate_sets, train_batched

    train_x, train_y, train_at = concatenate_sets([u.train for u in units], device)
    select_x, select_y, select_at = concatenate_sets([u.select for u in units], device)
    test_x, test_y, test_at = concatenate_sets([u.test for u in units], device)
    sources = [torch.arange(len(u.train)) + train_at[id(u.train)] for u in units]
    select_rows = [torch.arange(len(u.select)) + select_at[id(u.select)] for u in units]
    test_rows = [torch.arange(len(u.test)) + test_at[id(u.test)] for u in units]
    curves = [Curve([], [], False, schedule.epochs) for _ in units]
    skeleton = units[0].build().to("meta")

    def score(epoch: int, weights: dict, buffers: dict, diverged: Tensor) -> None:
        for split_x, split_y, rows, key in ((select_x, select_y, select_rows, "select"), (test_x, test_y, test_rows, "test")):
            correct = batched_correct(skeleton, weights, buffers, split_x, split_y, rows, 1000, device)
            for m, curve in enumerate(curves):
                if not bool(diverged[m]):
                    getattr(curve, key).append(float(correct[m]) / max(1, len(rows[m])))

    trained = train_batched([u.build() for u in units], family, params, train_x, train_y, sources, [u.data_seed for u in units], schedule,
                            num_classes=units[0].num_classes, epoch_end=score)  # fmt: skip
    for curve, diverged in zip(curves, trained.diverged):
        curve.diverged = bool(diverged)
    return curves


def _train_sequential(loss: nn.Module, unit: Unit, lr: float, epochs: int, batch_size: int, momentum: float, weight_decay: float,
                      device: torch.device) -> Curve:  # fmt: skip
    import copy

    from metaopt_core.train import fit

    model = unit.build().to(device)
    result = fit(model, copy.deepcopy(loss).to(device), unit.train, val={"select": unit.select, "test": unit.test}, optimizer="sgd", lr=lr,
                 momentum=momentum, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, seed=unit.data_seed, device=device)  # fmt: skip
    rows = [row for row in result.history if not row.get("diverged")]
    return Curve([row["val_acc/select"] for row in rows], [row["val_acc/test"] for row in rows], bool(result.diverged), epochs)


# ----------------------------------------------------------------------------- the protocols


@dataclass(frozen=True)
class Choice:
    """What one protocol made of one (candidate, unit): the lr and epoch it used and the test accuracy there."""

    lr: float
    epoch: int  # 1-based; 0 when no epoch completed (chance)
    test: float
    select: float  # the selection accuracy it was chosen by (nan for the fixed recipe)


def choose(training: Training, label: str, unit: int, protocol: str, recipe_lr: float | None = None) -> Choice:
    """The (lr, epoch) ``protocol`` picks for ``label`` on unit ``unit``, and its test accuracy."""
    chance = training.units[unit].chance

    def last(curve: Curve) -> tuple[float, float, int]:  # (select, test, epoch) at convergence
        complete = not curve.diverged and len(curve.test) == curve.epochs
        return (curve.select[-1], curve.test[-1], curve.epochs) if complete else (chance, chance, 0)

    if protocol == "fixed":
        if recipe_lr is None or float(recipe_lr) not in training.lr_grid:
            raise ValueError(f"recipe_lr: got {recipe_lr!r}; the fixed recipe's lr must be one of the trained grid {training.lr_grid}")
        _, test, epoch = last(training.curve(label, unit, float(recipe_lr)))
        return Choice(float(recipe_lr), epoch, test, math.nan)
    if protocol == "tuned":
        rows = [(last(training.curve(label, unit, lr)), lr) for lr in training.lr_grid]
        (select, test, epoch), lr = max(rows, key=lambda row: row[0][0])  # first in grid order on ties
        return Choice(lr, epoch, test, select)
    if protocol == "early-stop":
        best: Choice | None = None
        for lr in training.lr_grid:
            curve = training.curve(label, unit, lr)
            if not curve.select:
                candidate = Choice(lr, 0, chance, chance)
            else:
                epoch = max(range(len(curve.select)), key=lambda e: (curve.select[e], -e))  # earliest best epoch
                candidate = Choice(lr, epoch + 1, curve.test[epoch], curve.select[epoch])
            if best is None or candidate.select > best.select:
                best = candidate
        return best  # type: ignore[return-value]
    raise ValueError(f"protocol: got {protocol!r}; allowed: {list(PROTOCOLS)}")


def oracle(training: Training, label: str, unit: int, protocol: str) -> float:
    """The test accuracy the protocol would reach if it could choose on the test split: what the
    selection split's choice gives up (its regret) is a measure of how well it ranks lrs."""
    chance = training.units[unit].chance
    values = []
    for lr in training.lr_grid:
        curve = training.curve(label, unit, lr)
        if protocol == "early-stop":
            values.append(max(curve.test, default=chance))
        else:
            complete = not curve.diverged and len(curve.test) == curve.epochs
            values.append(curve.test[-1] if complete else chance)
    return max(values)


__all__ = [
    "PROTOCOLS",
    "PROTOCOL_TEXT",
    "Choice",
    "Curve",
    "LrScaledFamily",
    "ModuleFamily",
    "Training",
    "Unit",
    "choose",
    "oracle",
    "train_members",
    "train_units",
]
