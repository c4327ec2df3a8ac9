"""ARL as a :class:`~metaopt_core.meta.protocol.MetaLearner`: CMA-ES over the Taylor loss's
parameters. ask = the generation's candidates; the work is candidates × pool entries; a part is
the fitness of one shard of those jobs; tell merges the shards and takes the CMA-ES step."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field

from metaopt_core.config import DataSpec, ModelName, StrictModel, validate
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.meta import arl
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import compare_learned_loss, lr_grid_around
from metaopt_core.meta.protocol import LearnerBase, MetaTestReport, Part, ProgressReporter, Work


class ARLMetaTest(StrictModel):
    """ARL meta-test: the learned loss, the production version (when there is one) and baselines
    (CE, GCE, SCE, as in the thesis's tables) on a *held-out* dataset with the run's label noise,
    accuracy on clean labels at convergence (the ARL protocol). Every candidate gets the same
    ``lr_grid`` (default: 5 values around the meta-training lr) and budget; its lr is chosen on the
    *noisy* validation split (all a user has). ``batch_size`` defaults to the meta-training one."""

    source: str = "digits"
    max_examples: int | None = Field(None, ge=1)
    model: ModelName = "mlp2"
    epochs: int = Field(12, ge=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    baselines: list[str] = ["ce", "gce", "sce"]
    lr_grid: list[float] | None = Field(None, min_length=1)
    batch_size: int | None = Field(None, ge=1)


class ARLLearner(LearnerBase):
    name = "arl"
    kind = "loss"
    description = "ARL: CMA-ES over a 12-parameter Taylor loss, robust to label noise (thesis ch. 3)"
    config_class = arl.ARLConfig
    meta_test_class = ARLMetaTest
    state_class = arl.ARLState
    steps_field = "generations"
    resumable = ("max_batch", "batched")  # the batched and sequential paths agree up to float reassociation
    demo_configs = ("arl-demo.yaml",)
    # 5 grid points (factor ~3 apart, so no candidate's best lr sits on an edge of a narrow grid) x
    # 3 seeds x (learned, champion, ce, gce, sce) x 12 epochs on digits: about 1 min on 2 cores
    default_meta_test = {"source": "digits", "model": "mlp2", "epochs": 12, "seeds": [0, 1, 2], "baselines": ["ce", "gce", "sce"],
                         "lr_grid": [0.003, 0.01, 0.03, 0.1, 0.3]}  # fmt: skip
    # quick: `make run` on 2 cores (a generation of the demo takes ~140 s under load)
    presets = {"quick": {"generations": 3, "train.epochs": 6}}
    history_keys = ("best_accuracy", "mean_accuracy", "sigma", "diverged")

    def data_specs(self, config: BaseModel, meta_test: ARLMetaTest) -> list[DataSpec]:
        # a pool source the meta-test also reads gives meta-training only its meta-train part
        return [spec.model_copy(update={"part": "meta-train"}) if spec.source == meta_test.source else spec for spec in config.dataset_specs()]

    def meta_test_specs(self, config: BaseModel, meta_test: ARLMetaTest) -> list[DataSpec]:
        shared = any(spec.source == meta_test.source for spec in config.dataset_specs())
        doc = {"source": meta_test.source, "max_examples": meta_test.max_examples, "noise": config.noise.model_dump(),
               "seed": config.pool.datasets[0].seed, "part": "meta-test" if shared else "all"}  # fmt: skip
        return [validate(DataSpec, doc, source="meta_test")]

    def split_manifest(self, config: BaseModel, meta_test: ARLMetaTest, data: PreparedInputs) -> SplitManifest:
        """Candidates train on the pool's noisy train splits and are scored on their clean val
        splits; the meta-test trains on the held-out dataset's noisy train split (lr chosen on a
        noisy part of it) and reports its clean val split."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            manifest.add("inner_training", dataset, ["train"]).add("outer_objective", dataset, ["val"])
        for dataset in data.meta_test:
            manifest.add("meta_test_training", dataset, ["train"]).add("lr_selection", dataset, ["train"]).add("meta_test", dataset, ["val"])
        return manifest

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

    def export(self, state: arl.ARLState, data: PreparedInputs) -> tuple[str, dict]:
        pool = self._pool(self.config_of(state), data)
        result = arl.result_of(state, pool.names, [entry.fingerprint for entry in pool.entries])
        return result.export_kind, result.document

    def meta_test(self, config, artifact_dir: Path, data: PreparedInputs, settings: ARLMetaTest, *,
                  champion_dir: Path | None = None, progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import evaluate, exports

        training = {"model": settings.model, "seeds": settings.seeds, "epochs": settings.epochs, "momentum": config.train.momentum,
                    "lr_grid": settings.lr_grid or lr_grid_around(config.train.lr),
                    "batch_size": settings.batch_size or config.train.batch_size}  # fmt: skip
        champion = exports.read(champion_dir) if champion_dir is not None else None
        return compare_learned_loss("ARL meta-test", exports.read(artifact_dir), settings.baselines, [evaluate.noise_task(dataset) for dataset in data.meta_test], training,
                                    champion=champion, device=config.device, progress=progress)  # fmt: skip


__all__ = ["ARLLearner", "ARLMetaTest"]
