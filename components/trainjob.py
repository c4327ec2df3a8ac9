"""The meta-training step of a pipeline compiled with ``workers``: one component that submits a
Kubeflow Trainer TrainJob running every outer step under torch.distributed, streams its log, and
hands on the final state and the export (``components.trainjob_runtime.meta_train``)."""

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
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
    device: str = "",
) -> int:
    """Every outer step in one TrainJob of ``workers`` processes on ``nodes`` nodes of ``image``
    (rank 0 owns the outer state; checkpoints after every step, so a restarted job resumes). Fails
    when the job fails. Returns the outer step reached."""
    from components import trainjob_runtime

    return trainjob_runtime.meta_train(learner, config, data, state_in, run_id, workers, nodes, gpu, image, device, state, learned, metrics)


__all__ = ["meta_train"]
