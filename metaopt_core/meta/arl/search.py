"""CMA-ES (pycma) with its own random numbers, and the replay that rebuilds it from a checkpoint.

pycma keeps its random numbers in NumPy's *global* generator and draws them in both ``ask`` and
``tell``. Every call into pycma therefore runs inside :func:`numpy_rng`, which swaps in the
search's own generator state and swaps the caller's back afterwards, so nothing else in the process
can perturb the search. :func:`replay` re-runs a recorded ask/tell sequence through a fresh
:class:`CMASearch` and checks it reproduces the recorded candidates and final mean, σ and RNG state
bit for bit (no pickle in checkpoints).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np

from metaopt_core.meta.arl.config import ARLConfig


@contextmanager
def numpy_rng(box: dict):
    """Run pycma with the search's own NumPy global-RNG state (``box['rng']``), restoring the caller's."""
    caller = np.random.get_state()
    try:
        if box.get("rng") is not None:
            np.random.set_state(box["rng"])
        yield
    finally:
        box["rng"] = np.random.get_state()
        np.random.set_state(caller)


def rng_to_json(state: tuple) -> dict:
    name, keys, position, has_gauss, cached = state
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


class CMASearch:
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
        import cma  # here: importing pycma (and the matplotlib it pulls in) costs ~2 s of CPU

        self.box: dict = {"rng": None}
        with numpy_rng(self.box):
            self.es = cma.CMAEvolutionStrategy(config.initial_mean(), config.sigma0, options)

    def ask(self) -> np.ndarray:
        with numpy_rng(self.box):
            return np.asarray(self.es.ask(), dtype=np.float64)

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        with numpy_rng(self.box):
            self.es.tell(list(candidates), [float(v) for v in fitness])

    def stop_reasons(self) -> list[str]:
        with numpy_rng(self.box):
            return sorted(str(key) for key in self.es.stop())

    def summary(self) -> dict:
        return {"mean": [float(v) for v in self.es.mean], "sigma": float(self.es.sigma), "rng": rng_to_json(self.box["rng"])}


def replay(config: ARLConfig, records: Sequence[dict], summary: dict | None) -> CMASearch:
    """A fresh search fed the recorded generations (``records``: candidates and fitness each);
    raises if a generation's candidates or the final ``summary`` are not reproduced exactly."""
    search = CMASearch(config)
    for record in records:
        asked = search.ask()
        recorded = np.asarray(record["candidates"], dtype=np.float64)
        if asked.shape != recorded.shape or not np.array_equal(asked, recorded):
            raise ValueError(
                f"ARL state: replaying generation {record['generation']} does not reproduce its recorded "
                "candidates (was the checkpoint written by another pycma version or edited?)"
            )
        search.tell(asked, np.asarray(record["fitness"], dtype=np.float64))
    if summary is not None and search.summary() != summary:
        raise ValueError("ARL state: the replayed CMA-ES mean/sigma/RNG differ from the recorded ones")
    return search
