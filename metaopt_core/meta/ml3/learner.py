"""ML3 as a :class:`~metaopt_core.meta.protocol.MetaLearner`: a neural loss ω learned by unrolled
hypergradients. ask = the step's tasks; a part is the hypergradients of one shard of them; tell
averages them and steps ω. The export is a ``neural-loss``; the meta-test is the shared loss
meta-test (:func:`~metaopt_core.meta.loss_meta_test.compare_learned_loss`) on the held-out part."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, Field

from metaopt_core.config import DataSpec, ModelName, StrictModel
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.meta.hypergradient_learner import HypergradientLearner
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import compare_learned_loss, lr_grid_around
from metaopt_core.meta.ml3 import step
from metaopt_core.meta.ml3.config import ML3Config
from metaopt_core.meta.ml3.state import Hypergradient, ML3State
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter


class ML3MetaTest(StrictModel):
    """ML3 meta-test: the learned loss, the production version (when there is one) and baselines on
    the held-out part of the run's dataset (examples meta-training never read), accuracy on its
    val split. Every candidate gets the same ``lr_grid`` (default: 5 values around the inner lr)
    and budget; its lr is chosen on a selection split of the training part."""

    model: ModelName = "mlp2"
    epochs: int = Field(10, ge=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    baselines: list[str] = ["ce"]
    lr_grid: list[float] | None = Field(None, min_length=1)
    batch_size: int | None = Field(None, ge=1)


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
    default_meta_test = {"model": "mlp2", "epochs": 10, "seeds": [0, 1, 2], "baselines": ["ce"], "lr_grid": [0.01, 0.03, 0.1, 0.3, 1.0]}
    # quick: `make run` on 2 cores (about a second per outer step of the demo)
    presets = {"quick": {"outer.steps": 20}}
    history_keys = ("outer_ce", "outer_ce_with_ce", "advantage_over_ce", "hypergrad_norm")

    def data_specs(self, config: BaseModel, meta_test: ML3MetaTest) -> list[DataSpec]:
        return [config.data.model_copy(update={"part": "meta-train"})]

    def meta_test_specs(self, config: BaseModel, meta_test: ML3MetaTest) -> list[DataSpec]:
        return [config.data.model_copy(update={"part": "meta-test"})]

    def split_manifest(self, config: BaseModel, meta_test: ML3MetaTest, data: PreparedInputs) -> SplitManifest:
        """Inner steps on the meta-train part's train split, the outer objective on its val split;
        the meta-test trains on the meta-test part's train split (lr chosen on a part of it) and
        reports its val split."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            manifest.add("inner_training", dataset, ["train"]).add("outer_objective", dataset, ["val"])
        for dataset in data.meta_test:
            manifest.add("meta_test_training", dataset, ["train"]).add("lr_selection", dataset, ["train"]).add("meta_test", dataset, ["val"])
        return manifest

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
        from metaopt_core import evaluate, exports

        self.check_inputs(config, data)
        training = {"model": settings.model, "seeds": settings.seeds, "epochs": settings.epochs, "momentum": config.inner.momentum,
                    "lr_grid": settings.lr_grid or lr_grid_around(config.inner.lr), "batch_size": settings.batch_size or config.inner.batch_size}  # fmt: skip
        champion = exports.read(champion_dir) if champion_dir is not None else None
        return compare_learned_loss("ML3 meta-test", exports.read(artifact_dir), settings.baselines, [evaluate.noise_task(d) for d in data.meta_test],
                                    training, champion=champion, device=config.device, progress=progress)  # fmt: skip


__all__ = ["ML3Learner", "ML3MetaTest"]
