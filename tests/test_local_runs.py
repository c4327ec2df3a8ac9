"""The files a local run owns (``pipelines/local_runs.py``): unique per run, never pruned while the
run is in progress, and a new SQLite store created once when several runs start on it together.
(Two whole runs started in the same second: ``tests/test_kills.py``.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.local_runs import prune_runs, run_files

ROOT = Path(__file__).resolve().parents[1]


def test_runs_in_the_same_second_get_their_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *at: "20260101-000000")  # the same second for both
    with run_files(tmp_path, "itl") as first, run_files(tmp_path, "itl") as second:
        assert first.key != second.key and first.key.startswith("itl-20260101-000000-")
        assert len({first.config, second.config, first.log, second.log, first.summary, second.summary}) == 6
        assert first.pipeline_root != second.pipeline_root and first.checkpoints == second.checkpoints  # checkpoints are shared by key


def test_pruning_keeps_runs_in_progress(tmp_path):
    with run_files(tmp_path, "arl") as running:
        finished = []
        for _ in range(4):
            with run_files(tmp_path, "arl") as done:
                finished.append(done.directory)
        os.utime(running.directory, (0, 0))  # the oldest of all
        removed = prune_runs(tmp_path / ".metaopt", "arl", keep=2)
        assert running.directory.exists() and removed == finished[:2]
    assert prune_runs(tmp_path / ".metaopt", "arl", keep=2) == [running.directory]  # finished now: pruned like the others


def test_runs_starting_together_on_a_new_sqlite_store_create_it_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys\nfrom mlflow.tracking import MlflowClient\nfrom pipelines.local_runs import store_first_use\n"
            "with store_first_use(sys.argv[1]):\n    MlflowClient(sys.argv[1]).search_experiments()\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    starts = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [start.communicate(timeout=300)[1] for start in starts]
    assert [start.returncode for start in starts] == [0, 0], errors  # without the lock: "Online migration expected to match one row"
