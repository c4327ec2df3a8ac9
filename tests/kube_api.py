"""An in-memory Kubernetes API behind the real kubeflow SDK, for tests without a cluster.

``FakeCluster`` answers the calls the SDK's ``KubernetesBackend`` makes through the ``kubernetes``
client (``CustomObjectsApi``, ``CoreV1Api``, both ``unittest.mock.create_autospec`` of the real
classes, so every call is checked against the real signatures): custom objects with 404 and 409 as
the API server answers them, foreground deletion (the object lingers, being deleted, for a few
reads), the pods of each TrainJob with the labels the JobSet controller gives them, and their logs.
Every call is recorded as the RBAC request it is (verb, API group, resource, namespace), which is
what tests/test_trainer_contract.py checks the rendered roles against.

    cluster = FakeCluster("team-a", runtimes=[...ClusterTrainingRuntime dicts...])
    client = cluster.trainer_client()          # a kubeflow.trainer.TrainerClient on it
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from unittest import mock

from kubernetes import client as k8s


@dataclass(frozen=True)
class Request:
    """One API request, as RBAC sees it."""

    verb: str
    group: str
    resource: str
    namespace: str | None  # None: cluster-scoped
    name: str = ""


class _Thread:
    """What ``async_req=True`` returns: the result (or error) on ``get()``."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _LogStream:
    def __init__(self, lines: list[str]):
        self.lines = lines

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        yield from (line.encode() + b"\n" for line in self.lines)

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def _api_error(status: int, reason: str) -> k8s.ApiException:
    return k8s.ApiException(status=status, reason=reason)


@dataclass
class FakeCluster:
    namespace: str
    runtimes: list[dict] = field(default_factory=list)  # ClusterTrainingRuntimes
    objects: dict[tuple[str, str | None, str], dict] = field(default_factory=dict)  # (plural, namespace, name) -> object
    requests: list[Request] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)  # every body the client sent to create, as sent
    logs: dict[str, list[str]] = field(default_factory=dict)  # TrainJob name -> node-0 log lines
    finish_with: dict[str, str] = field(default_factory=dict)  # TrainJob name -> "Complete"/"Failed" once its log was read
    deletion_reads: int = 2  # reads a foreground-deleted object survives (its pods going first)
    step_pod: dict | None = None  # the pipeline step's own pod (KFP_POD_NAME), owned by a Workflow
    _deleting: dict[tuple[str, str | None, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for runtime in self.runtimes:
            self.objects[("clustertrainingruntimes", None, runtime["metadata"]["name"])] = copy.deepcopy(runtime)

    # ------------------------------------------------------------------ state the tests set or read

    def trainjobs(self) -> dict[str, dict]:
        return {name: obj for (plural, _, name), obj in self.objects.items() if plural == "trainjobs"}

    def set_status(self, name: str, condition: str) -> None:
        """Give TrainJob ``name`` the condition ``Complete`` or ``Failed`` (True)."""
        job = self.objects[("trainjobs", self.namespace, name)]
        job["status"] = {
            "conditions": [{"type": condition, "status": "True", "reason": condition, "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }

    # ------------------------------------------------------------------ CustomObjectsApi

    def _record(self, verb: str, group: str, resource: str, namespace: str | None, name: str = "") -> None:
        self.requests.append(Request(verb, group, resource, namespace, name))

    def _read(self, key: tuple[str, str | None, str]) -> dict:
        if key in self._deleting:
            self._deleting[key] -= 1
            if self._deleting[key] < 0:
                del self._deleting[key], self.objects[key]
        if key not in self.objects:
            raise _api_error(404, "Not Found")
        return copy.deepcopy(self.objects[key])

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._record("get", group, plural, namespace, name)
        try:
            return _Thread(self._read((plural, namespace, name)))
        except k8s.ApiException as exc:
            return _Thread(error=exc)

    def get_cluster_custom_object(self, group, version, plural, name, **kwargs):
        self._record("get", group, plural, None, name)
        try:
            return _Thread(self._read((plural, None, name)))
        except k8s.ApiException as exc:
            return _Thread(error=exc)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self._record("create", group, plural, namespace, body["metadata"]["name"])
        self.created.append(copy.deepcopy(body))
        key = (plural, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise _api_error(409, "AlreadyExists")
        obj = copy.deepcopy(body)
        obj["metadata"].update(namespace=namespace, uid=f"uid-{len(self.objects)}", creationTimestamp=datetime.now(timezone.utc).isoformat())
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._record("delete", group, plural, namespace, name)
        key = (plural, namespace, name)
        if key not in self.objects:
            raise _api_error(404, "Not Found")
        if kwargs.get("propagation_policy") == "Foreground":
            self.objects[key]["metadata"]["deletionTimestamp"] = datetime.now(timezone.utc).isoformat()
            self._deleting.setdefault(key, self.deletion_reads)
        else:
            del self.objects[key]
        return {"status": "Success"}

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs):
        self._record("patch", group, plural, namespace, name)
        obj = self._read((plural, namespace, name))
        self.objects[(plural, namespace, name)]["metadata"].update(body.get("metadata", {}))  # merge patch of metadata
        return obj

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        self._record("list", group, plural, namespace)
        items = [copy.deepcopy(o) for (p, ns, _), o in self.objects.items() if p == plural and ns == namespace]
        return _Thread({"apiVersion": f"{group}/{version}", "kind": "List", "items": items})

    def list_cluster_custom_object(self, group, version, plural, **kwargs):
        self._record("list", group, plural, None)
        items = [copy.deepcopy(o) for (p, ns, _), o in self.objects.items() if p == plural and ns is None]
        return _Thread({"apiVersion": f"{group}/{version}", "kind": "List", "items": items})

    # ------------------------------------------------------------------ CoreV1Api

    def _pods_of(self, trainjob: dict) -> list[k8s.V1Pod]:
        name = trainjob["metadata"]["name"]
        nodes = (trainjob.get("spec", {}).get("trainer") or {}).get("numNodes", 1)
        phase = "Succeeded" if any(c["type"] == "Complete" for c in trainjob.get("status", {}).get("conditions", [])) else "Running"
        return [
            k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(
                    name=f"{name}-node-0-{index}-abcde",
                    namespace=self.namespace,
                    creation_timestamp=datetime.now(timezone.utc),
                    labels={
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "batch.kubernetes.io/job-completion-index": str(index),
                    },
                ),  # fmt: skip
                spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="node", image="x")]),
                status=k8s.V1PodStatus(phase=phase),
            )
            for index in range(nodes)
        ]

    def list_namespaced_pod(self, namespace, **kwargs):
        self._record("list", "", "pods", namespace)
        # the SDK selects "jobset.sigs.k8s.io/jobset-name=<job>,jobset.sigs.k8s.io/replicatedjob-name in (...)"
        wanted = kwargs.get("label_selector", "").split(",", 1)[0].partition("=")[2]
        pods = [pod for key, job in self.objects.items() if key[0] == "trainjobs" and key[2] == wanted for pod in self._pods_of(job)]
        return _Thread(k8s.V1PodList(items=pods))

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        self._record("get", "", "pods/log", namespace, name)
        job_name = name.split("-node-", 1)[0]
        if job_name in self.finish_with:
            self.set_status(job_name, self.finish_with.pop(job_name))
        lines = self.logs.get(job_name, [])
        return _LogStream(lines) if kwargs.get("follow") else "\n".join(lines)

    def read_namespaced_pod(self, name, namespace, **kwargs):
        self._record("get", "", "pods", namespace, name)
        if self.step_pod is None or self.step_pod["name"] != name:
            raise _api_error(404, "Not Found")
        owner = self.step_pod["owner"]
        return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, owner_references=[
            k8s.V1OwnerReference(api_version="argoproj.io/v1alpha1", kind="Workflow", name=owner["name"], uid=owner["uid"])]))  # fmt: skip

    # ------------------------------------------------------------------ the SDK on top

    def apis(self) -> tuple[Any, Any]:
        """(CustomObjectsApi, CoreV1Api): autospecs of the real classes answering from this cluster."""
        custom = mock.create_autospec(k8s.CustomObjectsApi, instance=True)
        for method in ("get_namespaced_custom_object", "get_cluster_custom_object", "create_namespaced_custom_object", "delete_namespaced_custom_object",
                       "patch_namespaced_custom_object", "list_namespaced_custom_object", "list_cluster_custom_object"):  # fmt: skip
            getattr(custom, method).side_effect = getattr(self, method)
        core = mock.create_autospec(k8s.CoreV1Api, instance=True)
        for method in ("list_namespaced_pod", "read_namespaced_pod_log", "read_namespaced_pod"):
            getattr(core, method).side_effect = getattr(self, method)
        # kubernetes.watch reads the docstring to tell a log stream (follow) from a watch
        core.read_namespaced_pod_log.__doc__ = k8s.CoreV1Api.read_namespaced_pod_log.__doc__
        return custom, core

    def trainer_client(self) -> Any:
        """A real ``TrainerClient`` with a real ``KubernetesBackend`` whose API clients are this cluster."""
        from kubeflow.trainer import TrainerClient
        from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

        backend = KubernetesBackend.__new__(KubernetesBackend)  # __init__ would load a kubeconfig
        backend.custom_api, backend.core_api = self.apis()
        backend.namespace = self.namespace
        trainer_client = TrainerClient.__new__(TrainerClient)
        trainer_client.backend = backend
        return trainer_client


__all__ = ["FakeCluster", "Request"]
