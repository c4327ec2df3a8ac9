"""Static checks of infra/ (kustomize), the Dockerfile and .dockerignore.

No kubectl or kustomize here, so a small kustomize subset is rebuilt in Python: resources
(files and directories), namespace, labels, and patches (strategic-merge and JSON 6902, with
kind/name/labelSelector targets). Any other kustomization field fails the test rather than
being ignored silently. The built objects are then checked for the mistakes that only show
up at deploy time: dangling Secret/ConfigMap references, selectors that select nothing,
unknown ports, images outside the documented list, secrets in the tree, flags MLflow does not
know, and endpoints that do not point at a Service that exists.
"""

from __future__ import annotations

import copy
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
README = INFRA / "README.md"

CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "labels"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
TOP_LEVEL_BUILDS = ["base", "overlays/local", "overlays/gpu"]


# ------------------------------------------------------------------------------------------
# A small kustomize
# ------------------------------------------------------------------------------------------


@dataclass
class Build:
    objects: list[dict]
    files: set[Path]  # every file the build read (resources and patches)


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    raise AssertionError(f"{directory} has no kustomization.yaml")


def _matches_target(obj: dict, target: dict) -> bool:
    meta = obj.get("metadata", {})
    if "kind" in target and obj.get("kind") != target["kind"]:
        return False
    if "name" in target and meta.get("name") != target["name"]:
        return False
    if "namespace" in target and meta.get("namespace") != target["namespace"]:
        return False
    if "labelSelector" in target:
        labels = meta.get("labels", {}) or {}
        for requirement in target["labelSelector"].split(","):
            key, _, value = requirement.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer {path!r} must start with /"
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _resolve_parent(document: Any, path: str, where: str) -> tuple[Any, str]:
    parts = _pointer(path)
    node = document
    for part in parts[:-1]:
        if isinstance(node, list):
            assert part.isdigit() and int(part) < len(node), f"{where}: {path} does not exist"
            node = node[int(part)]
        else:
            assert isinstance(node, dict) and part in node, f"{where}: {path} does not exist"
            node = node[part]
    return node, parts[-1]


def _apply_json6902(obj: dict, operations: list[dict], where: str) -> None:
    for op in operations:
        parent, last = _resolve_parent(obj, op["path"], where)
        index: Any = int(last) if isinstance(parent, list) and last.isdigit() else last
        if op["op"] in ("test", "replace", "remove"):
            exists = index < len(parent) if isinstance(parent, list) else last in parent
            assert exists, f"{where}: {op['op']} of missing {op['path']}"
        if op["op"] == "test":
            assert parent[index] == op["value"], (
                f"{where}: test failed at {op['path']}: {parent[index]!r} != {op['value']!r}"
            )
        elif op["op"] == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[index]
        else:
            raise AssertionError(f"{where}: unsupported JSON patch op {op['op']!r}")


def _strategic_merge(base: Any, patch: Any, where: str) -> Any:
    """Strategic merge as kustomize does it for the fields used here: maps merge, lists of
    named maps (containers, env, volumes, ports) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        assert "$patch" not in patch, f"{where}: $patch directives are not supported by this test"
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _strategic_merge(base[key], value, where) if key in base else copy.deepcopy(value)
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged_list = [copy.deepcopy(i) for i in base]
        positions = {item["name"]: n for n, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in positions:
                n = positions[item["name"]]
                merged_list[n] = _strategic_merge(merged_list[n], item, where)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def build(directory: Path) -> Build:
    """Build the kustomization in ``directory`` (the subset described in the module doc)."""
    kfile = _kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{kfile}: fields {sorted(unknown)} are not understood by this test's kustomize"
    objects: list[dict] = []
    files: set[Path] = {kfile}
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{kfile}: resource {entry!r} does not exist"
        if path.is_dir():
            sub = build(path)
            objects += sub.objects
            files |= sub.files
        else:
            objects += _load_docs(path)
            files.add(path)
    if spec.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for label_spec in spec.get("labels", []):
        assert not label_spec.get("includeSelectors"), f"{kfile}: includeSelectors would change immutable selectors"
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_spec["pairs"])
    for number, patch_spec in enumerate(spec.get("patches", [])):
        where = f"{kfile} patch #{number}"
        if "path" in patch_spec:
            patch_file = (directory / patch_spec["path"]).resolve()
            assert patch_file.is_file(), f"{where}: {patch_spec['path']!r} does not exist"
            files.add(patch_file)
            documents = _load_docs(patch_file)
            assert len(documents) == 1, f"{where}: one patch per file"
            patch = documents[0]
        else:
            patch = yaml.safe_load(patch_spec["patch"])
        if isinstance(patch, list):
            assert "target" in patch_spec, f"{where}: a JSON 6902 patch needs a target"
            target = patch_spec["target"]
        else:
            target = patch_spec.get("target") or {
                "kind": patch["kind"],
                "name": patch["metadata"]["name"],
            }
        matched = [i for i, obj in enumerate(objects) if _matches_target(obj, target)]
        assert matched, f"{where}: target {target} matches nothing"
        for i in matched:
            if isinstance(patch, list):
                _apply_json6902(objects[i], patch, where)
            else:
                body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
                objects[i] = _strategic_merge(objects[i], body, where)
    return Build(objects, files)


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
        elif obj["kind"] == "Pod":
            found.append((obj, obj["spec"]))
    return found


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def name_of(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']}/{meta.get('namespace', '?')}/{meta['name']}"


def find(objects: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    hits = [
        o
        for o in objects
        if o["kind"] == kind
        and o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
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
                assert not obj.get("data") and not obj.get("stringData"), (
                    f"{name}: {name_of(obj)} carries literal credentials"
                )


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
        if "secret" in volume:
            refs.append(("Secret", volume["secret"]["secretName"], None))
        if "configMap" in volume:
            refs.append(("ConfigMap", volume["configMap"]["name"], None))
    return refs


def test_every_referenced_secret_and_config_map_exists_or_is_documented(builds: dict[str, Build]) -> None:
    secrets = documented_secrets()
    assert set(secrets) == {"metaopt-postgres", "metaopt-s3"}
    assert secrets["metaopt-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    external_config_maps = documented_external_config_maps()
    checked = 0
    for build_name, result in builds.items():
        defined = {
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
            for o in result.objects
            if o["kind"] in ("Secret", "ConfigMap")
        }
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
    assert "ghcr.io/metaopt/metaopt:0.1.0" in allowed and "ghcr.io/metaopt/metaopt:0.1.0-cuda" in allowed
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
                if w["metadata"]["namespace"] == namespace
                and service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
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
                assert "memory" in resources.get("limits", {}), name_of(workload)


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
                        assert reference in earlier, (
                            f"{name_of(workload)}: {env['name']} uses $({reference}) before it is defined"
                        )
                    earlier.add(env["name"])
    assert expansions >= 3


# ------------------------------------------------------------------------------------------
# MLflow, MinIO, KFP launcher and metaopt-runtime agree with each other
# ------------------------------------------------------------------------------------------


def _service_port(
    objects: list[dict], url_or_hostport: str, client_namespace: str | None = None
) -> tuple[str, str, int]:
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
    for build_name, pipeline_namespace in [("base", "kubeflow-user-example-com"), ("overlays/local", "kubeflow")]:
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
    for build_name, pipeline_namespace in [("base", "kubeflow-user-example-com"), ("overlays/local", "kubeflow")]:
        data = find(builds[build_name].objects, "ConfigMap", "metaopt-runtime", pipeline_namespace)["data"]
        settings = S3Settings.from_env(data)  # the way a pipeline pod's storage will read it
        assert _service_port(base_objects, settings.endpoint_url) == ("minio", "metaopt", 9000)
        assert data["MLFLOW_S3_ENDPOINT_URL"] == settings.endpoint_url
        assert _service_port(base_objects, data["MLFLOW_TRACKING_URI"]) == ("mlflow", "metaopt", 5000)


def _mlflow_container(objects: list[dict]) -> dict:
    deployment = find(objects, "Deployment", "mlflow", "metaopt")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_server_flags_exist_in_the_installed_mlflow(builds: dict[str, Build]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.cli import server as server_command

    options = {opt: param for param in server_command.params for opt in param.opts}
    for build_name in TOP_LEVEL_BUILDS:
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


def test_mlflow_accepts_the_host_names_clients_use(builds: dict[str, Build]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.server.security_utils import is_allowed_host_header

    args = dict(a.split("=", 1) for a in _mlflow_container(builds["base"].objects)["args"] if "=" in a)
    allowed = [h.strip() for h in args["--allowed-hosts"].split(",")]
    runtime = find(builds["base"].objects, "ConfigMap", "metaopt-runtime", "kubeflow-user-example-com")
    tracking_host = urllib.parse.urlsplit(runtime["data"]["MLFLOW_TRACKING_URI"]).netloc
    for host in [tracking_host, "mlflow:5000", "mlflow.metaopt:5000", "localhost:5000", "localhost"]:
        assert is_allowed_host_header(allowed, host), f"MLflow would reject Host: {host}"
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")


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
    assert {o["metadata"]["namespace"] for o in local if o["kind"] == "ConfigMap"} == {"kubeflow"}


def test_gpu_overlay_schedules_gpu_jobs_on_gpu_nodes(builds: dict[str, Build]) -> None:
    gpu_objects = builds["overlays/gpu"].objects
    gpu_jobs = [
        o
        for o in gpu_objects
        if o["kind"] == "Job" and o["metadata"].get("labels", {}).get("metaopt.io/gpu") == "true"
    ]
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
    assert "ghcr.io/metaopt/metaopt:0.1.0" in header and "ghcr.io/metaopt/metaopt:0.1.0-cuda" in header
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
