"""Where runs go and how we reach it: the tracking URI (argument, ``MLFLOW_TRACKING_URI``, or the
embedded ``sqlite:///<cwd>/mlflow.db``), a bounded ``/health`` probe of an HTTP server, the
``MlflowClient``, experiments, and the git commit recorded as provenance."""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "metaopt"
DB_FILE = "mlflow.db"

# Tag keys shared with the registry (provenance of a registered loss / optimiser).
TAG_FINGERPRINT = "metaopt.data_fingerprint"
TAG_GIT_COMMIT = "metaopt.git_commit"
TAG_ALGORITHM = "metaopt.algorithm"


class TrackingServerUnreachable(ConnectionError):
    """The MLflow tracking server at a URI did not answer (after bounded retries)."""


def default_tracking_uri(cwd: str | os.PathLike[str] | None = None) -> str:
    """The embedded store: ``sqlite:///<cwd>/mlflow.db`` (absolute, so a later ``chdir`` is harmless)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / DB_FILE).resolve()}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    if tracking_uri is not None:
        if not isinstance(tracking_uri, str) or not tracking_uri.strip():
            raise ValueError(f"tracking_uri: got {tracking_uri!r}; allowed: a non-empty URI string or None")
        return tracking_uri.strip()
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return from_env or default_tracking_uri()


def is_http_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


_health_ok: dict[str, float] = {}  # uri -> monotonic time of the last successful probe
_health_lock = threading.Lock()
_HEALTH_CACHE_S = 30.0


def ensure_reachable(uri: str, *, attempts: int = 3, timeout_s: float = 2.0, backoff_s: float = 0.5) -> None:
    """Probe ``<uri>/health`` of an HTTP tracking server; raise :class:`TrackingServerUnreachable` if
    no attempt gets an HTTP answer. Non-HTTP URIs (SQLite, files) pass. Worst case: about
    ``attempts * timeout_s + backoff_s * (2 ** (attempts - 1) - 1)`` seconds.

    Any HTTP status other than 502/503/504 counts as reachable (a 401 from an auth proxy means the
    server is there; the real request will report the auth problem).
    """
    if not is_http_uri(uri):
        return
    if attempts < 1:
        raise ValueError(f"attempts: got {attempts!r}; allowed: an int >= 1")
    with _health_lock:
        last = _health_ok.get(uri)
    if last is not None and time.monotonic() - last < _HEALTH_CACHE_S:
        return
    url = uri.rstrip("/") + "/health"
    problem = "no attempt made"
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            urllib.request.urlopen(url, timeout=timeout_s).close()
        except urllib.error.HTTPError as exc:
            if exc.code not in (502, 503, 504):
                break
            problem = f"HTTP {exc.code} from {url}"
        except (OSError, ValueError) as exc:  # URLError, ConnectionRefused, timeouts, bad URL
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError) or isinstance(exc, ssl.SSLError):
                break  # it answered TLS; certificates are MLflow's business (MLFLOW_TRACKING_INSECURE_TLS ...)
            problem = f"{type(exc).__name__}: {reason}"
        else:
            break
    else:
        raise TrackingServerUnreachable(
            f"MLflow tracking server at {uri} is unreachable ({problem}; {attempts} attempts, "
            f"{timeout_s:g} s timeout each). Check MLFLOW_TRACKING_URI / --tracking-uri and that the "
            "server is running."
        )
    with _health_lock:
        _health_ok[uri] = time.monotonic()


def connect(tracking_uri: str | None = None, *, check: bool = True) -> MlflowClient:
    """Resolve the tracking URI, probe it (HTTP only), make it MLflow's current URI and return a client.

    MLflow's registry/artifact helpers (``mlflow.artifacts``, ``log_model``) read the process-wide
    tracking URI, so it is set here every time rather than once at import.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if check:
        ensure_reachable(uri)
    if mlflow.get_tracking_uri() != uri or os.environ.get("MLFLOW_TRACKING_URI") != uri:
        mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Experiment id for ``name``, creating it if needed (restoring it if it was deleted)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException as exc:
            # another process created it between the two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The checked-out commit (``GIT_COMMIT`` / ``METAOPT_GIT_COMMIT`` env first, for containers
    built without ``.git``), or None when unknown."""
    for name in ("METAOPT_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(name):
            return os.environ[name]
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=str(cwd) if cwd else str(Path(__file__).resolve().parent),
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


__all__ = [
    "DB_FILE",
    "DEFAULT_EXPERIMENT",
    "TAG_ALGORITHM",
    "TAG_FINGERPRINT",
    "TAG_GIT_COMMIT",
    "TrackingServerUnreachable",
    "connect",
    "default_tracking_uri",
    "ensure_reachable",
    "get_or_create_experiment",
    "git_commit",
    "is_http_uri",
    "resolve_tracking_uri",
]
