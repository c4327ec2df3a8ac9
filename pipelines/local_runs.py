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
import signal
import threading
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


class RunInterrupted(KeyboardInterrupt):
    """The local runner was stopped by a signal; the steps it started were stopped too."""


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux ``/proc``; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def stop_steps_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, ``docker stop``, systemd) stops the step processes
    this runner started, which would otherwise outlive it and keep writing to the run, and raises
    :class:`RunInterrupted` so the runner can end its MLflow run. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        for pid in descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def store_first_use(tracking_uri: str) -> Iterator[None]:
    """Hold a lock beside a local SQLite store while the block opens it: two runs started at once on
    a new ``mlflow.db`` would both create its tables, and MLflow's migrations race ("No such index")."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import urllib.parse

    path = Path(urllib.parse.urlparse(tracking_uri).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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


__all__ = ["KEEP_RUNS", "LOCK_FILE", "RunFiles", "RunInterrupted", "STATE_DIR", "descendants", "prune_runs", "run_files", "run_key",
           "stop_steps_on_sigterm", "store_first_use"]  # fmt: skip
