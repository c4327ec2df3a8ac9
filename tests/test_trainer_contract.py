"""``--workers`` meta-training against the Kubeflow Trainer releases we support (infra/README.md,
"Supported versions"): the runtimes and the TrainJobs validate against each release's CRD schema,
the TrainJob's lifecycle across retries and failed runs, and the rights the steps need, derived
from the kubeflow SDK's own calls and checked against the rendered roles.

No cluster: the real ``kubeflow.trainer.TrainerClient`` and ``KubernetesBackend`` run against
``tests.kube_api.FakeCluster``, an in-memory API behind autospecs of the kubernetes client's
classes; the CRDs and platform roles are the release files (tests/upstream/trainer-<release>/).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.kube_api import FakeCluster, Request
from tests.upstream import OLDEST_KFP_BACKEND, TRAINER_RELEASES, kfp_pipeline_runner_rbac, kubeflow_roles, trainer_crd, trainer_roles
from tests.upstream.openapi import validate_against_crd
from tests.upstream.rbac import Authorizer, service_account

REPO = Path(__file__).resolve().parents[1]
PROFILE = "kubeflow-user-example-com"
RUN_ID = "3f6b0c1e-8d2a-4d47-9a51-2f0e5d6c7b8a"


def _build(directory: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are built with the real tool only")
    done = subprocess.run([kubectl, "kustomize", str(REPO / "infra" / directory)], capture_output=True, text=True, timeout=120, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: _build(name) for name in ("base", "overlays/local")}


@pytest.fixture(scope="module")
def runtimes(rendered: dict[str, list[dict]]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in rendered["base"] if o["kind"] == "ClusterTrainingRuntime"}


def _request(gpu: bool, run_id: str = RUN_ID) -> object:
    from components import trainjob_client as trainjob

    procs = 3 if gpu else 2
    return trainjob.TrainJobRequest(image="ghcr.io/metaopt/metaopt:0.1.0-abc" + ("-cuda" if gpu else ""), num_nodes=2, procs_per_node=procs,
                                    resources_per_node=trainjob.resources_per_node(procs, gpu), runtime=trainjob.runtime_for(gpu),
                                    command=trainjob.trainjob_command("itl", procs, config_uri="s3://b/c", data_uri="s3://b/d", checkpoint_uri="s3://b/k",
                                                                      initial_uri="s3://b/i", export_uri="s3://b/e"),
                                    name=trainjob.trainjob_name(run_id), labels=trainjob.trainjob_labels(run_id))  # fmt: skip


def _cluster(runtimes: dict[str, dict], monkeypatch: pytest.MonkeyPatch, **kwargs) -> FakeCluster:
    monkeypatch.setenv("KFP_POD_NAME", "itl-pipeline-abc-meta-train-1234")
    owner = {"name": "itl-pipeline-abc", "uid": "0c6d7e7c-workflow"}
    return FakeCluster(PROFILE, runtimes=list(runtimes.values()), step_pod={"name": "itl-pipeline-abc-meta-train-1234", "owner": owner}, **kwargs)


def _run(cluster: FakeCluster, request: object, outcome: str = "Complete") -> tuple[object, list[str]]:
    from components import trainjob_client as trainjob

    lines: list[str] = []
    cluster.logs[request.name] = ["[metaopt] itl: outer step 1/2", "[metaopt] itl: outer step 2/2"]
    cluster.finish_with[request.name] = outcome
    try:
        return trainjob.run_trainjob(cluster.trainer_client(), request, echo=lines.append, poll_s=1, timeout_s=30), lines
    except trainjob.TrainJobFailed as exc:
        return exc, lines


# ----------------------------------------------------------------------------- CRD schemas


@pytest.mark.parametrize("release", TRAINER_RELEASES)
def test_runtimes_validate_against_the_crd_of_each_release(runtimes: dict[str, dict], release: str) -> None:
    assert set(runtimes) == {"metaopt-torch", "metaopt-torch-gpu"}
    crd = trainer_crd(release, "clustertrainingruntimes")
    for name, runtime in runtimes.items():
        assert validate_against_crd(crd, runtime) == [], f"{name} under Trainer {release}"


@pytest.mark.parametrize("release", TRAINER_RELEASES)
def test_the_sdks_trainjobs_validate_against_the_crd_of_each_release(runtimes: dict[str, dict], monkeypatch: pytest.MonkeyPatch, release: str) -> None:
    """The TrainJob as the kubeflow SDK sends it (its own train(), our options), CPU and GPU."""
    crd = trainer_crd(release, "trainjobs")
    for gpu in (False, True):
        cluster = _cluster(runtimes, monkeypatch)
        job, _ = _run(cluster, _request(gpu))
        assert job.status == "Complete"
        [body] = cluster.created
        assert validate_against_crd(crd, body) == [], f"TrainJob (gpu={gpu}) under Trainer {release}"
        assert body["spec"]["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "metaopt-torch-gpu" if gpu else "metaopt-torch"}


def test_the_validator_rejects_what_the_api_server_rejects(runtimes: dict[str, dict]) -> None:
    """The runtime before this fix (torch.numProcPerNode: auto) was valid for v2.1 only; fields of
    another release's TrainJob API are unknown; the name rules of the CRD's CEL validations hold."""
    old = copy.deepcopy(runtimes["metaopt-torch"])
    old["spec"]["mlPolicy"]["torch"] = {"numProcPerNode": "auto"}
    assert validate_against_crd(trainer_crd("v2.1.0", "clustertrainingruntimes"), old) == []
    for release in ("v2.2.1", "v2.3.0"):
        [error] = validate_against_crd(trainer_crd(release, "clustertrainingruntimes"), old)
        assert "spec.mlPolicy.torch.numProcPerNode: unknown field" in error
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "metaopt-x"},
           "spec": {"runtimeRef": {"name": "metaopt-torch"}, "runtimePatches": []}}  # fmt: skip
    assert any("spec.runtimePatches: unknown field" in e for e in validate_against_crd(trainer_crd("v2.1.0", "trainjobs"), job))
    assert validate_against_crd(trainer_crd("v2.3.0", "trainjobs"), job) == []
    job["metadata"]["name"] = "9-starts-with-a-digit"
    assert any("RFC 1035" in e for e in validate_against_crd(trainer_crd("v2.3.0", "trainjobs"), job))
    deep = copy.deepcopy(runtimes["metaopt-torch"])
    deep["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert any("containers[0].gpus: unknown field" in e for e in validate_against_crd(trainer_crd("v2.3.0", "clustertrainingruntimes"), deep))


def test_runtime_pods_get_the_gpu_steps_scheduling_and_no_istio_sidecar(runtimes: dict[str, dict]) -> None:
    from pipelines.builder import GPU_NODE_LABEL, GPU_RESOURCE

    toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    patch = yaml.safe_load((REPO / "infra" / "overlays" / "gpu" / "gpu-scheduling.yaml").read_text())["spec"]["template"]["spec"]
    for name, runtime in runtimes.items():
        pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false" and pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        if name.endswith("-gpu"):
            assert pod["spec"]["nodeSelector"] == {GPU_NODE_LABEL[0]: GPU_NODE_LABEL[1]} == patch["nodeSelector"]
            assert pod["spec"]["tolerations"] == [toleration] == patch["tolerations"]
        else:
            assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]
        without_scheduling = copy.deepcopy(runtime)
        for key in ("nodeSelector", "tolerations"):
            without_scheduling["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"].pop(key, None)
        without_scheduling["metadata"]["name"] = "metaopt-torch"
        assert without_scheduling == runtimes["metaopt-torch"], "the GPU runtime differs from the CPU one in scheduling only"


# ----------------------------------------------------------------------------- lifecycle


def test_the_trainjob_name_is_the_runs_and_tasks() -> None:
    import re

    from components import trainjob_client as trainjob

    name = trainjob.trainjob_name(RUN_ID)
    assert name == trainjob.trainjob_name(RUN_ID, trainjob.TASK)  # every attempt of the step
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 45  # RFC 1035, room for the JobSet's pod names
    assert len({name, trainjob.trainjob_name("another-run"), trainjob.trainjob_name(RUN_ID, "other-task")}) == 3
    assert trainjob.trainjob_labels(RUN_ID)["metaopt.io/kfp-run-id"] == RUN_ID
    with pytest.raises(ValueError, match="kfp_run_id"):
        trainjob.trainjob_name("")


def test_a_retry_adopts_the_running_job_instead_of_starting_a_second(runtimes: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from components import trainjob_client as trainjob

    cluster = _cluster(runtimes, monkeypatch)
    client = cluster.trainer_client()
    request = _request(gpu=True)
    trainjob.ensure_trainjob(client, request, echo=lambda line: None)  # the first attempt's pod dies here
    job, lines = _run(cluster, request)  # the retried step
    assert job.status == "Complete" and len(cluster.created) == 1 and list(cluster.trainjobs()) == [request.name]
    assert any("adopting the job of an earlier attempt (Running)" in line for line in lines)
    assert "[metaopt] itl: outer step 2/2" in lines
    # owned by the run's workflow: deleting the run deletes the job
    [owner] = cluster.trainjobs()[request.name]["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Workflow", "itl-pipeline-abc", "0c6d7e7c-workflow") and "blockOwnerDeletion" not in owner


def test_a_retry_replaces_a_failed_job_after_its_pods_are_gone(runtimes: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from components import trainjob_client as trainjob

    cluster = _cluster(runtimes, monkeypatch, deletion_reads=3)
    request = _request(gpu=False)
    failed, _ = _run(cluster, request, outcome="Failed")
    assert isinstance(failed, trainjob.TrainJobFailed) and "Failed" in str(failed)
    monkeypatch.setattr(trainjob.time, "sleep", lambda s: None)
    job, lines = _run(cluster, request)
    assert job.status == "Complete" and len(cluster.created) == 2
    assert any("earlier attempt failed; replacing it" in line for line in lines)
    calls = [(r.verb, r.resource) for r in cluster.requests if r.resource == "trainjobs"]
    delete, second_create = calls.index(("delete", "trainjobs")), len(calls) - 1 - calls[::-1].index(("create", "trainjobs"))
    gets_between = calls[delete:second_create].count(("get", "trainjobs"))
    assert delete < second_create and gets_between >= 4, "created again only once the foreground deletion finished"
    [deleted] = [r for r in cluster.requests if r.verb == "delete"]
    assert deleted.name == request.name


def test_a_completed_job_is_adopted_and_a_lost_race_adopts_too(runtimes: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from components import trainjob_client as trainjob

    cluster = _cluster(runtimes, monkeypatch)
    request = _request(gpu=False)
    _run(cluster, request)
    job, lines = _run(cluster, request)  # the step died after the job completed, before collecting
    assert job.status == "Complete" and len(cluster.created) == 1 and any("(Complete)" in line for line in lines)
    # two attempts at once: this one looked before the other created the job; its create answers 409, and it adopts
    racing = _cluster(runtimes, monkeypatch)
    client = racing.trainer_client()
    trainjob.submit(client, request)  # the other attempt
    real_find, looks = trainjob.find_trainjob, []
    monkeypatch.setattr(trainjob, "find_trainjob", lambda c, n: None if not looks and not looks.append(n) else real_find(c, n))
    lines = []
    assert trainjob.ensure_trainjob(client, request, echo=lines.append) == request.name
    assert len(racing.created) == 2 and list(racing.trainjobs()) == [request.name] and any("adopting" in line for line in lines)


def test_the_exit_step_deletes_the_runs_job_unless_it_completed(runtimes: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from components import trainjob_client as trainjob

    monkeypatch.setattr(trainjob.time, "sleep", lambda s: None)
    for outcome, kept in (("Complete", True), ("Failed", False), (None, False)):  # None: still running (the run was cancelled)
        cluster = _cluster(runtimes, monkeypatch)
        client = cluster.trainer_client()
        request = _request(gpu=True)
        trainjob.ensure_trainjob(client, request, echo=lambda line: None)
        if outcome:
            cluster.set_status(request.name, outcome)
        line = trainjob.cleanup_run(client, RUN_ID, echo=lambda line: None)
        assert (request.name in cluster.trainjobs()) is kept, (outcome, line)
    assert "none for this run" in trainjob.cleanup_run(_cluster(runtimes, monkeypatch).trainer_client(), RUN_ID, echo=lambda line: None)


# ----------------------------------------------------------------------------- RBAC


@pytest.fixture(scope="module")
def sdk_requests(runtimes: dict[str, dict]) -> set[Request]:
    """Every API request the steps make through the SDK: submit, adopt, follow (status, logs),
    replace a failed job, and the exit step's cleanup."""
    from components import trainjob_client as trainjob

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(trainjob.time, "sleep", lambda s: None)
        cluster = _cluster(runtimes, monkeypatch)
        request = _request(gpu=True)
        _run(cluster, request, outcome="Failed")
        _run(cluster, request)  # replaces the failed one
        _run(cluster, request)  # adopts the completed one
        cluster.set_status(request.name, "Failed")
        trainjob.cleanup_run(cluster.trainer_client(), RUN_ID, echo=lambda line: None)
    return {Request(r.verb, r.group, r.resource, r.namespace) for r in cluster.requests}


def _profile_binding(namespace: str) -> dict:
    """The RoleBinding the Kubeflow profile controller makes in every profile namespace
    (kubeflow/dashboard components/profile-controller/controllers/profile_controller.go,
    updateServiceAccount: ServiceAccount default-editor, ClusterRole kubeflow-edit)."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "default-editor", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
            "subjects": [{"kind": "ServiceAccount", "name": "default-editor", "namespace": namespace}]}  # fmt: skip


@pytest.mark.parametrize("release", TRAINER_RELEASES)
def test_every_sdk_call_is_allowed_for_multi_user_kfps_service_account(rendered: dict[str, list[dict]], sdk_requests: set[Request], release: str) -> None:
    requests = sdk_requests
    verbs = {(r.verb, r.resource) for r in requests}
    assert {("create", "trainjobs"), ("get", "trainjobs"), ("patch", "trainjobs"), ("delete", "trainjobs"), ("get", "clustertrainingruntimes"),
            ("get", "trainingruntimes"), ("list", "pods"), ("get", "pods/log"), ("get", "pods")} <= verbs  # fmt: skip
    subject = service_account(PROFILE, "default-editor")
    upstream = kubeflow_roles() + trainer_roles(release) + [_profile_binding(PROFILE)]
    authorizer = Authorizer(upstream + rendered["base"])
    denied = [r for r in requests if not authorizer.allowed(subject, r.verb, r.group, r.resource, r.namespace)]
    assert not denied, f"Trainer {release}: default-editor may not {denied}"
    # ours is what v2.1.0 lacks: without runtime-reader.yaml the runtime read is denied there
    upstream_only = Authorizer(upstream)
    runtime_read = Request("get", "trainer.kubeflow.org", "clustertrainingruntimes", None)
    assert upstream_only.allowed(subject, *vars(runtime_read).values()) is (release != "v2.1.0")
    # no right outside the profile namespace, except reading runtimes
    ours = Authorizer(upstream + rendered["base"])
    for scope, rule, binding in ours.grants(subject):
        if scope is None and binding in rendered["base"]:
            assert rule["resources"] == ["clustertrainingruntimes"] and set(rule["verbs"]) <= {"get", "list", "watch"}, binding["metadata"]["name"]
        if scope is not None:
            assert scope == PROFILE


def test_nothing_cluster_wide_is_granted_beyond_reading_runtimes(rendered: dict[str, list[dict]]) -> None:
    for build_name, objects in rendered.items():
        for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
            role = next(o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == binding["roleRef"]["name"])
            assert role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"], "verbs": ["get", "list", "watch"]}]
            assert [s["name"] for s in binding["subjects"]] == ["system:serviceaccounts"], build_name
        assert not [o for o in objects if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] != "metaopt-trainer-runtime-reader"], build_name


@pytest.mark.parametrize("release", TRAINER_RELEASES)
def test_standalone_kfps_pipeline_runner_gets_the_same_rights(rendered: dict[str, list[dict]], sdk_requests: set[Request], release: str) -> None:
    requests = {Request(r.verb, r.group, r.resource, "kubeflow" if r.namespace else None) for r in sdk_requests}
    authorizer = Authorizer(trainer_roles(release) + kfp_pipeline_runner_rbac(OLDEST_KFP_BACKEND) + rendered["overlays/local"])
    subject = service_account("kubeflow", "pipeline-runner")
    denied = [r for r in requests if not authorizer.allowed(subject, r.verb, r.group, r.resource, r.namespace)]
    assert not denied, f"Trainer {release}: pipeline-runner may not {denied}"
    assert not authorizer.allowed(subject, "create", "trainer.kubeflow.org", "trainjobs", "someone-elses-namespace")
