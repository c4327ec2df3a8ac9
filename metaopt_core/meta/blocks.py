"""Algorithm-agnostic glue between the meta-learners and a pipeline: one run configuration, its
prepared inputs (with one fingerprint), blocks of outer steps, fan-out shards, and the meta-test.

A pipeline (``pipelines/``) runs meta-training as a fixed number of *blocks*. Each block resumes
the state the previous one handed over and runs outer steps up to its target step, in process,
through the algorithm's own ``run`` (which checkpoints after every step)::

    config = resolve_config("itl", doc)                       # validated, with the algorithm's schema
    inputs = prepare_inputs(config)                            # datasets (or tasks) + one fingerprint
    state = initial_state(config, inputs); save_state(state, "ckpt")
    for b in range(blocks):
        result = run_block(config, inputs, "ckpt", block_target(total_steps(config), b, blocks))
    export_result(result, "learned")                           # loss.json | divergence/, history.json
    report = meta_test(config, "learned", inputs, settings={})  # Markdown table + promotion scores

With several machines per outer step instead (``shards > 1``), one outer step is a fan-out over
shards and a fan-in: :func:`fan_out` computes one shard's part (ARL: fitness of a slice of the
(candidate, pool entry) jobs; ITL: hypergradients of a slice of the held-out domains; MetaMD: of
a slice of the step's tasks) and :func:`fan_in` merges the parts and takes the outer step. A
shard's result does not depend on how the jobs were split, so both routes give the same state.

Nothing here imports kfp, mlflow or boto3: the components call these functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from pydantic import BaseModel, Field

from metaopt_core.config import ConfigError, DataSpec, StrictModel, config_class, validate
from metaopt_core.data.prepare import PreparedData, prepare

ALGORITHMS = ("arl", "itl", "metamd")
INPUTS_FORMAT = "metaopt.pipeline.inputs/1"
PART_FORMAT = "metaopt.pipeline.part/1"
RESULT_FORMAT = "metaopt.pipeline.result/1"
# What each algorithm learns, and so which registry call takes its result.
KIND = {"arl": "loss", "itl": "loss", "metamd": "optimizer"}

ProgressReporter = Callable[[str], None]
MetricsCallback = Callable[[dict], None]


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: got {algorithm!r}; allowed: {list(ALGORITHMS)}")
    return algorithm


# ============================================================================= configuration


def integral_floats_to_int(value: Any) -> Any:
    """``8.0`` -> ``8`` throughout nested dicts and lists. Kubeflow passes dict parameters as
    protobuf Structs, whose numbers are all doubles; an int field then receives ``8.0``. Every float
    field of the configs accepts an int, so the conversion is safe for validation."""
    if isinstance(value, Mapping):
        return {str(k): integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [integral_floats_to_int(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def resolve_config(algorithm: str, doc: Mapping[str, Any] | BaseModel, source: str = "config") -> BaseModel:
    """The validated run configuration of ``algorithm`` from a dict (YAML/JSON/pipeline parameter).

    ``algorithm:`` may be missing (it is implied); a different one is an error."""
    _check_algorithm(algorithm)
    if isinstance(doc, BaseModel):
        doc = doc.model_dump(mode="json")
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: got {type(doc).__name__}; allowed: a mapping (the {algorithm} run configuration)")
    data = integral_floats_to_int(dict(doc))
    given = data.setdefault("algorithm", algorithm)
    if given != algorithm:
        raise ConfigError(f"{source}: field 'algorithm': got {given!r}; this pipeline runs {algorithm!r}")
    return validate(config_class(algorithm), data, source=source)


def algorithm_of(config: BaseModel) -> str:
    return _check_algorithm(getattr(config, "algorithm", None))


def total_steps(config: BaseModel) -> int:
    """Outer steps the configuration asks for (ARL: generations; ITL, MetaMD: outer.steps)."""
    if algorithm_of(config) == "arl":
        return int(config.generations)
    return int(config.outer.steps)


def with_total_steps(config: BaseModel, steps: int) -> BaseModel:
    """The configuration with its outer-step count set to ``steps`` (a change every algorithm
    accepts on resume, so a block can run to its own target)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; allowed: an int >= 1")
    if algorithm_of(config) == "arl":
        return config.model_copy(update={"generations": steps})
    return config.model_copy(update={"outer": config.outer.model_copy(update={"steps": steps})})


def with_device(config: BaseModel, device: str | None) -> BaseModel:
    """The configuration on ``device`` (empty / None: unchanged)."""
    if not device:
        return config
    return resolve_config(algorithm_of(config), {**config.model_dump(mode="json"), "device": device})


def block_target(total: int, block_index: int, blocks: int) -> int:
    """The outer step block ``block_index`` (0-based) of ``blocks`` runs up to: the steps are split
    as evenly as possible, the last block always ends at ``total``."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks: got {blocks!r}; allowed: an int >= 1")
    if isinstance(block_index, bool) or not isinstance(block_index, int) or not 0 <= block_index < blocks:
        raise ValueError(f"block_index: got {block_index!r}; allowed: 0..{blocks - 1}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total: got {total!r}; allowed: an int >= 1")
    return max(1, math.ceil(total * (block_index + 1) / blocks))


# ============================================================================= prepared inputs


@dataclass
class PreparedInputs:
    """What meta-training reads, prepared once: ARL's pool datasets (in pool order), ITL's domain
    dataset, MetaMD's domain dataset (network tasks) or nothing (quadratic tasks, generated from the
    config). ``fingerprint`` identifies the content: a single dataset's own fingerprint, else the
    sha256 of the parts' fingerprints (quadratics: of the generated problems)."""

    algorithm: str
    datasets: list[PreparedData]
    fingerprint: str
    details: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for position, data in enumerate(self.datasets):
            name = f"dataset-{position}"
            data.save(directory / name)
            entries.append({"dir": name, "fingerprint": data.fingerprint, "spec": data.spec, "domains": data.domains})
        doc = {"format": INPUTS_FORMAT, "algorithm": self.algorithm, "fingerprint": self.fingerprint,
               "datasets": entries, "details": self.details}  # fmt: skip
        (directory / "inputs.json").write_text(json.dumps(doc, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PreparedInputs":
        directory = Path(directory)
        path = directory / "inputs.json"
        if not path.exists():
            raise FileNotFoundError(f"no prepared inputs at {directory} (inputs.json missing)")
        doc = json.loads(path.read_text())
        if doc.get("format") != INPUTS_FORMAT:
            raise ValueError(f"prepared inputs {path}: format {doc.get('format')!r}; expected {INPUTS_FORMAT!r}")
        datasets = [PreparedData.load(directory / entry["dir"]) for entry in doc["datasets"]]
        for entry, data in zip(doc["datasets"], datasets):
            if data.fingerprint != entry["fingerprint"]:
                raise ValueError(f"prepared inputs {path}: {entry['dir']} has fingerprint {data.fingerprint}, recorded {entry['fingerprint']}")
        return cls(doc["algorithm"], datasets, doc["fingerprint"], dict(doc.get("details") or {}))

    def summary(self) -> str:
        if not self.datasets:
            return f"{self.details.get('kind', 'generated tasks')} (fingerprint {self.fingerprint[:12]})"
        parts = []
        for data in self.datasets:
            sizes = sum(len(split) for split in data.splits.values())
            where = f"{len(data.domains)} domains" if data.domains else "train/val"
            parts.append(f"{data.spec.get('source')} ({where}, {sizes} images)")
        return f"{', '.join(parts)} (fingerprint {self.fingerprint[:12]})"


def combine_fingerprints(fingerprints: Sequence[str]) -> str:
    """One fingerprint for several: a single one unchanged, else sha256 over them in order."""
    if not fingerprints:
        raise ValueError("fingerprints: got none")
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256(("\n".join(["metaopt.inputs/1", *fingerprints])).encode()).hexdigest()


def _dataset_specs(config: BaseModel) -> list[DataSpec]:
    algorithm = algorithm_of(config)
    if algorithm == "arl":
        return config.dataset_specs()
    if algorithm == "itl":
        return [config.data]
    if config.tasks.family == "quadratic":
        return []
    return [config.tasks.network.data]


def prepare_inputs(config: BaseModel, progress: ProgressReporter | None = None) -> PreparedInputs:
    """Prepare every dataset the configuration reads (re-reading its source, so new data shows up
    as a new fingerprint)."""
    algorithm = algorithm_of(config)
    specs = _dataset_specs(config)
    datasets = []
    for spec in specs:
        data = prepare(spec)
        datasets.append(data)
        if progress:
            progress(f"prepared {spec.source}: splits {sorted(data.splits)[:4]}{'...' if len(data.splits) > 4 else ''}, fingerprint {data.fingerprint[:12]}")
    if datasets:
        return PreparedInputs(algorithm, datasets, combine_fingerprints([d.fingerprint for d in datasets]), {"kind": "datasets"})
    from metaopt_core.meta import quadratics

    family = config.tasks.quadratic
    train, held_out = quadratics.split(family)
    digest = hashlib.sha256(json.dumps(family.model_dump(mode="json"), sort_keys=True).encode())
    for problems in (train, held_out):
        for tensor in (problems.Q, problems.b, problems.start):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    details = {"kind": "quadratic tasks", "meta_train": len(train), "held_out": len(held_out)}
    return PreparedInputs(algorithm, [], digest.hexdigest(), details)


def _check_inputs(config: BaseModel, inputs: PreparedInputs) -> None:
    algorithm = algorithm_of(config)
    if inputs.algorithm != algorithm:
        raise ValueError(f"inputs: prepared for {inputs.algorithm!r}; the config is {algorithm!r}")
    wanted = [spec.model_dump(mode="json") for spec in _dataset_specs(config)]
    have = [data.spec for data in inputs.datasets]
    if wanted != have:
        raise ValueError(f"inputs: prepared from data specs {have}; the config reads {wanted} (prepare the data again)")


def _run_data(config: BaseModel, inputs: PreparedInputs) -> dict:
    """Keyword arguments that hand the prepared data to the algorithm's functions."""
    _check_inputs(config, inputs)
    algorithm = algorithm_of(config)
    if algorithm == "arl":
        from metaopt_core.meta import arl

        return {"pool": arl.build_pool(config, inputs.datasets)}
    return {"data": inputs.datasets[0] if inputs.datasets else None}


# ============================================================================= state


def _module(algorithm: str):
    from importlib import import_module

    return import_module(f"metaopt_core.meta.{_check_algorithm(algorithm)}")


def _state_class(algorithm: str):
    return {"arl": "ARLState", "itl": "ITLState", "metamd": "MetaMDState"}[algorithm]


def initial_state(config: BaseModel, inputs: PreparedInputs) -> Any:
    """The state before the first outer step."""
    algorithm = algorithm_of(config)
    module = _module(algorithm)
    if algorithm == "arl":
        _check_inputs(config, inputs)
        return module.ARLState.initial(config)
    if algorithm == "itl":
        return module.with_domains(module.ITLState.initial(config), _run_data(config, inputs)["data"])
    return module.MetaMDState.initial(config, _run_data(config, inputs)["data"])


def save_state(state: Any, directory: str | Path) -> Path:
    return state.save(directory)


def load_state(algorithm: str, directory: str | Path) -> Any:
    return getattr(_module(algorithm), _state_class(algorithm)).load(directory)


def state_step(state: Any) -> int:
    """Completed outer steps of a state."""
    return int(state.generation if hasattr(state, "generation") else state.step)


def state_config(algorithm: str, state: Any) -> BaseModel:
    return resolve_config(algorithm, state.config, source="state.config")


def step_metrics(algorithm: str, state: Any) -> dict:
    """The scalar metrics of the state's last outer step, with its step number (``step`` or
    ``generation``), as the algorithm's ``run`` hands them to its callback."""
    if not state.history:
        return {}
    row = state.history[-1]
    if algorithm == "arl":
        return dict(row)
    module = _module(algorithm)
    return {"step": row["step"], **{key: row[key] for key in module.SCALAR_METRICS if key in row}}


# ============================================================================= blocks


def _total_in_progress(line: str, until: int, total: int) -> str:
    """'generation 3/3' -> 'generation 3/8': a block runs to its own target, the reader wants the run's."""
    if until == total:
        return line
    return re.sub(rf"\b(\d+)/{until}\b", rf"\g<1>/{total}", line, count=1)


def run_block(
    config: BaseModel,
    inputs: PreparedInputs,
    checkpoint_dir: str | Path,
    until: int,
    *,
    total: int | None = None,
    progress: ProgressReporter | None = None,
    callback: MetricsCallback | None = None,
) -> Any:
    """Resume the state in ``checkpoint_dir`` and run outer steps up to step ``until`` (fewer when
    the algorithm stops by itself), checkpointing after every step. Returns the algorithm's result
    for the state reached. ``total`` (the run's full length) only makes progress lines read
    'step k/total'."""
    algorithm = algorithm_of(config)
    checkpoint = Path(checkpoint_dir)
    if not (checkpoint / "state.json").exists():
        raise FileNotFoundError(f"checkpoint_dir: no state at {checkpoint} (run initial_state and save_state first)")
    module = _module(algorithm)
    block_config = with_total_steps(config, until)
    total = total or total_steps(config)
    report = (lambda line: progress(_total_in_progress(line, until, total))) if progress else None
    return module.run(block_config, checkpoint_dir=checkpoint, progress=report, callback=callback, **_run_data(config, inputs))


def result_for(config: BaseModel, inputs: PreparedInputs, state: Any) -> Any:
    """The algorithm's result object (learned loss / divergence and history) for a state."""
    algorithm = algorithm_of(config)
    module = _module(algorithm)
    data = _run_data(config, inputs)
    if algorithm == "arl":
        pool = data["pool"]
        return module.result_of(state, pool.names, [entry.fingerprint for entry in pool.entries])
    if algorithm == "itl":
        return module.result_of(state, inputs.fingerprint)
    return module.result_of(state, data["data"])


def export_result(algorithm: str, result: Any, directory: str | Path, fingerprint: str | None = None) -> dict:
    """Write what the registry takes (``loss.json`` or ``divergence/``) and ``history.json``, plus
    ``result.json`` (algorithm, kind, steps, fingerprint). Returns the ``result.json`` document."""
    _check_algorithm(algorithm)
    directory = Path(directory)
    paths = result.save(directory)
    state = result.state
    doc = {
        "format": RESULT_FORMAT,
        "algorithm": algorithm,
        "kind": KIND[algorithm],
        "steps": state_step(state),
        "fingerprint": fingerprint,
        "files": {key: str(Path(path).relative_to(directory)) for key, path in paths.items()},
    }
    (directory / "result.json").write_text(json.dumps(doc, indent=2))
    return doc


def read_result(directory: str | Path) -> dict:
    """``result.json`` of an exported result, plus ``history`` (and ``loss`` for a loss)."""
    directory = Path(directory)
    path = directory / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"no exported result at {directory} (result.json missing)")
    doc = json.loads(path.read_text())
    if doc.get("format") != RESULT_FORMAT:
        raise ValueError(f"result {path}: format {doc.get('format')!r}; expected {RESULT_FORMAT!r}")
    doc["history"] = json.loads((directory / "history.json").read_text()) if (directory / "history.json").exists() else []
    if doc["kind"] == "loss":
        doc["loss"] = json.loads((directory / "loss.json").read_text())
    else:
        doc["divergence_dir"] = str(directory / "divergence")
    return doc


# ============================================================================= fan-out / fan-in (shards)


def shard_slice(count: int, index: int, shards: int) -> range:
    """Positions of shard ``index`` of ``shards`` among ``count`` jobs: contiguous, sizes differ by at most one."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: got {shards!r}; allowed: an int >= 1")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < shards:
        raise ValueError(f"shard index: got {index!r}; allowed: 0..{shards - 1}")
    start, end = (round(count * index / shards), round(count * (index + 1) / shards))
    return range(start, end)


def ask(config: BaseModel, state: Any) -> Any:
    """ARL only: the next generation's candidates (what the evaluate shards share)."""
    if algorithm_of(config) != "arl":
        raise ValueError(f"ask: only ARL has an ask step; got {algorithm_of(config)!r}")
    return _module("arl").ask(state)


def fan_out(config: BaseModel, inputs: PreparedInputs, state_or_candidates: Any, index: int, shards: int, directory: str | Path) -> Path:
    """Compute shard ``index`` of ``shards`` of the next outer step and save it as one JSON part in
    ``directory``. ARL takes the candidates from :func:`ask`; ITL and MetaMD take the state."""
    algorithm = algorithm_of(config)
    module = _module(algorithm)
    data = _run_data(config, inputs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if algorithm == "arl":
        import numpy as np

        candidates, pool = state_or_candidates, data["pool"]
        if module.shard_jobs(len(candidates), len(pool), (index, shards)):
            fitness = module.evaluate(candidates, pool, shard=(index, shards))
        else:  # more shards than (candidate, pool entry) jobs: this one evaluates nothing
            shape = (len(candidates), len(pool))
            fitness = module.Fitness(candidates.generation, candidates.params.copy(), pool.names, np.full(shape, np.nan),
                                     np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool))  # fmt: skip
        doc = {"step": fitness.generation, "fitness": fitness.to_dict()}
    elif algorithm == "itl":
        state = state_or_candidates
        domains = state.domains or module.domain_set(state.itl_config, data["data"]).names
        chosen = [domains[i] for i in shard_slice(len(domains), index, shards)]
        grads = module.inner_hypergrads(state, chosen, data=data["data"]) if chosen else []
        doc = {"step": state.step, "hypergradients": [g.to_dict() for g in grads]}
    else:
        state = state_or_candidates
        tasks = module.tasks_for_step(state, data["data"])
        chosen = [tasks[i] for i in shard_slice(len(tasks), index, shards)]
        grads = module.inner_hypergrads(state, chosen, data=data["data"]) if chosen else []
        doc = {"step": state.step, "hypergradients": [g.to_dict() for g in grads]}
    path = directory / "part.json"
    path.write_text(json.dumps({"format": PART_FORMAT, "algorithm": algorithm, "shard": [index, shards], **doc}))
    return path


def _read_part(path: str | Path, algorithm: str) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "part.json"
    doc = json.loads(path.read_text())
    if doc.get("format") != PART_FORMAT or doc.get("algorithm") != algorithm:
        raise ValueError(f"part {path}: format {doc.get('format')!r} for {doc.get('algorithm')!r}; expected {PART_FORMAT!r} for {algorithm!r}")
    return doc


def fan_in(config: BaseModel, inputs: PreparedInputs, state: Any, parts: Sequence[str | Path]) -> Any:
    """Merge the shards' parts of one outer step and take it: ARL's ``tell``, ITL's and MetaMD's
    ``outer_update``. Every job must appear in exactly one part (the algorithms check)."""
    algorithm = algorithm_of(config)
    module = _module(algorithm)
    docs = [_read_part(p, algorithm) for p in parts]
    if not docs:
        raise ValueError("parts: got none")
    if algorithm == "arl":
        fitness = module.Fitness.merge([module.Fitness.from_dict(d["fitness"]) for d in docs])
        return module.tell(state, fitness)
    grads = [module.Hypergradient.from_dict(g) for d in docs for g in d["hypergradients"]]
    if algorithm == "itl":
        return module.outer_update(state, grads)
    return module.outer_update(state, grads, data=_run_data(config, inputs)["data"])


# ============================================================================= meta-test


class ARLMetaTest(StrictModel):
    """ARL meta-test: the learned loss against baselines on a *held-out* dataset with the run's label
    noise, accuracy on clean labels at convergence (the ARL protocol). ``lr`` / ``batch_size``
    default to the meta-training ones."""

    source: str = "digits"
    max_examples: int | None = Field(None, ge=1)
    model: str = "mlp2"
    epochs: int = Field(12, ge=1)
    seeds: list[int] = Field([0], min_length=1)
    baselines: list[str] = ["ce"]
    lr: float | None = Field(None, gt=0.0)
    batch_size: int | None = Field(None, ge=1)


class ITLMetaTest(StrictModel):
    """ITL meta-test: leave-one-domain-out on the run's domains, the learned loss against baselines,
    accuracy on the held-out domain. ``held_out``: domains (suffixes like ``rot75``), empty = all."""

    held_out: list[str] = []
    model: str = "mlp2"
    epochs: int = Field(3, ge=1)
    seeds: list[int] = Field([0], min_length=1)
    baselines: list[str] = ["ce"]
    lr: float | None = Field(None, gt=0.0)
    batch_size: int | None = Field(None, ge=1)


class MetaMDMetaTest(StrictModel):
    """MetaMD meta-test: mirror descent with the learned divergence against SGD (the identity
    divergence) at the same lr. Network tasks: ``steps`` steps on each held-out domain, ``seeds``
    fresh models, accuracy on its val split. Quadratic tasks: iterations to the threshold on the
    held-out problems (lower is better)."""

    steps: int | None = Field(None, ge=1)
    seeds: int = Field(2, ge=1)


META_TEST_SETTINGS: dict[str, type[StrictModel]] = {"arl": ARLMetaTest, "itl": ITLMetaTest, "metamd": MetaMDMetaTest}


@dataclass
class MetaTestReport:
    """The meta-test's tables (Markdown), the scores the registry records and promotion compares
    (``metric``, ``greater_is_better``), and the details as JSON."""

    markdown: str
    scores: dict[str, float]
    metric: str
    greater_is_better: bool
    details: dict = field(default_factory=dict)


def meta_test_settings(algorithm: str, settings: Mapping[str, Any] | None) -> StrictModel:
    return validate(META_TEST_SETTINGS[_check_algorithm(algorithm)], integral_floats_to_int(dict(settings or {})), source="meta_test")


def loss_module(doc: Mapping[str, Any]) -> torch.nn.Module:
    """The loss a white-box document describes (Taylor, or a named baseline such as ITL's iSCE as 'sce')."""
    if doc.get("family") == "taylor":
        from metaopt_core.losses.taylor import TaylorLoss

        return TaylorLoss.from_dict(dict(doc))
    from metaopt_core.losses.registry import get_loss

    return get_loss(str(doc.get("family")), **dict(doc.get("params") or {}))


def _loss_table_scores(result: Any, learned: str = "learned") -> dict[str, float]:
    """The learned loss's mean accuracy over the cells (at convergence: ``meta_test_accuracy``, the
    promotion metric; with early stopping), its average rank, and each baseline's accuracies."""
    scores: dict[str, float] = {}
    for label in result.losses:
        converged = [result.summary(label, cell).converged_mean for cell in result.cells]
        early = [result.summary(label, cell).early_stop_mean for cell in result.cells]
        prefix = "meta_test_" if label == learned else f"baseline.{label}."
        scores[prefix + "accuracy"] = sum(converged) / len(converged)
        scores[prefix + "accuracy_early_stop"] = sum(early) / len(early)
    scores["meta_test_rank"] = float(result.ranks["converged"][learned])
    return scores


def meta_test(
    config: BaseModel,
    learned_dir: str | Path,
    inputs: PreparedInputs,
    settings: Mapping[str, Any] | None = None,
    *,
    progress: ProgressReporter | None = None,
) -> MetaTestReport:
    """Meta-test an exported result (see the ``*MetaTest`` settings for each algorithm's protocol)."""
    algorithm = algorithm_of(config)
    options = meta_test_settings(algorithm, settings)
    exported = read_result(learned_dir)
    if exported["algorithm"] != algorithm:
        raise ValueError(f"learned_dir: holds a {exported['algorithm']!r} result; the config is {algorithm!r}")
    device = getattr(config, "device", None)

    def on_run(event: dict) -> None:
        if progress:
            progress(f"meta-test {event['done']}/{event['total']}: {event['loss']} on {event['dataset']} · {event['condition']} · "
                     f"{event['architecture']} seed {event['seed']}: accuracy {event['converged_acc']:.4f}")  # fmt: skip

    if algorithm in ("arl", "itl"):
        from metaopt_core import evaluate

        losses: dict[str, Any] = {"learned": loss_module(exported["loss"])}
        for name in options.baselines:
            if name == "learned":
                raise ValueError("meta_test.baselines: 'learned' is the meta-trained loss's own label; pick another name")
            losses[name] = name
        if algorithm == "arl":
            spec = validate(DataSpec, {"source": options.source, "max_examples": options.max_examples, "noise": config.noise.model_dump(),
                                       "seed": config.pool.datasets[0].seed}, source="meta_test")  # fmt: skip
            tasks = [evaluate.noise_task(spec)]
            lr = options.lr or config.train.lr
            batch = options.batch_size or config.train.batch_size
            momentum = config.train.momentum
        else:
            _check_inputs(config, inputs)
            held_out = options.held_out or None
            tasks = evaluate.domain_tasks(inputs.datasets[0], held_out)
            lr = options.lr or config.inner.lr
            batch = options.batch_size or config.inner.batch_size
            momentum = config.inner.momentum
        result = evaluate.compare_losses(
            losses, tasks, [options.model], options.seeds, epochs=options.epochs, batch_size=batch, momentum=momentum,
            lr=lr, device=device, progress=on_run,
        )  # fmt: skip
        scores = _loss_table_scores(result)
        title = f"### {algorithm.upper()} meta-test: learned loss vs {', '.join(options.baselines) or 'nothing'}\n\n"
        return MetaTestReport(title + result.to_markdown(), scores, "meta_test_accuracy", True, result.to_dict())
    return _metamd_meta_test(config, exported, inputs, options, progress)


def _metamd_meta_test(config: BaseModel, exported: dict, inputs: PreparedInputs, options: MetaMDMetaTest, progress: ProgressReporter | None) -> MetaTestReport:
    import numpy as np

    from metaopt_core.meta import metamd, quadratics
    from metaopt_core.optim import load_divergence

    learned, manifest = load_divergence(exported["divergence_dir"])
    lr = float(manifest.get("lr") or config.inner.lr)
    data = _run_data(config, inputs)["data"]
    tasks = metamd.task_set(config, data)
    if isinstance(tasks, metamd.QuadraticTasks):
        family = config.tasks.quadratic
        with torch.no_grad():
            metric = learned.to_dense()
        counts = {
            "metamd": quadratics.iterations_to_threshold(tasks.held_out, "metamd", lr, tol=family.tol, max_iters=family.max_iters, metric=metric),
            "sgd": quadratics.iterations_to_threshold(tasks.held_out, "sgd", lr, tol=family.tol, max_iters=family.max_iters),
        }
        summary = {name: quadratics.summarise(np.asarray(value), family.max_iters) for name, value in counts.items()}
        lines = [f"### MetaMD meta-test: {len(tasks.held_out)} held-out quadratics, lr {lr:g}, threshold ||grad|| < {family.tol:g}", "",
                 "| optimiser | median iterations | mean iterations | converged |", "|---|---:|---:|---:|"]  # fmt: skip
        for name, row in summary.items():
            lines.append(f"| {name} | {row['median']:.0f} | {row['mean']:.1f} | {row['converged']:.0%} |")
        scores = {"meta_test_iterations": summary["metamd"]["median"], "meta_test_converged": summary["metamd"]["converged"],
                  "baseline.sgd.iterations": summary["sgd"]["median"], "baseline.sgd.converged": summary["sgd"]["converged"]}  # fmt: skip
        return MetaTestReport("\n".join(lines) + "\n", scores, "meta_test_iterations", False, {"summary": summary, "lr": lr})

    steps = options.steps or config.inner.steps
    run_config = config.model_copy(update={"inner": config.inner.model_copy(update={"lr": lr})})
    identity = metamd.build_divergence(run_config, tasks)
    rows: dict[str, list[dict]] = {"metamd": [], "sgd": []}
    for domain in tasks.held_out:
        _, val = tasks.data.domain(domain)
        for seed in range(options.seeds):
            init_seed, data_seed = np.random.SeedSequence([config.seed, seed, 0x7E57]).generate_state(2)
            for name, div in (("metamd", learned), ("sgd", identity)):
                concrete = metamd.network_task(run_config, tasks, metamd.Task("domain", seed, domain, int(init_seed), int(data_seed)), steps=steps)
                _, losses = metamd.train_with_mirror_descent(run_config, div.to(run_config.device), concrete, steps=steps)
                with torch.no_grad():
                    logits = concrete.model(val.x.to(concrete.x.device))
                    accuracy = float((logits.argmax(-1).cpu() == val.y).float().mean())
                final = losses[-1] if losses else float("nan")
                rows[name].append({"domain": domain, "seed": seed, "accuracy": accuracy, "final_loss": final,
                                   "diverged": not math.isfinite(final)})  # fmt: skip
                if progress:
                    progress(f"meta-test: {name} on held-out {domain} seed {seed}: accuracy {accuracy:.4f}, final minibatch loss {final:.4f}")

    def mean(name: str, key: str) -> float:
        values = [r[key] for r in rows[name] if math.isfinite(r[key])]
        return sum(values) / len(values) if values else float("nan")

    lines = [f"### MetaMD meta-test: {steps} steps on held-out {', '.join(tasks.held_out)}, lr {lr:g}, {options.seeds} seed(s)", "",
             "| optimiser | val accuracy | final minibatch loss | diverged |", "|---|---:|---:|---:|"]  # fmt: skip
    for name in rows:
        lines.append(f"| {name} | {mean(name, 'accuracy') * 100:.1f}% | {mean(name, 'final_loss'):.4f} | {sum(r['diverged'] for r in rows[name])} |")
    scores = {"meta_test_accuracy": mean("metamd", "accuracy"), "meta_test_final_loss": mean("metamd", "final_loss"),
              "baseline.sgd.accuracy": mean("sgd", "accuracy"), "baseline.sgd.final_loss": mean("sgd", "final_loss")}  # fmt: skip
    return MetaTestReport("\n".join(lines) + "\n", scores, "meta_test_accuracy", True, {"runs": rows, "lr": lr, "steps": steps})


__all__ = [
    "ALGORITHMS",
    "ARLMetaTest",
    "ITLMetaTest",
    "KIND",
    "MetaMDMetaTest",
    "MetaTestReport",
    "PreparedInputs",
    "ask",
    "block_target",
    "combine_fingerprints",
    "export_result",
    "fan_in",
    "fan_out",
    "initial_state",
    "integral_floats_to_int",
    "load_state",
    "loss_module",
    "meta_test",
    "meta_test_settings",
    "prepare_inputs",
    "read_result",
    "resolve_config",
    "result_for",
    "run_block",
    "save_state",
    "shard_slice",
    "state_config",
    "state_step",
    "step_metrics",
    "total_steps",
    "with_device",
    "with_total_steps",
]
