"""MetaMD's tasks: the task families (quadratic problems, or domains of a prepared dataset), the
tasks of an outer step (a function of seed and step only), and a network task made concrete (base
model, data on the device, its seeded minibatch stream)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from metaopt_core.config import ConfigError, coerce
from metaopt_core.data.prepare import PreparedData, prepare
from metaopt_core.meta.metamd import quadratics
from metaopt_core.meta.metamd.config import MetaMDConfig
from metaopt_core.meta.metamd.quadratics import QuadraticProblems
from metaopt_core.models import build_model

if TYPE_CHECKING:
    from metaopt_core.meta.metamd.state import MetaMDState


@dataclass(frozen=True)
class Task:
    """One inner problem of an outer step. Quadratic: ``index`` into the meta-train problems.
    Network: ``domain`` to train on, ``init_seed`` (base model), ``data_seed`` (minibatch order),
    ``index`` its slot in the step."""

    kind: Literal["quadratic", "domain"]
    index: int
    domain: str | None = None
    init_seed: int = 0
    data_seed: int = 0

    @property
    def key(self) -> str:
        return f"q{self.index}" if self.kind == "quadratic" else f"{self.index}:{self.domain}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "index": self.index, "domain": self.domain, "init_seed": self.init_seed, "data_seed": self.data_seed}

    @classmethod
    def from_dict(cls, doc: Mapping) -> Task:
        return cls(doc["kind"], int(doc["index"]), doc.get("domain"), int(doc.get("init_seed", 0)), int(doc.get("data_seed", 0)))


@dataclass
class DomainTasks:
    """The domains of a prepared dataset split into meta-train and held-out (meta-test) ones."""

    data: PreparedData
    meta_train: list[str]
    held_out: list[str]

    @classmethod
    def from_prepared(cls, data: PreparedData, held_out: Sequence[str]) -> DomainTasks:
        chosen = [resolve_domain(data.domains, name, "tasks.network.held_out_domains") for name in held_out]
        meta_train = [d for d in data.domains if d not in chosen]
        if not meta_train:
            raise ConfigError(f"tasks.network.held_out_domains: got {list(held_out)}; that leaves no meta-train domain of {data.domains}")
        return cls(data, meta_train, chosen)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.domain(self.data.domains[0])[0].shape


def resolve_domain(domains: Sequence[str], name: str, field_name: str = "domain") -> str:
    """A domain's full name from itself or a suffix (``rot75`` for ``mnist5k-rot75``)."""
    for full in domains:
        if name == full or full.endswith("-" + str(name)):
            return full
    raise ConfigError(f"{field_name}: got {name!r}; allowed: {list(domains)} (or their suffixes after '-')")


@dataclass
class QuadraticTasks:
    """Meta-train and held-out problems of a quadratic family."""

    meta_train: QuadraticProblems
    held_out: QuadraticProblems


TaskSet = QuadraticTasks | DomainTasks
_TASK_CACHE: dict[str, QuadraticTasks] = {}
_PREPARED_CACHE: dict[str, PreparedData] = {}


def task_set(config: MetaMDConfig, data: PreparedData | DomainTasks | QuadraticTasks | None = None) -> TaskSet:
    """The config's tasks: quadratic problems, or the prepared domains (``data`` if given — the
    pipeline passes the prepared artifact —, else prepared here, cached per spec in the process)."""
    config = coerce(MetaMDConfig, config)
    if isinstance(data, (DomainTasks, QuadraticTasks)):
        return data
    if config.tasks.family == "quadratic":
        if data is not None:
            raise TypeError(f"data: got {type(data).__name__}; quadratic tasks take no data")
        key = "q:" + json.dumps(config.tasks.quadratic.model_dump(mode="json"), sort_keys=True)
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = QuadraticTasks(*quadratics.split(config.tasks.quadratic))
        return _TASK_CACHE[key]
    network = config.tasks.network
    if isinstance(data, PreparedData):
        return DomainTasks.from_prepared(data, network.held_out_domains)
    if data is not None:
        raise TypeError(f"data: got {type(data).__name__}; allowed: PreparedData, DomainTasks or None")
    key = "d:" + json.dumps(network.data.model_dump(mode="json"), sort_keys=True)
    if key not in _PREPARED_CACHE:
        if len(_PREPARED_CACHE) >= 2:
            _PREPARED_CACHE.clear()
        _PREPARED_CACHE[key] = prepare(network.data)
    return DomainTasks.from_prepared(_PREPARED_CACHE[key], network.held_out_domains)


def seed_sequence(*entropy: int) -> np.random.SeedSequence:
    """The seed stream of a tuple of integers (run seed, step, slot, a per-use constant)."""
    return np.random.SeedSequence([int(e) for e in entropy])


def tasks_for_step(state: MetaMDState, data: TaskSet | PreparedData | None = None) -> list[Task]:
    """The tasks of the state's next outer step: a function of (seed, step) only.

    Quadratic: ``tasks_per_step`` distinct meta-train problems. Networks: the meta-train domains in a
    seeded order, repeated to fill ``tasks_per_step`` slots, each slot with fresh seeds.
    """
    config = state.metamd_config
    tasks = task_set(config, data)
    count = config.outer.tasks_per_step
    rng = np.random.default_rng(seed_sequence(config.seed, state.step, 0x7A5C))
    if isinstance(tasks, QuadraticTasks):
        chosen = rng.choice(len(tasks.meta_train), size=count, replace=False)
        return [Task("quadratic", int(i)) for i in sorted(chosen)]
    order = [tasks.meta_train[i] for i in rng.permutation(len(tasks.meta_train))]
    out = []
    for slot in range(count):
        init_seed, data_seed = seed_sequence(config.seed, state.step, slot, 0x5107).generate_state(2)
        out.append(Task("domain", slot, order[slot % len(order)], int(init_seed), int(data_seed)))
    return out


# ============================================================================= network tasks


def base_model(config: MetaMDConfig, tasks: DomainTasks, seed: int | None = None) -> nn.Module:
    """A fresh base network of the config (``tasks.network.model``) for the domains' image shape and
    classes, initialised from ``seed``."""
    channels, height, width = tasks.shape
    if height != width:
        raise ValueError(f"data: images must be square, got {height}x{width}")
    network = config.tasks.network
    return build_model(network.model, channels, height, tasks.data.num_classes, seed=seed, **network.model_options)


@dataclass
class NetworkTask:
    """A network task made concrete: data on the device, the minibatch index stream, the base model."""

    model: nn.Module
    names: list[str]
    init: list[Tensor]
    x: Tensor
    y: Tensor
    batches: list[Tensor]  # T + 1 index batches: step t uses batches[t]; θ_t is scored on batches[t]
    check: Tensor  # seeded subset for the implicit method's L_tr


def minibatch_stream(count: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """``steps`` index batches from seeded epoch permutations of ``count`` examples (a partial last
    batch of an epoch is dropped so every step sees ``batch_size`` examples when count allows)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, count)
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - size + 1, size):
            batches.append(order[start : start + size])
            if len(batches) == steps:
                break
    return batches


def network_task(config: MetaMDConfig, tasks: DomainTasks, task: Task, steps: int | None = None) -> NetworkTask:
    """Build task ``task``: the base model with its seeded init, the domain's training split on the
    device, T + 1 minibatches (``steps`` overrides T) and the L_tr subset."""
    device = torch.device(config.device)
    steps = config.inner.steps if steps is None else steps
    train, _ = tasks.data.domain(task.domain)
    model = base_model(config, tasks, seed=task.init_seed).to(device)
    names = [n for n, _ in model.named_parameters()]
    init = [p.detach().clone() for _, p in model.named_parameters()]
    batches = minibatch_stream(len(train), config.tasks.network.batch_size, steps + 1, task.data_seed)
    generator = torch.Generator().manual_seed(task.data_seed + 1)
    check = torch.randperm(len(train), generator=generator)[: config.tasks.network.hypergrad_examples]
    return NetworkTask(model, names, init, train.x.to(device), train.y.to(device), [b.to(device) for b in batches], check.to(device))


__all__ = [
    "DomainTasks",
    "NetworkTask",
    "QuadraticTasks",
    "Task",
    "TaskSet",
    "base_model",
    "minibatch_stream",
    "network_task",
    "resolve_domain",
    "seed_sequence",
    "task_set",
    "tasks_for_step",
]
