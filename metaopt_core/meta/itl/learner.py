"""ITL as a :class:`~metaopt_core.meta.protocol.MetaLearner`: implicit hypergradients of a Taylor
loss's parameters ω over leave-one-domain-out inner trainings. ask = the held-out domains; a part
is the hypergradients of one shard of them; tell aggregates (PCGrad or mean) and steps ω."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, Field

from metaopt_core.config import DataSpec, ModelName, StrictModel
from metaopt_core.meta import itl
from metaopt_core.meta.hypergradient_learner import HypergradientLearner
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import compare_learned_loss
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter


class ITLMetaTest(StrictModel):
    """ITL meta-test: leave-one-domain-out on the run's domains, the learned loss against baselines,
    accuracy on the held-out domain. ``held_out``: domains (suffixes like ``rot75``), empty = all."""

    held_out: list[str] = []
    model: ModelName = "mlp2"
    epochs: int = Field(3, ge=1)
    seeds: list[int] = Field([0], min_length=1)
    baselines: list[str] = ["ce"]
    lr: float | None = Field(None, gt=0.0)
    batch_size: int | None = Field(None, ge=1)


class ITLLearner(HypergradientLearner):
    name = "itl"
    kind = "loss"
    description = "ITL: a Taylor loss learned by implicit hypergradients for domain generalisation (thesis ch. 4)"
    config_class = itl.ITLConfig
    meta_test_class = ITLMetaTest
    state_class = itl.ITLState
    hypergradient_class = itl.Hypergradient
    scalar_metrics = itl.SCALAR_METRICS
    demo_configs = ("itl-demo.yaml",)
    default_meta_test = {"held_out": ["rot75"], "model": "mlp2", "epochs": 3, "seeds": [0], "baselines": ["ce"]}
    presets = {"quick": {"outer.steps": 4}}  # `make run` on 2 cores (~25 s per demo outer step under load)
    history_keys = ("heldout_ce", "heldout_acc", "source_acc", "hypergrad_norm")

    def data_specs(self, config: BaseModel) -> list[DataSpec]:
        return [config.data]

    def init(self, config: BaseModel, data: PreparedInputs) -> itl.ITLState:
        self.check_inputs(config, data)
        return itl.with_domains(itl.ITLState.initial(config), self.dataset(data))

    def jobs(self, state: itl.ITLState, data: PreparedInputs) -> list[str]:
        return list(state.domains or itl.domain_set(state.itl_config, self.dataset(data)).names)

    def hypergradients(self, state: itl.ITLState, jobs: Sequence[str], data: PreparedInputs) -> list[itl.Hypergradient]:
        return itl.inner_hypergrads(state, list(jobs), data=self.dataset(data))

    def outer_update(self, state: itl.ITLState, hypergradients: Sequence[itl.Hypergradient], data: PreparedInputs) -> itl.ITLState:
        return itl.outer_update(state, hypergradients)

    def run(self, config, data, checkpoint_dir, *, progress=None, callback=None) -> itl.ITLState:
        # itl.run trains the leave-one-out models of a step batched (the same hypergradients as one shard)
        self.check_inputs(config, data)
        return itl.run(config, checkpoint_dir, progress, callback, data=self.dataset(data)).state

    def export(self, state: itl.ITLState, data: PreparedInputs, directory: str | Path) -> dict[str, Path]:
        return itl.result_of(state, data.fingerprint).save(directory)

    def meta_test(self, config, exported: Mapping[str, Any], data: PreparedInputs, settings: ITLMetaTest, *,
                  progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import evaluate

        self.check_inputs(config, data)
        tasks = evaluate.domain_tasks(self.dataset(data), settings.held_out or None)
        training = {"model": settings.model, "seeds": settings.seeds, "epochs": settings.epochs, "momentum": config.inner.momentum,
                    "lr": settings.lr or config.inner.lr, "batch_size": settings.batch_size or config.inner.batch_size}  # fmt: skip
        return compare_learned_loss("ITL meta-test", exported["loss"], settings.baselines, tasks, training, device=config.device,
                                    progress=progress)  # fmt: skip


__all__ = ["ITLLearner", "ITLMetaTest"]
