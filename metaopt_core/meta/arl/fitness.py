"""Evaluating a generation: train every (candidate loss, pool entry) job — all of them or one
shard — and score it. CMA-ES minimises, so

    fitness = −(mean clean-validation accuracy over the pool)   ∈ [−1, 0]

A candidate whose inner training diverges (non-finite loss) on *any* pool entry gets
``WORST_FITNESS = 0.0`` — the fitness of zero accuracy, the worst value a finite candidate can
reach, so CMA-ES ranks it last (ties among diverged candidates are harmless) — and is counted in
the generation's ``diverged`` metric. Inner training is seeded from (seed, generation, pool
entry[, candidate]) and uses no global torch RNG, so any shard computes the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from metaopt_core.config import validate
from metaopt_core.meta.arl.config import ARLConfig
from metaopt_core.meta.arl.pool import Pool
from metaopt_core.meta.arl.state import Candidates
from metaopt_core.population import Member, train_population

WORST_FITNESS = 0.0
FITNESS_CONVENTION = "fitness = -(mean clean-validation accuracy over the pool); any divergence -> 0.0 (worst)"


@dataclass
class Fitness:
    """Evaluation results of one generation, possibly partial (one shard); merge shards to tell."""

    generation: int
    candidates: np.ndarray  # (λ, n)
    entries: list[str]  # pool entry names (columns)
    accuracy: np.ndarray  # (λ, E) clean validation accuracy; nan where not evaluated by this shard
    diverged: np.ndarray  # (λ, E) bool
    evaluated: np.ndarray  # (λ, E) bool
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return bool(self.evaluated.all())

    @property
    def diverged_candidates(self) -> np.ndarray:
        return self.diverged.any(axis=1)

    @property
    def values(self) -> np.ndarray:
        """(λ,) fitness to minimise: −mean accuracy over the pool, WORST_FITNESS if any divergence."""
        if not self.complete:
            missing = int((~self.evaluated).sum())
            raise ValueError(f"fitness of generation {self.generation} is incomplete: {missing} (candidate, pool entry) jobs missing; merge all shards")
        values = -self.accuracy.mean(axis=1)
        return np.where(self.diverged_candidates, WORST_FITNESS, values)

    @classmethod
    def merge(cls, parts: Sequence[Fitness]) -> Fitness:
        """Combine shards of one generation; every job must be evaluated exactly once."""
        if not parts:
            raise ValueError("merge: no fitness parts given")
        first = parts[0]
        for part in parts[1:]:
            if part.generation != first.generation or part.entries != first.entries or not np.array_equal(part.candidates, first.candidates):
                raise ValueError("merge: the parts belong to different generations, candidates or pools")
        count = sum(p.evaluated.astype(int) for p in parts)
        if (count > 1).any():
            raise ValueError("merge: some (candidate, pool entry) jobs were evaluated by more than one shard")
        accuracy = np.full_like(first.accuracy, np.nan)
        diverged = np.zeros_like(first.diverged)
        for part in parts:
            accuracy[part.evaluated] = part.accuracy[part.evaluated]
            diverged |= part.diverged & part.evaluated
        return cls(first.generation, first.candidates, list(first.entries), accuracy, diverged, count > 0, sum(p.seconds for p in parts))

    def to_dict(self) -> dict:
        return {
            "generation": self.generation,
            "candidates": self.candidates.tolist(),
            "entries": self.entries,
            "accuracy": [[None if math.isnan(v) else float(v) for v in row] for row in self.accuracy],
            "diverged": self.diverged.tolist(),
            "evaluated": self.evaluated.tolist(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> Fitness:
        accuracy = np.array([[np.nan if v is None else v for v in row] for row in doc["accuracy"]], dtype=np.float64)
        return cls(
            int(doc["generation"]), np.asarray(doc["candidates"], dtype=np.float64), list(doc["entries"]), accuracy,
            np.asarray(doc["diverged"], dtype=bool), np.asarray(doc["evaluated"], dtype=bool), float(doc.get("seconds", 0.0)),
        )  # fmt: skip


def member_seeds(seed: int, generation: int, entry: int, candidate: int, common_random_numbers: bool) -> tuple[int, int]:
    """(initial-weights seed, minibatch-order seed) of one job. With common random numbers every
    candidate of a generation sees the same initial weights and batch order on a pool entry, so
    CMA-ES ranks losses, not luck; both change from generation to generation."""
    words = [seed, generation, entry] + ([] if common_random_numbers else [candidate + 1])
    init_seed, data_seed = np.random.SeedSequence(words).generate_state(2)
    return int(init_seed), int(data_seed)


def shard_jobs(candidates: int, entries: int, shard: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The (pool entry, candidate) jobs of one shard: a contiguous slice of the entry-major product,
    so a shard's jobs mostly share an architecture and batch together."""
    jobs = [(e, c) for e in range(entries) for c in range(candidates)]
    if shard is None:
        return jobs
    index, count = shard
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        raise ValueError(f"shard: got {shard!r}; allowed: (index, count) with count >= 1 and 0 <= index < count")
    bounds = np.linspace(0, len(jobs), count + 1).round().astype(int)
    return jobs[bounds[index] : bounds[index + 1]]


def evaluate(
    candidates: Candidates,
    pool: Pool,
    shard: tuple[int, int] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Fitness:
    """Train every (candidate, pool entry) job of ``shard`` (all of them by default) and record its
    clean validation accuracy and divergence. Batched across candidates (and across the datasets of
    a DR pool with equal image shapes) when the config says so and the architecture allows."""
    config = validate(ARLConfig, candidates.config, source="candidates.config")
    family = config.family()
    if candidates.params.ndim != 2 or candidates.params.shape[1] != family.num_params:
        raise ValueError(f"candidates.params: got shape {candidates.params.shape}; expected (λ, {family.num_params})")
    count, entries = len(candidates), len(pool)
    jobs = shard_jobs(count, entries, shard)
    members = []
    for entry_index, candidate in jobs:
        entry = pool.entries[entry_index]
        init_seed, data_seed = member_seeds(config.seed, candidates.generation, entry_index, candidate, config.common_random_numbers)
        members.append(
            Member(entry.model, entry.train, entry.val, torch.as_tensor(candidates.params[candidate], dtype=torch.float32),
                   init_seed, data_seed, dict(entry.model_options))
        )  # fmt: skip
    started = time.perf_counter()
    results = train_population(
        members, family, config.train.schedule(), batched=config.batched, max_batch=config.max_batch,
        device=config.device, progress=progress,
    )  # fmt: skip
    accuracy = np.full((count, entries), np.nan)
    diverged = np.zeros((count, entries), dtype=bool)
    evaluated = np.zeros((count, entries), dtype=bool)
    for (entry_index, candidate), result in zip(jobs, results):
        accuracy[candidate, entry_index] = result.val_accuracy
        diverged[candidate, entry_index] = result.diverged
        evaluated[candidate, entry_index] = True
    return Fitness(candidates.generation, candidates.params.copy(), pool.names, accuracy, diverged, evaluated, time.perf_counter() - started)
