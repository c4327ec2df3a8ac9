"""Meta-training as one Kubeflow Trainer TrainJob: what the pipeline's meta-training step submits,
how it follows the job (logs into the step's log, wait, fail when the job fails), and the job's
lifecycle across retries and failed or cancelled runs.

The job runs ``torchrun -m components.trainjob_runtime`` on ``num_nodes`` pods of the project's
image with the ``metaopt-torch`` ClusterTrainingRuntime (``metaopt-torch-gpu`` on GPU nodes;
``infra/base/trainer/``), which sets the torchrun rendezvous (``PET_NNODES``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR``/``PORT``), the GPU nodes' selector and toleration, keeps Istio sidecars out of
the pods and mounts the ``metaopt-runtime`` ConfigMap and the Secrets. Inputs, checkpoints and the
export live in the run's object storage (s3://), so a restarted or replaced job resumes from the
last outer step.

Lifecycle: the job's name is derived from the KFP run id and the task (:func:`trainjob_name`), so
a retried step finds the job of its earlier attempt: it adopts a job that is still running or has
completed, and replaces a failed one (foreground deletion, waiting until its pods are gone, then a
new job that resumes the checkpoint): there is never a second job writing the same checkpoint.
The job is owned by the run's Argo Workflow (deleting the run deletes it), and the pipeline's exit
handler deletes it when the run failed (:func:`cleanup_run`). The client is
``kubeflow.trainer.TrainerClient`` (package ``kubeflow``), imported when used.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

RUNTIME_NAME = "metaopt-torch"  # the ClusterTrainingRuntimes in infra/base/trainer/
GPU_RUNTIME_NAME = "metaopt-torch-gpu"
ENTRY_MODULE = "components.trainjob_runtime"
TASK = "meta-train"  # the pipeline task that submits the TrainJob
MAX_RESTARTS = 3  # torchrun restarts the workers (from the checkpoint) this often before the job fails
CREATED, COMPLETE, FAILED, RUNNING = "Created", "Complete", "Failed", "Running"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUN_ID_LABEL, TASK_LABEL = "metaopt.io/kfp-run-id", "metaopt.io/task"
PART_OF = ("app.kubernetes.io/part-of", "metaopt")


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in the Failed state (or never ended in time)."""


def trainjob_name(kfp_run_id: str, task: str = TASK) -> str:
    """The TrainJob of ``task`` in KFP run ``kfp_run_id``: the same for every attempt of the step.
    An RFC 1035 label (what the Trainer's CRD admits) well under its 63 characters, so the
    JobSet's Job and Pod names derived from it fit too; the run id itself goes into a label."""
    if not kfp_run_id or not kfp_run_id.strip():
        raise ValueError("kfp_run_id: got an empty value; allowed: the KFP run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER)")
    slug = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:20].strip("-") or "job"
    digest = hashlib.sha256(f"{kfp_run_id}/{task}".encode()).hexdigest()[:12]
    return f"metaopt-{slug}-{digest}"


def trainjob_labels(kfp_run_id: str, task: str = TASK) -> dict[str, str]:
    """Labels of the TrainJob: who made it (``kubectl get trainjobs -l metaopt.io/kfp-run-id=<run id>``)."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", kfp_run_id)[:63].strip("-._")
    return {PART_OF[0]: PART_OF[1], RUN_ID_LABEL: value, TASK_LABEL: re.sub(r"[^a-z0-9-]", "-", task.lower())[:63].strip("-")}


def runtime_for(gpu: bool) -> str:
    return GPU_RUNTIME_NAME if gpu else RUNTIME_NAME


@dataclass(frozen=True)
class TrainJobRequest:
    """One meta-training TrainJob: its name, the image, ``num_nodes`` pods of ``procs_per_node``
    workers each, per-node resources and the command (torchrun + the entry point's arguments)."""

    image: str
    num_nodes: int
    procs_per_node: int
    resources_per_node: dict
    command: list[str]
    runtime: str = RUNTIME_NAME
    env: dict[str, str] = field(default_factory=dict)
    name: str = ""  # empty: the SDK picks a random one (no adoption across retries)
    labels: dict[str, str] = field(default_factory=lambda: {PART_OF[0]: PART_OF[1]})

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
    if gpu:  # a string: the SDK would send the int as the JSON number 3.0
        resources["gpu"] = str(procs_per_node)
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
    """Create the TrainJob (named ``request.name``, else by the SDK); returns its name."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import Labels, Name, TrainerCommand

    trainer = CustomTrainerContainer(image=request.image, num_nodes=request.num_nodes, resources_per_node=dict(request.resources_per_node),
                                     env=dict(request.env) or None)  # fmt: skip
    options: list[Any] = [TrainerCommand(command=list(request.command)), Labels(labels=dict(request.labels))]
    if request.name:
        options.append(Name(name=request.name))
    return client.train(runtime=request.runtime, trainer=trainer, options=options)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of the Kubernetes API error behind ``exc`` (the SDK wraps it in RuntimeError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        status = getattr(exc, "status", None)
        if isinstance(status, int):
            return status
        exc = exc.__cause__ or exc.__context__
    return None


def find_trainjob(client: Any, name: str) -> Any | None:
    """The TrainJob ``name`` (the SDK's view: status, steps), or None when there is none."""
    try:
        return client.get_job(name)
    except RuntimeError as exc:
        if _http_status(exc) == 404:
            return None
        raise


def delete_trainjob(client: Any, name: str, *, wait_s: float = 900, poll_s: float = 2) -> bool:
    """Delete the TrainJob ``name`` in the foreground (its JobSet and pods go first) and wait until
    it is gone, so nothing of it writes the checkpoint any more. False when there was none."""
    backend = getattr(client, "backend", None)
    api = getattr(backend, "custom_api", None)
    try:
        if api is not None:  # the Kubernetes backend: the SDK's delete_job has no propagation policy
            api.delete_namespaced_custom_object(GROUP, VERSION, backend.namespace, PLURAL, name, propagation_policy="Foreground")
        else:
            client.delete_job(name)
    except Exception as exc:  # noqa: BLE001 (the kubernetes client raises ApiException, the SDK RuntimeError)
        if _http_status(exc) == 404:
            return False
        raise
    deadline = time.monotonic() + wait_s
    while find_trainjob(client, name) is not None:
        if time.monotonic() > deadline:
            raise TrainJobFailed(f"TrainJob {name}: still being deleted after {wait_s:.0f} s (see `kubectl describe trainjob {name}`)")
        time.sleep(poll_s)
    return True


def own_by_workflow(client: Any, name: str, echo: Callable[[str], None] = print) -> bool:
    """Make the run's Argo Workflow the owner of TrainJob ``name``, so deleting the run deletes the
    job and its pods even where the exit handler never ran (a run terminated from the UI). The
    workflow is the owner of this step's own pod (``KFP_POD_NAME``, set by KFP). False, with a
    line saying why, where that cannot be done; the job then lives until the exit handler or
    ``kubectl delete trainjob`` removes it."""
    backend = getattr(client, "backend", None)
    pod_name = os.environ.get("KFP_POD_NAME", "")
    if not pod_name or getattr(backend, "core_api", None) is None:
        return False
    try:
        pod = backend.core_api.read_namespaced_pod(pod_name, backend.namespace)
        owners = [ref for ref in (pod.metadata.owner_references or []) if ref.kind == "Workflow"]
        if not owners:
            echo(f"TrainJob {name}: pod {pod_name} has no Workflow owner; the job is not tied to the run")
            return False
        ref = owners[0]  # blockOwnerDeletion unset: needs no rights on the workflow itself
        patch = {"metadata": {"ownerReferences": [{"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name, "uid": ref.uid}]}}
        backend.custom_api.patch_namespaced_custom_object(GROUP, VERSION, backend.namespace, PLURAL, name, patch)
    except Exception as exc:  # noqa: BLE001 (best effort: the exit handler still deletes a failed run's job)
        echo(f"TrainJob {name}: could not make the run's workflow its owner ({exc}); the exit handler still deletes it on failure")
        return False
    return True


def ensure_trainjob(client: Any, request: TrainJobRequest, echo: Callable[[str], None] = print) -> str:
    """The step's TrainJob, running: a job of an earlier attempt of the step (same name) is adopted
    while it runs or once it completed, and replaced when it failed; never two at once."""
    name = request.name
    existing = find_trainjob(client, name) if name else None
    if existing is not None and existing.status == FAILED:
        echo(f"TrainJob {name}: the job of an earlier attempt failed; replacing it (the new one resumes the checkpoint)")
        delete_trainjob(client, name)
        existing = None
    if existing is None:
        try:
            name = submit(client, request)
        except RuntimeError as exc:
            if not name or _http_status(exc) != 409:
                raise
            existing = find_trainjob(client, name)  # an attempt running beside this one created it first
    if existing is not None:
        echo(f"TrainJob {name}: adopting the job of an earlier attempt ({existing.status})")
    else:
        echo(f"TrainJob {name}: {request.num_nodes} node(s) x {request.procs_per_node} worker(s) of {request.image} "
             f"({request.resources_per_node} per node, runtime {request.runtime})")  # fmt: skip
    own_by_workflow(client, name, echo)
    return name


def cleanup_run(client: Any, kfp_run_id: str, echo: Callable[[str], None] = print, task: str = TASK) -> str:
    """The exit handler's part: delete the run's TrainJob unless it completed (a failed or
    cancelled run must not leave GPUs busy). Returns what it did, as one line."""
    name = trainjob_name(kfp_run_id, task)
    job = find_trainjob(client, name)
    if job is None:
        line = f"TrainJob {name}: none for this run"
    elif job.status == COMPLETE:
        line = f"TrainJob {name}: completed; kept (its pods' logs stay readable)"
    else:
        delete_trainjob(client, name)
        line = f"TrainJob {name}: {job.status}; deleted with its pods"
    echo(line)
    return line


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
    """Submit (or adopt), stream the logs, wait; the finished job (:class:`TrainJobFailed` if it failed)."""
    return follow(client, ensure_trainjob(client, request, echo), echo, **wait)


__all__ = [
    "COMPLETE",
    "ENTRY_MODULE",
    "FAILED",
    "GPU_RUNTIME_NAME",
    "MAX_RESTARTS",
    "RUNTIME_NAME",
    "TASK",
    "TrainJobFailed",
    "TrainJobRequest",
    "cleanup_run",
    "delete_trainjob",
    "ensure_trainjob",
    "find_trainjob",
    "follow",
    "make_client",
    "own_by_workflow",
    "resources_per_node",
    "run_trainjob",
    "runtime_for",
    "split_workers",
    "submit",
    "trainjob_command",
    "trainjob_labels",
    "trainjob_name",
]
