"""Compiled pipelines against the Kubeflow Pipelines backends we support (infra/README.md,
"Supported versions"), with each backend's own protos (tests/upstream/kfp-<version>/: the
descriptors its Go code is built with, taken from the release tag).

A backend's API server parses an uploaded pipeline spec with ``protojson.Unmarshal``: a field its
protos lack is an error. Its driver parses each task's Kubernetes config leniently from 2.4.1 on,
dropping such fields without a word (a Secret marked optional silently becomes required, say).
So every document here is parsed strictly, with each backend's messages: nothing in a compiled
spec may mean nothing to the oldest supported backend.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.upstream import HERE as UPSTREAM
from tests.upstream import KFP_BACKENDS, OLDEST_KFP_BACKEND, TRAINER_RELEASES, git_blob_id, kfp_message, parse_strict, read_bytes, sources

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    """(pipeline spec, platform spec) of the shapes that use every kind of task the builder makes:
    a TrainJob on GPUs with a data volume, sharded ParallelFor steps on GPUs, in-process blocks."""
    from pipelines.builder import PipelineOptions, compile_pipeline

    shapes = {
        "itl-workers-gpu-volume": ("itl", PipelineOptions(gpu=True, workers=4, nodes=2, data_volume="datasets")),
        "arl-shards-gpu": ("arl", PipelineOptions(gpu=True, blocks=2, shards=2)),
        "metamd-blocks": ("metamd", PipelineOptions(blocks=2)),
    }
    out = {}
    for name, (learner, options) in shapes.items():
        path = compile_pipeline(learner, tmp_path_factory.mktemp("kfp") / f"{name}.yaml", options)
        spec, platform = yaml.safe_load_all(path.read_text())
        out[name] = (spec, platform)
    return out


def _executors(platform: dict) -> dict[str, dict]:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


# ----------------------------------------------------------------------------- the vendored files


def test_vendored_files_are_the_upstream_release_files() -> None:
    recorded = sources()
    on_disk = {str(p.relative_to(UPSTREAM)) for p in UPSTREAM.rglob("*") if p.is_file() and p.parent != UPSTREAM}
    assert on_disk == set(recorded), "every vendored file is named in tests/upstream/SOURCES.json, and nothing else"
    for relative, source in recorded.items():
        assert source["commit"] and source["url"].endswith(f"/{source['tag']}/{source['path']}")
        if relative.endswith(".binpb"):
            continue  # derived from a Go file (checked against the .proto below)
        assert git_blob_id(read_bytes(relative)) == source["git_blob"], f"{relative} differs from {source['url']}"


def _proto_fields(text: str) -> set[tuple[str, int]]:
    """(field name, number) of every field a .proto declares (messages, oneofs, maps; not enums)."""
    text = re.sub(r"//[^\n]*", "", text)
    fields = re.findall(r"(?:^|[;{}]|\n)\s*(?:repeated\s+|optional\s+)?(?:map\s*<[^>]+>|[A-Za-z_][\w.]*)\s+(\w+)\s*=\s*(\d+)\s*[;\[]", text)
    return {(name, int(number)) for name, number in fields}


def _descriptor_fields(version: str, file: str) -> set[tuple[str, int]]:
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString((UPSTREAM / f"kfp-{version}" / f"{file}.binpb").read_bytes())

    def walk(messages) -> set[tuple[str, int]]:
        found = set()
        for message in messages:
            if message.options.map_entry:
                continue  # a map field's synthetic entry type
            found |= {(f.name, f.number) for f in message.field} | walk(message.nested_type)
        return found

    return walk(proto.message_type)


@pytest.mark.parametrize("version", KFP_BACKENDS)
def test_vendored_descriptors_are_the_release_protos(version: str) -> None:
    for file in ("pipeline_spec", "kubernetes_executor_config"):
        declared = _proto_fields((UPSTREAM / f"kfp-{version}" / f"{file}.proto").read_text())
        assert declared and _descriptor_fields(version, file) == declared, f"kfp-{version}/{file}: descriptor and .proto disagree"


# ----------------------------------------------------------------------------- the compiled specs


@pytest.mark.parametrize("version", KFP_BACKENDS)
def test_compiled_pipelines_parse_strictly_under_each_supported_backend(compiled: dict, version: str) -> None:
    for name, (spec, platform) in compiled.items():
        parse_strict(version, "ml_pipelines.PipelineSpec", spec)
        parse_strict(version, "ml_pipelines.PlatformSpec", platform)
        for executor, config in _executors(platform).items():
            try:
                parse_strict(version, "kfp_kubernetes.KubernetesExecutorConfig", config)
            except Exception as exc:  # noqa: BLE001 (name the executor)
                raise AssertionError(f"{name}/{executor} under KFP {version}: {exc}") from None


def test_the_check_rejects_what_the_oldest_backend_does_not_know(compiled: dict) -> None:
    """The strict parse is what holds the specs to the oldest backend: a SecretAsEnv marked
    optional (what kfp-kubernetes writes for optional=True) fails under 2.5.0 and parses under 2.15."""
    from google.protobuf.json_format import ParseError

    _, platform = compiled["metamd-blocks"]
    config = copy.deepcopy(next(iter(_executors(platform).values())))
    config["secretAsEnv"][0]["optional"] = True
    with pytest.raises(ParseError, match="optional"):
        parse_strict(OLDEST_KFP_BACKEND, "kfp_kubernetes.KubernetesExecutorConfig", config)
    parse_strict("2.15.0", "kfp_kubernetes.KubernetesExecutorConfig", config)


def test_the_oldest_backend_sees_every_setting_of_every_task(compiled: dict) -> None:
    """What the 2.5.0 driver reads (its messages, its field names) is what the builder set."""
    from google.protobuf.json_format import MessageToDict

    from pipelines.builder import (
        GPU_NODE_LABEL,
        GPU_RESOURCE,
        MLFLOW_AUTH_KEYS,
        MLFLOW_AUTH_SECRET,
        RUNTIME_CONFIG_MAP,
        RUNTIME_KEYS,
        S3_KEYS,
        S3_SECRET,
        STEP_LABEL,
    )

    def name_of(entry: dict, key: str) -> str:  # 2.5.0's driver takes the parameter when present, else the deprecated name
        return entry.get(f"{key}NameParameter", {}).get("runtimeValue", {}).get("constant") or entry.get(f"{key}Name", "")

    gpu_executors = 0
    for name, (spec, platform) in compiled.items():
        for executor, raw in _executors(platform).items():
            seen = MessageToDict(parse_strict(OLDEST_KFP_BACKEND, "kfp_kubernetes.KubernetesExecutorConfig", raw))
            secrets = {name_of(s, "secret"): {k["secretKey"] for k in s["keyToEnv"]} for s in seen["secretAsEnv"]}
            assert secrets == {S3_SECRET: set(S3_KEYS), MLFLOW_AUTH_SECRET: set(MLFLOW_AUTH_KEYS)}, (name, executor)
            [config_map] = seen["configMapAsEnv"]
            assert name_of(config_map, "configMap") == RUNTIME_CONFIG_MAP and {k["configMapKey"] for k in config_map["keyToEnv"]} == set(RUNTIME_KEYS)
            assert seen["podMetadata"]["labels"] == {STEP_LABEL[0]: STEP_LABEL[1]} and int(seen["activeDeadlineSeconds"]) > 0
            if "nodeSelector" in seen:
                gpu_executors += 1
                assert seen["nodeSelector"]["labels"] == {GPU_NODE_LABEL[0]: GPU_NODE_LABEL[1]}
                assert seen["tolerations"] == [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
                container = spec["deploymentSpec"]["executors"][executor]["container"]
                assert container["resources"]["accelerator"]["resourceType"] == GPU_RESOURCE and container["image"].endswith("-cuda")
        volumes = [
            MessageToDict(parse_strict(OLDEST_KFP_BACKEND, "kfp_kubernetes.KubernetesExecutorConfig", c)).get("pvcMount") for c in _executors(platform).values()
        ]
        if name.endswith("volume"):
            [[mount]] = [v for v in volumes if v]
            assert mount["mountPath"] == "/data" and mount["pvcNameParameter"]["runtimeValue"]["constant"] == "datasets"
    assert gpu_executors >= 3  # arl: evaluate, meta-test; itl: meta-test (its TrainJob gets GPUs from the runtime)


def test_retries_reach_the_oldest_backend(compiled: dict) -> None:
    """Preempted GPU steps are retried: the retry policy is part of 2.5.0's task spec (the first
    release whose driver honours it, kubeflow/pipelines#9950)."""
    from google.protobuf.json_format import MessageToDict

    spec, _ = compiled["arl-shards-gpu"]
    parsed = MessageToDict(parse_strict(OLDEST_KFP_BACKEND, "ml_pipelines.PipelineSpec", spec))
    retried = [task for component in parsed["components"].values() for task in component.get("dag", {}).get("tasks", {}).values() if "retryPolicy" in task]
    assert retried and all(int(t["retryPolicy"]["maxRetryCount"]) == 3 for t in retried)
    assert kfp_message(OLDEST_KFP_BACKEND, "ml_pipelines.PipelineTaskSpec.RetryPolicy").DESCRIPTOR.fields_by_name["max_retry_count"]


def test_the_workers_pipeline_names_its_trainjob_after_the_run_and_cleans_up_on_exit(compiled: dict) -> None:
    """The TrainJob step gets the KFP run id (its job's name, components/trainjob_client.py), and the exit
    step of a --workers pipeline is the one that also deletes the run's TrainJob."""
    spec, _ = compiled["itl-workers-gpu-volume"]
    root = spec["root"]["dag"]["tasks"]
    [exit_task] = [t for t in root.values() if t.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"]
    assert "finish-run" in exit_task["componentRef"]["name"]
    assert "trainjob.cleanup_run" in str(spec["deploymentSpec"]["executors"]["exec-finish-run"])
    meta_train = spec["components"]["comp-meta-train"]["inputDefinitions"]["parameters"]
    assert "kfp_run_id" in meta_train
    [task] = [t for c in spec["components"].values() for key, t in c.get("dag", {}).get("tasks", {}).items() if key == "meta-train"]
    assert task["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


# ----------------------------------------------------------------------------- the stated matrix


def _matrix() -> str:
    text = (REPO / "infra" / "README.md").read_text()
    match = re.search(r"^## Supported versions\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "infra/README.md has no '## Supported versions' section"
    return match.group(1)


def test_the_supported_versions_are_the_tested_ones_and_stated_in_both_readmes() -> None:
    matrix = _matrix()
    assert (REPO / "infra" / "README.md").read_text().index("## Supported versions") < (REPO / "infra" / "README.md").read_text().index("## 0.")
    rows = {line.split("|")[1].strip(): line for line in matrix.splitlines() if line.startswith("| ") and not line.startswith("|--")}
    for version in KFP_BACKENDS:
        assert version in rows["Kubeflow Pipelines backend"], f"KFP {version} is tested but not in the matrix"
    assert f"{OLDEST_KFP_BACKEND} – " in rows["Kubeflow Pipelines backend"], "the range starts at the oldest tested backend"
    for release in TRAINER_RELEASES:
        assert release in rows["Kubeflow Trainer"], f"Trainer {release} is tested but not in the matrix"
    readme = (REPO / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if line.startswith("Supported: ")]
    for stated in ("Kubeflow 1.10.1", "1.11.0", f"KFP backend {OLDEST_KFP_BACKEND}", "Trainer v2.1", "v2.3", "MLflow 3.17"):
        assert stated in line, f"README.md's versions line lacks {stated!r}"
