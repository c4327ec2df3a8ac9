"""ARL — Automated Robust Loss (thesis chapter 3, Algorithm 6).

CMA-ES (pycma) searches the parameters of the Taylor-polynomial loss
(:mod:`metaopt_core.losses.taylor`). Every generation it samples ``population_size`` losses; each
loss trains every entry of the meta-train *pool* — architectures on one dataset (AR) or one
architecture on several datasets (DR) — on *noisy* training labels, and is scored by the *clean*
validation accuracy averaged over the pool. CMA-ES minimises, so

    fitness = −(mean clean-validation accuracy over the pool)   ∈ [−1, 0]

A candidate whose inner training diverges (non-finite loss) on *any* pool entry gets
``WORST_FITNESS = 0.0`` — the fitness of zero accuracy, the worst value a finite candidate can
reach, so CMA-ES ranks it last (ties among diverged candidates are harmless) — and is counted in
the generation's ``diverged`` metric; the run goes on.

The outer loop is three pure steps over a serialisable :class:`ARLState`, so a pipeline can run
them as separate components and fan the evaluation out over machines::

    candidates = ask(state)                          # (λ, n) loss parameters of one generation
    parts = [evaluate(candidates, pool, shard=(i, k)) for i in range(k)]   # any machines
    state = tell(state, Fitness.merge(parts))        # CMA-ES update, best-so-far, history

:func:`run` chains them, checkpoints after every generation and resumes from a checkpoint.

Checkpoints and exact resume (no pickle). pycma keeps its random numbers in NumPy's *global*
generator and draws them in both ``ask`` and ``tell``. Every call into pycma therefore runs inside
a context that swaps in the search's own generator state and swaps the caller's back afterwards,
so nothing else in the process can perturb the search. The state file (``state.json``) holds the
config, every generation's candidates and fitness, best-so-far and the search's NumPy RNG state;
loading it *replays* the recorded ask/tell sequence through a fresh ``CMAEvolutionStrategy`` (a
few milliseconds per generation for 12 parameters), checks that every replayed generation
reproduces the recorded candidates bit for bit and that the final mean, σ and RNG state match
the recorded ones, and fails loudly otherwise (e.g. a different pycma version). Inner training is
seeded from (seed, generation, pool entry[, candidate]) and uses no global torch RNG, so a run
killed at any point and resumed ends exactly as an uninterrupted one (CPU).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import cma
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from metaopt_core.config import ConfigError, DataSpec, NoiseSpec, StrictModel, validate
from metaopt_core.data.prepare import PreparedData, prepare
from metaopt_core.data.sources import ImageData
from metaopt_core.losses.taylor import ORDERS, PRESETS, TaylorLoss, num_params
from metaopt_core.population import Member, Schedule, TaylorFamily, train_population

WORST_FITNESS = 0.0
STATE_FILE = "state.json"
FITNESS_CONVENTION = "fitness = -(mean clean-validation accuracy over the pool); any divergence -> 0.0 (worst)"
# Fields that may change when resuming without changing what the search computes (up to the
# float reassociation between the batched and sequential paths, for the last two).
RESUMABLE_CHANGES = ("generations", "device", "max_batch", "batched")

ProgressReporter = Callable[[str], None]
MetricsCallback = Callable[[dict], None]


# ----------------------------------------------------------------------------- configuration


class ModelSpec(StrictModel):
    """One architecture of the pool; ``options`` go to ``build_model`` (e.g. ``width``)."""

    name: str
    options: dict[str, int | float] = {}

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from metaopt_core.models import MODEL_NAMES

        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; allowed: {list(MODEL_NAMES)}")
        return value


class PoolSpec(StrictModel):
    """The meta-train pool: every model is trained on every dataset (their Cartesian product).

    ``ar`` (architecture randomisation): several models, exactly one dataset.
    ``dr`` (dataset randomisation): exactly one model, several datasets.
    Label noise is set once, by the top-level ``noise`` of :class:`ARLConfig`.
    """

    kind: Literal["ar", "dr"] = "ar"
    models: list[ModelSpec] = Field(min_length=1)
    datasets: list[DataSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape_of_pool(self) -> "PoolSpec":
        if self.kind == "ar" and len(self.datasets) != 1:
            raise ValueError(f"kind 'ar' takes exactly one dataset, got {len(self.datasets)}; use kind 'dr' for several")
        if self.kind == "dr" and len(self.models) != 1:
            raise ValueError(f"kind 'dr' takes exactly one model, got {len(self.models)}; use kind 'ar' for several")
        for position, spec in enumerate(self.datasets):
            if spec.noise.kind != "none" or spec.noise.rate != 0.0:
                raise ValueError(
                    f"datasets[{position}].noise: got {spec.noise.model_dump()}; leave it unset and give the "
                    "label noise once in the top-level 'noise' field (it applies to every dataset of the pool)"
                )
        return self


class InnerTraining(StrictModel):
    """Inner training of every (candidate, pool entry): SGD with momentum (thesis: lr 0.01, 0.9)."""

    optimizer: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1000, ge=1)

    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.momentum, self.weight_decay, self.epochs, self.batch_size, self.eval_batch_size)


class ARLConfig(StrictModel):
    """One ARL meta-training run (``algorithm: arl`` in a YAML config)."""

    algorithm: Literal["arl"] = "arl"
    name: str = "arl"
    pool: PoolSpec
    noise: NoiseSpec = NoiseSpec(kind="symmetric", rate=0.8)
    train: InnerTraining = InnerTraining()
    # CMA-ES (thesis / TaylorGLO: population 20, sigma0 1.2, <= 100 generations)
    population_size: int = Field(20, ge=2)
    sigma0: float = Field(1.2, gt=0.0)
    init: str | list[float] = "zeros"  # "zeros", a preset name, or the n initial parameters
    bounds: tuple[float, float] | None = (-50.0, 50.0)  # per-parameter box; covers every published preset
    generations: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    stop_on_cma_termination: bool = True  # honour pycma's own stop criteria (tolfun, tolx, ...)
    # loss family
    order: int = 4
    form: Literal["taylor", "monomial"] = "taylor"
    normalise: bool = False  # scale normalisation of A.3 (the found loss carries the same flag)
    eta: float = Field(1.0, gt=0.0)
    # evaluation
    common_random_numbers: bool = True  # all candidates of a generation share initial weights and batch order per pool entry
    batched: bool = True
    max_batch: int | None = Field(None, ge=1)
    device: str = "cpu"

    @field_validator("order")
    @classmethod
    def _known_order(cls, value: int) -> int:
        if value not in ORDERS:
            raise ValueError(f"order {value!r} is not supported; allowed: {list(ORDERS)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"device {value!r} is not a torch device; allowed e.g. 'cpu', 'cuda', 'cuda:1'") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ARLConfig":
        n = num_params(self.order)
        if isinstance(self.init, str):
            if self.init != "zeros" and self.init not in PRESETS:
                raise ValueError(f"init: got {self.init!r}; allowed: 'zeros', {sorted(PRESETS)} or a list of {n} numbers")
            if self.init in PRESETS and (self.order != 4 or PRESETS[self.init].form != self.form):
                preset = PRESETS[self.init]
                raise ValueError(
                    f"init: preset {self.init!r} is order 4, form {preset.form!r}; the config has order "
                    f"{self.order}, form {self.form!r}"
                )
        elif len(self.init) != n:
            raise ValueError(f"init: got {len(self.init)} numbers; order {self.order} needs {n}")
        if self.bounds is not None:
            low, high = self.bounds
            if not low < high:
                raise ValueError(f"bounds: got {list(self.bounds)}; allowed: [lower, upper] with lower < upper")
            if any(not low <= v <= high for v in self.initial_mean()):
                raise ValueError(f"init: the initial parameters {self.initial_mean()} lie outside bounds {list(self.bounds)}")
        return self

    def initial_mean(self) -> list[float]:
        if isinstance(self.init, list):
            return [float(v) for v in self.init]
        if self.init == "zeros":
            return [0.0] * num_params(self.order)
        return list(PRESETS[self.init].params)

    def family(self) -> TaylorFamily:
        return TaylorFamily(self.order, self.form, self.normalise, self.eta)

    def dataset_specs(self) -> list[DataSpec]:
        """The pool's datasets with the run's label noise applied: what ``prepare`` should build."""
        return [spec.model_copy(update={"noise": self.noise}) for spec in self.pool.datasets]


# ----------------------------------------------------------------------------- pool


@dataclass
class PoolEntry:
    name: str  # "<model>@<dataset>"
    model: str
    model_options: dict
    train: ImageData  # noisy labels
    val: ImageData  # clean labels
    fingerprint: str  # of the prepared dataset


@dataclass
class Pool:
    entries: list[PoolEntry]

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


def build_pool(config: ARLConfig, prepared: Sequence[PreparedData] | None = None) -> Pool:
    """The pool's entries in a fixed order (dataset-major, then model). ``prepared`` are the
    datasets of ``config.dataset_specs()`` already prepared (the pipeline passes them as artifacts);
    without it they are prepared here."""
    specs = config.dataset_specs()
    if prepared is None:
        prepared = [prepare(spec) for spec in specs]
    if len(prepared) != len(specs):
        raise ValueError(f"prepared: got {len(prepared)} datasets; the pool has {len(specs)}")
    entries = []
    for spec, data in zip(specs, prepared):
        if "train" not in data.splits or "val" not in data.splits:
            raise ValueError(f"prepared dataset {spec.source!r}: needs 'train' and 'val' splits, has {sorted(data.splits)}")
        for model in config.pool.models:
            suffix = "" if not model.options else "(" + ",".join(f"{k}={v}" for k, v in sorted(model.options.items())) + ")"
            entries.append(
                PoolEntry(f"{model.name}{suffix}@{spec.source}", model.name, dict(model.options),
                          data.splits["train"], data.splits["val"], data.fingerprint)
            )  # fmt: skip
    return Pool(entries)


# ----------------------------------------------------------------------------- CMA-ES with its own RNG


@contextmanager
def _numpy_rng(box: dict):
    """Run pycma with the search's own NumPy global-RNG state (``box['rng']``), restoring the caller's."""
    caller = np.random.get_state()
    try:
        if box.get("rng") is not None:
            np.random.set_state(box["rng"])
        yield
    finally:
        box["rng"] = np.random.get_state()
        np.random.set_state(caller)


def _rng_to_json(state: tuple) -> dict:
    name, keys, position, has_gauss, cached = state
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _rng_from_json(doc: dict) -> tuple:
    return (doc["name"], np.asarray(doc["keys"], dtype=np.uint32), doc["pos"], doc["has_gauss"], doc["cached_gaussian"])


class _Search:
    """A ``CMAEvolutionStrategy`` plus the NumPy RNG state it owns."""

    def __init__(self, config: ARLConfig):
        options = {
            "popsize": config.population_size,
            # pycma treats seed 0/None as "from the clock": derive a non-zero seed from ours
            "seed": int(np.random.SeedSequence([config.seed, 0xA21]).generate_state(1)[0] % (2**31 - 2)) + 1,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            # accuracy-based fitness is discrete and ties often (a generation that all diverges is
            # flat): never stop on flat or unchanging fitness values, only on search-space criteria
            # (tolx, noeffect*, conditioncov, tolstagnation)
            "tolflatfitness": 10**9,
            "tolfun": 0.0,
            "tolfunhist": 0.0,
        }
        if config.bounds is not None:
            options["bounds"] = [config.bounds[0], config.bounds[1]]
        self.box: dict = {"rng": None}
        with _numpy_rng(self.box):
            self.es = cma.CMAEvolutionStrategy(config.initial_mean(), config.sigma0, options)

    def ask(self) -> np.ndarray:
        with _numpy_rng(self.box):
            return np.asarray(self.es.ask(), dtype=np.float64)

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        with _numpy_rng(self.box):
            self.es.tell(list(candidates), [float(v) for v in fitness])

    def stop_reasons(self) -> list[str]:
        with _numpy_rng(self.box):
            return sorted(str(key) for key in self.es.stop())

    def summary(self) -> dict:
        return {"mean": [float(v) for v in self.es.mean], "sigma": float(self.es.sigma), "rng": _rng_to_json(self.box["rng"])}


# ----------------------------------------------------------------------------- state


@dataclass
class ARLState:
    """Everything the search needs to continue: JSON only (see the module docstring on resume)."""

    config: dict
    generation: int = 0  # completed generations
    records: list[dict] = field(default_factory=list)  # per generation: candidates, accuracy, metrics
    best: dict | None = None  # best-so-far individual: params, fitness, accuracy, generation, candidate
    search: dict | None = None  # CMA mean, sigma and RNG state after the last tell (verification)
    stop_reasons: list[str] = field(default_factory=list)
    _cache: _Search | None = field(default=None, repr=False, compare=False)  # CMA object after `generation` tells

    @classmethod
    def initial(cls, config: ARLConfig) -> "ARLState":
        search = _Search(config)
        state = cls(config=config.model_dump(mode="json"), search=search.summary())
        state._cache = search
        return state

    @property
    def arl_config(self) -> ARLConfig:
        return validate(ARLConfig, self.config, source="state.config")  # type: ignore[return-value]

    @property
    def history(self) -> list[dict]:
        """Per-generation metrics (best, mean, diverged, sigma, ...), without the raw candidates."""
        return [record["metrics"] for record in self.records]

    @property
    def finished(self) -> bool:
        return self.generation >= self.config["generations"] or bool(self.stop_reasons)

    def to_dict(self) -> dict:
        return {
            "format": "metaopt.arl.state/1",
            "config": self.config,
            "generation": self.generation,
            "records": self.records,
            "best": self.best,
            "search": self.search,
            "stop_reasons": self.stop_reasons,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> "ARLState":
        if doc.get("format") != "metaopt.arl.state/1":
            raise ValueError(f"ARL state: format {doc.get('format')!r}; expected 'metaopt.arl.state/1'")
        return cls(doc["config"], doc["generation"], doc["records"], doc["best"], doc["search"], doc.get("stop_reasons", []))

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/state.json`` atomically (a kill mid-write leaves the previous one)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / STATE_FILE
        scratch = path.with_suffix(".json.tmp")
        scratch.write_text(json.dumps(self.to_dict()))
        os.replace(scratch, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ARLState":
        """Read a checkpoint and rebuild the CMA-ES object by replay (verified; see module docstring)."""
        path = Path(directory) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no ARL checkpoint at {path}")
        state = cls.from_dict(json.loads(path.read_text()))
        state._cache = _replay(state)
        return state


def _replay(state: ARLState) -> _Search:
    search = _Search(state.arl_config)
    for record in state.records:
        asked = search.ask()
        recorded = np.asarray(record["candidates"], dtype=np.float64)
        if asked.shape != recorded.shape or not np.array_equal(asked, recorded):
            raise ValueError(
                f"ARL state: replaying generation {record['generation']} does not reproduce its recorded "
                "candidates (was the checkpoint written by another pycma version or edited?)"
            )
        search.tell(asked, np.asarray(record["fitness"], dtype=np.float64))
    if state.search is not None and search.summary() != state.search:
        raise ValueError("ARL state: the replayed CMA-ES mean/sigma/RNG differ from the recorded ones")
    return search


def _search_of(state: ARLState) -> _Search:
    """A private copy of the CMA object after ``state.generation`` tells (replayed if not cached)."""
    if state._cache is None:
        state._cache = _replay(state)
    # pycma's default sampler is the bound method np.random.randn; a plain deepcopy would copy the
    # global RandomState behind it (frozen at the caller's state). Keep it pointing at the global
    # one, which _numpy_rng swaps to the search's own state around every pycma call.
    global_generator = np.random.mtrand._rand
    return copy.deepcopy(state._cache, {id(global_generator): global_generator})


# ----------------------------------------------------------------------------- ask / evaluate / tell


@dataclass
class Candidates:
    """One generation's sampled loss parameters, with the settings needed to evaluate them."""

    generation: int  # 0-based index of the generation these belong to
    params: np.ndarray  # (λ, n) float64
    config: dict

    def to_dict(self) -> dict:
        return {"generation": self.generation, "params": self.params.tolist(), "config": self.config}

    @classmethod
    def from_dict(cls, doc: dict) -> "Candidates":
        return cls(int(doc["generation"]), np.asarray(doc["params"], dtype=np.float64), doc["config"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Candidates":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __len__(self) -> int:
        return len(self.params)


def ask(state: ARLState) -> Candidates:
    """The next generation's candidates. Pure: the same state always gives the same candidates."""
    if state.finished:
        raise ValueError(f"ask: the search is finished (generation {state.generation}, stop reasons {state.stop_reasons})")
    return Candidates(state.generation, _search_of(state).ask(), state.config)


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
    def merge(cls, parts: Sequence["Fitness"]) -> "Fitness":
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
    def from_dict(cls, doc: dict) -> "Fitness":
        accuracy = np.array([[np.nan if v is None else v for v in row] for row in doc["accuracy"]], dtype=np.float64)
        return cls(
            int(doc["generation"]), np.asarray(doc["candidates"], dtype=np.float64), list(doc["entries"]), accuracy,
            np.asarray(doc["diverged"], dtype=bool), np.asarray(doc["evaluated"], dtype=bool), float(doc.get("seconds", 0.0)),
        )  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Fitness":
        return cls.from_dict(json.loads(Path(path).read_text()))


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


def tell(state: ARLState, fitness: Fitness) -> ARLState:
    """The CMA-ES update with a complete generation's fitness. Returns a new state (the input is
    not modified)."""
    if fitness.generation != state.generation:
        raise ValueError(f"tell: fitness is for generation {fitness.generation}; the state expects {state.generation}")
    values = fitness.values  # raises if incomplete
    search = _search_of(state)
    asked = search.ask()
    if asked.shape != fitness.candidates.shape or not np.array_equal(asked, fitness.candidates):
        raise ValueError(f"tell: the fitness's candidates are not the ones this state asks for at generation {state.generation}")
    search.tell(asked, values)
    config = state.arl_config
    stop = search.stop_reasons() if config.stop_on_cma_termination else []
    # pycma reports 'maxiter' etc. that we do not use; keep only real convergence criteria
    stop = [reason for reason in stop if reason not in ("maxiter", "maxfevals")]

    best_index = int(np.argmin(values))
    best = state.best
    if best is None or values[best_index] < best["fitness"]:
        best = {
            "params": [float(v) for v in asked[best_index]],
            "fitness": float(values[best_index]),
            "accuracy": [float(v) for v in fitness.accuracy[best_index]],
            "generation": state.generation + 1,
            "candidate": best_index,
        }
    diverged = int(fitness.diverged_candidates.sum())
    metrics = {
        "generation": state.generation + 1,
        "best": float(values.min()),
        "mean": float(values.mean()),
        "best_accuracy": float(-values.min()),
        "mean_accuracy": float(np.where(fitness.diverged_candidates, 0.0, fitness.accuracy.mean(axis=1)).mean()),
        "best_so_far": float(best["fitness"]),
        "diverged": diverged,
        "sigma": float(search.es.sigma),
        "seconds": float(fitness.seconds),
    }
    record = {
        "generation": state.generation + 1,
        "candidates": asked.tolist(),
        "fitness": [float(v) for v in values],
        "accuracy": fitness.accuracy.tolist(),
        "diverged": fitness.diverged.tolist(),
        "entries": list(fitness.entries),
        "metrics": metrics,
    }
    new_state = ARLState(
        config=copy.deepcopy(state.config),
        generation=state.generation + 1,
        records=[*state.records, record],
        best=best,
        search=search.summary(),
        stop_reasons=stop,
    )
    new_state._cache = search
    return new_state


# ----------------------------------------------------------------------------- run


@dataclass
class ARLResult:
    """The best loss found (white-box) and the meta-train history."""

    loss: TaylorLoss
    document: dict  # TaylorLoss.to_dict() plus "meta"
    history: list[dict]
    state: ARLState

    @property
    def best_fitness(self) -> float:
        return self.document["meta"]["fitness"]

    def save(self, directory: str | Path) -> dict[str, Path]:
        """``loss.json`` (the registry artifact: JSON only) and ``history.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"loss": directory / "loss.json", "history": directory / "history.json"}
        paths["loss"].write_text(json.dumps(self.document, indent=2))
        paths["history"].write_text(json.dumps(self.history, indent=2))
        return paths


def result_of(state: ARLState, pool_names: Sequence[str] | None = None, fingerprints: Sequence[str] | None = None) -> ARLResult:
    """The best-so-far loss of a state as an :class:`ARLResult`."""
    if state.best is None:
        raise ValueError("result: the search has not completed a generation yet")
    config = state.arl_config
    loss = TaylorLoss(state.best["params"], order=config.order, form=config.form, normalise=config.normalise, eta=config.eta)
    document = loss.to_dict()
    document["meta"] = {
        "algorithm": "arl",
        "name": config.name,
        "fitness": state.best["fitness"],
        "fitness_convention": FITNESS_CONVENTION,
        "val_accuracy": state.best["accuracy"],
        "pool": list(pool_names) if pool_names is not None else (state.records[-1]["entries"] if state.records else []),
        "pool_kind": config.pool.kind,
        "noise": config.noise.model_dump(),
        "found_at_generation": state.best["generation"],
        "generations": state.generation,
        "population_size": config.population_size,
        "cma_final_mean": state.search["mean"] if state.search else None,
        "cma_final_sigma": state.search["sigma"] if state.search else None,
        "stop_reasons": state.stop_reasons,
        "data_fingerprints": list(fingerprints) if fingerprints is not None else None,
        "config": state.config,
    }
    return ARLResult(loss, document, state.history, state)


def _resume_state(config: ARLConfig, checkpoint_dir: Path) -> ARLState:
    state = ARLState.load(checkpoint_dir)
    saved, wanted = state.config, config.model_dump(mode="json")
    for key in sorted(set(saved) | set(wanted)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != wanted.get(key):
            raise ConfigError(
                f"resume from {checkpoint_dir}: field '{key}': checkpoint has {saved.get(key)!r}, config has "
                f"{wanted.get(key)!r}; only {list(RESUMABLE_CHANGES)} may change on resume (or use a new checkpoint_dir)"
            )
    state.config = wanted  # e.g. more generations
    return state


def run(
    config: ARLConfig | Mapping[str, Any],
    checkpoint_dir: str | Path | None = None,
    progress: ProgressReporter | None = None,
    callback: MetricsCallback | None = None,
    *,
    pool: Pool | None = None,
) -> ARLResult:
    """Meta-train a loss: ask → evaluate → tell until ``generations`` (or a CMA-ES stop criterion).

    With ``checkpoint_dir`` the state is saved after every generation and an existing checkpoint
    there is resumed. ``progress`` receives one human-readable line per generation; ``callback``
    receives that generation's metrics dict (``generation``, ``best``, ``mean`` — fitness values —,
    ``best_accuracy``, ``mean_accuracy``, ``best_so_far``, ``diverged``, ``sigma``, ``seconds``)
    after the checkpoint is written, so an exception raised there loses nothing.
    """
    if not isinstance(config, ARLConfig):
        config = validate(ARLConfig, dict(config), source="config")  # type: ignore[assignment]
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None and (checkpoint / STATE_FILE).exists():
        state = _resume_state(config, checkpoint)
        if progress:
            progress(f"arl: resumed from {checkpoint} at generation {state.generation}/{config.generations}")
    else:
        state = ARLState.initial(config)
    pool = pool if pool is not None else build_pool(config)
    while not state.finished:
        candidates = ask(state)
        fitness = evaluate(candidates, pool)
        state = tell(state, fitness)
        if checkpoint is not None:
            state.save(checkpoint)
        metrics = state.history[-1]
        if progress:
            progress(
                f"arl: generation {metrics['generation']}/{config.generations}: best acc {metrics['best_accuracy']:.4f} "
                f"mean acc {metrics['mean_accuracy']:.4f} best-so-far acc {-metrics['best_so_far']:.4f} "
                f"diverged {metrics['diverged']}/{config.population_size} sigma {metrics['sigma']:.3f} ({metrics['seconds']:.1f}s)"
            )
        if callback:
            callback(dict(metrics))
    if progress and state.stop_reasons:
        progress(f"arl: CMA-ES stopped: {state.stop_reasons}")
    return result_of(state, pool.names, [entry.fingerprint for entry in pool.entries])
