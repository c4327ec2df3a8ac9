"""A real MLflow tracking server for tests: ``mlflow server`` in its own process, one per session.

    from tests.fixtures_mlflow import mlflow_server  # noqa: F401  (fixture)

    def test_something(mlflow_server):
        mlflow_server                         # "http://127.0.0.1:<port>" (a str)
        mlflow_server.artifacts_destination   # where the server keeps artifacts (a directory or s3:// URI)
        mlflow_server.backend_store_uri       # postgresql://...@127.0.0.1:<port>/mlflow_local

The backend store is PostgreSQL, what infra/ deploys: one throwaway cluster per session
(``tests.fixtures_postgres``), one database per server. Where the PostgreSQL binaries are absent
the servers fall back to SQLite with a warning saying so, and tests that need PostgreSQL skip
(``requires_postgres``). The server proxies artifacts
(``--serve-artifacts``): clients talk HTTP only, the server reads and writes the artifact store.
``mlflow_server_s3`` is the same with the artifact destination on the moto S3 server of
``tests.fixtures_s3`` (the server process gets the fake AWS credentials; clients never need them).

``reset_mlflow_uri`` (import it too, it is autouse) makes every test start with no process-wide
MLflow tracking URI, so nothing leaks from one test to the next.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures_postgres import postgres_cluster, postgres_unavailable
from tests.fixtures_s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REGION, free_port, moto_server_url  # noqa: F401

STARTUP_TIMEOUT_S = 90.0


class ServerURI(str):
    """The server's URL, with where it keeps things."""

    artifacts_destination: str
    backend_store_uri: str
    log_path: str

    def __new__(cls, url: str, artifacts_destination: str, backend_store_uri: str, log_path: str) -> ServerURI:
        obj = super().__new__(cls, url)
        obj.artifacts_destination = artifacts_destination
        obj.backend_store_uri = backend_store_uri
        obj.log_path = log_path
        return obj


def _wait_for_health(url: str, process: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{Path(log_path).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout_s:.0f} s:\n{Path(log_path).read_text()[-4000:]}")


def backend_for(kind: str, workdir: Path) -> str:
    """A fresh PostgreSQL database named after ``kind`` in the session's cluster; SQLite in ``workdir`` (with a warning) without one."""
    cluster = postgres_cluster()
    if cluster is None:
        warnings.warn(f"MLflow test server on SQLite, not PostgreSQL (the production backend): {postgres_unavailable()}", stacklevel=2)
        return f"sqlite:///{workdir / 'mlflow.db'}"
    return cluster.create_database("mlflow_" + "".join(c if c.isalnum() else "_" for c in kind.lower())[:50])


def requires_postgres(server: str) -> None:
    """Skip, saying why, unless ``server`` (a ServerURI) runs on PostgreSQL."""
    import pytest

    if not getattr(server, "backend_store_uri", "").startswith("postgresql"):
        pytest.skip(f"needs the MLflow server on PostgreSQL: {postgres_unavailable() or 'it runs on another backend'}")


def start_mlflow_server(
    workdir: Path, artifacts_destination: str | None = None, env: dict[str, str] | None = None, backend_store_uri: str | None = None
) -> tuple[ServerURI, subprocess.Popen]:
    """Start ``mlflow server`` (``backend_store_uri``, default SQLite in ``workdir``; proxied artifacts) on a free port; wait for /health."""
    workdir.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    destination = artifacts_destination or str(workdir / "artifacts")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(workdir / "server.log")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    # MLflow 3's server also starts a job runner with several huey consumer processes (GenAI
    # jobs, periodic tasks); the registry needs none of them, and they cost seconds of CPU.
    child_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    child_env["MLFLOW_BACKEND_STORE_URI"] = backend  # not an argument: a PostgreSQL URI holds a password
    child_env.update(env or {})
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command
            + [
                "server",
                "--serve-artifacts",
                "--artifacts-destination",
                destination,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=str(workdir),
        )
    try:
        _wait_for_health(url, process, log_path, STARTUP_TIMEOUT_S)
    except BaseException:
        stop_server(process)
        raise
    return ServerURI(url, destination, backend, log_path), process


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


# Test modules import these fixtures (``from tests.fixtures_mlflow import mlflow_server``), and
# pytest then holds one session fixture per importing module: without sharing, every module would
# start its own server. So servers are shared here, by kind, and stopped when the last user's
# session-scoped fixture is torn down (at the end of the session).
_shared: dict[str, list] = {}  # kind -> [ServerURI, Popen, number of fixture instances using it]


@contextlib.contextmanager
def _shared_server(kind: str, start: Callable[[], tuple[ServerURI, subprocess.Popen]]) -> Iterator[ServerURI]:
    entry = _shared.get(kind)
    if entry is None or entry[1].poll() is not None:
        uri, process = start()
        entry = _shared[kind] = [uri, process, 0]
    entry[2] += 1
    try:
        yield entry[0]
    finally:
        entry[2] -= 1
        if entry[2] == 0:
            stop_server(entry[1])
            _shared.pop(kind, None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerURI]:
    """A real ``mlflow server`` (SQLite backend, proxied local artifacts) for the whole session."""

    def start() -> tuple[ServerURI, subprocess.Popen]:
        workdir = tmp_path_factory.mktemp("mlflow-server")
        return start_mlflow_server(workdir, backend_store_uri=backend_for("local", workdir))

    with _shared_server("local", start) as uri:
        yield uri


@pytest.fixture(scope="session")
def mlflow_server_s3(tmp_path_factory: pytest.TempPathFactory, moto_server_url: str) -> Iterator[ServerURI]:  # noqa: F811
    """A real ``mlflow server`` whose proxied artifact store is a bucket on the moto S3 server."""

    def start() -> tuple[ServerURI, subprocess.Popen]:
        import boto3
        from botocore.config import Config

        bucket = f"mlflow-{uuid.uuid4().hex[:16]}"
        aws = {
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": moto_server_url,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
        }
        boto3.session.Session().client(
            "s3",
            endpoint_url=moto_server_url,
            region_name=REGION,
            aws_access_key_id=FAKE_ACCESS_KEY_ID,
            aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
            config=Config(s3={"addressing_style": "path"}),
        ).create_bucket(Bucket=bucket)
        workdir = tmp_path_factory.mktemp("mlflow-server-s3")
        return start_mlflow_server(workdir, artifacts_destination=f"s3://{bucket}/mlflow", env=aws, backend_store_uri=backend_for(f"s3_{bucket}", workdir))

    # keyed by the S3 endpoint too: each moto server instance (one per importing module) gets its own
    with _shared_server(f"s3:{moto_server_url}", start) as uri:
        yield uri


@pytest.fixture(autouse=True)
def reset_mlflow_uri() -> Iterator[None]:
    """No process-wide MLflow tracking URI before or after a test (MLflow keeps one in a global)."""
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


__all__ = ["ServerURI", "backend_for", "requires_postgres", "mlflow_server", "mlflow_server_s3", "reset_mlflow_uri", "start_mlflow_server", "stop_server"]
