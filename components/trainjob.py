"""The steps of a pipeline compiled with ``workers``: the meta-training step, which submits (or, on
a retry, adopts) a Kubeflow Trainer TrainJob running every outer step under torch.distributed,
streams its log and hands on the final state and the export (``components.trainjob_runtime``),
and the pipeline's exit step, which also deletes the run's TrainJob when the run failed."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def meta_train(
    learner: str,
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    run_id: str,
    workers: int,
    nodes: int,
    gpu: bool,
    image: str,
    kfp_run_id: str,
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
    device: str = "",
) -> int:
    """Every outer step in one TrainJob of ``workers`` processes on ``nodes`` nodes of ``image``
    (rank 0 owns the outer state; checkpoints after every step, so a restarted job resumes). Fails
    when the job fails. Returns the outer step reached."""
    from components import trainjob_runtime

    return trainjob_runtime.meta_train(learner, config, data, state_in, run_id, workers, nodes, gpu, image, device, state, learned, metrics,
                                       kfp_run_id=kfp_run_id)  # fmt: skip


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_run(status: dsl.PipelineTaskFinalStatus, kfp_run_id: str) -> str:
    """The exit step of a ``workers`` pipeline: delete the run's TrainJob unless it completed (a
    failed run must not leave its pods holding GPUs), then end the MLflow run as
    ``common.finish_tracking`` does. Returns the same lineage JSON."""
    from components import lineage
    from components import trainjob_client as trainjob

    try:
        trainjob.cleanup_run(trainjob.make_client(), kfp_run_id)
    except Exception as exc:  # noqa: BLE001 (ending the MLflow run must not depend on the Kubernetes API)
        print(f"TrainJob cleanup for run {kfp_run_id} failed: {exc}; delete it with kubectl delete trainjob -l metaopt.io/kfp-run-id={kfp_run_id}")
    error = getattr(status, "error_message", None) or ""
    return lineage.finish_tracking(status.state, kfp_run_id, error)


__all__ = ["finish_run", "meta_train"]
