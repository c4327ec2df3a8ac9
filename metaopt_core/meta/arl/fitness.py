"""Evaluating a generation: train every (candidate loss, pool entry) job — all of them or one
shard — the way the meta-test will use the loss (``config.fitness``, the deployment protocol), and
score it. CMA-ES minimises, so

    fitness = −(mean over the pool of the clean accuracy the protocol reaches)   ∈ [−1, 0]

Every generation redraws each entry's noisy training split into an inner training part, a noisy
selection part and a scoring part read with its clean labels (fresh validation data each
generation). A job trains at every lr of the fitness grid; the protocol (``early-stop``: the lr and
epoch with the best noisy selection accuracy; ``tuned``: the lr, last epoch; ``fixed``: the training
lr, last epoch) picks the run whose scoring-part accuracy counts. So a loss cannot win by acting as
a smaller lr: every loss gets its best lr. The entry's clean validation split is held back from
the search: :func:`rescore` re-scores the best candidates there before export.

A candidate whose every run diverges (non-finite loss) on *any* pool entry gets
``WORST_FITNESS = 0.0`` — the fitness of zero accuracy, the worst value a finite candidate can
reach, so CMA-ES ranks it last (ties among diverged candidates are harmless) — and is counted in
the generation's ``diverged`` metric; a run that diverged at one lr of the grid just scores chance
there. Inner training is seeded from (seed, generation, pool entry[, candidate]) and uses no global
torch RNG, so any shard computes the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from metaopt_core.config import validate
from metaopt_core.meta.arl.config import ARLConfig
from metaopt_core.meta.arl.pool import Pool
from metaopt_core.meta.arl.state import Candidates

if TYPE_CHECKING:
    from metaopt_core.meta.arl.state import ARLState

WORST_FITNESS = 0.0
FITNESS_CONVENTION = ("fitness = -(mean over the pool of the clean accuracy on a fresh scoring part at the protocol's (lr, epoch)); "
                      "every lr diverging on an entry -> 0.0 (worst)")  # fmt: skip
SPLIT_SALT = 0x5917  # the per-generation split of an entry's training data


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
    chosen_lr: np.ndarray | None = None  # (λ, E) the lr the protocol chose; nan where not evaluated

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
        chosen = np.full_like(first.accuracy, np.nan)
        diverged = np.zeros_like(first.diverged)
        for part in parts:
            accuracy[part.evaluated] = part.accuracy[part.evaluated]
            if part.chosen_lr is not None:
                chosen[part.evaluated] = part.chosen_lr[part.evaluated]
            diverged |= part.diverged & part.evaluated
        return cls(first.generation, first.candidates, list(first.entries), accuracy, diverged, count > 0, sum(p.seconds for p in parts), chosen)

    def to_dict(self) -> dict:
        return {
            "generation": self.generation,
            "candidates": self.candidates.tolist(),
            "entries": self.entries,
            "accuracy": [[None if math.isnan(v) else float(v) for v in row] for row in self.accuracy],
            "diverged": self.diverged.tolist(),
            "evaluated": self.evaluated.tolist(),
            "seconds": self.seconds,
            "chosen_lr": None if self.chosen_lr is None else [[None if math.isnan(v) else float(v) for v in row] for row in self.chosen_lr],
        }

    @classmethod
    def from_dict(cls, doc: dict) -> Fitness:
        accuracy = np.array([[np.nan if v is None else v for v in row] for row in doc["accuracy"]], dtype=np.float64)
        chosen = doc.get("chosen_lr")
        chosen = None if chosen is None else np.array([[np.nan if v is None else v for v in row] for row in chosen], dtype=np.float64)
        return cls(
            int(doc["generation"]), np.asarray(doc["candidates"], dtype=np.float64), list(doc["entries"]), accuracy,
            np.asarray(doc["diverged"], dtype=bool), np.asarray(doc["evaluated"], dtype=bool), float(doc.get("seconds", 0.0)), chosen,
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


def _protocol_scores(
    config: ARLConfig, params: np.ndarray, jobs: Sequence[tuple[int, tuple]], lrs: Sequence[float], seeds: Callable[[int], tuple[int, int]]
) -> list[tuple[float, float, bool]]:
    """Train job j (candidate parameters ``params[j]``, data (entry, inner train, selection, scoring
    part)) at every lr; (scoring accuracy at the protocol's choice, its lr, every lr diverged)."""
    from metaopt_core.evaluate.units import Training, Unit, choose, train_members

    units, members, rows, rates = [], [], [], []
    for j, (_, (entry, train, select, score)) in enumerate(jobs):
        init_seed, data_seed = seeds(j)
        units.append(Unit(entry.name, j, train, select, score, entry.model, init_seed, data_seed, dict(entry.model_options)))
        for lr in lrs:
            members.append((j, lr))
            rows.append(params[j])
            rates.append(lr)
    curves = train_members(config.family(), torch.as_tensor(np.asarray(rows), dtype=torch.float32), [units[j] for j, _ in members], rates,
                           epochs=config.train.epochs, batch_size=config.train.batch_size, momentum=config.train.momentum,
                           weight_decay=config.train.weight_decay, device=config.device, max_batch=config.max_batch)  # fmt: skip
    training = Training({("job", j, lr): curve for (j, lr), curve in zip(members, curves)}, ["job"], list(lrs), units)
    out = []
    for j in range(len(jobs)):
        choice = choose(training, "job", j, config.fitness.protocol, recipe_lr=config.train.lr)
        out.append((choice.test, choice.lr, all(training.curve("job", j, lr).diverged for lr in lrs)))
    return out


def evaluate(
    candidates: Candidates,
    pool: Pool,
    shard: tuple[int, int] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Fitness:
    """Train every (candidate, pool entry) job of ``shard`` (all of them by default) at every lr of
    the fitness grid on this generation's split of the entry, and record the accuracy its protocol
    reaches on the clean scoring part (see the module docstring). Batched across candidates, lrs
    (and the datasets of a DR pool with equal image shapes) when the architecture allows."""
    config = validate(ARLConfig, candidates.config, source="candidates.config")
    family = config.family()
    if candidates.params.ndim != 2 or candidates.params.shape[1] != family.num_params:
        raise ValueError(f"candidates.params: got shape {candidates.params.shape}; expected (λ, {family.num_params})")
    count, entries = len(candidates), len(pool)
    jobs = shard_jobs(count, entries, shard)
    spec = config.fitness
    splits = {e: pool.entries[e].generation_split(int(np.random.SeedSequence([config.seed, candidates.generation, e, SPLIT_SALT]).generate_state(1)[0]),
                                                 spec.select_fraction, spec.score_fraction)
              for e in sorted({e for e, _ in jobs})}  # fmt: skip
    data = [(c, (pool.entries[e], *splits[e])) for e, c in jobs]

    def seeds(j: int) -> tuple[int, int]:
        e, c = jobs[j]
        return member_seeds(config.seed, candidates.generation, e, c, config.common_random_numbers)

    started = time.perf_counter()
    scores = _protocol_scores(config, candidates.params[[c for _, c in jobs]], data, config.fitness_lrs(), seeds)
    accuracy = np.full((count, entries), np.nan)
    chosen = np.full((count, entries), np.nan)
    diverged = np.zeros((count, entries), dtype=bool)
    evaluated = np.zeros((count, entries), dtype=bool)
    for (entry_index, candidate), (score, lr, all_diverged) in zip(jobs, scores):
        accuracy[candidate, entry_index] = score
        chosen[candidate, entry_index] = lr
        diverged[candidate, entry_index] = all_diverged
        evaluated[candidate, entry_index] = True
    if progress:
        progress({"generation": candidates.generation, "jobs": len(jobs), "lrs": len(config.fitness_lrs())})
    return Fitness(candidates.generation, candidates.params.copy(), pool.names, accuracy, diverged, evaluated, time.perf_counter() - started, chosen)


def rescore(config: ARLConfig, pool: Pool, params: np.ndarray) -> np.ndarray:
    """(k,) mean clean accuracy of each of the ``k`` candidate parameter vectors on the pool's
    held-back validation splits (never read by the search), under the fitness protocol: trained on
    the whole noisy training split (selection part carved from it), ``rescore_seeds`` fresh
    initialisations per entry, averaged over entries and seeds."""
    spec = config.fitness
    jobs, rows = [], []
    for k in range(len(params)):
        for e, entry in enumerate(pool.entries):
            for seed in range(spec.rescore_seeds):
                words = [config.seed, e, seed, 0x5C0E]
                order = torch.randperm(len(entry.train), generator=torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0])))
                n_select = max(1, round(len(order) * spec.select_fraction))
                jobs.append((k, (entry, entry.train.subset(order[n_select:]), entry.train.subset(order[:n_select]), entry.val)))
                rows.append(params[k])

    def seeds(j: int) -> tuple[int, int]:  # the same fresh initialisations for every candidate (paired)
        init_seed, data_seed = np.random.SeedSequence([config.seed, j % (len(pool) * spec.rescore_seeds), 0x5C0F]).generate_state(2)
        return int(init_seed), int(data_seed)

    scores = _protocol_scores(config, np.asarray(rows), jobs, config.fitness_lrs(), seeds)
    per_job = np.array([score for score, _, _ in scores]).reshape(len(params), -1)
    return per_job.mean(axis=1)


def export_choice(state: ARLState, pool: Pool) -> tuple[list[float], dict]:
    """The candidate to export: the ``rescore_top`` best distinct candidates of the whole search
    (by search fitness) re-scored on the held-back validation splits (:func:`rescore`), the best
    there. Returns (its parameters, what the re-scoring found, for the loss document's provenance)."""
    config = state.arl_config
    ranked: list[tuple[float, int, int, list[float]]] = []
    seen: set[tuple[float, ...]] = set()
    for record in state.records:
        for index, (fitness, params) in enumerate(zip(record["fitness"], record["candidates"])):
            key = tuple(round(float(v), 12) for v in params)
            if key not in seen and math.isfinite(fitness) and fitness < WORST_FITNESS:
                seen.add(key)
                ranked.append((float(fitness), int(record["generation"]), index, [float(v) for v in params]))
    if not ranked:
        raise ValueError("export: no generation produced a non-diverged candidate to export")
    top = sorted(ranked, key=lambda row: row[0])[: config.fitness.rescore_top]
    held_back = rescore(config, pool, np.asarray([row[3] for row in top]))
    best = int(np.argmax(held_back))  # first on ties: the better search fitness
    table = [{"generation": g, "candidate": i, "search_fitness": f, "held_back_accuracy": float(a)} for (f, g, i, _), a in zip(top, held_back)]
    info = {"rescored": table, "chosen": table[best], "protocol": config.fitness.protocol, "lr_grid": config.fitness_lrs(),
            "held_back": "the pool entries' clean validation splits (never read by the search)", "seeds": config.fitness.rescore_seeds}  # fmt: skip
    return top[best][3], info
