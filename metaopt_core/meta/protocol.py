"""The one shape every meta-learner has, modelled on pycma's ask/tell.

An outer step is *ask* (what must be evaluated: ARL's candidates × pool entries, ITL's
leave-one-out domains, MetaMD's tasks), *evaluate* (the inner trainings of one shard of that work:
what a pipeline fans out), *tell* (merge the shards' parts and take the outer step). One driver
(:mod:`metaopt_core.meta.driver`) runs that loop everywhere: in process, per pipeline block and
under torch.distributed::

    learner = registry.get("itl")
    state = driver.run(learner, config, inputs, "ckpt", on_event=print_line)   # resumable
    runner.export(learner, state, inputs, "learned")     # the artifact, as its export kind's files
    report = learner.meta_test(config, Path("learned"), inputs, settings, champion_dir=production_dir)

Work and parts are JSON-able dicts, so they cross process and machine boundaries unchanged.
A learner's state is its own object with the :class:`LearnerState` contract (``save``/``load``,
``finished``, ``history``, ``config``, ``step``). :class:`LearnerBase` implements what does not
depend on the algorithm (configuration, data preparation); a learner fills in the rest. The glue
(``driver``, ``runner``, components, pipelines, CLI) only ever calls these methods: nothing
outside a learner's package branches on its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel

from metaopt_core.config import ConfigError, DataSpec, validate
from metaopt_core.data.manifest import SplitManifest
from metaopt_core.meta.inputs import PreparedInputs, combine_fingerprints, integral_floats_to_int

Work = dict  # one outer step's jobs (JSON-able)
Part = dict  # the evaluations of one shard of the work (JSON-able)
ProgressReporter = Callable[[str], None]
FINISHED = "finished"  # key of a work document when the run has nothing left to ask


@dataclass
class MetaTestReport:
    """The meta-test's tables (Markdown), the scores the registry records (``metric``,
    ``greater_is_better``), and the details as JSON.

    ``paired``: candidate label (``learned``, ``champion`` when the production version was
    re-evaluated, each baseline) -> its score on every unit of ``units`` (task x seed), the same
    units in the same order for every label, in the direction of ``metric``: what the promotion
    gate (:mod:`metaopt_core.gate`) compares. ``settings``: how the candidates were run (lr grid,
    budget, seeds, the lr chosen per candidate and task), also in ``details`` and the Markdown.
    ``deployment``: what a downstream job needs to use the artifact at its own settings, measured
    here and baked into the registered artifact: ``lr_scale`` for a loss (its chosen lr over
    cross-entropy's: the loader multiplies the loss by it, so it trains at the lr tuned for CE),
    ``lr`` for an optimiser (its chosen lr)."""

    markdown: str
    scores: dict[str, float]
    metric: str
    greater_is_better: bool
    details: dict = field(default_factory=dict)
    paired: dict[str, list[float]] = field(default_factory=dict)
    units: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    deployment: dict = field(default_factory=dict)

    def gate_inputs(self) -> dict:
        """What the promotion step needs from this run, as JSON: metric, direction, paired scores,
        their units and the settings."""
        return {"metric": self.metric, "greater_is_better": self.greater_is_better, "paired": self.paired,
                "units": self.units, "settings": self.settings}  # fmt: skip


STATE_FILE = "state.json"  # what every checkpoint folder holds (a LearnerState writes it)


@runtime_checkable
class LearnerState(Protocol):
    """What the driver needs from a learner's state (the learner's own class, ``state_class``).

    ``config``: the run configuration as JSON; the driver replaces it on a compatible resume (more
    steps, another device), so ``finished`` must read its step budget from it. ``step``: outer
    steps completed. ``history``: one dict of that step's numbers per completed step.
    ``save(directory)`` writes a crash-safe checkpoint whose ``state.json`` marks it complete;
    ``load(directory)`` (a classmethod) reads it back. Nothing is pickled."""

    config: dict

    @property
    def step(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    @property
    def history(self) -> list[dict]: ...

    def save(self, directory: str | Path) -> Path: ...

    @classmethod
    def load(cls, directory: str | Path) -> LearnerState: ...


@runtime_checkable
class MetaLearner(Protocol):
    """What the driver, pipelines, components and CLI call. A learner *implements* the algorithm
    (``init`` ... ``meta_test``) and *declares* the class attributes; :class:`LearnerBase`
    provides configuration and data handling from those declarations."""

    name: str  # the registry name, and the default registered-model name
    kind: Literal["loss", "optimizer"]  # what it learns (the registry's load_loss / load_optimizer)
    description: str
    config_class: type[BaseModel]
    meta_test_class: type[BaseModel]
    state_class: type  # a LearnerState

    # the algorithm
    def init(self, config: BaseModel, data: PreparedInputs) -> Any: ...
    def ask(self, state: Any, data: PreparedInputs) -> Work: ...
    def evaluate(self, state: Any, work: Work, shard: tuple[int, int], data: PreparedInputs) -> Part: ...
    def tell(self, state: Any, parts: Sequence[Part], data: PreparedInputs) -> Any: ...
    def done(self, state: Any) -> bool: ...
    def metrics(self, state: Any) -> dict: ...
    def export(self, state: Any, data: PreparedInputs) -> tuple[str, Any]: ...  # (export kind name, artifact)
    def meta_test(self, config: BaseModel, artifact_dir: Path, data: PreparedInputs, settings: BaseModel, *,
                  champion_dir: Path | None = None, progress: ProgressReporter | None = None) -> MetaTestReport: ...  # fmt: skip

    # configuration and data (LearnerBase)
    def resolve_config(self, doc: Mapping[str, Any] | BaseModel, source: str = "config") -> BaseModel: ...
    def resolve_meta_test(self, settings: Mapping[str, Any] | BaseModel | None, source: str = "meta_test") -> BaseModel: ...
    def total_steps(self, config: BaseModel) -> int: ...
    def with_total_steps(self, config: BaseModel, steps: int) -> BaseModel: ...
    def with_device(self, config: BaseModel, device: str | None) -> BaseModel: ...
    def resumable_fields(self) -> tuple[str, ...]: ...
    def prepare(self, config: BaseModel, meta_test: Mapping[str, Any] | BaseModel | None = None,
                progress: ProgressReporter | None = None) -> PreparedInputs: ...  # fmt: skip


def shard_slice(count: int, index: int, shards: int) -> range:
    """Positions of shard ``index`` of ``shards`` among ``count`` jobs: contiguous, sizes differ by at most one."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: got {shards!r}; allowed: an int >= 1")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < shards:
        raise ValueError(f"shard index: got {index!r}; allowed: 0..{shards - 1}")
    return range(round(count * index / shards), round(count * (index + 1) / shards))


class LearnerBase:
    """Defaults for everything that does not depend on the algorithm.

    A learner sets the class attributes and implements ``init``, ``ask``, ``evaluate``, ``tell``,
    ``export`` and ``meta_test``; it overrides ``data_specs`` (and ``meta_test_specs``,
    ``split_manifest``) when it reads datasets. Its state is a :class:`LearnerState`
    (``state_class``). The driver runs the loop; there is no learner-specific loop.

    Declarations: ``steps_field`` (dot path of the outer-step count in the config), ``resumable``
    (config fields besides that count and ``device`` that may change when a checkpoint is resumed,
    because they do not change what the run computes), ``demo_configs`` (files under configs/, the
    first that exists is the pipeline's default), ``default_meta_test``, ``history_keys`` (the
    curves worth plotting) and ``presets``: named dot-path overrides of the demo configuration.
    Every learner must have a ``"quick"`` preset, a shorter run that `make run` (``metaopt run
    all --local``) takes on 2 CPU cores within minutes (tests/test_pipelines_compile.py holds
    every registered learner to it). ``meta_test_presets``: per preset, changes to
    ``default_meta_test`` (a cheaper meta-test for ``quick``: fewer epochs or lrs, never fewer
    than the gate's units).
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["loss", "optimizer"]]
    description: ClassVar[str] = ""
    config_class: ClassVar[type[BaseModel]]
    meta_test_class: ClassVar[type[BaseModel]]
    state_class: ClassVar[type]
    steps_field: ClassVar[str] = "outer.steps"  # dot path of the outer-step count in the config
    resumable: ClassVar[tuple[str, ...]] = ()  # further config fields a resume may change (dot paths)
    # For the pipeline front end: demo configuration files (configs/<file>, first that exists),
    # meta-test settings a pipeline defaults to, named overrides ("quick": for `make run`),
    # and the meta-training curves worth plotting.
    demo_configs: ClassVar[tuple[str, ...]] = ()
    default_meta_test: ClassVar[Mapping[str, Any]] = {}
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    meta_test_presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    history_keys: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # ---------------------------------------------------------------- configuration

    def resolve_config(self, doc: Mapping[str, Any] | BaseModel, source: str = "config") -> BaseModel:
        """The validated configuration from a dict (YAML/JSON/pipeline parameter). ``algorithm:``
        may be missing (it is implied); another learner's name is an error."""
        if isinstance(doc, BaseModel):
            doc = doc.model_dump(mode="json")
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{source}: got {type(doc).__name__}; allowed: a mapping (the {self.name} run configuration)")
        data = integral_floats_to_int(dict(doc))
        given = data.setdefault("algorithm", self.name)
        if given != self.name:
            raise ConfigError(f"{source}: field 'algorithm': got {given!r}; this learner is {self.name!r}")
        return validate(self.config_class, data, source=source)

    def resolve_meta_test(self, settings: Mapping[str, Any] | BaseModel | None, source: str = "meta_test") -> BaseModel:
        if isinstance(settings, BaseModel):
            return settings
        return validate(self.meta_test_class, integral_floats_to_int(dict(settings or {})), source=source)

    def _steps_path(self) -> list[str]:
        return self.steps_field.split(".")

    def total_steps(self, config: BaseModel) -> int:
        node: Any = config
        for key in self._steps_path():
            node = getattr(node, key)
        return int(node)

    def with_total_steps(self, config: BaseModel, steps: int) -> BaseModel:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: got {steps!r}; allowed: an int >= 1")

        def replace(model: BaseModel, keys: list[str]) -> BaseModel:
            if len(keys) == 1:
                return model.model_copy(update={keys[0]: steps})
            return model.model_copy(update={keys[0]: replace(getattr(model, keys[0]), keys[1:])})

        return replace(config, self._steps_path())

    def with_device(self, config: BaseModel, device: str | None) -> BaseModel:
        if not device:
            return config
        return self.resolve_config({**config.model_dump(mode="json"), "device": device})

    # ---------------------------------------------------------------- data

    def data_specs(self, config: BaseModel, meta_test: BaseModel) -> list[DataSpec]:
        """The datasets meta-training reads, in order (none: tasks generated from the config)."""
        return []

    def meta_test_specs(self, config: BaseModel, meta_test: BaseModel) -> list[DataSpec]:
        """The datasets the meta-test reads: examples (and held-out domains) meta-training never touches."""
        return []

    def split_manifest(self, config: BaseModel, meta_test: BaseModel, data: PreparedInputs) -> SplitManifest:
        """Which splits each phase reads (see :mod:`metaopt_core.data.manifest`). The default:
        meta-training reads all of ``data.datasets``, the meta-test all of ``data.meta_test``."""
        manifest = SplitManifest()
        for dataset in data.datasets:
            manifest.add("inner_training", dataset)
        for dataset in data.meta_test:
            manifest.add("meta_test", dataset)
        return manifest

    def generated_inputs(self, config: BaseModel) -> PreparedInputs:
        """Inputs of a learner that reads no dataset: an empty set whose fingerprint is the config's."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
        return PreparedInputs(self.name, [], digest, {"kind": "generated from the config"})

    def prepare(self, config: BaseModel, meta_test: Mapping[str, Any] | BaseModel | None = None,
                progress: ProgressReporter | None = None) -> PreparedInputs:  # fmt: skip
        """Prepare every dataset the run reads, meta-training's and the meta-test's (re-reading the
        sources, so new data shows up as a new fingerprint), and the split manifest; refuses an
        overlap between meta-training and meta-test (:class:`SplitOverlapError`) before any training."""
        from metaopt_core.data.checks import check_prepared
        from metaopt_core.data.prepare import prepare

        settings = self.resolve_meta_test(meta_test)

        def prepared(spec: DataSpec) -> Any:
            data = prepare(spec)
            if progress and (data.content or {}).get("empty_folders"):
                progress(f"{spec.source}: folders without images (absent there): {', '.join(data.content['empty_folders'])}")
            if progress:
                splits = sorted(data.splits)
                progress(f"prepared {spec.source} ({spec.part}): splits {splits[:4]}{'...' if len(splits) > 4 else ''}, fingerprint {data.fingerprint[:12]}")
            return data

        datasets = [prepared(spec) for spec in self.data_specs(config, settings)]
        held_out = [prepared(spec) for spec in self.meta_test_specs(config, settings)]
        if datasets:
            inputs = PreparedInputs(self.name, datasets, "", {"kind": "datasets"})
        else:
            inputs = self.generated_inputs(config)
        inputs.meta_test, inputs.meta_test_settings = held_out, settings.model_dump(mode="json")
        inputs.fingerprint = combine_fingerprints([*(d.fingerprint for d in datasets), *(d.fingerprint for d in held_out)] or [inputs.fingerprint])
        manifest = self.split_manifest(config, settings, inputs).check()
        check_prepared([*datasets, *held_out], manifest)  # too few classes or examples: refused before any training
        inputs.manifest = manifest.to_dict()
        return inputs

    def check_inputs(self, config: BaseModel, data: PreparedInputs) -> None:
        """The prepared inputs are the ones this configuration reads."""
        if data.learner != self.name:
            raise ValueError(f"inputs: prepared for {data.learner!r}; the config is {self.name!r}")
        wanted = [spec.model_dump(mode="json") for spec in self.data_specs(config, self.resolve_meta_test(data.meta_test_settings))]
        have = [dataset.spec for dataset in data.datasets]
        if wanted != have:
            raise ValueError(f"inputs: prepared from data specs {have}; the config reads {wanted} (prepare the data again)")

    def resumable_fields(self) -> tuple[str, ...]:
        """Config fields (dot paths) that may differ between a checkpoint and the config resuming
        it: the step budget, the device and the learner's ``resumable``. Every other field would
        change what the run computes, so a resume under it is refused (naming the field)."""
        return (self.steps_field, "device", *self.resumable)

    # ---------------------------------------------------------------- state

    def config_of(self, state: Any) -> BaseModel:
        return self.resolve_config(state.config, source="state.config")

    def done(self, state: Any) -> bool:
        return bool(state.finished)

    def metrics(self, state: Any) -> dict:
        """The scalar metrics of the last outer step, with its step number."""
        if not state.history:
            return {}
        row = state.history[-1]
        return {key: value for key, value in row.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
                or key == "step"}  # fmt: skip


__all__ = [
    "FINISHED",
    "LearnerBase",
    "LearnerState",
    "MetaLearner",
    "MetaTestReport",
    "Part",
    "ProgressReporter",
    "STATE_FILE",
    "Work",
    "shard_slice",
]
