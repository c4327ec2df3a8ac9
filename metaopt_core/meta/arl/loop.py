"""ARL's outer loop: :func:`run` chains ask → evaluate → tell, checkpoints after every generation
and resumes from a checkpoint; :func:`result_of` turns a state into the found loss (white-box) and
its history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from metaopt_core.config import validate
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.meta.arl.config import ARLConfig
from metaopt_core.meta.arl.fitness import FITNESS_CONVENTION, evaluate
from metaopt_core.meta.arl.pool import Pool, build_pool
from metaopt_core.meta.arl.state import STATE_FILE, ARLState, ask, tell
from metaopt_core.meta.checkpoint import check_resumable, save_loss_export

# Fields that may change when resuming without changing what the search computes (up to the
# float reassociation between the batched and sequential paths, for the last two).
RESUMABLE_CHANGES = ("generations", "device", "max_batch", "batched")

ProgressReporter = Callable[[str], None]
MetricsCallback = Callable[[dict], None]


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
        return save_loss_export(directory, self.document, self.history)


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
    wanted = config.model_dump(mode="json")
    check_resumable(state.config, wanted, checkpoint_dir, RESUMABLE_CHANGES)
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
