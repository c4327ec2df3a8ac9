"""ARL as a :class:`~metaopt_core.meta.protocol.MetaLearner`: CMA-ES over the Taylor loss's
parameters. ask = the generation's candidates; the work is candidates × pool entries; a part is
the fitness of one shard of those jobs; tell merges the shards and takes the CMA-ES step."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field

from metaopt_core.config import DataSpec
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.meta import arl
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import MetaTestTask, TaskMetaTestSettings, compare_learned_loss, task_manifest, task_specs, task_units
from metaopt_core.meta.protocol import LearnerBase, MetaTestReport, Part, ProgressReporter, Work

# digits at its native 8x8 (a dataset beyond the pool) with both pool MLPs, and the unseen part of
# the pool's source at another resolution: 3 tasks x 5 seeds = 15 units
DEFAULT_TASKS = ({"source": "digits", "image_size": 8, "model": "mlp2"}, {"source": "digits", "image_size": 8, "model": "mlp3"},
                 {"source": "mnist5k", "image_size": 14, "model": "mlp2"})  # fmt: skip


class ARLMetaTest(TaskMetaTestSettings):
    """ARL meta-test: the learned loss, the production version (when there is one) and baselines
    (CE, GCE, SCE, as in the thesis's tables) on ``tasks`` beyond the meta-training pool, with the
    run's label noise. Each task has ``seeds`` independent units (every unit its own split into
    train / noisy selection / clean test, its own noise draw and initialisation); every candidate is
    trained at every lr of ``lr_grid`` (default: 5 values around the meta-training lr) and read out
    under the three protocols (``early-stop``: lr and epoch chosen on the noisy selection split,
    the gate's default; ``tuned``; ``fixed``: ``recipe_lr`` for all, default the meta-training lr)."""

    tasks: list[MetaTestTask] = Field(default_factory=lambda: [MetaTestTask(**t) for t in DEFAULT_TASKS], min_length=1)
    baselines: list[str] = ["ce", "gce", "sce"]


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
    # 3 tasks x 5 seeds = 15 independent units x 5 grid points (factor ~3 apart, so no candidate's
    # best lr sits on an edge) x (learned, champion, ce, gce, sce) x 12 epochs, batched per candidate
    default_meta_test = {"seeds": 5, "epochs": 12, "baselines": ["ce", "gce", "sce"], "lr_grid": [0.003, 0.01, 0.03, 0.1, 0.3]}
    # quick: `make run` on 2 cores (a generation of the demo takes ~140 s under load)
    presets = {"quick": {"generations": 3, "train.epochs": 6}}
    meta_test_presets = {"quick": {"epochs": 6, "lr_grid": [0.01, 0.03, 0.1, 0.3]}}  # still 15 units
    history_keys = ("best_accuracy", "mean_accuracy", "sigma", "diverged")

    def data_specs(self, config: BaseModel, meta_test: ARLMetaTest) -> list[DataSpec]:
        # a pool source the meta-test also reads gives meta-training only its meta-train part
        tested = {task.source for task in meta_test.tasks}
        return [spec.model_copy(update={"part": "meta-train"}) if spec.source in tested else spec for spec in config.dataset_specs()]

    def meta_test_specs(self, config: BaseModel, meta_test: ARLMetaTest) -> list[DataSpec]:
        return task_specs(meta_test, config.seed, config.noise.model_dump(), {spec.source for spec in config.dataset_specs()})

    def split_manifest(self, config: BaseModel, meta_test: ARLMetaTest, data: PreparedInputs) -> SplitManifest:
        """The search trains candidates on parts of the pool's noisy train splits and scores them on
        other parts of them (clean labels), redrawn every generation; the clean val splits are held
        back to re-score the best candidates before export (both outer objectives: they choose).
        Each meta-test unit trains on its dataset's noisy train split (lr and epoch chosen on a noisy
        part of it) and reports its clean val split."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            manifest.add("inner_training", dataset, ["train"]).add("outer_objective", dataset, ["train", "val"])
        return task_manifest(manifest, data.meta_test)

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
        """The loss the re-scoring on held-back validation chose among the search's best (not simply
        the best of many candidates scored once: the winner's curse)."""
        import copy

        from metaopt_core.meta.arl.fitness import export_choice

        pool = self._pool(self.config_of(state), data)
        params, rescored = export_choice(state, pool)
        chosen = copy.copy(state)
        chosen.best = {**(state.best or {}), "params": params, "fitness": rescored["chosen"]["search_fitness"],
                       "generation": rescored["chosen"]["generation"], "candidate": rescored["chosen"]["candidate"]}  # fmt: skip
        result = arl.result_of(chosen, pool.names, [entry.fingerprint for entry in pool.entries])
        result.document["meta"]["rescored"] = rescored
        result.document["meta"]["held_back_accuracy"] = rescored["chosen"]["held_back_accuracy"]
        return result.export_kind, result.document

    def meta_test(self, config, artifact_dir: Path, data: PreparedInputs, settings: ARLMetaTest, *,
                  champion_dir: Path | None = None, progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import exports

        units = task_units(settings, config.seed, data.meta_test)
        training = settings.training(config.train.lr, config.train.momentum, config.train.batch_size)
        champion = exports.read(champion_dir) if champion_dir is not None else None
        return compare_learned_loss("ARL meta-test", exports.read(artifact_dir), settings.baselines, units, training,
                                    champion=champion, device=config.device, progress=progress)  # fmt: skip


__all__ = ["ARLLearner", "ARLMetaTest"]
