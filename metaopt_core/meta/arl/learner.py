"""ARL as a :class:`~metaopt_core.meta.protocol.MetaLearner`: CMA-ES over the Taylor loss's
parameters. ask = the generation's candidates; the work is candidates × pool entries; a part is
the fitness of one shard of those jobs; tell merges the shards and takes the CMA-ES step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, Field

from metaopt_core.config import DataSpec, ModelName, StrictModel, validate
from metaopt_core.meta import arl
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import compare_learned_loss
from metaopt_core.meta.protocol import LearnerBase, MetaTestReport, Part, ProgressReporter, Work


class ARLMetaTest(StrictModel):
    """ARL meta-test: the learned loss against baselines on a *held-out* dataset with the run's label
    noise, accuracy on clean labels at convergence (the ARL protocol). ``lr`` / ``batch_size``
    default to the meta-training ones."""

    source: str = "digits"
    max_examples: int | None = Field(None, ge=1)
    model: ModelName = "mlp2"
    epochs: int = Field(12, ge=1)
    seeds: list[int] = Field([0], min_length=1)
    baselines: list[str] = ["ce"]
    lr: float | None = Field(None, gt=0.0)
    batch_size: int | None = Field(None, ge=1)


class ARLLearner(LearnerBase):
    name = "arl"
    kind = "loss"
    description = "ARL: CMA-ES over a 12-parameter Taylor loss, robust to label noise (thesis ch. 3)"
    config_class = arl.ARLConfig
    meta_test_class = ARLMetaTest
    state_class = arl.ARLState
    steps_field = "generations"
    step_attribute = "generation"
    demo_configs = ("arl-demo.yaml",)
    default_meta_test = {"source": "digits", "model": "mlp2", "epochs": 12, "seeds": [0], "baselines": ["ce"]}
    # quick: `make run` on 2 cores (a generation of the demo takes ~140 s under load)
    presets = {"quick": {"generations": 3, "train.epochs": 6}}
    history_keys = ("best_accuracy", "mean_accuracy", "sigma", "diverged")

    def data_specs(self, config: BaseModel) -> list[DataSpec]:
        return config.dataset_specs()

    def _pool(self, config: BaseModel, data: PreparedInputs) -> arl.Pool:
        self.check_inputs(config, data)
        return arl.build_pool(config, data.datasets)

    def init(self, config: BaseModel, data: PreparedInputs) -> arl.ARLState:
        self.check_inputs(config, data)
        return arl.ARLState.initial(config)

    def metrics(self, state: arl.ARLState) -> dict:
        return dict(state.history[-1]) if state.history else {}

    def ask(self, state: arl.ARLState, data: PreparedInputs) -> Work:
        return {"candidates": arl.ask(state).to_dict()}

    def evaluate(self, state: arl.ARLState, work: Work, shard: tuple[int, int], data: PreparedInputs) -> Part:
        candidates = arl.Candidates.from_dict(work["candidates"])
        pool = self._pool(self.config_of(state), data)
        if arl.shard_jobs(len(candidates), len(pool), shard):
            fitness = arl.evaluate(candidates, pool, shard=shard)
        else:  # more shards than (candidate, pool entry) jobs: this one evaluates nothing
            shape = (len(candidates), len(pool))
            fitness = arl.Fitness(candidates.generation, candidates.params.copy(), pool.names, np.full(shape, np.nan),
                                  np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool))  # fmt: skip
        return {"fitness": fitness.to_dict()}

    def tell(self, state: arl.ARLState, parts: Sequence[Part], data: PreparedInputs) -> arl.ARLState:
        return arl.tell(state, arl.Fitness.merge([arl.Fitness.from_dict(part["fitness"]) for part in parts]))

    def run(self, config, data, checkpoint_dir, *, progress=None, callback=None) -> arl.ARLState:
        # arl.run trains each generation's population batched (the same fitness as one shard)
        return arl.run(config, checkpoint_dir, progress, callback, pool=self._pool(config, data)).state

    def export(self, state: arl.ARLState, data: PreparedInputs, directory: str | Path) -> dict[str, Path]:
        pool = self._pool(self.config_of(state), data)
        return arl.result_of(state, pool.names, [entry.fingerprint for entry in pool.entries]).save(directory)

    def meta_test(self, config, exported: Mapping[str, Any], data: PreparedInputs, settings: ARLMetaTest, *,
                  progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import evaluate

        spec = validate(DataSpec, {"source": settings.source, "max_examples": settings.max_examples, "noise": config.noise.model_dump(),
                                   "seed": config.pool.datasets[0].seed}, source="meta_test")  # fmt: skip
        training = {"model": settings.model, "seeds": settings.seeds, "epochs": settings.epochs, "momentum": config.train.momentum,
                    "lr": settings.lr or config.train.lr, "batch_size": settings.batch_size or config.train.batch_size}  # fmt: skip
        return compare_learned_loss("ARL meta-test", exported["loss"], settings.baselines, [evaluate.noise_task(spec)], training,
                                    device=config.device, progress=progress)  # fmt: skip


__all__ = ["ARLLearner", "ARLMetaTest"]
