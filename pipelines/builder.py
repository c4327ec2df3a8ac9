"""The one pipeline builder: any registered learner's meta-training DAG, and the options fixed
when it is compiled.

    ExitHandler(finish_tracking):
        prepare_data ─► check_new_data ─► If(should_train):
                                             start_tracking ─► init_state ─► block 1 ─► … ─► block N
                                               ─► meta_test ─► register_and_promote
                                          Else:
                                             report_skipped

One MLflow run per pipeline run: ``start_tracking`` creates it (tagged with the KFP run id), every
later step logs into it and leaves it RUNNING, and the exit step ``finish_tracking`` ends it
FINISHED, or FAILED when any step failed. The pipeline returns the exit step's lineage JSON (KFP
run, MLflow run, their pages and the MLflow status): outputs of steps inside an ExitHandler cannot
be pipeline outputs.

A *block* is, with ``shards == 1``, one component running several outer steps in process
(``run_block``); with ``shards > 1`` it is one outer step fanned out over ``dsl.ParallelFor``:
``ask`` ─► ``evaluate`` × shards ─► ``tell``. KFP DAGs are static, so the number of blocks (and,
when sharded, of outer steps) is fixed at compile time; the number of outer steps a block runs is
not (the run's total from the config, split evenly over the blocks).

Everything learner-specific comes from the learner (``metaopt_core.meta.registry``): its demo
configuration, meta-test defaults, presets and description. Every pipeline parameter has a
default and a description (from the ``Args:`` section of the pipeline's docstring, which KFP
copies into the compiled YAML), so a run can be started from the Kubeflow UI as is.
"""

# No ``from __future__ import annotations``: KFP reads the pipeline function's annotations as types.
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from components.images import resolve_images
from pipelines.resources import apply_resources, resources_for

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# "demo" runs a configuration as written; the other presets are the learner's own overrides
# ("quick": what `make run` uses to stay within minutes on 2 cores).
PRESET_NAMES = ("demo", "quick")


# Cluster wiring (infra/): the ConfigMap every step reads, and the S3 credentials Secret.
RUNTIME_CONFIG_MAP = "metaopt-runtime"
RUNTIME_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "METAOPT_S3_MAX_ATTEMPTS",
    "KFP_UI_URL",
    "MLFLOW_UI_URL",
)
S3_SECRET = "metaopt-s3"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# MLflow's basic-auth app (infra/): the pipeline user's credentials, read by the MLflow client.
MLFLOW_AUTH_SECRET = "metaopt-mlflow-auth"
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Every pipeline pod carries this label: infra/'s NetworkPolicies let only such pods reach MLflow and MinIO.
STEP_LABEL = ("metaopt.io/pipeline-step", "true")
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
    # > 0: meta-training is one step that submits a TrainJob of this many torch.distributed
    # workers on ``nodes`` nodes (components/trainjob_client.py); ``blocks`` and ``shards`` then do not apply.
    workers: int = 0
    nodes: int = 1
    # A PersistentVolumeClaim mounted into the data step at ``data_mount``: a dataset on a
    # volume is then the source ``folder:<data_mount>/...`` (its fingerprint is its content).
    data_volume: str = ""
    data_mount: str = "/data"
    # The images (empty: $METAOPT_IMAGE / $METAOPT_IMAGE_CUDA, else the version-commit tags of
    # components.images); a digest pins one exactly.
    image: str = ""
    image_cuda: str = ""
    # Per step kind, fields of pipelines.resources.StepResources to change: {"train": {"memory_limit": "32Gi"}}.
    resources: Any = dataclasses.field(default_factory=dict)
    # The pods' active deadline (the steps' timeouts); None: on Kubernetes, i.e. when cluster_env.
    timeouts: bool | None = None

    def __post_init__(self) -> None:
        cpu_image, cuda_image = resolve_images(self.image, self.image_cuda, gpu=bool(self.gpu))
        object.__setattr__(self, "image", cpu_image)
        object.__setattr__(self, "image_cuda", cuda_image)
        object.__setattr__(self, "resources", {kind: dict(fields) for kind, fields in dict(self.resources or {}).items()})
        for kind in self.resources:
            resources_for(kind, self.gpu, self.resources)  # an unknown kind or a bad value fails at compile time
        if self.timeouts is None:
            object.__setattr__(self, "timeouts", self.cluster_env)
        if self.workers:
            from components.trainjob_client import split_workers

            split_workers(self.workers, self.nodes)
        for name in ("blocks", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ValueError(f"{name}: got {value!r}; allowed: an int from 1 to 1000")
        for name in ("gpu", "cluster_env", "retries", "timeouts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; allowed: true or false")

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else ""

    def describe(self) -> str:
        if self.workers:
            shape = f"one TrainJob of {self.workers} torch.distributed workers on {self.nodes} node(s)"
        elif self.shards > 1:
            shape = f"{self.blocks} outer steps, each fanned out over {self.shards} shards"
        else:
            shape = f"{self.blocks} blocks of outer steps, inner trainings batched in process"
        return f"{shape}; {self.gpu_summary()}"

    def gpu_summary(self) -> str:
        """How many GPUs the compiled pipeline asks for, as the pods request them."""
        if not self.gpu:
            return "CPU"
        if self.workers:
            per_node = self.workers // self.nodes
            train = f"{self.workers} GPUs at once for meta-training ({self.nodes} node(s) x {per_node}, one per worker)"
        elif self.shards > 1:
            train = f"{self.shards} GPUs at once for meta-training (1 per shard task)"
        else:
            train = "1 GPU per meta-training block"
        return f"GPU (CUDA image): {train}, 1 for the meta-test"


def learner_of(name: str) -> Any:
    """The registered learner called ``name`` (error: the names there are)."""
    from metaopt_core.meta import registry

    return registry.get(name)


def default_config_path(name: str) -> Path | None:
    """The demo configuration file a pipeline defaults to (None: the learner declares none, and
    its configuration's defaults are the demo)."""
    learner = learner_of(name)
    for file in learner.demo_configs:
        path = CONFIG_DIR / file
        if path.exists():
            return path
    if learner.demo_configs:
        raise FileNotFoundError(f"no default configuration for {name!r}: none of {list(learner.demo_configs)} in {CONFIG_DIR}")
    return None


def default_config(name: str) -> dict:
    """The learner's demo configuration as a dict (its config class's defaults when it declares no file)."""
    from metaopt_core.config import read_config

    path = default_config_path(name)
    if path is None:
        return learner_of(name).config_class().model_dump(mode="json")
    return read_config(path, algorithm=name)


def preset_overrides(preset: str, name: str) -> dict[str, Any]:
    """The learner's overrides for ``preset`` (``demo``: none; a preset it lacks: none)."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset: got {preset!r}; allowed: {list(PRESET_NAMES)}")
    return {} if preset == "demo" else dict(learner_of(name).presets.get(preset, {}))


def preset_meta_test(preset: str, name: str) -> dict[str, Any]:
    """The meta-test settings of ``preset`` (the learner's ``default_meta_test`` with the preset's
    changes), or {} when the preset changes nothing (the pipeline's default then applies)."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset: got {preset!r}; allowed: {list(PRESET_NAMES)}")
    learner = learner_of(name)
    changes = {} if preset == "demo" else dict(learner.meta_test_presets.get(preset, {}))
    return {**dict(learner.default_meta_test), **changes} if changes else {}


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
        learner = learner_of(algorithm)
        if learner.resolve_config(stripped).model_dump() != learner.resolve_config(doc).model_dump():
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
        # Both Secrets are required (a missing one: a pod that names it, not 401s / 403s later). With
        # IRSA / workload identity, metaopt-s3 holds empty values (botocore then asks the next provider).
        kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in S3_KEYS})
        kubernetes.use_secret_as_env(task, MLFLOW_AUTH_SECRET, {key: key for key in MLFLOW_AUTH_KEYS})
        kubernetes.add_pod_label(task, label_key=STEP_LABEL[0], label_value=STEP_LABEL[1])
        _without_optional_flags(task)
    return task


def _without_optional_flags(task: Any) -> None:
    """Drop ``optional`` from the task's SecretAsEnv / ConfigMapAsEnv. KFP backends before 2.15
    (2.5.0 in Kubeflow 1.10) have no such field: their driver ignores it, so ``optional: true``
    would promise what they do not do. Every entry here is required, which is also what a missing
    ``optional`` means to the backends that know it (tests/test_kfp_backend_contract.py)."""
    config = task.platform_config.get("kubernetes", {})
    for key in ("secretAsEnv", "configMapAsEnv"):
        for entry in config.get(key, []):
            entry.pop("optional", None)


# The kind of each step (pipelines/resources.py sizes them); train and meta_test run on a GPU with --gpu.
GPU_KINDS = ("train", "meta_test")


def _sized(task: Any, kind: str, options: PipelineOptions) -> Any:
    """The step's image, CPU, memory and timeout for its kind (GPU kinds: GPU sizes when compiled with gpu)."""
    task.set_container_image(options.image)
    return apply_resources(task, resources_for(kind, options.gpu and kind in GPU_KINDS, options.resources), kubernetes_timeout=bool(options.timeouts))


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
        task.set_container_image(options.image_cuda)
        kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


# ----------------------------------------------------------------------------- the pipeline


PIPELINE_DOC = """{description}

Compiled for {shape}. Data → new-data check → (if the data changed, or forced) MLflow run →
meta-training → meta-test → register in the MLflow registry and promote if it beats production.

Args:
    config_uri: A run configuration (YAML or JSON) at a path, file:// or s3:// URI. Empty: use the 'config' parameter.
    config: The run configuration itself (the {algorithm} schema of metaopt_core, as in {config_file}); used when config_uri is empty. Its default is that demo configuration.
    meta_test_settings: Meta-test protocol: {meta_test_fields}. Unset fields take the defaults shown.
    model_name: Registered model name in the MLflow registry; downstream jobs load models:/<model_name>/production.
    experiment: MLflow experiment of the run (ignored when the cluster injects MLFLOW_EXPERIMENT_ID).
    force_retrain: Meta-train even if the data fingerprint and the configuration equal those of the last finished meta-training.
    promotion_margin: Promotion gate margin: the new version replaces production only if, in the same meta-test run, it beats the
        re-evaluated production version by at least this (95% paired-bootstrap lower bound over tasks x seeds, >= 3 seeds) and
        is not worse than the best tuned baseline by more than this.
"""


def _meta_test_fields(learner: Any) -> str:
    return ", ".join(learner.meta_test_class.model_fields)


def build_pipeline(name: str, options: PipelineOptions | None = None, config: dict | None = None) -> Callable:
    """The pipeline (a KFP graph component) of the learner called ``name`` for ``options``;
    ``config`` replaces the demo configuration as the ``config`` parameter's default."""
    from kfp import dsl

    from components import common
    from components import learner as steps
    from components import trainjob as trainjob_steps
    from metaopt_core.meta import registry

    learner = learner_of(name)
    ref = registry.reference(name)  # what each step's fresh process finds the learner by
    options = options or PipelineOptions()
    default = parameter_config(name, config if config is not None else default_config(name))
    meta_test_default = dict(learner.default_meta_test)
    device = options.device
    label_name = learner.name

    def pipeline(
        config_uri: str = "",
        config: dict = default,
        meta_test_settings: dict = meta_test_default,
        model_name: str = learner.name,
        experiment: str = "metaopt",
        force_retrain: bool = False,
        promotion_margin: float = 0.0,
    ) -> str:
        def wire(task: Any, display: str, kind: str = "control") -> Any:
            task.set_display_name(display)
            return _sized(_cluster_env(task, options), kind, options)

        # The exit step ends the pipeline's MLflow run (found by the KFP run id: an exit step takes no
        # outputs of the steps it guards): FINISHED if every step succeeded, else FAILED.
        # With workers the exit step also deletes the run's TrainJob unless it completed (components/trainjob.py).
        exit_step, exit_name = (
            (trainjob_steps.finish_run, "finish MLflow run, clean up TrainJob") if options.workers else (common.finish_tracking, "finish MLflow run")
        )
        finished = wire(_fresh(exit_step(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)), exit_name)
        with dsl.ExitHandler(finished, name="pipeline-steps"):
            prepared = wire(
                _fresh(common.prepare_data(learner=ref, config=config, config_uri=config_uri, meta_test_settings=meta_test_settings)), "prepare data", "data"
            )
            resolved, data, fingerprint = prepared.outputs["config"], prepared.outputs["data"], prepared.outputs["fingerprint"]
            if options.data_volume:
                from kfp import kubernetes

                kubernetes.mount_pvc(prepared, pvc_name=options.data_volume, mount_path=options.data_mount)
            check = wire(
                _fresh(common.check_new_data(fingerprint=fingerprint, model_name=model_name, force=force_retrain, config=resolved)), "check for new data"
            )
            with dsl.If(check.outputs["should_train"] == True, name="data-changed"):  # noqa: E712 (a KFP condition, not Python)
                tracking = wire(_fresh(common.start_tracking(
                    learner=ref, config=resolved, data=data, fingerprint=fingerprint, model_name=model_name,
                    experiment=experiment, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)), "start MLflow run")  # fmt: skip
                run_id = tracking.outputs["run_id"]
                init = wire(_fresh(steps.init_state(learner=ref, config=resolved, data=data, device=device,
                                                    total_steps=options.blocks if options.shards > 1 and not options.workers else 0)), f"{label_name} initial state", "data")  # fmt: skip
                state = init.outputs["state"]
                learned = None
                if options.workers:  # every outer step in one TrainJob (components/trainjob_client.py), named after the run and task
                    step = trainjob_steps.meta_train(learner=ref, config=resolved, data=data, state_in=state, run_id=run_id, workers=options.workers,
                                                     nodes=options.nodes, gpu=options.gpu, image=options.image_cuda if options.gpu else options.image,
                                                     device=device, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)  # fmt: skip
                    _fresh(wire(step, f"{label_name} meta-training (TrainJob)", "submit"))
                    if options.retries:
                        step.set_retry(**RETRY)  # the step resumes the job's checkpoint
                    learned = step.outputs["learned"]
                for block in range(0 if options.workers else options.blocks):
                    label = f"{block + 1}/{options.blocks}"
                    if options.shards == 1:
                        step = steps.run_block(learner=ref, config=resolved, data=data, state_in=state, run_id=run_id, block_index=block,
                                               blocks=options.blocks, device=device)  # fmt: skip
                        _compute(_fresh(wire(step, f"{label_name} block {label}", "train")), options)
                    else:
                        asked = wire(_fresh(steps.ask(learner=ref, config=resolved, data=data, state_in=state)), f"{label_name} ask {label}", "data")
                        with dsl.ParallelFor(items=list(range(options.shards)), parallelism=options.shards, name=f"shards-{block + 1}") as shard:
                            fan_out = steps.evaluate(learner=ref, config=resolved, data=data, state_in=state, work=asked.outputs["work"],
                                                     shard_index=shard, shards=options.shards)  # fmt: skip
                            _compute(wire(fan_out, f"{label_name} evaluate {label}", "train"), options)
                        step = steps.tell(learner=ref, config=resolved, data=data, state_in=state, run_id=run_id,
                                          parts=dsl.Collected(fan_out.outputs["part"]))  # fmt: skip
                        _fresh(wire(step, f"{label_name} tell {label}", "data"))
                    state, learned = step.outputs["state"], step.outputs["learned"]
                tested = common.meta_test(learner=ref, config=resolved, data=data, learned=learned, run_id=run_id,
                                          settings=meta_test_settings, device=device, model_name=model_name)  # fmt: skip
                _compute(_fresh(wire(tested, "meta-test", "meta_test")), options)
                wire(_fresh(common.register_and_promote(
                    learner=ref, config=resolved, learned=learned, fingerprint=fingerprint, run_id=run_id,
                    model_name=model_name, scores=tested.outputs["scores"], metric=tested.outputs["metric"], gate_inputs=tested.outputs["gate_inputs"],
                    greater_is_better=tested.outputs["greater_is_better"], margin=promotion_margin, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)), "register and promote")  # fmt: skip
            with dsl.Else(name="data-unchanged"):
                wire(_fresh(common.report_skipped(
                    learner=ref, model_name=model_name, production_version=check.outputs["production_version"],
                    fingerprint=fingerprint, reason=check.outputs["reason"])), "skip: data unchanged")  # fmt: skip
        return finished.output  # the lineage JSON; summaries: the final steps' outputs (and $METAOPT_SUMMARY_FILE locally)

    config_path = default_config_path(name) if config is None else None
    pipeline.__name__ = f"{learner.name}_pipeline"
    pipeline.__doc__ = PIPELINE_DOC.format(
        description=learner.description, shape=options.describe(), algorithm=learner.name,
        config_file=f"configs/{config_path.name}" if config_path else "<your file>", meta_test_fields=_meta_test_fields(learner),
    )  # fmt: skip
    return dsl.pipeline(name=f"metaopt-{learner.name}", description=f"{learner.description}. {options.describe()}.")(pipeline)


def compile_pipeline(name: str, path: str | Path, options: PipelineOptions | None = None, config: dict | None = None) -> Path:
    """Compile the pipeline of the learner called ``name`` to KFP IR YAML at ``path``."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(name, options, config), str(path))
    return path


__all__ = [
    "GPU_KINDS",
    "MLFLOW_AUTH_KEYS",
    "MLFLOW_AUTH_SECRET",
    "PRESET_NAMES",
    "PipelineOptions",
    "RUNTIME_CONFIG_MAP",
    "S3_SECRET",
    "STEP_LABEL",
    "build_pipeline",
    "compile_pipeline",
    "default_config",
    "default_config_path",
    "learner_of",
    "parameter_config",
    "preset_overrides",
]
