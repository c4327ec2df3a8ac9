"""ML3 as a :class:`~metaopt_core.meta.protocol.MetaLearner`: a neural loss ω learned by unrolled
hypergradients. ask = the step's tasks; a part is the hypergradients of one shard of them; tell
averages them and steps ω. The export is a ``neural-loss``; the meta-test is the shared loss
meta-test (:func:`~metaopt_core.meta.loss_meta_test.compare_learned_loss`) on the held-out part."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, Field

from metaopt_core.config import DataSpec
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.meta.hypergradient_learner import HypergradientLearner
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import MetaTestTask, TaskMetaTestSettings, compare_learned_loss, task_manifest, task_specs, task_units
from metaopt_core.meta.ml3 import step
from metaopt_core.meta.ml3.config import ML3Config
from metaopt_core.meta.ml3.state import Hypergradient, ML3State
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter


class ML3MetaTest(TaskMetaTestSettings):
    """ML3 meta-test: the learned loss, the production version (when there is one) and baselines on
    ``tasks`` drawn from the held-out part of the run's dataset (examples meta-training never read),
    ``seeds`` independent units per task (each its own split into train / selection / test and its
    own initialisation); every candidate is trained at every lr of ``lr_grid`` (default: 5 values
    around the inner lr) and read out under the three protocols (the gate's: ``early-stop``)."""

    tasks: list[MetaTestTask] = Field(default_factory=lambda: [MetaTestTask(source="digits", model="mlp2"), MetaTestTask(source="digits", model="mlp3")],
                                      min_length=1)  # fmt: skip
    seeds: int | list[int] = 8
    epochs: int = Field(10, ge=1)


class ML3Learner(HypergradientLearner):
    name = "ml3"
    kind = "loss"
    description = "ML3: a neural loss learned by unrolled hypergradients through inner SGD steps (Bechtle et al. 2021)"
    config_class = ML3Config
    meta_test_class = ML3MetaTest
    state_class = ML3State
    hypergradient_class = Hypergradient
    scalar_metrics = step.SCALAR_METRICS
    demo_configs = ("ml3-demo.yaml",)
    # 2 architectures x 8 seeds = 16 independent units on the held-out part of digits
    default_meta_test = {"epochs": 10, "seeds": 8, "baselines": ["ce"], "lr_grid": [0.01, 0.03, 0.1, 0.3, 1.0]}
    # quick: `make run` on 2 cores (about a second per outer step of the demo)
    presets = {"quick": {"outer.steps": 20}}
    meta_test_presets = {"quick": {"epochs": 6, "lr_grid": [0.03, 0.1, 0.3, 1.0]}}  # still 16 units
    history_keys = ("outer_ce", "outer_ce_with_ce", "advantage_over_ce", "hypergrad_norm")

    def data_specs(self, config: BaseModel, meta_test: ML3MetaTest) -> list[DataSpec]:
        return [config.data.model_copy(update={"part": "meta-train"})]

    def meta_test_specs(self, config: BaseModel, meta_test: ML3MetaTest) -> list[DataSpec]:
        return task_specs(meta_test, config.seed, config.data.noise.model_dump(), {config.data.source})

    def split_manifest(self, config: BaseModel, meta_test: ML3MetaTest, data: PreparedInputs) -> SplitManifest:
        """Inner steps on the meta-train part's train split, the outer objective on its val split;
        the meta-test trains on the meta-test part's train split (lr chosen on a part of it) and
        reports its val split."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            manifest.add("inner_training", dataset, ["train"]).add("outer_objective", dataset, ["val"])
        return task_manifest(manifest, data.meta_test)

    def init(self, config: ML3Config, data: PreparedInputs) -> ML3State:
        self.check_inputs(config, data)
        return ML3State.initial(config)

    def jobs(self, state: ML3State, data: PreparedInputs) -> list[dict]:
        return step.jobs_for_step(state.ml3_config, state.step)

    def hypergradients(self, state: ML3State, jobs: Sequence[dict], data: PreparedInputs) -> list[Hypergradient]:
        config, dataset = state.ml3_config, self.dataset(data)
        return [step.hypergradient(config, state.omega, job, dataset.splits["train"], dataset.splits["val"], state.step) for job in jobs]

    def outer_update(self, state: ML3State, hypergradients: Sequence[Hypergradient], data: PreparedInputs) -> ML3State:
        return step.outer_update(state, hypergradients)

    def export(self, state: ML3State, data: PreparedInputs) -> tuple[str, dict]:
        config = state.ml3_config
        family = config.family()
        document = family.to_dict(state.omega)
        history = state.history
        document["meta"] = {"algorithm": self.name, "name": config.name, "init": config.loss.init, "outer_steps": state.step,
                            "outer_ce_first": history[0]["outer_ce"] if history else None, "outer_ce_last": history[-1]["outer_ce"] if history else None,
                            "advantage_over_ce_last": history[-1]["advantage_over_ce"] if history else None,
                            "data_fingerprint": data.fingerprint, "config": state.config}  # fmt: skip
        return family.export_kind, document

    def meta_test(self, config: ML3Config, artifact_dir: Path, data: PreparedInputs, settings: ML3MetaTest, *,
                  champion_dir: Path | None = None, progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import exports

        self.check_inputs(config, data)
        training = settings.training(config.inner.lr, config.inner.momentum, config.inner.batch_size)
        champion = exports.read(champion_dir) if champion_dir is not None else None
        return compare_learned_loss("ML3 meta-test", exports.read(artifact_dir), settings.baselines, task_units(settings, config.seed, data.meta_test),
                                    training, champion=champion, device=config.device, progress=progress)  # fmt: skip


__all__ = ["ML3Learner", "ML3MetaTest"]
