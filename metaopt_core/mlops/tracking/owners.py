"""Runs whose owner died: a pipeline's MLflow run stays RUNNING until its exit step ends it, so a
``kill -9`` (or SIGTERM, a crash, a reboot) of the local runner leaves it RUNNING for ever. The
local runner tags every run it starts with its owner (``metaopt.owner``: host, pid and the process's
start time, which tells a reused pid apart), and before a new run of the same model it ends the
runs whose owner is gone: status KILLED, with a note (the run's description in the MLflow UI)
saying what happened. Runs started elsewhere (a cluster, another host) carry no owner this host can
check and are left alone. A runner stopped by SIGTERM or Ctrl-C ends its own run the same way
(:func:`end_owned_runs`), after stopping the step it was running."""

from __future__ import annotations

import datetime as _dt
import os
import socket
from typing import Any

from metaopt_core.mlops.tracking.retry import call_with_retries
from metaopt_core.mlops.tracking.server import connect

TAG_OWNER = "metaopt.owner"
TAG_MODEL_NAME = "metaopt.model_name"
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
TAG_ENDED_BY = "metaopt.ended_by"
# The local runner sets it for its steps: they tag the pipeline's MLflow run with it.
OWNER_ENV = "METAOPT_OWNER"


def process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else ""


def owner_token(pid: int | None = None) -> str:
    """``host:pid:start``: who owns a run (the current process by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def owner_state(token: str) -> str:
    """``alive``, ``gone`` (this host, and that process no longer exists), or ``unknown``
    (another host, or a token this host cannot check)."""
    parts = token.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return "unknown"
    host, pid, started = parts[0], int(parts[1]), parts[2]
    if host != socket.gethostname():
        return "unknown"
    now = process_start(pid)
    if not now:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "alive"
        return "alive" if not started else "unknown"
    return "alive" if not started or now == started else "gone"  # another process now has that pid


def _end_runs(model_name: str, which: Any, note_of: Any, by: str, tracking_uri: str | None, client: Any) -> list[dict[str, str]]:
    """End KILLED, with a note, the RUNNING runs of ``model_name`` whose owner tag ``which`` accepts."""
    client = client or connect(tracking_uri)
    experiments = [e.experiment_id for e in call_with_retries(client.search_experiments)]
    quoted = model_name.replace("'", "\\'")
    query = f"attributes.status = 'RUNNING' and tags.`{TAG_MODEL_NAME}` = '{quoted}'"
    ended = []
    for start in range(0, len(experiments), 100):
        for run in call_with_retries(client.search_runs, experiments[start : start + 100], query, max_results=200):
            owner = run.data.tags.get(TAG_OWNER, "")
            if not owner or not which(owner):
                continue
            host, pid, _ = owner.rsplit(":", 2)
            when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            note = f"Ended KILLED at {when} by {by or 'metaopt'}: {note_of(host, pid)} A new run of the same data and configuration resumes meta-training from its last checkpoint."
            earlier = run.data.tags.get(TAG_NOTE, "")
            call_with_retries(client.set_tag, run.info.run_id, TAG_NOTE, f"{earlier}\n\n{note}" if earlier else note)
            call_with_retries(client.set_tag, run.info.run_id, TAG_ENDED_BY, by or "metaopt")
            call_with_retries(client.set_terminated, run.info.run_id, status="KILLED")
            ended.append({"run_id": run.info.run_id, "owner": owner, "note": note})
    return ended


def end_stale_runs(model_name: str, *, by: str = "", tracking_uri: str | None = None, client: Any = None) -> list[dict[str, str]]:
    """End the RUNNING runs of ``model_name`` whose owner process on this host is gone: KILLED,
    with a note. Returns ``[{"run_id", "owner", "note"}]`` of the runs it ended."""
    return _end_runs(model_name, lambda owner: owner_state(owner) == "gone",
                     lambda host, pid: (f"the local runner that owned this run (pid {pid} on {host}) is gone, so the run was interrupted "
                                        "(kill -9, SIGTERM, a crash or a reboot) and could not end itself."),
                     by or "a later metaopt run", tracking_uri, client)  # fmt: skip


def end_owned_runs(model_name: str, owner: str, reason: str, *, tracking_uri: str | None = None, client: Any = None) -> list[dict[str, str]]:
    """End the RUNNING runs of ``model_name`` that ``owner`` (this runner) started, as it stops
    early (``reason``: a signal, Ctrl-C): KILLED, with a note."""
    return _end_runs(model_name, lambda tag: tag == owner, lambda host, pid: f"its local runner (pid {pid} on {host}) was stopped ({reason}).",
                     "the runner itself", tracking_uri, client)  # fmt: skip


__all__ = ["OWNER_ENV", "TAG_ENDED_BY", "TAG_NOTE", "TAG_OWNER", "end_owned_runs", "end_stale_runs", "owner_state", "owner_token", "process_start"]
