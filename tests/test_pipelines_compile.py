"""The pipelines compile to the IR YAML the architecture describes. Every registered learner is
compiled once (its parameters, defaults, descriptions and DAG shape: what its own spec proves); the
compile options (GPU, shards, cluster wiring, resources, retries, byte stability) are generic in
the builder and proved on one learner. Plus the pure pieces the DAG relies on (block targets,
shards, cron, arguments) and the CLI's argument handling, with a fake KFP client where an endpoint
would be needed."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.images import IMAGE, IMAGE_CUDA
from metaopt_core.meta import registry
from pipelines import remote
from pipelines.builder import (
    MLFLOW_AUTH_KEYS,
    MLFLOW_AUTH_SECRET,
    RUNTIME_CONFIG_MAP,
    S3_SECRET,
    STEP_LABEL,
    PipelineOptions,
    compile_pipeline,
    default_config,
    parameter_config,
)

ALGORITHMS = tuple(registry.BUILTIN)
OPTIONS_LEARNER = "itl"  # the learner the generic compile options are proved on
TINY_META_TEST = {"itl": {"held_out": ["rot90"]}}  # the tiny configs' held-out domain (meta-training never sees it)
PARAMETERS = {"config_uri", "config", "meta_test_settings", "model_name", "experiment", "force_retrain", "promotion_margin"}


def _load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _dags(spec: dict) -> dict[str, dict]:
    """Every DAG's tasks: 'root' and each component with a dag."""
    out = {"root": spec["root"]["dag"]["tasks"]}
    for name, component in spec["components"].items():
        if "dag" in component:
            out[name] = component["dag"]["tasks"]
    return out


def _all_tasks(spec: dict) -> dict[str, dict]:
    tasks = {}
    for dag in _dags(spec).values():
        tasks.update(dag)
    return tasks


def _upstream_producers(task: dict) -> set[str]:
    producers = set()
    for kind in ("artifacts", "parameters"):
        for value in task.get("inputs", {}).get(kind, {}).values():
            source = value.get("taskOutputArtifact") or value.get("taskOutputParameter")
            if source:
                producers.add(source["producerTask"])
    return producers


def _executor(spec: dict, task: dict) -> dict:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


SHARDED = PipelineOptions(blocks=2, shards=3, gpu=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every learner compiled once with the defaults (3 blocks, CPU); the options learner also
    with GPU, and sharded (2 x 3 shards, GPU)."""
    root = tmp_path_factory.mktemp("compiled")
    out = {(algorithm, "cpu"): compile_pipeline(algorithm, root / f"{algorithm}-cpu.yaml") for algorithm in ALGORITHMS}
    out[(OPTIONS_LEARNER, "gpu")] = compile_pipeline(OPTIONS_LEARNER, root / "gpu.yaml", PipelineOptions(gpu=True))
    out[(OPTIONS_LEARNER, "sharded")] = compile_pipeline(OPTIONS_LEARNER, root / "sharded.yaml", SHARDED)
    return out


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_parameters_have_defaults_and_descriptions(compiled, algorithm):
    spec, _ = _load(compiled[(algorithm, "cpu")])
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == PARAMETERS
    for name, definition in parameters.items():
        assert "defaultValue" in definition, f"{name} has no default"
        assert len(definition.get("description", "")) > 20, f"{name} has no real description"
    assert parameters["model_name"]["defaultValue"] == algorithm
    assert parameters["force_retrain"]["defaultValue"] is False
    assert parameters["config_uri"]["defaultValue"] == ""
    # the config default is the demo configuration (numbers arrive as floats: KFP structs)
    assert json.loads(json.dumps(parameters["config"]["defaultValue"])) == json.loads(json.dumps(_as_floats(default_config(algorithm))))
    assert parameters["meta_test_settings"]["defaultValue"] == _as_floats(dict(registry.get(algorithm).default_meta_test))
    assert spec["pipelineInfo"]["name"] == f"metaopt-{algorithm}"


def _as_floats(value):
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_floats(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dag_shape(compiled, algorithm):
    spec, _ = _load(compiled[(algorithm, "cpu")])
    dags = _dags(spec)
    # every step sits under one ExitHandler whose exit step ends the MLflow run (tests/test_lineage.py)
    assert set(dags["root"]) == {"exit-handler-1", "finish-tracking"}
    root = dags["comp-exit-handler-1"]
    assert {"prepare-data", "check-new-data"} <= set(root)
    assert _upstream_producers(root["check-new-data"]) == {"prepare-data"}
    tasks = _all_tasks(spec)
    blocks = ["run-block", "run-block-2", "run-block-3"]
    expected = {"start-tracking", "init-state", *blocks, "meta-test", "register-and-promote", "report-skipped"}
    assert expected <= set(tasks)
    # the meta-training branch and the skip branch sit under the two conditions of one If/Else
    trained = next(dag for dag in dags.values() if "register-and-promote" in dag)
    skipped = next(dag for dag in dags.values() if "report-skipped" in dag)
    assert trained is not skipped and "report-skipped" not in trained
    # state handed block to block; meta-test and registration take the last block's result
    assert _upstream_producers(tasks[blocks[0]]) >= {"init-state", "start-tracking"}
    assert f"{blocks[0]}" in _upstream_producers(tasks[blocks[1]])
    assert f"{blocks[1]}" in _upstream_producers(tasks[blocks[2]])
    assert tasks["meta-test"]["inputs"]["artifacts"]["learned"]["taskOutputArtifact"]["producerTask"] == blocks[2]
    register = tasks["register-and-promote"]
    assert register["inputs"]["artifacts"]["learned"]["taskOutputArtifact"]["producerTask"] == blocks[2]
    assert {"meta-test", "start-tracking"} <= _upstream_producers(register)
    # block i runs block_index i of 3
    for index, name in enumerate(blocks):
        assert tasks[name]["inputs"]["parameters"]["block_index"]["runtimeValue"]["constant"] == index
        assert tasks[name]["inputs"]["parameters"]["blocks"]["runtimeValue"]["constant"] == 3


def test_caching_retries_and_cpu_resources(compiled):
    spec, _ = _load(compiled[(OPTIONS_LEARNER, "cpu")])
    tasks = _all_tasks(spec)
    for name in ("prepare-data", "check-new-data", "start-tracking", "register-and-promote"):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), f"{name} must not be cached"
    for name in ("run-block", "run-block-2", "run-block-3", "meta-test"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 3 and policy["backoffDuration"] == "60s"
        container = _executor(spec, tasks[name])
        assert container["image"] == IMAGE
        assert "accelerator" not in container.get("resources", {})
    for name in ("prepare-data", "check-new-data", "register-and-promote"):
        assert "retryPolicy" not in tasks[name]
    for container in (e["container"] for e in spec["deploymentSpec"]["executors"].values()):
        assert container["image"] == IMAGE
        assert "pip install" not in " ".join(container["command"])  # nothing installed at run time


def test_gpu_steps_request_an_accelerator_on_gpu_nodes(compiled):
    spec, platform = _load(compiled[(OPTIONS_LEARNER, "gpu")])
    tasks = _all_tasks(spec)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_steps = ["run-block", "run-block-2", "run-block-3", "meta-test"]
    for name in gpu_steps:
        container = _executor(spec, tasks[name])
        assert container["image"] == IMAGE_CUDA
        accelerator = container["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1"
        label = spec["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]
        assert executors[label]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert executors[label]["tolerations"][0]["key"] == "nvidia.com/gpu"
        # the step computes on cuda
        assert tasks[name]["inputs"]["parameters"]["device"]["runtimeValue"]["constant"] == "cuda"
    for name in ("prepare-data", "check-new-data", "start-tracking", "register-and-promote"):
        container = _executor(spec, tasks[name])
        assert container["image"] == IMAGE and "accelerator" not in container.get("resources", {})


def test_sharded_pipeline_fans_out_with_parallel_for(compiled):
    spec, _ = _load(compiled[(OPTIONS_LEARNER, "sharded")])
    fan_out, fan_in, ask = "evaluate", "tell", "ask"
    dags = _dags(spec)
    loops = {name: dag for name, dag in dags.items() if name.startswith("comp-for-loop")}
    assert len(loops) == 2  # one fan-out per block (= per outer step)
    for dag in loops.values():
        assert set(dag) == {fan_out} or set(dag) == {f"{fan_out}-2"}
    tasks = _all_tasks(spec)
    loop_tasks = [task for task in tasks.values() if "parameterIterator" in task]
    assert {task["parameterIterator"]["items"]["raw"] for task in loop_tasks} == {"[0, 1, 2]"}
    assert {task["iteratorPolicy"]["parallelismLimit"] for task in loop_tasks} == {3}
    for merge in (fan_in, f"{fan_in}-2"):
        collected = [a for a in tasks[merge]["inputs"]["artifacts"].values() if "taskOutputArtifact" in a]
        assert any(a["taskOutputArtifact"]["producerTask"].startswith("for-loop") for a in collected)
    # sharded: one outer step per block, so the run's length is fixed at compile time
    assert tasks["init-state"]["inputs"]["parameters"]["total_steps"]["runtimeValue"]["constant"] == 2
    assert {ask, f"{ask}-2"} <= set(tasks)
    assert _executor(spec, tasks[fan_out])["resources"]["accelerator"]["resourceCount"] == "1"
    assert tasks[fan_out]["retryPolicy"]["maxRetryCount"] == 3
    assert tasks[fan_out].get("cachingOptions", {}).get("enableCache") is True  # pure computation: cacheable


def test_every_step_gets_the_cluster_runtime_config(compiled):
    spec, platform = _load(compiled[(OPTIONS_LEARNER, "cpu")])
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for config in executors.values():
        [config_map] = config["configMapAsEnv"]
        assert config_map["configMapName"] == RUNTIME_CONFIG_MAP
        assert {e["envVar"] for e in config_map["keyToEnv"]} >= {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"}
        s3, mlflow_auth = config["secretAsEnv"]
        # required, with no `optional` flag: KFP before 2.15 knows none (tests/test_kfp_backend_contract.py)
        assert s3["secretName"] == S3_SECRET and "optional" not in s3
        assert mlflow_auth["secretName"] == MLFLOW_AUTH_SECRET and "optional" not in mlflow_auth
        assert {e["envVar"] for e in mlflow_auth["keyToEnv"]} == set(MLFLOW_AUTH_KEYS)
        assert config["podMetadata"]["labels"] == {STEP_LABEL[0]: STEP_LABEL[1]}  # what infra/'s NetworkPolicies admit


STEP_KINDS_BY_TASK = {"prepare-data": "data", "check-new-data": "control", "start-tracking": "control", "init-state": "data",
                      "run-block": "train", "meta-test": "meta_test", "register-and-promote": "control", "report-skipped": "control"}  # fmt: skip


@pytest.mark.parametrize("variant", ["cpu", "gpu", "sharded"])
def test_every_step_has_requests_limits_and_a_timeout(compiled, variant):
    from pipelines.resources import CPU_DEFAULTS, GPU_DEFAULTS

    spec, platform = _load(compiled[(OPTIONS_LEARNER, variant)])
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for label, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(resources), label
        assert int(kubernetes[label]["activeDeadlineSeconds"]) > 0, label  # past it the pod is killed: the step fails, then retries
    tasks = _all_tasks(spec)
    for name, kind in STEP_KINDS_BY_TASK.items():
        gpu = variant != "cpu" and kind in ("train", "meta_test")
        if name == "run-block" and variant == "sharded":
            continue
        expected = (GPU_DEFAULTS if gpu else CPU_DEFAULTS)[kind]
        container = _executor(spec, tasks[name])
        label = spec["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]
        assert container["resources"]["resourceMemoryLimit"] == expected.memory_limit, name
        assert container["resources"]["resourceCpuRequest"] == expected.cpu, name
        assert int(kubernetes[label]["activeDeadlineSeconds"]) == expected.timeout, name
        assert ("accelerator" in container["resources"]) is gpu, name


def test_resources_and_images_are_compile_options(tmp_path, monkeypatch):
    digest = "registry.example.com/ml/metaopt@sha256:" + "a" * 64
    options = PipelineOptions(gpu=True, image=digest, image_cuda=digest.replace("metaopt@", "metaopt-cuda@"),
                              resources={"train": {"memory_limit": "64Gi", "memory": "64Gi", "timeout": "48h"}})  # fmt: skip
    spec, platform = _load(compile_pipeline("arl", tmp_path / "arl.yaml", options))
    tasks = _all_tasks(spec)
    block = _executor(spec, tasks["run-block"])
    assert block["image"] == options.image_cuda and block["resources"]["resourceMemoryLimit"] == "64Gi"
    assert _executor(spec, tasks["prepare-data"])["image"] == digest
    label = spec["components"][tasks["run-block"]["componentRef"]["name"]]["executorLabel"]
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]["activeDeadlineSeconds"] == str(48 * 3600)
    # the environment names the default image; the compile option wins over it
    monkeypatch.setenv("METAOPT_IMAGE", "registry.example.com/ml/metaopt:1.2.3")
    assert PipelineOptions().image == "registry.example.com/ml/metaopt:1.2.3"
    assert PipelineOptions(image=digest).image == digest
    for bad, message in [({"image": "ghcr.io/metaopt/metaopt"}, "REPOSITORY:TAG"), ({"image": "ghcr.io/metaopt/metaopt:latest"}, "latest"),
                         ({"resources": {"gpu": {"cpu": "1"}}}, "step kind"), ({"resources": {"train": {"memory": "9Gi", "memory_limit": "8Gi"}}}, "exceeds"),
                         ({"resources": {"train": {"timeout": "soon"}}}, "timeout")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            PipelineOptions(**bad)


def test_default_image_tag_is_version_and_commit(monkeypatch):
    from components import images

    commit = "0123456789abcdef" * 2 + "01234567"
    monkeypatch.setenv(images.COMMIT_ENV, commit)
    monkeypatch.delenv(images.IMAGE_ENV, raising=False)
    monkeypatch.delenv(images.IMAGE_CUDA_ENV, raising=False)
    cpu, cuda = images.default_images()
    assert cpu == f"ghcr.io/metaopt/metaopt:{images.package_version()}-0123456789ab" and cuda == cpu + "-cuda"
    assert images.default_tag("0.1.0", "") == "0.1.0"  # no commit known: the version alone


def test_resources_cli_overrides_parse_and_name_bad_ones():
    from pipelines.resources import parse_overrides

    assert parse_overrides(["train.memory_limit=32Gi", "train.timeout=2d", "control.cpu=100m"]) == {
        "train": {"memory_limit": "32Gi", "timeout": "2d"}, "control": {"cpu": "100m"}}  # fmt: skip
    for bad in ["train=1", "gpu.cpu=1", "train.disk=1Gi", "train.cpu=lots", "train.memory_limit=1Gi"]:
        with pytest.raises(ValueError):
            parse_overrides([bad])


def test_compile_is_byte_stable(compiled, tmp_path):
    again = compile_pipeline(OPTIONS_LEARNER, tmp_path / "again.yaml", SHARDED)
    assert again.read_bytes() == compiled[(OPTIONS_LEARNER, "sharded")].read_bytes()


def test_pipeline_options_are_checked():
    with pytest.raises(ValueError, match="blocks: got 0"):
        PipelineOptions(blocks=0)
    with pytest.raises(ValueError, match="shards: got 1.5"):
        PipelineOptions(shards=1.5)


# ----------------------------------------------------------------------------- pure pieces


def test_block_targets_split_the_run_and_end_at_the_total():
    from metaopt_core.meta.runner import block_target

    assert [block_target(8, b, 3) for b in range(3)] == [3, 6, 8]
    assert [block_target(2, b, 3) for b in range(3)] == [1, 2, 2]
    assert [block_target(15, b, 5) for b in range(5)] == [3, 6, 9, 12, 15]
    with pytest.raises(ValueError, match="block_index: got 3"):
        block_target(8, 3, 3)


def test_shards_partition_the_jobs():
    from metaopt_core.meta import shard_slice

    for count in (0, 1, 5, 6, 7):
        for shards in (1, 2, 3, 4):
            parts = [list(shard_slice(count, i, shards)) for i in range(shards)]
            assert sum(parts, []) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_kfp_struct_numbers_become_ints_again():
    from metaopt_core.meta.inputs import integral_floats_to_int

    assert integral_floats_to_int({"a": 8.0, "b": [1.0, 2.5], "c": {"d": 0.0}, "e": True}) == {"a": 8, "b": [1, 2.5], "c": {"d": 0}, "e": True}
    # what a KFP dict parameter delivers validates like the YAML it came from
    doc = _as_floats(default_config("arl"))
    learner = registry.get("arl")
    assert learner.resolve_config(doc).model_dump() == learner.resolve_config(default_config("arl")).model_dump()


def test_config_parameter_drops_nulls_only_where_they_are_the_default():
    doc = default_config("arl")
    doc["max_batch"] = None  # default None: dropping it changes nothing
    assert "max_batch" not in parameter_config("arl", doc)
    doc["bounds"] = None  # default (-50, 50): dropping it would change the run
    with pytest.raises(ValueError, match="config_uri"):
        parameter_config("arl", doc)


@pytest.mark.parametrize("cron", ["0 0 3 * * 0", "0 */15 * * * *", "30 0 9 ? * MON-FRI", "0 0 0 1 JAN,JUL ?", "@daily", "@every 6h"])
def test_valid_cron(cron):
    assert remote.validate_cron(cron) == cron


def test_five_field_cron_fails_with_the_corrected_form():
    with pytest.raises(ValueError, match=r"got 5 fields .*'0 0 3 \* \* 0'"):
        remote.validate_cron("0 3 * * 0")


@pytest.mark.parametrize(("cron", "message"), [
    ("0 60 3 * * 0", "minutes field '60'.*out of range"),
    ("0 0 24 * * 0", "hours field '24'"),
    ("0 0 3 * * 7", "day of week field '7'"),
    ("0 0 3 * * MONDAY", "not a number or one of"),
    ("0 0 3 * *", "got 5 fields"),
    ("0 0 3 * * 0 2026", "got 7 fields"),
    ("0 */0 * * * *", "step '0'"),
])  # fmt: skip
def test_bad_cron_names_the_field(cron, message):
    with pytest.raises(ValueError, match=message):
        remote.validate_cron(cron)


# ----------------------------------------------------------------------------- CLI and KFP client


@pytest.fixture
def fake_kfp(monkeypatch):
    """``kfp.Client`` replaced by autospec mocks: a call with a wrong signature fails like the real
    client would. The instance's calls are in ``fake_kfp.mock_calls``; the constructor's in ``fake_kfp.constructed``."""
    from unittest import mock

    import kfp

    instance = mock.create_autospec(kfp.Client, instance=True)
    instance.create_experiment.return_value = argparse.Namespace(experiment_id="exp-1")
    instance.create_run_from_pipeline_package.side_effect = lambda pipeline_file, **kw: (
        instance.seen.append(next(yaml.safe_load_all(Path(pipeline_file).read_text()))["pipelineInfo"]["name"]) or argparse.Namespace(run_id="run-1")
    )
    instance.create_recurring_run.side_effect = lambda **kw: (
        instance.seen.append(next(yaml.safe_load_all(Path(kw["pipeline_package_path"]).read_text()))["pipelineInfo"]["name"])
        or argparse.Namespace(recurring_run_id="rr-1")
    )  # the YAML exists while the call runs
    item = argparse.Namespace(recurring_run_id="rr-1", display_name="metaopt-itl-scheduled", status="ENABLED", created_at="t",
                              trigger=argparse.Namespace(cron_schedule=argparse.Namespace(cron="0 0 3 * * 0")))  # fmt: skip
    instance.list_recurring_runs.side_effect = lambda page_token="", **kw: (
        argparse.Namespace(recurring_runs=[item], next_page_token="p2") if not page_token else argparse.Namespace(recurring_runs=[], next_page_token="")
    )
    instance.seen = []
    cls = mock.create_autospec(kfp.Client, return_value=instance)
    monkeypatch.setattr(kfp, "Client", cls)
    instance.constructed = cls.call_args_list
    for name in ("KFP_TOKEN", "KFP_COOKIE", "KFP_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    return instance


def _cli(argv):
    from pipelines.commands import add_pipeline_commands

    parser = argparse.ArgumentParser(prog="metaopt")
    add_pipeline_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_schedule_create_submits_a_recurring_run(fake_kfp, capsys, tmp_path):
    token = tmp_path / "token"
    token.write_text("sa-token")
    assert _cli(["schedule", "create", "itl", "--host", "http://kfp:8080", "--cron", "0 0 3 * * 0", "--config-uri", "s3://metaopt/configs/itl-paper.yaml",
                 "--namespace", "team-a", "--token-file", str(token)]) == 0  # fmt: skip
    [constructed] = fake_kfp.constructed
    assert constructed.kwargs["namespace"] == "team-a" and constructed.kwargs["host"] == "http://kfp:8080"
    assert constructed.kwargs["credentials"]._token_path == str(token)  # re-read before every request (a rotating SA token)
    fake_kfp.create_experiment.assert_called_once_with("metaopt", namespace="team-a")
    kwargs = fake_kfp.create_recurring_run.call_args.kwargs
    assert fake_kfp.seen == ["metaopt-itl"]
    assert kwargs["cron_expression"] == "0 0 3 * * 0" and kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True
    assert kwargs["params"] == {"config_uri": "s3://metaopt/configs/itl-paper.yaml"} and kwargs["experiment_id"] == "exp-1"
    assert "rr-1" in capsys.readouterr().out


def test_schedule_create_rejects_five_fields_before_contacting_the_cluster(fake_kfp):
    with pytest.raises(ValueError, match="got 5 fields"):
        _cli(["schedule", "create", "arl", "--host", "http://kfp:8080", "--cron", "0 3 * * 0"])
    assert fake_kfp.mock_calls == []


def test_schedule_list_and_delete(fake_kfp, capsys, monkeypatch):
    monkeypatch.setenv("KFP_NAMESPACE", "team-a")
    monkeypatch.setenv("KFP_COOKIE", "authservice_session=abc")
    assert _cli(["schedule", "list", "--host", "http://kfp:8080"]) == 0
    assert "rr-1  metaopt-itl-scheduled  0 0 3 * * 0" in capsys.readouterr().out
    assert [c.kwargs["page_token"] for c in fake_kfp.list_recurring_runs.call_args_list] == ["", "p2"]  # both pages
    assert {c.kwargs["namespace"] for c in fake_kfp.list_recurring_runs.call_args_list} == {"team-a"}
    assert fake_kfp.constructed[0].kwargs["cookies"] == "authservice_session=abc"
    assert _cli(["schedule", "delete", "rr-1", "--host", "http://kfp:8080"]) == 0
    fake_kfp.delete_recurring_run.assert_called_once_with("rr-1")


def test_run_on_a_cluster_sends_the_config_file(fake_kfp, tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "bearer-123")
    config = tmp_path / "itl.yaml"
    config.write_text(Path("configs/itl-tiny.yaml").read_text())
    assert (
        _cli(["run", "itl", "--host", "http://kfp:8080", "--namespace", "team-a", "--config", str(config), "--force-retrain", "--meta-test", "epochs=1"]) == 0
    )
    assert fake_kfp.constructed[0].kwargs["existing_token"] == "bearer-123"
    call = fake_kfp.create_run_from_pipeline_package.call_args
    arguments = call.kwargs["arguments"]
    assert fake_kfp.seen == ["metaopt-itl"] and call.kwargs["experiment_name"] == "metaopt" and call.kwargs["namespace"] == "team-a"
    assert arguments["config"] == yaml.safe_load(config.read_text())
    from metaopt_core.meta import registry

    # --meta-test sets the fields it names; the others keep the learner's defaults (held_out, seeds, ...)
    assert arguments["force_retrain"] is True and arguments["meta_test_settings"] == {**registry.get("itl").default_meta_test, "epochs": 1}


def test_compile_command_writes_yaml(tmp_path, capsys):
    out = tmp_path / "arl.yaml"
    assert _cli(["compile", "arl", "-o", str(out), "--blocks", "2", "--gpu"]) == 0
    spec, _ = _load(out)
    tasks = _all_tasks(spec)
    assert {"run-block", "run-block-2"} <= set(tasks) and "run-block-3" not in tasks
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_clear():
    with pytest.raises(ValueError, match="with one learner"):
        _cli(["run", "all", "--config", "configs/itl-tiny.yaml"])
    with pytest.raises(ValueError, match="local runner is CPU only"):
        _cli(["run", "arl", "--local", "--gpu"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _cli(["run", "arl", "--meta-test", "epochs"])
    with pytest.raises(ValueError, match="host: got 'kfp:8080'"):
        remote.client("kfp:8080")


@pytest.mark.parametrize("algorithm", ["itl", "metamd"])
def test_sharded_outer_steps_equal_the_in_process_block(algorithm, tmp_path):
    """What the sharded DAG computes (ask, evaluate over 2 shards, tell) is what one block computes
    in process: the same state after every step (ARL: checked end to end in test_pipelines_local)."""
    import torch

    from metaopt_core.meta import driver, runner

    learner = registry.get(algorithm)
    config = learner.resolve_config(yaml.safe_load(Path(f"configs/{algorithm}-tiny.yaml").read_text()))
    inputs = learner.prepare(config, TINY_META_TEST.get(algorithm))
    total = learner.total_steps(config)
    driver.save_state(learner.init(config, inputs), tmp_path / "block")
    in_process = runner.run_block(learner, config, inputs, tmp_path / "block", total)
    sharded = learner.init(config, inputs)
    for step in range(total):
        work = runner.write_work(learner, sharded, inputs, tmp_path / f"work-{step}")
        parts = [runner.write_part(learner, sharded, work, index, 2, inputs, tmp_path / f"part-{step}-{index}") for index in range(2)]
        sharded = runner.tell_parts(learner, sharded, parts, inputs)
    assert sharded.step == in_process.step == total
    assert torch.equal(sharded.omega, in_process.omega)
    assert learner.metrics(sharded)["step"] == total
    # a part is a plain JSON file naming its learner and shard
    doc = json.loads((tmp_path / "part-0-1" / "part.json").read_text())
    assert doc["shard"] == [1, 2] and doc["learner"] == algorithm


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_quick_preset_is_a_valid_shorter_run(algorithm):
    from metaopt_core.config import apply_overrides
    from pipelines.builder import preset_overrides

    learner = registry.get(algorithm)
    demo = learner.resolve_config(default_config(algorithm))
    quick = learner.resolve_config(apply_overrides(default_config(algorithm), preset_overrides("quick", algorithm)))
    assert learner.total_steps(quick) < learner.total_steps(demo)
    assert preset_overrides("demo", algorithm) == {}
    with pytest.raises(ValueError, match="preset: got 'fast'"):
        preset_overrides("fast", algorithm)


def test_local_runs_of_the_demo_default_to_the_quick_preset():
    from pipelines.builder import preset_overrides
    from pipelines.commands import run_overrides

    args = argparse.Namespace(preset=None, config=None, overrides=["outer.steps=7"])
    assert run_overrides(args, "itl", local=True) == {**preset_overrides("quick", "itl"), "outer.steps": 7}
    assert run_overrides(args, "itl", local=False) == {"outer.steps": 7}  # cluster runs: the demo as written
    args = argparse.Namespace(preset=None, config="configs/itl-tiny.yaml", overrides=[])
    assert run_overrides(args, "itl", local=True) == {}  # a given file is used as written
    args = argparse.Namespace(preset="demo", config=None, overrides=[])
    assert run_overrides(args, "itl", local=True) == {}


def test_local_compile_has_no_retries_and_no_cluster_wiring(tmp_path):
    spec, platform = _load(compile_pipeline(OPTIONS_LEARNER, tmp_path / "local.yaml", PipelineOptions(retries=False, cluster_env=False)))
    assert all("retryPolicy" not in task for task in _all_tasks(spec).values())
    assert not platform


def test_arl_shards_beyond_the_jobs_evaluate_nothing_and_merge(tmp_path):
    from metaopt_core.meta import arl, runner

    learner = registry.get("arl")
    config = learner.resolve_config({**yaml.safe_load(Path("configs/arl-tiny.yaml").read_text()), "population_size": 2})
    inputs = learner.prepare(config)
    state = learner.init(config, inputs)
    work = runner.write_work(learner, state, inputs, tmp_path / "work")
    parts = [runner.write_part(learner, state, work, index, 3, inputs, tmp_path / f"part-{index}") for index in range(3)]  # 2 jobs, 3 shards
    evaluated = [np.asarray(json.loads(p.read_text())["part"]["fitness"]["evaluated"]).sum() for p in parts]
    assert sorted(evaluated) == [0, 1, 1]
    merged = runner.tell_parts(learner, state, parts, inputs)
    candidates = arl.Candidates.from_dict(work["candidates"])
    reference = arl.tell(state, arl.evaluate(candidates, arl.build_pool(config, inputs.datasets)))
    assert merged.records[-1]["fitness"] == reference.records[-1]["fitness"]


def test_meta_test_settings_errors_name_the_field():
    from metaopt_core.config import ConfigError

    with pytest.raises(ConfigError, match="meta_test: field 'epochs': got 0"):
        registry.get("arl").resolve_meta_test({"epochs": 0})
    with pytest.raises(ConfigError, match="meta_test: field 'held': got 1: unknown field"):
        registry.get("itl").resolve_meta_test({"held": 1})
    assert registry.get("metamd").resolve_meta_test({"seeds": 3.0}).seeds == 3  # a KFP struct's float


def test_pipelines_upload_creates_the_pipeline_then_adds_a_version_per_upload(fake_kfp, capsys):
    fake_kfp.list_pipelines.return_value = argparse.Namespace(pipelines=None)
    fake_kfp.upload_pipeline.return_value = argparse.Namespace(pipeline_id="p-1")
    fake_kfp.list_pipeline_versions.return_value = argparse.Namespace(
        pipeline_versions=[argparse.Namespace(pipeline_version_id="v-1", display_name="metaopt-itl")]
    )
    assert _cli(["pipelines", "upload", "itl", "--host", "http://kfp:8080", "--namespace", "team-a", "--gpu"]) == 0
    call = fake_kfp.upload_pipeline.call_args
    assert call.kwargs["pipeline_name"] == "metaopt-itl" and call.kwargs["namespace"] == "team-a" and "-cuda" in call.kwargs["description"]
    assert fake_kfp.list_pipelines.call_args.kwargs["namespace"] == "team-a"
    fake_kfp.upload_pipeline_version.assert_not_called()
    assert "pipeline metaopt-itl (p-1), version metaopt-itl (v-1)" in capsys.readouterr().out
    # the pipeline exists now: every upload adds a version named after the compile
    fake_kfp.list_pipelines.return_value = argparse.Namespace(pipelines=[argparse.Namespace(pipeline_id="p-1")])
    fake_kfp.upload_pipeline_version.return_value = argparse.Namespace(pipeline_version_id="v-2")
    assert _cli(["pipelines", "upload", "itl", "--host", "http://kfp:8080", "--namespace", "team-a"]) == 0
    call = fake_kfp.upload_pipeline_version.call_args
    assert call.kwargs["pipeline_id"] == "p-1" and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{10}", call.kwargs["pipeline_version_name"])
    assert _cli(["pipelines", "upload", "itl", "--host", "http://kfp:8080", "--version", "release-7"]) == 0
    assert fake_kfp.upload_pipeline_version.call_args.kwargs["pipeline_version_name"] == "release-7"


def test_connection_checks_credentials_and_keeps_them_out_of_repr(tmp_path):
    from pipelines.kfp_client import Connection, connection

    conn = connection("https://kf.example.com/pipeline", env={"KFP_TOKEN": "tok-secret", "KFP_NAMESPACE": "team-a"})
    assert conn.namespace == "team-a" and conn.client_arguments()["existing_token"] == "tok-secret"
    assert "tok-secret" not in repr(conn)
    cookie = tmp_path / "cookie"
    cookie.write_text("authservice_session=xyz\n")
    assert connection("http://kfp:8080", cookie_file=str(cookie), env={"KFP_TOKEN": "t"}).client_arguments()["cookies"] == "authservice_session=xyz"
    with pytest.raises(ValueError, match="give one of"):
        Connection("http://kfp:8080", token="a", cookies="b")
    with pytest.raises(ValueError, match="token file"):
        Connection("http://kfp:8080", token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="namespace: got 'Team A'"):
        Connection("http://kfp:8080", namespace="Team A")
