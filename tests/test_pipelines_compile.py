"""The pipelines compile to the IR YAML the architecture describes: tasks, dependencies, caching,
retries, GPU requests, parameters with defaults and descriptions, cluster wiring; compiles are
byte-stable. Plus the pure pieces the DAG relies on (block targets, shards, cron, arguments) and
the CLI's argument handling, with a fake KFP client where an endpoint would be needed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.images import IMAGE, IMAGE_CUDA
from pipelines import remote
from metaopt_core.meta import registry
from pipelines.builder import (
    RUNTIME_CONFIG_MAP,
    S3_SECRET,
    PipelineOptions,
    compile_pipeline,
    default_config,
    parameter_config,
)

ALGORITHMS = tuple(registry.BUILTIN)
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Each algorithm compiled three ways: default (3 blocks, CPU), GPU, and sharded (2 x 3 shards, GPU)."""
    root = tmp_path_factory.mktemp("compiled")
    out = {}
    for algorithm in ALGORITHMS:
        out[(algorithm, "cpu")] = compile_pipeline(algorithm, root / f"{algorithm}-cpu.yaml")
        out[(algorithm, "gpu")] = compile_pipeline(algorithm, root / f"{algorithm}-gpu.yaml", PipelineOptions(gpu=True))
        out[(algorithm, "sharded")] = compile_pipeline(algorithm, root / f"{algorithm}-sharded.yaml", PipelineOptions(blocks=2, shards=3, gpu=True))
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
    root = dags["root"]
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


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_caching_retries_and_cpu_resources(compiled, algorithm):
    spec, _ = _load(compiled[(algorithm, "cpu")])
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


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gpu_steps_request_an_accelerator_on_gpu_nodes(compiled, algorithm):
    spec, platform = _load(compiled[(algorithm, "gpu")])
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


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sharded_pipeline_fans_out_with_parallel_for(compiled, algorithm):
    spec, _ = _load(compiled[(algorithm, "sharded")])
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


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_step_gets_the_cluster_runtime_config(compiled, algorithm):
    spec, platform = _load(compiled[(algorithm, "cpu")])
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for config in executors.values():
        [config_map] = config["configMapAsEnv"]
        assert config_map["configMapName"] == RUNTIME_CONFIG_MAP
        assert {e["envVar"] for e in config_map["keyToEnv"]} >= {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"}
        [secret] = config["secretAsEnv"]
        assert secret["secretName"] == S3_SECRET and secret["optional"] is True


def test_compile_is_byte_stable(tmp_path):
    for algorithm in ALGORITHMS:
        first = compile_pipeline(algorithm, tmp_path / f"{algorithm}-1.yaml", PipelineOptions(blocks=2, shards=2, gpu=True))
        second = compile_pipeline(algorithm, tmp_path / f"{algorithm}-2.yaml", PipelineOptions(blocks=2, shards=2, gpu=True))
        assert first.read_bytes() == second.read_bytes()


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


class FakeKFPClient:
    """Records what the CLI asks of kfp.Client."""

    def __init__(self):
        self.calls = []

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", name))
        return argparse.Namespace(experiment_id="exp-1")

    def create_recurring_run(self, **kwargs):
        spec = next(yaml.safe_load_all(Path(kwargs["pipeline_package_path"]).read_text()))  # the YAML exists while the call runs
        self.calls.append(("create_recurring_run", kwargs, spec["pipelineInfo"]["name"]))
        return argparse.Namespace(recurring_run_id="rr-1")

    def create_run_from_pipeline_package(self, pipeline_file, arguments=None, run_name=None, experiment_name=None, namespace=None):
        spec = yaml.safe_load_all(Path(pipeline_file).read_text())
        self.calls.append(("create_run", arguments, next(spec)["pipelineInfo"]["name"], experiment_name))
        return argparse.Namespace(run_id="run-1")

    def list_recurring_runs(self, page_token="", page_size=10, namespace=None):
        self.calls.append(("list", page_token))
        item = argparse.Namespace(recurring_run_id="rr-1", display_name="metaopt-itl-scheduled", status="ENABLED", created_at="t",
                                  trigger=argparse.Namespace(cron_schedule=argparse.Namespace(cron="0 0 3 * * 0")))  # fmt: skip
        if not page_token:
            return argparse.Namespace(recurring_runs=[item], next_page_token="p2")
        return argparse.Namespace(recurring_runs=[], next_page_token="")

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete", recurring_run_id))


@pytest.fixture
def fake_kfp(monkeypatch):
    fake = FakeKFPClient()
    monkeypatch.setattr(remote, "client", lambda host, namespace=None: fake)
    return fake


def _cli(argv):
    from pipelines.commands import add_pipeline_commands

    parser = argparse.ArgumentParser(prog="metaopt")
    add_pipeline_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_schedule_create_submits_a_recurring_run(fake_kfp, capsys):
    assert _cli(["schedule", "create", "itl", "--host", "http://kfp:8080", "--cron", "0 0 3 * * 0", "--config-uri", "s3://metaopt/configs/itl-paper.yaml"]) == 0
    (_, name), (_, kwargs, pipeline_name) = fake_kfp.calls
    assert name == "metaopt" and pipeline_name == "metaopt-itl"
    assert kwargs["cron_expression"] == "0 0 3 * * 0" and kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True
    assert kwargs["params"] == {"config_uri": "s3://metaopt/configs/itl-paper.yaml"} and kwargs["experiment_id"] == "exp-1"
    assert "rr-1" in capsys.readouterr().out


def test_schedule_create_rejects_five_fields_before_contacting_the_cluster(fake_kfp):
    with pytest.raises(ValueError, match="got 5 fields"):
        _cli(["schedule", "create", "arl", "--host", "http://kfp:8080", "--cron", "0 3 * * 0"])
    assert fake_kfp.calls == []


def test_schedule_list_and_delete(fake_kfp, capsys):
    assert _cli(["schedule", "list", "--host", "http://kfp:8080"]) == 0
    assert "rr-1  metaopt-itl-scheduled  0 0 3 * * 0" in capsys.readouterr().out
    assert [c[0] for c in fake_kfp.calls] == ["list", "list"]  # both pages
    assert _cli(["schedule", "delete", "rr-1", "--host", "http://kfp:8080"]) == 0
    assert fake_kfp.calls[-1] == ("delete", "rr-1")


def test_run_on_a_cluster_sends_the_config_file(fake_kfp, tmp_path):
    config = tmp_path / "itl.yaml"
    config.write_text(Path("configs/itl-tiny.yaml").read_text())
    assert _cli(["run", "itl", "--host", "http://kfp:8080", "--config", str(config), "--force-retrain", "--meta-test", "epochs=1"]) == 0
    (_, arguments, pipeline_name, experiment) = fake_kfp.calls[0]
    assert pipeline_name == "metaopt-itl" and experiment == "metaopt"
    assert arguments["config"] == yaml.safe_load(config.read_text())
    assert arguments["force_retrain"] is True and arguments["meta_test_settings"] == {"epochs": 1}


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

    from metaopt_core.meta import runner

    learner = registry.get(algorithm)
    config = learner.resolve_config(yaml.safe_load(Path(f"configs/{algorithm}-tiny.yaml").read_text()))
    inputs = learner.prepare(config)
    total = learner.total_steps(config)
    learner.save_state(learner.init(config, inputs), tmp_path / "block")
    in_process = runner.run_block(learner, config, inputs, tmp_path / "block", total)
    sharded = learner.init(config, inputs)
    for step in range(total):
        work = runner.write_work(learner, sharded, inputs, tmp_path / f"work-{step}")
        parts = [runner.write_part(learner, sharded, work, index, 2, inputs, tmp_path / f"part-{step}-{index}") for index in range(2)]
        sharded = runner.tell_parts(learner, sharded, parts, inputs)
    assert learner.step(sharded) == learner.step(in_process) == total
    assert torch.equal(sharded.omega, in_process.omega)
    assert learner.metrics(sharded)["step"] == total
    # a part is a plain JSON file naming its learner and shard
    doc = json.loads((tmp_path / "part-0-1" / "part.json").read_text())
    assert doc["shard"] == [1, 2] and doc["learner"] == algorithm


def test_overrides_set_dot_paths_and_name_bad_ones():
    from pipelines.builder import apply_overrides

    doc = {"train": {"epochs": 25, "lr": 0.1}, "generations": 8}
    out = apply_overrides(doc, {"train.epochs": 4, "generations": 3, "outer.steps": 2})
    assert out == {"train": {"epochs": 4, "lr": 0.1}, "generations": 3, "outer": {"steps": 2}}
    assert doc["train"]["epochs"] == 25  # the input is not modified
    with pytest.raises(ValueError, match="generations is 8, not a mapping"):
        apply_overrides(doc, {"generations.x": 1})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_quick_preset_is_a_valid_shorter_run(algorithm):
    from pipelines.builder import apply_overrides, preset_overrides

    learner = registry.get(algorithm)
    demo = learner.resolve_config(default_config(algorithm))
    quick = learner.resolve_config(apply_overrides(default_config(algorithm), preset_overrides("quick", algorithm)))
    assert learner.total_steps(quick) < learner.total_steps(demo)
    assert preset_overrides("demo", algorithm) == {}
    with pytest.raises(ValueError, match="preset: got 'fast'"):
        preset_overrides("fast", algorithm)


def test_local_runs_of_the_demo_default_to_the_quick_preset():
    from pipelines.builder import preset_overrides
    from pipelines.commands import _overrides

    args = argparse.Namespace(preset=None, config=None, overrides=["outer.steps=7"])
    assert _overrides(args, "itl", local=True) == {**preset_overrides("quick", "itl"), "outer.steps": 7}
    assert _overrides(args, "itl", local=False) == {"outer.steps": 7}  # cluster runs: the demo as written
    args = argparse.Namespace(preset=None, config="configs/itl-tiny.yaml", overrides=[])
    assert _overrides(args, "itl", local=True) == {}  # a given file is used as written
    args = argparse.Namespace(preset="demo", config=None, overrides=[])
    assert _overrides(args, "itl", local=True) == {}


def test_local_compile_has_no_retries_and_no_cluster_wiring(tmp_path):
    spec, platform = _load(compile_pipeline("itl", tmp_path / "itl.yaml", PipelineOptions(retries=False, cluster_env=False)))
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
