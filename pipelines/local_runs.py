"""The files one local pipeline run owns, under ``<workdir>/.metaopt/``:

    runs/<key>/config.json        the configuration its steps read (a mapping, or a file with --set overrides)
    runs/<key>/summary.json       the summary its last step writes ($METAOPT_SUMMARY_FILE)
    runs/<key>/pipeline-root/     kfp.local's artifacts of its steps (prepared data, states, exports)
    logs/<key>.log                everything KFP printed
    checkpoints/<learner>-<data>-<config>/   meta-training checkpoints a later run of the same data and config resumes

``<key>`` is ``<learner>-<YYYYmmdd-HHMMSS>-<random>``: two runs started in the same second never
share a file. A run holds an exclusive lock on ``runs/<key>/.lock`` while it runs, so pruning old
run folders (the last :data:`KEEP_RUNS` per learner are kept; prepared data and states are large)
never removes the folder of a run in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

STATE_DIR = ".metaopt"
KEEP_RUNS = 3
LOCK_FILE = ".lock"


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where one local run keeps its files (all paths absolute)."""

    key: str
    directory: Path
    log: Path
    config: Path
    summary: Path
    pipeline_root: Path
    checkpoints: Path


def run_key(algorithm: str) -> str:
    """``<learner>-<YYYYmmdd-HHMMSS>-<8 hex>``: sortable by time, unique without coordination."""
    return f"{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _locked(path: Path) -> bool:
    """Whether another process holds the lock of a run folder."""
    try:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def prune_runs(state_dir: Path, algorithm: str, keep: int = KEEP_RUNS) -> list[Path]:
    """Remove the oldest run folders of ``algorithm`` beyond the newest ``keep``, except those of
    runs still in progress (locked). Returns what was removed."""
    runs_dir = Path(state_dir) / "runs"
    runs = sorted((p for p in runs_dir.glob(f"{algorithm}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    removed = []
    for stale in runs[:-keep] if keep > 0 else runs:
        if not _locked(stale / LOCK_FILE):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


@contextlib.contextmanager
def run_files(workdir: Path, algorithm: str) -> Iterator[RunFiles]:
    """Create this run's folder and hold its lock for the duration of the block."""
    state_dir = Path(workdir).resolve() / STATE_DIR
    key = run_key(algorithm)
    directory = state_dir / "runs" / key
    directory.mkdir(parents=True)  # a fresh random key: exists only if something is badly wrong
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    files = RunFiles(key, directory, state_dir / "logs" / f"{key}.log", directory / "config.json", directory / "summary.json",
                     directory / "pipeline-root", state_dir / "checkpoints")  # fmt: skip
    with open(directory / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield files


__all__ = ["KEEP_RUNS", "LOCK_FILE", "RunFiles", "STATE_DIR", "prune_runs", "run_files", "run_key"]
