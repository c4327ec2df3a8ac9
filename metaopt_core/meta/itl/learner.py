"""ITL as a :class:`~metaopt_core.meta.protocol.MetaLearner`: implicit hypergradients of a Taylor
loss's parameters ω over leave-one-domain-out inner trainings. ask = the held-out domains; a part
is the hypergradients of one shard of them; tell aggregates (PCGrad or mean) and steps ω."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, Field

from metaopt_core.config import ConfigError, DataSpec, ModelName
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.data.prepare import UnknownDomainsError, domain_matches
from metaopt_core.meta import itl
from metaopt_core.meta.hypergradient_learner import HypergradientLearner
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.loss_meta_test import LossMetaTestSettings, compare_learned_loss, unit_seed
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter


class ITLMetaTest(LossMetaTestSettings):
    """ITL meta-test: leave-one-domain-out on the meta-test part of the run's source, the learned
    loss, the production version (when there is one) and baselines, accuracy on every image of each
    ``held_out`` domain (suffixes like ``rot75``; meta-training never sees them). ``seeds``
    independent units per held-out domain (every seed rebuilds the domains from its own draw of the
    images, its own splits and initialisation). Every candidate is trained at every lr of
    ``lr_grid`` (default: 5 values around the inner lr) and read out under the three protocols
    (``early-stop``, the gate's default: lr and epoch chosen on the source domains' validation
    splits, DomainBed's training-domain validation; ``tuned``; ``fixed``: ``recipe_lr`` for all,
    default the inner lr)."""

    held_out: list[str] = []
    model: ModelName = "mlp2"
    epochs: int = Field(6, ge=1)
    seeds: int | list[int] = 8


class ITLLearner(HypergradientLearner):
    name = "itl"
    kind = "loss"
    description = "ITL: a Taylor loss learned by implicit hypergradients for domain generalisation (thesis ch. 4)"
    config_class = itl.ITLConfig
    meta_test_class = ITLMetaTest
    state_class = itl.ITLState
    hypergradient_class = itl.Hypergradient
    scalar_metrics = itl.SCALAR_METRICS
    resumable = ("max_batch", "batched")  # the batched and sequential paths agree up to float reassociation
    demo_configs = ("itl-demo.yaml",)
    # 2 held-out domains (the extremes) x 8 seeds = 16 independent units x 6 grid points (factor ~3
    # apart; up to 0.3 because tuned CE once chose the top of a grid ending at 0.1) x (learned,
    # champion, ce) x 6 epochs on 5 source domains, batched per candidate
    default_meta_test = {"held_out": ["rot0", "rot75"], "model": "mlp2", "epochs": 6, "seeds": 8, "baselines": ["ce"],
                         "lr_grid": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]}  # fmt: skip
    presets = {"quick": {"outer.steps": 4}}  # `make run` on 2 cores (~25 s per demo outer step under load)
    meta_test_presets = {"quick": {"epochs": 4, "lr_grid": [0.01, 0.03, 0.1, 0.3]}}  # still 16 units
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
        """One prepared dataset per seed: the meta-test part's domains rebuilt from its own draw."""
        _held_out(meta_test)
        return [config.data.model_copy(update={"part": "meta-test", "seed": unit_seed(config.seed, 0, seed)}) for seed in meta_test.seed_values]

    def split_manifest(self, config: BaseModel, meta_test: ITLMetaTest, data: PreparedInputs) -> SplitManifest:
        """Leave-one-domain-out meta-training trains on the meta-train part's train splits and scores
        on them (val splits choose the inner lr, or only feed the logged curves); each meta-test unit (seed x held-out domain)
        trains on the meta-test part's other domains (lr and epoch chosen on their val splits) and
        reports every image of the held-out domain."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            train, val = [f"{d}/train" for d in dataset.domains], [f"{d}/val" for d in dataset.domains]
            manifest.add("inner_training", dataset, train).add("outer_objective", dataset, train)
            # val splits choose each job's inner lr when there is an lr grid; otherwise they only feed curves
            manifest.add("outer_objective" if config.inner.lr_grid else "monitoring", dataset, val)
        unit = 0
        for dataset in data.meta_test:
            for name in meta_test.held_out:
                [held] = [d for d in dataset.domains if domain_matches(d, name)]
                sources = [d for d in dataset.domains if d != held]
                manifest.add("meta_test_training", dataset, [f"{d}/train" for d in sources], unit)
                manifest.add("lr_selection", dataset, [f"{d}/val" for d in sources], unit)
                manifest.add("meta_test", dataset, [f"{held}/train", f"{held}/val"], unit)
                unit += 1
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

    def export(self, state: itl.ITLState, data: PreparedInputs) -> tuple[str, dict]:
        result = itl.result_of(state, data.fingerprint)
        return result.export_kind, result.document

    def meta_test(self, config, artifact_dir: Path, data: PreparedInputs, settings: ITLMetaTest, *,
                  champion_dir: Path | None = None, progress: ProgressReporter | None = None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import evaluate, exports
        from metaopt_core.evaluate.units import Unit

        self.check_inputs(config, data)
        units = []
        for dataset, seed in zip(data.meta_test, settings.seed_values):
            for h, task in enumerate(evaluate.domain_tasks(dataset, _held_out(settings), whole_domain=True)):
                units.append(Unit(f"{task.dataset} · {task.condition} · {settings.model}", seed, task.train, task.select, task.test, settings.model,
                                  unit_seed(config.seed, h, seed, 1), unit_seed(config.seed, h, seed, 2)))  # fmt: skip
        training = settings.training(config.inner.lr, config.inner.momentum, config.inner.batch_size)
        champion = exports.read(champion_dir) if champion_dir is not None else None
        return compare_learned_loss("ITL meta-test", exports.read(artifact_dir), settings.baselines, units, training,
                                    champion=champion, device=config.device, progress=progress)  # fmt: skip


def _held_out(meta_test: ITLMetaTest) -> list[str]:
    if not meta_test.held_out:
        raise ConfigError(
            "meta_test: field 'held_out': got []; allowed: the domains the meta-test holds out, e.g. ['rot75'] "
            "(meta-training must not see them, so 'each domain in turn' cannot be meta-tested honestly)"
        )
    return list(meta_test.held_out)


__all__ = ["ITLLearner", "ITLMetaTest"]
