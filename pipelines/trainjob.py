"""Meta-training as one Kubeflow Trainer TrainJob: what the pipeline's meta-training step submits,
and how it follows the job (logs into the step's log, wait, fail when the job fails).

The job runs ``torchrun -m components.trainjob_runtime`` on ``num_nodes`` pods of the project's
image with the ``metaopt-torch`` ClusterTrainingRuntime (``infra/trainer/``), which sets the
torchrun rendezvous (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``/``PORT``) and mounts
the ``metaopt-runtime`` ConfigMap and ``metaopt-s3`` Secret. Inputs, checkpoints and the export
live in the run's object storage (s3://), so a restarted or rescheduled job resumes from the last
outer step. The client is ``kubeflow.trainer.TrainerClient`` (package ``kubeflow``), imported
when used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

RUNTIME_NAME = "metaopt-torch"  # the ClusterTrainingRuntime in infra/trainer/
ENTRY_MODULE = "components.trainjob_runtime"
MAX_RESTARTS = 3  # torchrun restarts the workers (from the checkpoint) this often before the job fails
COMPLETE, FAILED, RUNNING = "Complete", "Failed", "Running"


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in the Failed state (or never ended in time)."""


@dataclass(frozen=True)
class TrainJobRequest:
    """One meta-training TrainJob: the image, ``num_nodes`` pods of ``procs_per_node`` workers
    each, per-node resources and the command (torchrun + the entry point's arguments)."""

    image: str
    num_nodes: int
    procs_per_node: int
    resources_per_node: dict
    command: list[str]
    runtime: str = RUNTIME_NAME
    env: dict[str, str] = field(default_factory=dict)

    @property
    def workers(self) -> int:
        return self.num_nodes * self.procs_per_node


def split_workers(workers: int, nodes: int) -> int:
    """Workers per node for ``workers`` in all on ``nodes`` nodes (they must divide evenly)."""
    for name, value in (("workers", workers), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: got {value!r}; allowed: an int >= 1")
    if workers % nodes:
        raise ValueError(f"workers: got {workers} on {nodes} nodes; allowed: a multiple of the node count")
    return workers // nodes


def resources_per_node(procs_per_node: int, gpu: bool, cpu: str = "", memory: str = "") -> dict:
    """Per-node requests: one GPU per worker on GPU nodes; by default 2 CPUs and 8 GiB per worker
    (one thread computes, the other feeds data and talks to the other ranks)."""
    resources: dict[str, Any] = {"cpu": cpu or str(2 * procs_per_node), "memory": memory or f"{8 * procs_per_node}Gi"}
    if gpu:
        resources["gpu"] = procs_per_node
    return resources


def trainjob_command(
    learner: str, procs_per_node: int, *, config_uri: str, data_uri: str, checkpoint_uri: str, initial_uri: str, export_uri: str,
    run_id: str = "", device: str = "", threads: int = 0,
) -> list[str]:  # fmt: skip
    """torchrun (nodes, node rank and master from the runtime's PET_* variables) running the
    distributed outer loop with storage URIs."""
    command = ["torchrun", f"--nproc-per-node={procs_per_node}", f"--max-restarts={MAX_RESTARTS}", "-m", ENTRY_MODULE,
               "--learner", learner, "--config-uri", config_uri, "--data-uri", data_uri, "--checkpoint-uri", checkpoint_uri,
               "--initial-uri", initial_uri, "--export-uri", export_uri]  # fmt: skip
    for flag, value in (("--run-id", run_id), ("--device", device), ("--threads", threads)):
        if value:
            command += [flag, str(value)]
    return command


def make_client(namespace: str | None = None) -> Any:
    """A TrainerClient for the cluster this process runs in (or the kubeconfig's)."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace=namespace))


def submit(client: Any, request: TrainJobRequest) -> str:
    """Create the TrainJob; returns its name."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import Labels, TrainerCommand

    trainer = CustomTrainerContainer(image=request.image, num_nodes=request.num_nodes, resources_per_node=dict(request.resources_per_node),
                                     env=dict(request.env) or None)  # fmt: skip
    options = [TrainerCommand(command=list(request.command)), Labels(labels={"app.kubernetes.io/part-of": "metaopt"})]
    return client.train(runtime=request.runtime, trainer=trainer, options=options)


def follow(client: Any, name: str, echo: Callable[[str], None] = print, *, timeout_s: int = 7 * 24 * 3600, poll_s: int = 10) -> Any:
    """Stream node 0's log (rank 0 prints the progress) into ``echo`` while the job runs, then
    wait for it to end. Returns the finished job; raises :class:`TrainJobFailed` if it failed."""
    deadline = time.monotonic() + timeout_s
    try:
        client.wait_for_job_status(name, status={RUNNING, COMPLETE, FAILED}, timeout=timeout_s, polling_interval=poll_s)
        for line in client.get_job_logs(name, follow=True):
            echo(line.rstrip("\n"))
        left = max(int(deadline - time.monotonic()), poll_s + 1)
        job = client.wait_for_job_status(name, status={COMPLETE, FAILED}, timeout=left, polling_interval=poll_s)
    except TimeoutError as exc:
        raise TrainJobFailed(f"TrainJob {name}: not finished after {timeout_s} s ({exc})") from None
    if job.status != COMPLETE:
        raise TrainJobFailed(f"TrainJob {name}: {job.status} (see `kubectl describe trainjob {name}` and its pods' logs)")
    return job


def run_trainjob(client: Any, request: TrainJobRequest, echo: Callable[[str], None] = print, **wait: Any) -> Any:
    """Submit, stream the logs, wait; the finished job (:class:`TrainJobFailed` if it failed)."""
    name = submit(client, request)
    echo(f"TrainJob {name}: {request.num_nodes} node(s) x {request.procs_per_node} worker(s) of {request.image} "
         f"({request.resources_per_node} per node, runtime {request.runtime})")  # fmt: skip
    return follow(client, name, echo, **wait)


__all__ = [
    "COMPLETE",
    "ENTRY_MODULE",
    "FAILED",
    "MAX_RESTARTS",
    "RUNTIME_NAME",
    "TrainJobFailed",
    "TrainJobRequest",
    "follow",
    "make_client",
    "resources_per_node",
    "run_trainjob",
    "split_workers",
    "submit",
    "trainjob_command",
]
