"""ITL as a :class:`~metaopt_core.meta.protocol.MetaLearner`: implicit hypergradients of a Taylor
loss's parameters ω over leave-one-domain-out inner trainings. ask = the held-out domains; a part
is the hypergradients of one shard of them; tell aggregates (PCGrad or mean) and steps ω."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, Field

from metaopt_core.config import ConfigError, DataSpec, ModelName, StrictModel
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.data.prepare import UnknownDomainsError, domain_matches
from metaopt_core.meta import itl
from metaopt_core.meta.hypergradient_learner import HypergradientLearner
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import compare_learned_loss, lr_grid_around
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter


class ITLMetaTest(StrictModel):
    """ITL meta-test: leave-one-domain-out on the run's domains, the learned loss, the production
    version (when there is one) and baselines, accuracy on the held-out domain. ``held_out``:
    domains (suffixes like ``rot75``), empty = all. Every candidate gets the same ``lr_grid``
    (default: 5 values around the inner lr) and budget; its lr is chosen on the source domains'
    validation splits (DomainBed's training-domain validation), never on the held-out domain."""

    held_out: list[str] = []
    model: ModelName = "mlp2"
    epochs: int = Field(3, ge=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    baselines: list[str] = ["ce"]
    lr_grid: list[float] | None = Field(None, min_length=1)
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
    # 6 grid points (factor ~3 apart; up to 0.3 because tuned CE chose the top of a grid ending at
    # 0.1) x 3 seeds x (learned, champion, ce) x 3 epochs on 5 source domains: under a minute on 2 cores
    default_meta_test = {"held_out": ["rot75"], "model": "mlp2", "epochs": 3, "seeds": [0, 1, 2], "baselines": ["ce"],
                         "lr_grid": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]}  # fmt: skip
    presets = {"quick": {"outer.steps": 4}}  # `make run` on 2 cores (~25 s per demo outer step under load)
    history_keys = ("heldout_ce", "heldout_acc", "source_acc", "hypergrad_norm")

    def data_specs(self, config: BaseModel, meta_test: ITLMetaTest) -> list[DataSpec]:
        # meta-training never sees the meta-test's domains, nor any image of the meta-test part
        held_out = _held_out(meta_test)
        return [config.data.model_copy(update={"part": "meta-train", "exclude_domains": [*config.data.exclude_domains, *held_out]})]

    def prepare(self, config: BaseModel, meta_test: Mapping[str, Any] | BaseModel | None = None,
                progress: ProgressReporter | None = None) -> PreparedInputs:  # fmt: skip
        # the held-out domains reach the data as exclude_domains: a wrong one is named as the user wrote it
        settings = self.resolve_meta_test(meta_test)
        try:
            return super().prepare(config, settings, progress)
        except UnknownDomainsError as exc:
            if not set(exc.unknown) <= set(settings.held_out) or set(exc.unknown) & set(config.data.exclude_domains):
                raise
            raise ConfigError(f"meta_test: field 'held_out': got {settings.held_out}; {exc.unknown} are not domains of the source "
                              f"{config.data.source!r}; allowed: {exc.available} (or their suffixes)") from None  # fmt: skip

    def meta_test_specs(self, config: BaseModel, meta_test: ITLMetaTest) -> list[DataSpec]:
        _held_out(meta_test)
        return [config.data.model_copy(update={"part": "meta-test"})]

    def split_manifest(self, config: BaseModel, meta_test: ITLMetaTest, data: PreparedInputs) -> SplitManifest:
        """Leave-one-domain-out meta-training trains on the meta-train part's train splits and scores
        on them (val splits only feed the logged curves); the meta-test trains on the meta-test
        part's source domains (lr chosen on their val splits) and reports the held-out domains."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            train = [f"{d}/train" for d in dataset.domains]
            manifest.add("inner_training", dataset, train).add("outer_objective", dataset, train)
            manifest.add("monitoring", dataset, [f"{d}/val" for d in dataset.domains])
        for dataset in data.meta_test:
            held = [d for d in dataset.domains if any(domain_matches(d, name) for name in meta_test.held_out)]
            sources = [d for d in dataset.domains if d not in held]
            manifest.add("meta_test_training", dataset, [f"{d}/train" for d in sources])
            manifest.add("lr_selection", dataset, [f"{d}/val" for d in sources])
            manifest.add("meta_test", dataset, [f"{d}/train" for d in held])
        return manifest

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
                  champion: Mapping[str, Any] | None = None, progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import evaluate

        self.check_inputs(config, data)
        tasks = evaluate.domain_tasks(data.meta_test[0], _held_out(settings))
        training = {"model": settings.model, "seeds": settings.seeds, "epochs": settings.epochs, "momentum": config.inner.momentum,
                    "lr_grid": settings.lr_grid or lr_grid_around(config.inner.lr),
                    "batch_size": settings.batch_size or config.inner.batch_size}  # fmt: skip
        return compare_learned_loss("ITL meta-test", exported["loss"], settings.baselines, tasks, training,
                                    champion=(champion or {}).get("loss"), device=config.device, progress=progress)  # fmt: skip


def _held_out(meta_test: ITLMetaTest) -> list[str]:
    if not meta_test.held_out:
        raise ConfigError(
            "meta_test: field 'held_out': got []; allowed: the domains the meta-test holds out, e.g. ['rot75'] "
            "(meta-training must not see them, so 'each domain in turn' cannot be meta-tested honestly)"
        )
    return list(meta_test.held_out)


__all__ = ["ITLLearner", "ITLMetaTest"]
