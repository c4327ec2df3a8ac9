"""Static checks of infra/ (kustomize), the Dockerfile and .dockerignore.

Every kustomization is built with the real tool (``kubectl kustomize``, else ``kustomize build``;
the tests that need a build skip, saying so, where neither is installed). The built objects are
then checked for the mistakes that only show up at deploy time: dangling Secret/ConfigMap
references, selectors that select nothing, unknown ports, images outside the documented list,
secrets in the tree, flags MLflow does not know, endpoints that do not point at a Service that
exists, and NetworkPolicies that leave a service open or shut out a client it needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
README = INFRA / "README.md"

KUSTOMIZE = shutil.which("kubectl") or shutil.which("kustomize")
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
SERVICE_BUILDS = ["base", "overlays/local", "overlays/gpu"]  # what kubectl apply -k gets: namespace metaopt and the rest
TOP_LEVEL_BUILDS = [*SERVICE_BUILDS, "base/pipeline-namespace"]
PROFILE_BUILDS = [("base/pipeline-namespace", None), ("overlays/local", "kubeflow")]  # None: infra/add-profile.sh picks the namespace
SECRETS = {  # what the user and infra/add-profile.sh create (infra/README.md, "2. Secrets") and their keys
    "metaopt-postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    "metaopt-minio-root": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
    "metaopt-mlflow-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "metaopt-mlflow-admin": {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"},
    "metaopt-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "metaopt-mlflow-auth": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    "metaopt-profile-setup": {"PROFILE_NAMESPACE", "PROFILE_S3_ACCESS_KEY", "PROFILE_S3_SECRET_KEY", "PROFILE_MLFLOW_USERNAME", "PROFILE_MLFLOW_PASSWORD"},
}


# ------------------------------------------------------------------------------------------
# kustomize: the real tool (kubectl kustomize), and the files a kustomization names
# ------------------------------------------------------------------------------------------


@dataclass
class Build:
    objects: list[dict]
    files: set[Path]  # every file the kustomization names (resources and patches), recursively


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    raise AssertionError(f"{directory} has no kustomization.yaml")


def referenced_files(directory: Path) -> set[Path]:
    """The kustomization file, its resources (directories recursively) and its patch files."""
    kfile = _kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    files = {kfile}
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{kfile}: resource {entry!r} does not exist"
        files |= referenced_files(path) if path.is_dir() else {path}
    for patch in spec.get("patches", []):
        if "path" in patch:
            files.add((directory / patch["path"]).resolve())
    return files


def build(directory: Path) -> Build:
    """``kubectl kustomize DIR`` (or ``kustomize build DIR``): the objects as the cluster gets them."""
    if KUSTOMIZE is None:
        pytest.skip("neither kubectl nor kustomize is installed: the manifests are built with the real tool only")
    command = [KUSTOMIZE, "kustomize", str(directory)] if Path(KUSTOMIZE).name == "kubectl" else [KUSTOMIZE, "build", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    return Build([doc for doc in yaml.safe_load_all(done.stdout) if doc is not None], referenced_files(directory))


# ------------------------------------------------------------------------------------------
# What infra/README.md documents
# ------------------------------------------------------------------------------------------


def _readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"infra/README.md has no '## {title}' section"
    return match.group(1)


def documented_images() -> set[str]:
    return set(re.findall(r"^- `([^`]+)`", _readme_section("Images"), flags=re.M))


def documented_secrets() -> dict[str, set[str]]:
    """Secret name -> documented keys, from the bullets of the README's Secrets section."""
    secrets: dict[str, set[str]] = {}
    for line in _readme_section("2. Secrets").splitlines():
        match = re.match(r"^- `([a-z0-9-]+)`(.*)$", line)
        if match:
            secrets[match.group(1)] = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", match.group(2)))
    return secrets


def documented_external_config_maps() -> set[str]:
    # ConfigMaps a user must create are listed like secrets; none are needed today.
    return set()


# ------------------------------------------------------------------------------------------
# Helpers over built objects
# ------------------------------------------------------------------------------------------


def pod_specs(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod spec) for every object that runs pods."""
    found = []
    for obj in objects:
        if obj["kind"] in POD_TEMPLATE_KINDS:
            found.append((obj, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            found.append((obj, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            found.append((obj, obj["spec"]))
    return found


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def name_of(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']}/{meta.get('namespace', '?')}/{meta['name']}"


def find(objects: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(hits) == 1, f"expected one {kind} {name} in namespace {namespace}, found {len(hits)}"
    return hits[0]


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def builds() -> dict[str, Build]:
    return {name: build(INFRA / name) for name in TOP_LEVEL_BUILDS}


def all_kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in INFRA.rglob("kustomization.yaml"))


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(list(INFRA.rglob("*.yaml")) + list(INFRA.rglob("*.yml")))
    assert len(files) >= 15
    for path in files:
        documents = _load_docs(path)
        assert documents, f"{path} is empty"
        for document in documents:
            assert isinstance(document, dict), f"{path}: top level must be a mapping"


def test_every_kustomization_builds_and_its_files_exist() -> None:
    directories = all_kustomization_dirs()
    assert {str(d.relative_to(INFRA)) for d in directories} >= set(TOP_LEVEL_BUILDS)
    for directory in directories:
        result = build(directory)
        assert result.objects, f"{directory} builds to nothing"
        identities = [name_of(o) for o in result.objects]
        duplicates = {i for i in identities if identities.count(i) > 1}
        assert not duplicates, f"{directory}: duplicate objects {duplicates}"


def test_no_orphan_manifests(builds: dict[str, Build]) -> None:
    used = set().union(*(b.files for b in builds.values()))
    for path in sorted(INFRA.rglob("*.yaml")):
        if path.name.endswith(".example.yaml"):
            continue
        assert path.resolve() in used, f"{path.relative_to(REPO)} is not used by any kustomization"


def test_example_files_are_not_applied(builds: dict[str, Build]) -> None:
    used = set().union(*(b.files for b in builds.values()))
    for path in INFRA.rglob("*.example.yaml"):
        assert path.resolve() not in used, f"{path} must never be part of a kustomization"


# ------------------------------------------------------------------------------------------
# Secrets, ConfigMaps, images
# ------------------------------------------------------------------------------------------


def test_no_secret_with_data_is_in_any_build(builds: dict[str, Build]) -> None:
    for name, result in builds.items():
        for obj in result.objects:
            if obj["kind"] == "Secret":
                assert not obj.get("data") and not obj.get("stringData"), f"{name}: {name_of(obj)} carries literal credentials"


def test_secret_example_holds_placeholders_only() -> None:
    for document in _load_docs(INFRA / "secret.example.yaml"):
        for key, value in (document.get("stringData") or {}).items():
            assert str(value).startswith("<") or key == "POSTGRES_DB", f"{key} has a real-looking value"
        assert not document.get("data")


def _references(pod_spec: dict) -> list[tuple[str, str, str | None]]:
    """(kind, name, key or None) for every Secret/ConfigMap a pod spec uses."""
    refs: list[tuple[str, str, str | None]] = []
    for container in containers(pod_spec):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                refs.append(("Secret", source["secretRef"]["name"], None))
            if "configMapRef" in source:
                refs.append(("ConfigMap", source["configMapRef"]["name"], None))
        for env in container.get("env", []):
            value_from = env.get("valueFrom", {})
            if "secretKeyRef" in value_from:
                refs.append(("Secret", value_from["secretKeyRef"]["name"], value_from["secretKeyRef"]["key"]))
            if "configMapKeyRef" in value_from:
                ref = value_from["configMapKeyRef"]
                refs.append(("ConfigMap", ref["name"], ref["key"]))
    for volume in pod_spec.get("volumes", []):
        sources = [volume] + volume.get("projected", {}).get("sources", [])
        for source in sources:
            if "secret" in source:
                refs.append(("Secret", source["secret"].get("secretName") or source["secret"]["name"], None))
            if "configMap" in source:
                refs.append(("ConfigMap", source["configMap"]["name"], None))
    return refs


def test_every_referenced_secret_and_config_map_exists_or_is_documented(builds: dict[str, Build]) -> None:
    secrets = documented_secrets()
    assert set(secrets) == set(SECRETS)
    for name, keys in SECRETS.items():
        assert secrets[name] == keys, f"infra/README.md documents {sorted(secrets[name])} for {name}"
    external_config_maps = documented_external_config_maps()
    checked = 0
    for build_name, result in builds.items():
        defined = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in result.objects if o["kind"] in ("Secret", "ConfigMap")}
        for workload, pod_spec in pod_specs(result.objects):
            namespace = workload["metadata"].get("namespace")
            for kind, ref_name, key in _references(pod_spec):
                checked += 1
                where = f"{build_name}: {name_of(workload)} uses {kind} {ref_name}"
                local = defined.get((kind, namespace, ref_name))
                if local is not None:
                    if key is not None:
                        assert key in (local.get("data") or {}), f"{where}: no key {key}"
                    continue
                if kind == "Secret":
                    assert ref_name in secrets, f"{where}: neither defined nor documented in infra/README.md"
                    assert key is None or key in secrets[ref_name], f"{where}: key {key} is not documented"
                else:
                    assert ref_name in external_config_maps, f"{where}: not defined in namespace {namespace}"
    assert checked >= 10


def test_images_are_documented_and_pinned(builds: dict[str, Build]) -> None:
    allowed = documented_images()
    assert "ghcr.io/metaopt/metaopt:0.1.0-cuda" in allowed
    used = set()
    for result in builds.values():
        for _, pod_spec in pod_specs(result.objects):
            for container in containers(pod_spec):
                image = container["image"]
                used.add(image)
                assert image in allowed, f"image {image} is not listed in infra/README.md '## Images'"
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                assert tag and tag != "latest", f"image {image} must be pinned to a version"
    assert used >= {"ghcr.io/mlflow/mlflow:v3.17.0-full", "postgres:16.6"}


# ------------------------------------------------------------------------------------------
# Workload wiring
# ------------------------------------------------------------------------------------------


def test_selectors_services_and_ports_line_up(builds: dict[str, Build]) -> None:
    for build_name, result in builds.items():
        workloads = [(w, s) for w, s in pod_specs(result.objects) if w["kind"] in ("Deployment", "StatefulSet")]
        for workload, _ in workloads:
            template_labels = workload["spec"]["template"]["metadata"]["labels"]
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template_labels.items(), f"{name_of(workload)}: selector misses its pods"
            if workload["kind"] == "StatefulSet":
                find(result.objects, "Service", workload["spec"]["serviceName"], workload["metadata"]["namespace"])
        for service in (o for o in result.objects if o["kind"] == "Service"):
            namespace = service["metadata"]["namespace"]
            selected = [
                s
                for w, s in workloads
                if w["metadata"]["namespace"] == namespace and service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert selected, f"{build_name}: {name_of(service)} selects no pods"
            ports = [p for s in selected for c in containers(s) for p in c.get("ports", [])]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                if isinstance(target, str):
                    assert target in {p.get("name") for p in ports}, f"{name_of(service)}: no port named {target}"
                else:
                    assert target in {p["containerPort"] for p in ports}, f"{name_of(service)}: no port {target}"


def test_pods_meet_the_restricted_pod_security_standard(builds: dict[str, Build]) -> None:
    namespace = find(builds["base"].objects, "Namespace", "metaopt")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for result in builds.values():
        for workload, pod_spec in pod_specs(result.objects):
            pod_context = pod_spec.get("securityContext", {})
            assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name_of(workload)
            for container in containers(pod_spec):
                context = container.get("securityContext", {})
                assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, name_of(workload)
                assert context.get("allowPrivilegeEscalation") is False, name_of(workload)
                assert context.get("capabilities", {}).get("drop") == ["ALL"], name_of(workload)
                resources = container.get("resources", {})
                assert {"cpu", "memory"} <= set(resources.get("requests", {})), name_of(workload)
                # both limits: a namespace ResourceQuota on limits.cpu / limits.memory admits no pod without them
                assert {"cpu", "memory"} <= set(resources.get("limits", {})), name_of(workload)


def test_env_var_expansions_refer_to_earlier_variables(builds: dict[str, Build]) -> None:
    # Kubernetes expands $(NAME) only from variables defined before, in the same container;
    # anything else is passed through literally (e.g. a password slot left as "$(PASSWORD)").
    expansions = 0
    for result in builds.values():
        for workload, pod_spec in pod_specs(result.objects):
            for container in containers(pod_spec):
                earlier: set[str] = set()
                for env in container.get("env", []):
                    for reference in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
                        expansions += 1
                        assert reference in earlier, f"{name_of(workload)}: {env['name']} uses $({reference}) before it is defined"
                    earlier.add(env["name"])
    assert expansions >= 3


# ------------------------------------------------------------------------------------------
# MLflow, MinIO, KFP launcher and metaopt-runtime agree with each other
# ------------------------------------------------------------------------------------------


def _service_port(objects: list[dict], url_or_hostport: str, client_namespace: str | None = None) -> tuple[str, str, int]:
    """Resolve an in-cluster URL or host:port, as seen from a pod in ``client_namespace``, to
    (service, namespace, port), checking that the Service exists and serves that port."""
    parts = urllib.parse.urlsplit(url_or_hostport if "://" in url_or_hostport else f"//{url_or_hostport}")
    labels = parts.hostname.split(".")
    if len(labels) == 1:  # a short name resolves in the client's own namespace
        assert client_namespace, f"{url_or_hostport}: a short name only works inside one namespace"
        labels.append(client_namespace)
    assert labels[2:] in ([], ["svc"], ["svc", "cluster", "local"]), parts.hostname
    service, namespace = labels[0], labels[1]
    svc = find(objects, "Service", service, namespace)
    assert parts.port in {p["port"] for p in svc["spec"]["ports"]}, f"{url_or_hostport}: port not served"
    return service, namespace, parts.port


def _bucket_job_buckets(objects: list[dict]) -> set[str]:
    job = find(objects, "Job", "minio-buckets", "metaopt")
    return set(container_env(job["spec"]["template"]["spec"]["containers"][0])["BUCKETS"].split(","))


def test_kfp_launcher_config_is_valid_and_points_at_minio(builds: dict[str, Build]) -> None:
    for build_name, pipeline_namespace in PROFILE_BUILDS:
        objects = builds[build_name].objects
        launcher = find(objects, "ConfigMap", "kfp-launcher", pipeline_namespace)
        root = urllib.parse.urlsplit(launcher["data"]["defaultPipelineRoot"])
        assert root.scheme == "s3" and root.netloc in _bucket_job_buckets(builds["base"].objects)
        providers = yaml.safe_load(launcher["data"]["providers"])
        assert set(providers) <= {"s3", "minio", "gs"}
        default = providers["s3"]["default"]
        assert "://" not in default["endpoint"], "KFP wants host:port, without a scheme"
        assert _service_port(builds["base"].objects, default["endpoint"]) == ("minio", "metaopt", 9000)
        assert default["disableSSL"] is True and default["forcePathStyle"] is True
        credentials = default["credentials"]
        assert credentials["fromEnv"] is False
        secret = credentials["secretRef"]
        assert {secret["accessKeyKey"], secret["secretKeyKey"]} <= documented_secrets()[secret["secretName"]]


def test_metaopt_runtime_config_works_for_storage_and_mlflow(builds: dict[str, Build]) -> None:
    from metaopt_core.mlops.storage import S3Settings

    base_objects = builds["base"].objects
    for build_name, pipeline_namespace in PROFILE_BUILDS:
        data = find(builds[build_name].objects, "ConfigMap", "metaopt-runtime", pipeline_namespace)["data"]
        settings = S3Settings.from_env(data)  # the way a pipeline pod's storage will read it
        assert _service_port(base_objects, settings.endpoint_url) == ("minio", "metaopt", 9000)
        assert data["MLFLOW_S3_ENDPOINT_URL"] == settings.endpoint_url
        assert _service_port(base_objects, data["MLFLOW_TRACKING_URI"]) == ("mlflow", "metaopt", 5000)


def test_metaopt_runtime_holds_every_key_a_pipeline_step_reads(builds: dict[str, Build]) -> None:
    # use_config_map_as_env maps each key without `optional`: a key missing from the ConfigMap
    # keeps every step's pod from starting
    from pipelines.builder import RUNTIME_KEYS

    for build_name, pipeline_namespace in PROFILE_BUILDS:
        data = find(builds[build_name].objects, "ConfigMap", "metaopt-runtime", pipeline_namespace)["data"]
        assert set(RUNTIME_KEYS) <= set(data), (build_name, sorted(set(RUNTIME_KEYS) - set(data)))


def _mlflow_container(objects: list[dict]) -> dict:
    deployment = find(objects, "Deployment", "mlflow", "metaopt")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_server_flags_exist_in_the_installed_mlflow(builds: dict[str, Build]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.cli import server as server_command

    options = {opt: param for param in server_command.params for opt in param.opts}
    for build_name in SERVICE_BUILDS:
        container = _mlflow_container(builds[build_name].objects)
        assert container["command"] == ["mlflow", "server"]
        for argument in container["args"]:
            flag = argument.split("=", 1)[0]
            assert flag in options, f"{build_name}: mlflow server has no option {flag}"
        env = container_env(container)
        backend_env = options["--backend-store-uri"].envvar
        assert backend_env in env and env[backend_env].startswith("postgresql+psycopg2://")
        args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
        bucket = urllib.parse.urlsplit(args["--artifacts-destination"]).netloc
        assert bucket in _bucket_job_buckets(builds["base"].objects)
        endpoint = _service_port(builds["base"].objects, env["MLFLOW_S3_ENDPOINT_URL"], "metaopt")
        assert endpoint == ("minio", "metaopt", 9000)
        backend = urllib.parse.urlsplit(env[backend_env].replace("$(", "").replace(")", ""))
        assert _service_port(builds["base"].objects, f"{backend.hostname}:{backend.port}", "metaopt")[:2] == (
            "postgres",
            "metaopt",
        )


def _mlflow_args(objects: list[dict]) -> dict[str, str]:
    """The MLflow server's --flag=value arguments with $(VAR) expanded as Kubernetes does it, from
    the container's env (literal values and the ConfigMap keys they reference)."""
    container = _mlflow_container(objects)
    values = {}
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            values[env["name"]] = find(objects, "ConfigMap", ref["name"], "metaopt")["data"][ref["key"]]
        elif "value" in env:
            values[env["name"]] = env["value"]
    expand = lambda text: re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m.group(1), m.group(0)), text)
    return dict(expand(a).split("=", 1) for a in container["args"] if "=" in a)


def test_mlflow_accepts_the_host_names_clients_use(builds: dict[str, Build]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.server.security_utils import is_allowed_host_header, should_block_cors_request

    args = _mlflow_args(builds["base"].objects)
    allowed = [h.strip() for h in args["--allowed-hosts"].split(",")]
    runtime = find(builds["base/pipeline-namespace"].objects, "ConfigMap", "metaopt-runtime")
    tracking_host = urllib.parse.urlsplit(runtime["data"]["MLFLOW_TRACKING_URI"]).netloc
    for host in [tracking_host, "mlflow:5000", "mlflow.metaopt:5000", "localhost:5000", "localhost"]:
        assert is_allowed_host_header(allowed, host), f"MLflow would reject Host: {host}"
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    assert "$(" not in args["--allowed-hosts"], "every $(VAR) in the arguments must come from the container's env"


def test_mlflow_ui_through_the_kubeflow_gateway(builds: dict[str, Build], tmp_path: Path) -> None:
    """The route, MLflow's host and origin checks and the run links agree, for a gateway host set
    the way infra/README.md says (the ConfigMap mlflow-gateway)."""
    pytest.importorskip("mlflow")
    from mlflow.server.security_utils import is_allowed_host_header, should_block_cors_request

    from metaopt_core.mlops.tracking import mlflow_run_url

    site = tmp_path / "site"  # an overlay setting the gateway host, as an operator writes it
    site.mkdir()
    (site / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [os.path.relpath(INFRA / "base", site)], "patches": [{"patch": yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mlflow-gateway", "namespace": "metaopt"},
         "data": {"KUBEFLOW_HOST": "kubeflow.example.com"}})}]}))  # fmt: skip
    objects = build(site).objects
    args = _mlflow_args(objects)
    allowed = [h.strip() for h in args["--allowed-hosts"].split(",")]
    assert is_allowed_host_header(allowed, "kubeflow.example.com")
    assert not should_block_cors_request("https://kubeflow.example.com", "POST", args["--cors-allowed-origins"].split(","))
    assert should_block_cors_request("https://evil.example.com", "POST", args["--cors-allowed-origins"].split(","))
    route = find(objects, "VirtualService", "mlflow", "metaopt")["spec"]
    assert route["gateways"] == ["kubeflow/kubeflow-gateway"]
    [http] = [r for r in route["http"] if "route" in r]
    prefix = http["match"][0]["uri"]["prefix"]
    destination = http["route"][0]["destination"]
    assert _service_port(objects, f"{destination['host']}:{destination['port']['number']}") == ("mlflow", "metaopt", 5000)
    assert http["rewrite"]["uri"] == "/"  # MLflow serves its UI at /
    # a run link as the pipelines write it, with MLFLOW_UI_URL as add-profile.sh --kubeflow-url sets it
    link = urllib.parse.urlsplit(mlflow_run_url(None, "1", "abc", base="https://kubeflow.example.com/mlflow"))
    assert link.netloc == "kubeflow.example.com" and link.path.startswith(prefix) and link.path[len(prefix) - 1 :] == "/"
    assert "MLFLOW_UI_URL) value=${kubeflow_url:+$kubeflow_url/mlflow}" in (INFRA / "add-profile.sh").read_text()
    redirect = next(r for r in route["http"] if "redirect" in r)
    assert redirect["match"][0]["uri"]["exact"] + "/" == prefix == redirect["redirect"]["uri"]


# ------------------------------------------------------------------------------------------
# Overlays
# ------------------------------------------------------------------------------------------


def test_local_overlay_is_small_and_targets_standalone_kfp(builds: dict[str, Build]) -> None:
    local, base = builds["overlays/local"].objects, builds["base"].objects
    assert "--workers=1" in _mlflow_container(local)["args"]
    assert "--workers=2" in _mlflow_container(base)["args"]
    postgres = find(local, "StatefulSet", "postgres", "metaopt")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    minio_pvc = find(local, "PersistentVolumeClaim", "minio-data", "metaopt")
    assert minio_pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    # The patch changed the resources but kept the container otherwise intact.
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["memory"] == "128Mi" and container["image"] == "postgres:16.6"
    pipeline_side = {o["metadata"]["name"] for o in local if o["kind"] == "ConfigMap" and o["metadata"]["namespace"] == "kubeflow"}
    assert pipeline_side == {"kfp-launcher", "metaopt-runtime"}
    assert {o["metadata"]["namespace"] for o in local if o["kind"] == "ConfigMap"} == {"kubeflow", "metaopt"}  # metaopt: minio-policies
    # --workers works locally too: the runtimes are there; no Istio (kind/minikube), so no gateway route
    assert {o["metadata"]["name"] for o in local if o["kind"] == "ClusterTrainingRuntime"} == {"metaopt-torch", "metaopt-torch-gpu"}
    assert not [o for o in local if o["kind"] == "VirtualService"]


def test_gpu_overlay_schedules_gpu_jobs_on_gpu_nodes(builds: dict[str, Build]) -> None:
    gpu_objects = builds["overlays/gpu"].objects
    gpu_jobs = [o for o in gpu_objects if o["kind"] == "Job" and o["metadata"].get("labels", {}).get("metaopt.io/gpu") == "true"]
    assert gpu_jobs
    for job in gpu_jobs:
        spec = job["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        for container in spec["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["image"].endswith("-cuda")
    # Services never ask for GPU nodes.
    for workload, spec in pod_specs(gpu_objects):
        if workload not in gpu_jobs:
            assert "nodeSelector" not in spec, name_of(workload)


def test_recurring_run_example_uses_a_six_field_cron() -> None:
    example = _load_docs(INFRA / "recurring-run.example.yaml")[0]
    fields = example["trigger"]["cron_schedule"]["cron"].split()
    assert len(fields) == 6, "KFP cron expressions start with seconds"
    assert example["mode"] == "ENABLE" and example["no_catchup"] is True


# ------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_shape() -> None:
    text = (REPO / "Dockerfile").read_text()
    header = text.split("\nARG ", 1)[0]
    assert "make image" in header and "ghcr.io/metaopt/metaopt:<version>-<commit>" in header
    instructions = _dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert "ENTRYPOINT" not in kinds, "KFP sets the command; an ENTRYPOINT would wrap it"
    assert any(kind == "ARG" and arg.startswith("BASE_IMAGE=") for kind, arg in instructions)
    users = [arg.strip() for kind, arg in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run unprivileged"
    assert any(kind == "WORKDIR" for kind in kinds)
    # Dependencies are installed before the source is copied, so code edits reuse the layers.
    copy_lines = [n for n, (kind, arg) in enumerate(instructions) if kind == "COPY" and "metaopt_core" in arg]
    install_lines = [n for n, (kind, arg) in enumerate(instructions) if kind == "RUN" and "requirements.txt" in arg]
    assert install_lines and copy_lines and max(install_lines) < min(copy_lines)
    assert not re.search(r"(?i)(AWS_SECRET_ACCESS_KEY|PASSWORD|TOKEN)\s*=", text), "no secrets in the image"
    # the commit is baked in (metaopt.git_commit on a cluster), after the dependency layers
    args = [arg for kind, arg in instructions if kind == "ARG"]
    assert 'GIT_COMMIT=""' in args
    assert any(kind == "ENV" and arg.startswith("METAOPT_GIT_COMMIT=${GIT_COMMIT}") for kind, arg in instructions)
    assert [n for n, (k, a) in enumerate(instructions) if k == "ARG" and a.startswith("GIT_COMMIT")][0] > max(install_lines)
    # every pip install of dependencies is constrained by the lock file
    for kind, arg in instructions:
        if kind == "RUN" and re.search(r"pip install .*-r /tmp/requirements", arg):
            assert "-c /app/constraints.txt" in arg, arg


def test_constraints_pin_every_image_dependency() -> None:
    import tomllib

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "+" not in version, f"constraints.txt: {line!r} is not an exact public pin"
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    deps = [d for f in ("pyproject.toml", "app/pyproject.toml") for d in tomllib.loads((REPO / f).read_text())["project"]["dependencies"]]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower())
        if not name.startswith("metaopt"):
            assert name in pins, f"constraints.txt does not pin {name} (make constraints)"


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> str:
    """.dockerignore globbing: * and ? stay within one path segment, **/ spans directories."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(relative: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        parts = relative.split("/")
        # A pattern matching a directory excludes everything beneath it.
        if any(re.fullmatch(regex, "/".join(parts[: n + 1])) for n in range(len(parts))):
            result = not negate
    return result


def test_docker_build_context_keeps_what_the_dockerfile_copies() -> None:
    patterns = _dockerignore_patterns()
    sources = []
    for kind, arg in _dockerfile_instructions():
        if kind == "COPY":
            words = [w for w in arg.split() if not w.startswith("--")]
            sources += words[:-1]
    assert {"pyproject.toml", "README.md", "metaopt_core"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
        assert not _ignored(source, patterns), f".dockerignore excludes {source}, which the Dockerfile copies"
    for must_be_ignored in [".git", ".venv", "tests", "infra", "mlruns", "metaopt_core/__pycache__", ".env"]:
        assert _ignored(must_be_ignored, patterns), f".dockerignore lets {must_be_ignored} into the image"
    assert not _ignored("metaopt_core/data/sources.py", patterns), "a top-level pattern must not hit package dirs"


# ------------------------------------------------------------------------------------------
# Least privilege: who holds which credentials, who may reach which service
# ------------------------------------------------------------------------------------------


def _secret_users(objects: list[dict]) -> dict[str, set[str]]:
    """Secret name -> the workloads (kind/namespace/name) that read it."""
    users: dict[str, set[str]] = {}
    for workload, pod_spec in pod_specs(objects):
        for kind, name, _ in _references(pod_spec):
            if kind == "Secret":
                users.setdefault(name, set()).add(name_of(workload))
    return users


def test_minio_root_credentials_only_for_minio_and_its_setup_jobs(builds: dict[str, Build]) -> None:
    for build_name in SERVICE_BUILDS:
        users = _secret_users(builds[build_name].objects)
        setup = {"Job/metaopt/minio-buckets", "CronJob/metaopt/profile-setup"}
        assert users["metaopt-minio-root"] == {"Deployment/metaopt/minio"} | setup, build_name
        assert users["metaopt-mlflow-s3"] == {"Deployment/metaopt/mlflow", "Job/metaopt/minio-buckets"}, build_name
        assert users["metaopt-mlflow-admin"] == {"Deployment/metaopt/mlflow", "CronJob/metaopt/profile-setup"}, build_name
        assert users["metaopt-profile-setup"] == {"CronJob/metaopt/profile-setup"}, build_name
        # no workload in namespace metaopt holds a profile's keys
        assert "metaopt-s3" not in users and "metaopt-mlflow-auth" not in users, build_name
    for build_name, _ in PROFILE_BUILDS:  # the KFP launcher reads the profile's user, never root
        launcher = find(builds[build_name].objects, "ConfigMap", "kfp-launcher")
        secret = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]["secretName"]
        assert secret == "metaopt-s3"


def test_minio_policies_limit_each_user_to_its_bucket(builds: dict[str, Build]) -> None:
    import json

    policies = find(builds["base"].objects, "ConfigMap", "minio-policies", "metaopt")["data"]
    for file, bucket in [("metaopt-pipelines.json", "metaopt"), ("metaopt-mlflow.json", "mlflow-artifacts")]:
        statements = json.loads(policies[file])["Statement"]
        resources = {r for st in statements for r in st["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, file
        actions = {a for st in statements for a in st["Action"]}
        assert all(st["Effect"] == "Allow" for st in statements) and not any(a in ("s3:*", "*") or a.startswith("admin:") for a in actions)
    buckets = find(builds["base"].objects, "Job", "minio-buckets", "metaopt")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    profile = find(builds["base"].objects, "CronJob", "profile-setup", "metaopt")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "minio_user metaopt-mlflow " in buckets and "minio_user metaopt-pipelines " in profile["initContainers"][0]["args"][0]
    functions = find(builds["base"].objects, "ConfigMap", "minio-setup", "metaopt")["data"]["minio-setup.sh"]
    assert "MINIO_ROOT_PASSWORD}@" in functions and "--password" not in functions  # credentials via MC_HOST_root, not arguments


def test_mlflow_runs_its_basic_auth_app_with_credentials_from_secrets(builds: dict[str, Build]) -> None:
    from pipelines.builder import MLFLOW_AUTH_KEYS, MLFLOW_AUTH_SECRET

    for build_name in SERVICE_BUILDS:
        deployment = find(builds[build_name].objects, "Deployment", "mlflow", "metaopt")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "--app-name=basic-auth" in container["args"]
        assert container_env(container)["MLFLOW_AUTH_CONFIG_PATH"].startswith("/etc/mlflow-auth/")
        assert {"secretRef": {"name": "metaopt-mlflow-admin"}} in container["envFrom"]
        [init] = deployment["spec"]["template"]["spec"]["initContainers"]
        assert "database_uri" in init["args"][0] and "default_permission = READ" in init["args"][0]
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth-config")
        assert volume["emptyDir"]["medium"] == "Memory"
    # each profile's user: made by the profile-setup Job as the admin, from the keys add-profile.sh
    # also writes into the profile's metaopt-mlflow-auth, the Secret the compiled steps read
    job = find(builds["base"].objects, "CronJob", "profile-setup", "metaopt")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mlflow_user = next(c for c in job["containers"] if c["name"] == "mlflow-user")
    assert {"secretRef": {"name": "metaopt-mlflow-admin"}} in mlflow_user["envFrom"]
    assert {e["valueFrom"]["secretKeyRef"]["key"] for e in mlflow_user["env"] if "valueFrom" in e} == {"PROFILE_MLFLOW_USERNAME", "PROFILE_MLFLOW_PASSWORD"}
    script = (INFRA / "add-profile.sh").read_text()
    assert all(f"{key}=" in script for key in MLFLOW_AUTH_KEYS) and MLFLOW_AUTH_SECRET in script
    assert SECRETS[MLFLOW_AUTH_SECRET] == set(MLFLOW_AUTH_KEYS)
    for runtime in (o for o in builds["base"].objects if o["kind"] == "ClusterTrainingRuntime"):
        node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        assert {"secretRef": {"name": MLFLOW_AUTH_SECRET}} in node["spec"]["containers"][0]["envFrom"]


def _policies(objects: list[dict], namespace: str) -> list[dict]:
    return [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == namespace]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, f"unexpected selector {selector}"
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] in ("Exists", "DoesNotExist", "In", "NotIn"), expression
        present = expression["key"] in labels
        if expression["operator"] == "Exists" and not present or expression["operator"] == "DoesNotExist" and present:
            return False
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and labels.get(expression["key"]) in expression["values"]:
            return False
    return selector.get("matchLabels", {}).items() <= labels.items()


def _admits(policies: list[dict], target_labels: dict, client_namespace_labels: dict, client_labels: dict, same_namespace: bool) -> bool:
    """Would ingress from a pod (labels, namespace labels) to a pod with ``target_labels`` be allowed?"""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target_labels)]
    assert selecting, f"no NetworkPolicy selects pods {target_labels}: open to everyone"
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                ns_ok = _selects(peer["namespaceSelector"], client_namespace_labels) if "namespaceSelector" in peer else same_namespace
                pod_ok = _selects(peer["podSelector"], client_labels) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_admit_profile_pods_notebooks_mlflow_and_the_ui_only(builds: dict[str, Build]) -> None:
    from pipelines.builder import STEP_LABEL

    objects = builds["base"].objects
    policies = _policies(objects, "metaopt")
    deny = find(objects, "NetworkPolicy", "default-deny-ingress", "metaopt")
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    profile_ns = {"metaopt.io/pipelines": "enabled", "kubernetes.io/metadata.name": "kubeflow-user-example-com"}
    other_ns = {"kubernetes.io/metadata.name": "someone-else"}
    metaopt_ns = {"kubernetes.io/metadata.name": "metaopt"}
    step = {STEP_LABEL[0]: STEP_LABEL[1]}
    notebook = {"notebook-name": "my-notebook", "statefulset": "my-notebook"}  # Kubeflow's notebook controller labels its pods so
    labels = {name: find(objects, kind, name, "metaopt")["spec"]["template"]["metadata"]["labels"]
              for kind, name in [("Deployment", "mlflow"), ("Deployment", "minio"), ("StatefulSet", "postgres")]}  # fmt: skip
    jobs = {"minio-buckets": find(objects, "Job", "minio-buckets", "metaopt")["spec"]["template"]["metadata"]["labels"],
            "profile-setup": find(objects, "CronJob", "profile-setup", "metaopt")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]}  # fmt: skip
    gateway = ({"kubernetes.io/metadata.name": "istio-system"}, {"app": "istio-ingressgateway"})
    allowed = {  # (target, client) -> expected
        ("mlflow", "pipeline step"): True, ("mlflow", "notebook"): True, ("mlflow", "gateway"): True, ("mlflow", "profile-setup"): True,
        ("mlflow", "other pod, profile namespace"): False, ("mlflow", "step label, other namespace"): False,
        ("mlflow", "notebook, other namespace"): False,
        ("minio", "pipeline step"): True, ("minio", "notebook"): True, ("minio", "mlflow"): True, ("minio", "minio-buckets"): True,
        ("minio", "profile-setup"): True, ("minio", "gateway"): False, ("minio", "step label, other namespace"): False,
        ("postgres", "mlflow"): True, ("postgres", "pipeline step"): False, ("postgres", "notebook"): False, ("postgres", "minio"): False,
        ("postgres", "gateway"): False, ("postgres", "profile-setup"): False,
    }  # fmt: skip
    clients = {
        "pipeline step": (profile_ns, step, False), "notebook": (profile_ns, notebook, False), "gateway": (*gateway, False),
        "other pod, profile namespace": (profile_ns, {"app": "x"}, False), "step label, other namespace": (other_ns, step, False),
        "notebook, other namespace": (other_ns, notebook, False), "mlflow": (metaopt_ns, labels["mlflow"], True),
        "minio": (metaopt_ns, labels["minio"], True), "minio-buckets": (metaopt_ns, jobs["minio-buckets"], True),
        "profile-setup": (metaopt_ns, jobs["profile-setup"], True),
    }  # fmt: skip
    for (target, client), expected in allowed.items():
        ns_labels, pod_labels, same = clients[client]
        assert _admits(policies, labels[target], ns_labels, pod_labels, same) is expected, f"{client} -> {target}: expected {expected}"
    # the policies name the services' ports by the names their containers declare
    ports = {p["name"] for w, spec in pod_specs(objects) for c in containers(spec) for p in c.get("ports", [])}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert {p["port"] for p in rule["ports"]} <= ports, name_of(policy)
    # TrainJob pods carry the pipeline-step label too
    for runtime in (o for o in objects if o["kind"] == "ClusterTrainingRuntime"):
        pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        assert pod["metadata"]["labels"][STEP_LABEL[0]] == STEP_LABEL[1]


def test_profiles_are_labelled_for_the_network_policies() -> None:
    script = (INFRA / "add-profile.sh").read_text()
    assert "kubectl label namespace" in script and "metaopt.io/pipelines=enabled" in script
