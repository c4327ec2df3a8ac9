"""ARL's serialisable search state and the two CMA-ES steps on it: :func:`ask` (a generation's
candidate losses) and :func:`tell` (the update with their fitness).

``state.json`` holds the config, every generation's candidates and fitness, best-so-far and the
search's NumPy RNG state — JSON only. Loading it rebuilds the CMA-ES object by a verified
:func:`~metaopt_core.meta.arl.search.replay`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metaopt_core.config import validate
from metaopt_core.files import atomic_write_text
from metaopt_core.meta.arl.config import ARLConfig
from metaopt_core.meta.arl.search import CMASearch, replay

if TYPE_CHECKING:
    from metaopt_core.meta.arl.fitness import Fitness

STATE_FILE = "state.json"
STATE_FORMAT = "metaopt.arl.state/1"


@dataclass
class ARLState:
    """Everything the search needs to continue: JSON only (see the module docstring on resume)."""

    config: dict
    generation: int = 0  # completed generations
    records: list[dict] = field(default_factory=list)  # per generation: candidates, accuracy, metrics
    best: dict | None = None  # best-so-far individual: params, fitness, accuracy, generation, candidate
    search: dict | None = None  # CMA mean, sigma and RNG state after the last tell (verification)
    stop_reasons: list[str] = field(default_factory=list)
    _cache: CMASearch | None = field(default=None, repr=False, compare=False)  # CMA object after `generation` tells

    @classmethod
    def initial(cls, config: ARLConfig) -> ARLState:
        search = CMASearch(config)
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
    def step(self) -> int:
        """Completed outer steps (generations): the driver's name for them."""
        return self.generation

    @property
    def finished(self) -> bool:
        return self.generation >= self.config["generations"] or bool(self.stop_reasons)

    def to_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "config": self.config,
            "generation": self.generation,
            "records": self.records,
            "best": self.best,
            "search": self.search,
            "stop_reasons": self.stop_reasons,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> ARLState:
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"ARL state: format {doc.get('format')!r}; expected {STATE_FORMAT!r}")
        return cls(doc["config"], doc["generation"], doc["records"], doc["best"], doc["search"], doc.get("stop_reasons", []))

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/state.json`` atomically and durably (fsynced; a kill mid-write
        leaves the previous one)."""
        return atomic_write_text(Path(directory) / STATE_FILE, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, directory: str | Path) -> ARLState:
        """Read a checkpoint and rebuild the CMA-ES object by replay (verified; see module docstring)."""
        path = Path(directory) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no ARL checkpoint at {path}")
        state = cls.from_dict(json.loads(path.read_text()))
        state._cache = replay(state.arl_config, state.records, state.search)
        return state


def search_of(state: ARLState) -> CMASearch:
    """A private copy of the CMA object after ``state.generation`` tells (replayed if not cached)."""
    if state._cache is None:
        state._cache = replay(state.arl_config, state.records, state.search)
    # pycma's default sampler is the bound method np.random.randn; a plain deepcopy would copy the
    # global RandomState behind it (frozen at the caller's state). Keep it pointing at the global
    # one, which numpy_rng swaps to the search's own state around every pycma call.
    global_generator = np.random.mtrand._rand
    return copy.deepcopy(state._cache, {id(global_generator): global_generator})


@dataclass
class Candidates:
    """One generation's sampled loss parameters, with the settings needed to evaluate them."""

    generation: int  # 0-based index of the generation these belong to
    params: np.ndarray  # (λ, n) float64
    config: dict

    def to_dict(self) -> dict:
        return {"generation": self.generation, "params": self.params.tolist(), "config": self.config}

    @classmethod
    def from_dict(cls, doc: dict) -> Candidates:
        return cls(int(doc["generation"]), np.asarray(doc["params"], dtype=np.float64), doc["config"])

    def __len__(self) -> int:
        return len(self.params)


def ask(state: ARLState) -> Candidates:
    """The next generation's candidates. Pure: the same state always gives the same candidates."""
    if state.finished:
        raise ValueError(f"ask: the search is finished (generation {state.generation}, stop reasons {state.stop_reasons})")
    return Candidates(state.generation, search_of(state).ask(), state.config)


def tell(state: ARLState, fitness: Fitness) -> ARLState:
    """The CMA-ES update with a complete generation's fitness. Returns a new state (the input is
    not modified)."""
    if fitness.generation != state.generation:
        raise ValueError(f"tell: fitness is for generation {fitness.generation}; the state expects {state.generation}")
    values = fitness.values  # raises if incomplete
    search = search_of(state)
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
