"""Runs own their files, and kills lose nothing.

- Two ``metaopt run`` started in the same second with different ``--set`` overrides each record
  (and so train with) their own configuration.
- SIGTERM stops a run's steps with it and ends its MLflow run KILLED, with a note.
- ``kill -9`` of a run (``METAOPT_FAULT``, :mod:`metaopt_core.faults`: SIGKILL of the whole run at a
  named point) in meta-training, in the meta-test and in registration: the next run of the same
  data and configuration ends the dead run's MLflow run KILLED with a note, resumes meta-training
  from its last checkpoint (no outer step taken twice), and reuses the version the dead run
  registered (no duplicate, no registered model without a version).

The CLI runs are real local pipelines (kfp.local, one subprocess per step); the meta-test and
registration kills drive the same component functions in one process per run, which is what
each kfp.local step calls, without the per-step interpreter start-up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from metaopt_core.mlops.tracking import OWNER_ENV
from tests.fixtures_mlflow import mlflow_server  # noqa: F401  (the session server)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "metamd-tiny.yaml"
META_TEST = ["--meta-test", "seeds=3", "--meta-test", "lr_grid=[0.1]"]
pytestmark = pytest.mark.slow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(uri: str, model: str) -> list:
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`metaopt.model_name` = '{model}'", order_by=["attributes.start_time ASC"])


def _env(uri: str, fault: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "METAOPT_FAULT"))}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri, **({"METAOPT_FAULT": fault} if fault else {}))
    return env


def _metaopt(args: list[str], cwd: Path, uri: str, fault: str = "", second: str = "") -> subprocess.Popen:
    """``metaopt ARGS`` in its own session (a fault kills the run's process group, not pytest).
    ``second``: the local runner's clock reads that second (``YYYYmmdd-HHMMSS``) whenever it asks,
    so that two runs started together surely start "in the same second"."""
    code = ("import sys, time\nsecond, strftime = sys.argv[1], time.strftime\n"
            "time.strftime = lambda fmt, *at: second if second and fmt == '%Y%m%d-%H%M%S' else strftime(fmt, *at)\n"
            "from pipelines.cli import main\nsys.exit(main(sys.argv[2:]))\n")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code, second, *args], cwd=cwd, env=_env(uri, fault), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def _stop_when(run: subprocess.Popen, marker: str, lines: list[str]) -> threading.Thread:
    """Collect ``run``'s output; send SIGTERM to the runner alone (not its steps) once ``marker`` shows."""

    def follow() -> None:
        for line in run.stdout:
            lines.append(line)
            if marker in line:
                os.kill(run.pid, signal.SIGTERM)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def _processes_with(text: str) -> list[int]:
    """Processes whose environment holds ``text``."""
    found = []
    for entry in (e for e in os.listdir("/proc") if e.isdigit()):
        try:
            if text.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_concurrent_runs_keep_their_config_and_a_killed_run_resumes(mlflow_server, tmp_path):
    model = f"killed-{uuid.uuid4().hex[:6]}"
    args = ["run", "metamd", "--config", str(TINY), "--model-name", model, "--blocks", "1", "--promotion-margin", "1.0", *META_TEST]
    # two runs started in the same second with different overrides: one stopped by SIGTERM once it took
    # its outer step, the other killed (kill -9) right after its first outer step
    second = time.strftime("%Y%m%d-%H%M%S")
    stopped = _metaopt([*args, "--set", "outer.steps=1"], tmp_path, mlflow_server, "", second)
    killed = _metaopt([*args, "--set", "outer.steps=2"], tmp_path, mlflow_server, "outer-step-1", second)
    lines: list[str] = []
    follower = _stop_when(stopped, "step 1/1", lines)
    out = killed.communicate(timeout=600)[0]
    stopped.wait(timeout=600)
    follower.join(timeout=60)
    assert killed.returncode == -signal.SIGKILL, out
    assert stopped.returncode == 130 and "metaopt: stopped by SIGTERM" in "".join(lines), "".join(lines)
    time.sleep(2)
    assert not _processes_with(f"{OWNER_ENV}={socket.gethostname()}:{stopped.pid}:")  # no step outlives its runner

    runs = {run.data.params["outer.steps"]: run for run in _runs(mlflow_server, model)}
    assert sorted(runs) == ["1", "2"], out  # each recorded (and so trained with) its own configuration
    configs = sorted(json.loads(path.read_text())["outer"]["steps"] for path in (tmp_path / ".metaopt" / "runs").glob("metamd-*/config.json"))
    assert configs == [1, 2] and len(list((tmp_path / ".metaopt" / "logs").glob("metamd-*.log"))) == 2
    assert runs["1"].info.status == "KILLED" and "was stopped (stopped by SIGTERM)" in runs["1"].data.tags["mlflow.note.content"]
    dead = runs["2"]
    assert dead.info.status == "RUNNING"  # what a kill -9 used to leave for ever
    assert [m.step for m in _client(mlflow_server).get_metric_history(dead.info.run_id, "objective")] == [1]

    again = _metaopt([*args, "--set", "outer.steps=2"], tmp_path, mlflow_server)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert f"MLflow run {dead.info.run_id} was left RUNNING by a runner that is gone" in out
    assert "resuming meta-training at outer step 1" in out and "outer step 2/2:" in out and "outer step 1/2:" not in out
    ended = _client(mlflow_server).get_run(dead.info.run_id)
    assert ended.info.status == "KILLED" and "the local runner that owned this run" in ended.data.tags["mlflow.note.content"]
    (finished,) = [run for run in _runs(mlflow_server, model) if run.info.run_id not in {r.info.run_id for r in runs.values()}]
    assert finished.info.status == "FINISHED"
    # no step taken twice (the output has no "step 1/2"), and the new run's curve is whole: step 1 as the killed run recorded it
    history = {m.step: m.value for m in _client(mlflow_server).get_metric_history(finished.info.run_id, "objective")}
    assert sorted(history) == [1, 2]
    assert history[1] == _client(mlflow_server).get_metric_history(dead.info.run_id, "objective")[0].value
    assert [v.version for v in _client(mlflow_server).search_model_versions(f"name='{model}'")] == ["1"]
    assert len(list((tmp_path / ".metaopt" / "checkpoints").glob("metamd-*.lock"))) == 1  # the finished one's checkpoint is gone


# ----------------------------------------------------------------------------- the same steps, one process per run

DRIVER = """
import json, os, sys
from pathlib import Path

class Artifact:  # what a KFP artifact offers the component functions
    def __init__(self, path):
        self.path, self.metadata = str(path), {}
    def log_metric(self, key, value):
        pass

from components import lineage, outer_steps, runtime
from components.resume import CHECKPOINT_ROOT_ENV
from metaopt_core.mlops.tracking import OWNER_ENV, end_stale_runs, owner_token

work, model, kfp_run = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
settings = {"seeds": 3, "lr_grid": [0.1]}
# what the local runner sets for its steps (pipelines/local.py), then the pipeline's steps in order
os.environ.update({CHECKPOINT_ROOT_ENV: str(work / "checkpoints"), OWNER_ENV: owner_token()})
ended = end_stale_runs(model)
step = lambda name: Artifact(work / kfp_run / name)
data, state, learned = step("data"), step("state"), step("learned")
fingerprint, config, _ = runtime.prepare_data("metamd", {}, sys.argv[4], data, settings)
run_id, _, _ = lineage.start_tracking("metamd", config, data, fingerprint, "metaopt", model, kfp_run, kfp_run)
outer_steps.init_state("metamd", config, data.path, "", 0, step("initial"))
outer_steps.run_block("metamd", config, data.path, step("initial").path, run_id, 0, 1, "", state, learned, None)
gate = step("gate")
scores, metric, greater = runtime.meta_test("metamd", config, data.path, learned.path, run_id, settings, "", step("report"), step("plots"), None, model, gate)
runtime.register_and_promote("metamd", config, learned.path, fingerprint, run_id, model, scores, metric, greater, 1.0, step("registration"),
                             gate.path, kfp_run, None)
lineage.finish_tracking("SUCCEEDED", kfp_run)
print(json.dumps({"ended": [e["run_id"] for e in ended], "run_id": run_id}))
"""


def _drive(work: Path, model: str, uri: str, fault: str = "") -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", DRIVER, str(work), model, uuid.uuid4().hex[:8], str(TINY)], cwd=work, env=_env(uri, fault),
                          capture_output=True, text=True, timeout=600, start_new_session=True)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_kills_in_meta_test_and_registration_lose_nothing(mlflow_server, tmp_path):
    model = f"kills-{uuid.uuid4().hex[:6]}"
    client = _client(mlflow_server)
    versions = lambda: sorted(v.version for v in client.search_model_versions(f"name='{model}'"))  # noqa: E731

    code, out = _drive(tmp_path, model, mlflow_server, fault="meta-test")  # meta-training done, meta-test starts: killed
    assert code == -signal.SIGKILL and "outer step 2/2:" in out, out
    code, out = _drive(tmp_path, model, mlflow_server, fault="register-model")  # the registered model exists, no version yet
    assert code == -signal.SIGKILL and "resuming meta-training at outer step 2" in out and "outer step 1/2:" not in out and "outer step 2/2:" not in out, out
    assert versions() == []
    code, out = _drive(tmp_path, model, mlflow_server, fault="register-version")  # the version exists, no gate decision yet
    assert code == -signal.SIGKILL and versions() == ["1"], out
    code, out = _drive(tmp_path, model, mlflow_server)
    assert code == 0, out
    assert f"models:/{model}/1 was registered for this data and configuration by MLflow run" in out and "reusing it" in out
    assert versions() == ["1"]  # no duplicate
    assert client.get_model_version(model, "1").tags["metaopt.gate.decision"] in ("promoted", "rejected")  # the decision, recorded once
    runs = _runs(mlflow_server, model)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "KILLED", "FINISHED"]
    assert json.loads(out.strip().splitlines()[-1])["ended"] == [runs[2].info.run_id]  # each run ended its dead predecessor
    assert all("is gone" in r.data.tags["mlflow.note.content"] for r in runs[:3])
