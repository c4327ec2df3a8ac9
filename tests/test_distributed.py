"""The driver under torch.distributed (``metaopt_core.meta.distributed``): real processes under
torchrun with gloo on CPU, one thread each, the tiny configurations.

ARL reaches the same fitness values and CMA-ES state, bit for bit, with 1, 2 and 3 workers; ITL
and MetaMD the same hypergradient statistics and ω up to float summation order (relative error
≤ 1e-6). A worker killed mid-run makes torchrun restart the job, which resumes from rank 0's last
checkpoint and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metaopt_core.meta import PreparedInputs, driver, registry
from metaopt_core.meta.driver import directory_files, write_directory_files

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMING_KEYS = {"seconds"}  # wall times in the histories: the only fields allowed to differ
REL = 1e-6
TINY_META_TEST = {"itl": {"held_out": ["rot90"]}}  # configs/itl-tiny.yaml: rot90 is the meta-test's domain


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{learner name: prepared inputs dir}, each prepared once for the whole module."""
    root = tmp_path_factory.mktemp("inputs")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            learner = registry.get(name)
            config = learner.resolve_config(yaml.safe_load((ROOT / "configs" / f"{name}-tiny.yaml").read_text()))
            cache[name] = learner.prepare(config, TINY_META_TEST.get(name)).save(root / name)
        return cache[name]

    return get


def launch(name: str, workers: int, data: Path, checkpoint: Path, *extra: str, config: Path | None = None,
           restarts: int = 0, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:  # fmt: skip
    """The entry point under torchrun with ``workers`` processes (1: plain python, no process group)."""
    args = ["--learner", name, "--config", str(config or ROOT / "configs" / f"{name}-tiny.yaml"), "--data", str(data),
            "--checkpoint", str(checkpoint), "--threads", "1", *extra]  # fmt: skip
    if workers == 1 and not restarts:
        command = [sys.executable, "-m", "metaopt_core.meta.distributed", *args]
    else:
        command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={workers}", f"--max-restarts={restarts}",
                   "-m", "metaopt_core.meta.distributed", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def state_doc(checkpoint: Path) -> dict:
    return without_timings(json.loads((checkpoint / "state.json").read_text()))


def assert_close(a, b, where: str = "state") -> None:
    """Equal structure; numbers equal up to a relative error of REL (float summation order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tensors(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return {path.name: load_file(path) for path in sorted(checkpoint.glob("*.safetensors"))}


# ----------------------------------------------------------------------------- in process


def test_state_files_round_trip_and_stay_inside_the_folder(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "state.json").write_text("{}")
    (tmp_path / "a" / "sub" / "w.bin").write_bytes(b"\x00\x01")
    files = directory_files(tmp_path / "a")
    assert files == {"state.json": b"{}", "sub/w.bin": b"\x00\x01"}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.json").write_text("old")
    write_directory_files(files, tmp_path / "b")
    assert directory_files(tmp_path / "b") == files  # replaced, not merged
    for bad in ("../escape", "/etc/passwd", ""):
        with pytest.raises(ValueError, match="relative path inside"):
            write_directory_files({bad: b""}, tmp_path / "c")


# ----------------------------------------------------------------------------- several processes


def test_arl_is_bit_identical_with_1_2_and_3_workers(prepared, tmp_path):
    data = prepared("arl")
    for workers in (1, 2, 3):
        launch("arl", workers, data, tmp_path / f"w{workers}")
    one = state_doc(tmp_path / "w1")
    assert one["generation"] == 2 and len(one["records"]) == 2
    for workers in (2, 3):
        assert state_doc(tmp_path / f"w{workers}") == one  # fitness, candidates, CMA-ES mean/sigma/RNG, best


@pytest.mark.parametrize("name,workers", [("itl", 2), ("itl", 3), ("metamd", 2)])
def test_hypergradient_learners_agree_with_one_process(prepared, tmp_path, name, workers):
    data = prepared(name)
    launch(name, 1, data, tmp_path / "w1")
    done = launch(name, workers, data, tmp_path / "wn", "--export", str(tmp_path / "learned"))
    assert f"outer step 2/2 ({workers} workers)" in done.stdout
    one, many = state_doc(tmp_path / "w1"), state_doc(tmp_path / "wn")
    assert one["step"] == many["step"] == 2
    assert_close(one, many)  # ω, the outer optimiser's moments, every hypergradient statistic in the history
    a, b = tensors(tmp_path / "w1"), tensors(tmp_path / "wn")
    assert sorted(a) == sorted(b) and a
    for file in a:
        for key in a[file]:
            assert (a[file][key] - b[file][key]).abs().max() <= REL * max(1.0, a[file][key].abs().max().item()), (file, key)
    assert json.loads((tmp_path / "learned" / "result.json").read_text())["steps"] == 2


def _worker_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux /proc; no psutil here)."""
    found = {}
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_resumes(prepared, tmp_path):
    data = prepared("arl")
    config = tmp_path / "arl.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs" / "arl-tiny.yaml").read_text()), "generations": 24}))
    # a short collective timeout turns any hang after the kill into one more restart, not a stuck test
    job = launch("arl", 2, data, tmp_path / "killed", "--timeout-min", "2", config=config, restarts=3, wait=False)
    killed_at = None
    deadline = time.monotonic() + 240
    while killed_at is None and time.monotonic() < deadline and job.poll() is None:
        state = tmp_path / "killed" / "state.json"
        generation = json.loads(state.read_text())["generation"] if state.exists() else 0
        pids = _worker_pids(job.pid)
        if generation >= 2 and 1 in pids:
            os.kill(pids[1], signal.SIGKILL)
            killed_at = generation
        time.sleep(0.02)
    output, _ = job.communicate(timeout=300)
    assert killed_at is not None and killed_at < 24, f"never killed (generation {killed_at}):\n{output[-3000:]}"
    assert job.returncode == 0, output[-4000:]
    assert "arl: resumed from" in output  # the restarted rank 0 read the checkpoint
    resumed = state_doc(tmp_path / "killed")
    assert resumed["generation"] == 24
    launch("arl", 1, data, tmp_path / "whole", config=config)
    assert resumed == state_doc(tmp_path / "whole")


# ----------------------------------------------------------------------------- the cluster side


class FakeArtifact:
    """What a KFP artifact offers a component body: path, uri, metadata (and log_metric)."""

    def __init__(self, path: Path, uri: str | None = None):
        self.path, self.uri, self.metadata, self.logged = str(path), uri or str(path), {}, {}

    def log_metric(self, key: str, value: float) -> None:
        self.logged[key] = value


def test_the_meta_training_step_submits_a_trainjob_and_hands_on_its_result(prepared, tmp_path):
    from datetime import datetime
    from unittest import mock

    import torch
    from kubeflow.trainer import CustomTrainerContainer, TrainerClient
    from kubeflow.trainer.options import Name, TrainerCommand
    from kubeflow.trainer.types.types import TrainJob

    from components import trainjob_client as trainjob
    from components import trainjob_runtime
    from components.images import IMAGE_CUDA

    arl = registry.get("arl")
    config = arl.resolve_config(yaml.safe_load((ROOT / "configs" / "arl-tiny.yaml").read_text()))
    data = FakeArtifact(prepared("arl"))
    state_in = FakeArtifact(tmp_path / "init")
    driver.save_state(arl.init(config, PreparedInputs.load(data.path)), state_in.path)
    outputs = tmp_path / "outputs"  # the step's output artifacts: their uri is where the TrainJob's files go
    state, learned, metrics = FakeArtifact(outputs / "state"), FakeArtifact(outputs / "learned"), FakeArtifact(outputs / "metrics")
    client = mock.create_autospec(TrainerClient, instance=True)
    threads = torch.get_num_threads()

    def the_job_runs(runtime=None, initializer=None, trainer=None, options=None):  # one worker, in this process
        command = next(option.command for option in options if isinstance(option, TrainerCommand))
        assert command[:4] == ["torchrun", "--nproc-per-node=3", f"--max-restarts={trainjob.MAX_RESTARTS}", "-m"]
        assert command[4] == "components.trainjob_runtime"
        trainjob_runtime.main(command[5:])
        return "metaopt-job-1"

    client.train.side_effect = the_job_runs

    def no_job_yet(name):  # what the SDK raises for a TrainJob that does not exist
        from kubernetes.client import ApiException

        raise RuntimeError(f"Failed to get TrainJob: {name}") from ApiException(status=404, reason="Not Found")

    client.get_job.side_effect = no_job_yet
    client.get_job_logs.return_value = iter(["[metaopt] arl: outer step 2/2\n"])
    client.wait_for_job_status.return_value = TrainJob("metaopt-job-1", None, [], 2, datetime.now(), status=trainjob.COMPLETE)
    lines: list[str] = []
    try:
        step = trainjob_runtime.meta_train("arl", json.dumps(config.model_dump(mode="json")), data, state_in, "", 6, 2, True, IMAGE_CUDA, "",
                                           state, learned, metrics, kfp_run_id="run-1", client=client, echo=lines.append)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert step == 2 and driver.load_state(arl, state.path).step == 2
    call = client.train.call_args.kwargs
    trainer = call["trainer"]
    assert call["runtime"] == trainjob.GPU_RUNTIME_NAME and isinstance(trainer, CustomTrainerContainer)
    assert (trainer.image, trainer.num_nodes) == (IMAGE_CUDA, 2)
    assert trainer.resources_per_node == {"gpu": "3", "cpu": "6", "memory": "24Gi"}
    assert Name(name=trainjob.trainjob_name("run-1")) in call["options"]  # a retried step finds it by this name
    command = next(option.command for option in call["options"] if isinstance(option, TrainerCommand))
    prefix = trainjob_runtime.trainjob_prefix(state.uri)
    for flag, value in [("--learner", "arl"), ("--data-uri", data.uri), ("--initial-uri", state_in.uri),
                        ("--checkpoint-uri", f"{prefix}/checkpoint"), ("--export-uri", f"{prefix}/learned")]:  # fmt: skip
        assert command[command.index(flag) + 1] == value
    assert "[metaopt] arl: outer step 2/2" in lines and any("TrainJob metaopt-job-1" in line for line in lines)
    assert json.loads((Path(learned.path) / "result.json").read_text())["steps"] == 2
    assert learned.metadata["steps"] == 2 and "best" in metrics.logged


def test_a_failed_trainjob_fails_the_step():
    from datetime import datetime
    from unittest import mock

    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.types.types import TrainJob

    from components import trainjob_client as trainjob

    client = mock.create_autospec(TrainerClient, instance=True)
    client.train.return_value = "metaopt-job-2"
    client.get_job_logs.return_value = iter([])
    client.wait_for_job_status.return_value = TrainJob("metaopt-job-2", None, [], 1, datetime.now(), status=trainjob.FAILED)
    request = trainjob.TrainJobRequest("image", 1, 2, trainjob.resources_per_node(2, False), ["torchrun"])
    with pytest.raises(trainjob.TrainJobFailed, match="metaopt-job-2: Failed"):
        trainjob.run_trainjob(client, request, echo=lambda line: None)
    with pytest.raises(ValueError, match="multiple of the node count"):
        trainjob.split_workers(6, 4)


def test_the_paper_itl_pipeline_has_one_trainjob_step_and_stays_small(tmp_path):
    from metaopt_core.config import read_config
    from pipelines.builder import PipelineOptions, compile_pipeline

    config = read_config(ROOT / "configs" / "itl-paper.yaml", algorithm="itl")
    assert config["outer"]["steps"] == 200
    path = compile_pipeline("itl", tmp_path / "itl.yaml", PipelineOptions(gpu=True, workers=6), config)
    spec = next(yaml.safe_load_all(path.read_text()))
    assert path.stat().st_size < 100_000
    executors = spec["deploymentSpec"]["executors"]
    train = [name for name in executors if "meta-train" in name]
    assert len(train) == 1 and not any(key.startswith(("exec-ask", "exec-evaluate", "exec-tell", "exec-run-block")) for key in executors)
    assert "trainjob_runtime.meta_train" in json.dumps(executors[train[0]])


@pytest.mark.slow
def test_the_workers_command_takes_meta_test_settings_and_refuses_bad_counts(tmp_path, monkeypatch, capsys):
    """``metaopt run itl --local --workers 2`` prepares what the meta-test holds out from
    ``--meta-test`` (it used to ignore it and fail on ITL's empty ``held_out``), and a worker
    count below 1 is refused by the argument parser, before any work."""
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit) as stopped:
            main(["run", "itl", "--local", "--workers", bad])
        assert stopped.value.code == 2 and "argument --workers" in capsys.readouterr().err
    assert not (tmp_path / ".metaopt").exists()

    config = str(Path(__file__).resolve().parents[1] / "configs" / "itl-tiny.yaml")
    assert main(["run", "itl", "--local", "--workers", "2", "--config", config, "--meta-test", "held_out=[rot90]"]) == 0
    (run,) = (tmp_path / ".metaopt" / "distributed").glob("itl-*")
    inputs = json.loads((run / "data" / "inputs.json").read_text())
    assert inputs["meta_test_settings"]["held_out"] == ["rot90"] and (run / "learned" / "loss.json").exists()
