"""The shape every metaopt pipeline shares, and the options fixed when it is compiled.

    prepare_data ─► check_new_data ─► If(should_train):
                                         start_tracking ─► <alg>_init ─► block 1 ─► … ─► block N
                                           ─► meta_test ─► register_and_promote
                                      Else:
                                         report_skipped

A *block* is, with ``shards == 1``, one component running several outer steps in process
(``<alg>_block``); with ``shards > 1`` it is one outer step fanned out over ``dsl.ParallelFor``
(ARL: ``arl_ask`` ─► ``arl_evaluate`` × shards ─► ``arl_tell``; ITL / MetaMD:
``<alg>_inner_hypergrad`` × shards ─► ``<alg>_outer_update``). KFP DAGs are static, so the number
of blocks (and, when sharded, of outer steps) is fixed at compile time; the number of outer steps
a block runs is not (the run's total from the config, split evenly over the blocks).

Every pipeline parameter has a default (the algorithm's demo configuration, meta-test settings
sized like it) and a description (from the ``Args:`` section of the pipeline's docstring, which
KFP copies into the compiled YAML), so a run can be started from the Kubeflow UI as is.
"""

# No ``from __future__ import annotations``: KFP reads the pipeline function's annotations as types.
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import yaml

from components.images import IMAGE_CUDA

ALGORITHMS = ("arl", "itl", "metamd")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The demo configuration each pipeline defaults to (the first file that exists).
DEFAULT_CONFIGS = {
    "arl": ("arl-demo.yaml",),
    "itl": ("itl-demo.yaml",),
    "metamd": ("metamd-demo.yaml", "metamd-quadratic.yaml"),
}
# Meta-test settings each pipeline defaults to (see metaopt_core.meta.blocks.*MetaTest).
DEFAULT_META_TEST: dict[str, dict] = {
    "arl": {"source": "digits", "model": "mlp2", "epochs": 12, "seeds": [0], "baselines": ["ce"]},
    "itl": {"held_out": ["rot75"], "model": "mlp2", "epochs": 3, "seeds": [0], "baselines": ["ce"]},
    "metamd": {"seeds": 2},
}
DESCRIPTIONS = {
    "arl": "ARL: CMA-ES over a 12-parameter Taylor loss, robust to label noise (thesis ch. 3)",
    "itl": "ITL: a Taylor loss learned by implicit hypergradients for domain generalisation (thesis ch. 4)",
    "metamd": "MetaMD: a meta-learned mirror-descent optimiser (Bregman divergence, thesis ch. 5)",
}
# Presets: overrides of the demo configurations (dot paths). "quick" keeps `make run` (all three
# pipelines, local) well within 15 minutes on 2 shared CPU cores; the demo configurations as
# written take about 35 minutes there (measured per outer step under load: ARL ~140 s per
# generation x 8, ITL ~25 s per step x 15, MetaMD ~20 s per step x 30). "demo": the file as written.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {"arl": {}, "itl": {}, "metamd": {}},
    "quick": {
        "arl": {"generations": 3, "train.epochs": 6},
        "itl": {"outer.steps": 4},
        # MetaMD's demo ramps the inner lr from 1.0 to 2.5 over 20 outer steps (only a well-learned M
        # is stable at 2.5); a 6-step run cannot learn that far, so it stays at 1.0 (measured: held-out
        # rot75 after 50 steps, learned M 86.8 % vs SGD 59.3 % accuracy; the 2.5 ramp squeezed into 6
        # steps diverged)
        "metamd": {"outer.steps": 6, "inner.lr": 1.0, "inner.lr_warmup_steps": 0, "evaluation.every": 3},
    },
}

# Cluster wiring (infra/): the ConfigMap every step reads, and the S3 credentials Secret.
RUNTIME_CONFIG_MAP = "metaopt-runtime"
RUNTIME_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "METAOPT_S3_MAX_ATTEMPTS")
S3_SECRET = "metaopt-s3"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
# Steps that run long enough to be preempted (spot / GPU nodes): retried, resuming from their inputs.
RETRY = {"num_retries": 3, "backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "3600s"}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """What is fixed when a pipeline is compiled.

    ``blocks``: meta-training blocks (state handed block to block). ``shards``: 1 runs each block's
    inner trainings batched in one process; > 1 fans each outer step out over that many parallel
    tasks (then a block is one outer step, and the run takes ``blocks`` outer steps). ``gpu``: the
    meta-training and meta-test steps request one NVIDIA GPU, run the CUDA image on GPU nodes and
    compute on ``cuda``. ``cluster_env``: every step reads the ``metaopt-runtime`` ConfigMap and
    the ``metaopt-s3`` Secret (``infra/``) as environment variables. ``retries``: meta-training and
    meta-test steps are retried when they fail (preemption); the local runner turns it off, since
    there a failure is a bug or a bad setting that a retry only repeats.
    """

    blocks: int = 3
    shards: int = 1
    gpu: bool = False
    cluster_env: bool = True
    retries: bool = True

    def __post_init__(self) -> None:
        for name in ("blocks", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ValueError(f"{name}: got {value!r}; allowed: an int from 1 to 1000")
        for name in ("gpu", "cluster_env", "retries"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; allowed: true or false")

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else ""

    def describe(self) -> str:
        if self.shards > 1:
            shape = f"{self.blocks} outer steps, each fanned out over {self.shards} shards"
        else:
            shape = f"{self.blocks} blocks of outer steps, inner trainings batched in process"
        return f"{shape}; {'GPU (CUDA image, 1 GPU per meta-training step)' if self.gpu else 'CPU'}"


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: got {algorithm!r}; allowed: {list(ALGORITHMS)}")
    return algorithm


def default_config_path(algorithm: str) -> Path:
    """The demo configuration a pipeline defaults to."""
    check_algorithm(algorithm)
    for name in DEFAULT_CONFIGS[algorithm]:
        path = CONFIG_DIR / name
        if path.exists():
            return path
    raise FileNotFoundError(f"no default configuration for {algorithm!r}: none of {list(DEFAULT_CONFIGS[algorithm])} in {CONFIG_DIR}")


def load_config_file(path: str | Path, algorithm: str | None = None) -> dict:
    """A YAML/JSON run configuration as a plain dict (checked against ``algorithm`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    if algorithm is not None and doc.setdefault("algorithm", algorithm) != algorithm:
        raise ValueError(f"{path}: field 'algorithm': got {doc['algorithm']!r}; this pipeline runs {algorithm!r}")
    return doc


def default_config(algorithm: str) -> dict:
    return load_config_file(default_config_path(algorithm), algorithm)


def apply_overrides(doc: dict, overrides: dict[str, Any] | None) -> dict:
    """A copy of ``doc`` with ``{"train.epochs": 4, ...}`` set (dot paths into nested mappings).
    A path through something that is not a mapping is an error naming it."""
    out = json.loads(json.dumps(doc))
    for path, value in (overrides or {}).items():
        keys = str(path).split(".")
        if not all(keys):
            raise ValueError(f"override {path!r}: allowed: a dot path such as train.epochs")
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {path!r}: {'.'.join(keys[:depth + 1])} is {child!r}, not a mapping")
            node = child
        node[keys[-1]] = value
    return out


def preset_overrides(preset: str, algorithm: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"preset: got {preset!r}; allowed: {sorted(PRESETS)}")
    return dict(PRESETS[preset][check_algorithm(algorithm)])


def _without_nulls(value: Any) -> tuple[Any, bool]:
    if isinstance(value, dict):
        out, dropped = {}, False
        for key, item in value.items():
            if item is None:
                dropped = True
                continue
            out[key], inner = _without_nulls(item)
            dropped = dropped or inner
        return out, dropped
    if isinstance(value, list):
        pairs = [_without_nulls(item) for item in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs) or any(item is None for item in value)
    return value, False


def parameter_config(algorithm: str, doc: dict) -> dict:
    """``doc`` as a value for the ``config`` pipeline parameter. KFP dict parameters cannot hold
    null, so null fields are dropped — allowed only where that leaves the configuration unchanged
    (the field's default is null); otherwise the error says to pass the file as ``config_uri``."""
    stripped, dropped = _without_nulls(doc)
    if dropped:
        from metaopt_core.meta import blocks

        if blocks.resolve_config(algorithm, stripped).model_dump() != blocks.resolve_config(algorithm, doc).model_dump():
            raise ValueError(
                "config: a field set to null differs from its default, and KFP dict parameters cannot hold null; "
                "store the configuration in a file the cluster can read and pass it as config_uri (s3://...)"
            )
    return json.loads(json.dumps(stripped))


# ----------------------------------------------------------------------------- per-task settings


def _cluster_env(task: Any, options: PipelineOptions) -> Any:
    if options.cluster_env:
        from kfp import kubernetes

        kubernetes.use_config_map_as_env(task, RUNTIME_CONFIG_MAP, {key: key for key in RUNTIME_KEYS})
        # optional: with IRSA / workload identity there are no keys to mount
        kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in S3_KEYS}, optional=True)
    return task


def _fresh(task: Any) -> Any:
    """No caching: the step re-reads data, talks to MLflow, or must run for every pipeline run."""
    task.set_caching_options(False)
    return task


def _compute(task: Any, options: PipelineOptions) -> Any:
    """A meta-training / meta-test step: retried when preempted; on GPU when compiled for it."""
    if options.retries:
        task.set_retry(**RETRY)
    if options.gpu:
        from kfp import kubernetes

        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        task.set_container_image(IMAGE_CUDA)
        kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


# ----------------------------------------------------------------------------- the pipeline


def _components(algorithm: str) -> dict[str, Any]:
    from components import arl, itl, metamd

    if algorithm == "arl":
        return {"init": arl.arl_init, "block": arl.arl_block, "ask": arl.arl_ask, "fan_out": arl.arl_evaluate, "fan_in": arl.arl_tell,
                "part_in": "candidates", "part_out": "fitness"}  # fmt: skip
    module = itl if algorithm == "itl" else metamd
    return {"init": getattr(module, f"{algorithm}_init"), "block": getattr(module, f"{algorithm}_block"), "ask": None,
            "fan_out": getattr(module, f"{algorithm}_inner_hypergrad"), "fan_in": getattr(module, f"{algorithm}_outer_update"),
            "part_in": "state_in", "part_out": "hypergradients"}  # fmt: skip


PIPELINE_DOC = """{description}

Compiled for {shape}. Data → new-data check → (if the data changed, or forced) MLflow run →
meta-training → meta-test → register in the MLflow registry and promote if it beats production.

Args:
    config_uri: A run configuration (YAML or JSON) at a path, file:// or s3:// URI. Empty: use the 'config' parameter.
    config: The run configuration itself (the {algorithm} schema of metaopt_core, as in configs/{config_file}); used when config_uri is empty. Its default is that demo configuration.
    meta_test_settings: Meta-test protocol: {meta_test_fields}. Unset fields take the defaults shown.
    model_name: Registered model name in the MLflow registry; downstream jobs load models:/<model_name>/production.
    experiment: MLflow experiment of the run (ignored when the cluster injects MLFLOW_EXPERIMENT_ID).
    force_retrain: Meta-train even if the data fingerprint equals the production version's.
    promotion_margin: The new version replaces production only if its meta-test metric is better by more than this.
"""

META_TEST_FIELDS = {
    "arl": "source (held-out dataset), max_examples, model, epochs, seeds, baselines (loss names), lr, batch_size",
    "itl": "held_out (domains, e.g. rot75; empty = each in turn), model, epochs, seeds, baselines (loss names), lr, batch_size",
    "metamd": "steps (inner steps; default the config's), seeds (fresh models per held-out domain)",
}


def build_pipeline(algorithm: str, options: PipelineOptions | None = None, config: dict | None = None) -> Callable:
    """The ``algorithm`` pipeline (a KFP graph component) for ``options``; ``config`` replaces the
    demo configuration as the ``config`` parameter's default."""
    from kfp import dsl

    from components import common

    check_algorithm(algorithm)
    options = options or PipelineOptions()
    parts = _components(algorithm)
    default = parameter_config(algorithm, config if config is not None else default_config(algorithm))
    meta_test_default = dict(DEFAULT_META_TEST[algorithm])
    device = options.device

    def pipeline(
        config_uri: str = "",
        config: dict = default,
        meta_test_settings: dict = meta_test_default,
        model_name: str = algorithm,
        experiment: str = "metaopt",
        force_retrain: bool = False,
        promotion_margin: float = 0.0,
    ) -> str:
        def wire(task: Any, name: str) -> Any:
            task.set_display_name(name)
            return _cluster_env(task, options)

        prepared = wire(_fresh(common.prepare_data(algorithm=algorithm, config=config, config_uri=config_uri)), "prepare data")
        resolved, data, fingerprint = prepared.outputs["config"], prepared.outputs["data"], prepared.outputs["fingerprint"]
        check = wire(_fresh(common.check_new_data(fingerprint=fingerprint, model_name=model_name, force=force_retrain)), "check for new data")
        with dsl.If(check.outputs["should_train"] == True, name="data-changed"):  # noqa: E712 (a KFP condition, not Python)
            tracking = wire(_fresh(common.start_tracking(
                algorithm=algorithm, config=resolved, data=data, fingerprint=fingerprint, model_name=model_name,
                experiment=experiment, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)), "start MLflow run")  # fmt: skip
            run_id = tracking.outputs["run_id"]
            init = wire(_fresh(parts["init"](config=resolved, data=data, device=device,
                                             total_steps=options.blocks if options.shards > 1 else 0)), f"{algorithm} initial state")  # fmt: skip
            state = init.outputs["state"]
            learned = None
            for block in range(options.blocks):
                label = f"{block + 1}/{options.blocks}"
                if options.shards == 1:
                    step = parts["block"](config=resolved, data=data, state_in=state, run_id=run_id, block_index=block,
                                          blocks=options.blocks, device=device)  # fmt: skip
                    _compute(_fresh(wire(step, f"{algorithm} block {label}")), options)
                else:
                    source = state
                    if parts["ask"] is not None:
                        asked = wire(parts["ask"](config=resolved, state_in=state), f"{algorithm} ask {label}")
                        source = asked.outputs["candidates"]
                    with dsl.ParallelFor(items=list(range(options.shards)), parallelism=options.shards, name=f"shards-{block + 1}") as shard:
                        fan_out = parts["fan_out"](config=resolved, data=data, shard_index=shard, shards=options.shards,
                                                   **{parts["part_in"]: source})  # fmt: skip
                        _compute(wire(fan_out, f"{algorithm} shard {label}"), options)
                    step = parts["fan_in"](config=resolved, data=data, state_in=state, run_id=run_id,
                                           **{parts["part_out"]: dsl.Collected(fan_out.outputs[parts["part_out"]])})  # fmt: skip
                    _fresh(wire(step, f"{algorithm} update {label}"))
                state, learned = step.outputs["state"], step.outputs["learned"]
            tested = common.meta_test(algorithm=algorithm, config=resolved, data=data, learned=learned, run_id=run_id,
                                      settings=meta_test_settings, device=device)  # fmt: skip
            _compute(_fresh(wire(tested, "meta-test")), options)
            registered = wire(_fresh(common.register_and_promote(
                algorithm=algorithm, config=resolved, learned=learned, fingerprint=fingerprint, run_id=run_id,
                model_name=model_name, scores=tested.outputs["scores"], metric=tested.outputs["metric"],
                greater_is_better=tested.outputs["greater_is_better"], margin=promotion_margin)), "register and promote")  # fmt: skip
        with dsl.Else(name="data-unchanged"):
            skipped = wire(_fresh(common.report_skipped(
                algorithm=algorithm, model_name=model_name, production_version=check.outputs["production_version"],
                fingerprint=fingerprint, reason=check.outputs["reason"])), "skip: data unchanged")  # fmt: skip
        return dsl.OneOf(registered.outputs["summary"], skipped.outputs["summary"])

    pipeline.__name__ = f"{algorithm}_pipeline"
    pipeline.__doc__ = PIPELINE_DOC.format(
        description=DESCRIPTIONS[algorithm], shape=options.describe(), algorithm=algorithm,
        config_file=default_config_path(algorithm).name if config is None else "<your file>", meta_test_fields=META_TEST_FIELDS[algorithm],
    )  # fmt: skip
    return dsl.pipeline(name=f"metaopt-{algorithm}", description=f"{DESCRIPTIONS[algorithm]}. {options.describe()}.")(pipeline)


def compile_pipeline(algorithm: str, path: str | Path, options: PipelineOptions | None = None, config: dict | None = None) -> Path:
    """Compile the ``algorithm`` pipeline to KFP IR YAML at ``path``."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(algorithm, options, config), str(path))
    return path


__all__ = [
    "ALGORITHMS",
    "DEFAULT_META_TEST",
    "PRESETS",
    "PipelineOptions",
    "apply_overrides",
    "build_pipeline",
    "compile_pipeline",
    "default_config",
    "default_config_path",
    "load_config_file",
    "parameter_config",
    "preset_overrides",
]
