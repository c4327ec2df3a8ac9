"""What ARL exports: :func:`result_of` turns a state into the best loss found (white-box) and its
history. (The outer loop is the driver's: :mod:`metaopt_core.meta.driver`.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.meta.arl.fitness import FITNESS_CONVENTION
from metaopt_core.meta.arl.state import ARLState


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

    export_kind = "loss-document"

    def save(self, directory: str | Path) -> Path:
        """The loss as its export kind (``loss.json``: JSON only) and ``history.json``; the folder."""
        from metaopt_core import exports

        return exports.save(directory, self.export_kind, self.document, self.history)


def result_of(state: ARLState, pool_names: Sequence[str] | None = None, fingerprints: Sequence[str] | None = None) -> ARLResult:
    """The best-so-far loss of a state as an :class:`ARLResult`."""
    if state.best is None:
        raise ValueError("result: the search has not completed a generation yet")
    config = state.arl_config
    family = config.family()
    loss = family.to_module(state.best["params"])
    document = family.to_dict(state.best["params"])
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
