"""A throwaway PostgreSQL cluster for the tests: the backend infra/ gives MLflow in production.

    cluster = postgres_cluster()            # one per test session, started on first use, or None
    uri = cluster.create_database("mlflow")  # postgresql+psycopg2://metaopt:<password>@127.0.0.1:<port>/mlflow

The server binaries are Debian's (``/usr/lib/postgresql/<major>/bin``; ``.ci/run`` installs them
where absent). PostgreSQL refuses to run as root, so as root the cluster is created and run as
the ``postgres`` system user, in a temporary directory owned by it; otherwise as the current
user. It listens on 127.0.0.1 only, on a free port, with a random password (scram-sha-256), and
trades durability for speed (fsync off): it lives for one test session.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.fixtures_s3 import free_port

USER = "metaopt"


def server_binaries() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (the newest Debian cluster version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path
    port: int
    password: str = field(repr=False)
    run_as: str | None  # the system user running the server (None: this process's user)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def uri(self, database: str, driver: str = "+psycopg2") -> str:
        """SQLAlchemy's URI (psycopg2, the driver infra/'s MLflow image has); ``driver=""``: libpq's."""
        return f"postgresql{driver}://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropped first if it exists); its URI."""
        import psycopg2

        connection = psycopg2.connect(self.uri("postgres", driver=""))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.uri(name)

    def stop(self) -> None:
        if self.data_dir.exists():
            _run(self, [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(cluster: PostgresCluster, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    kwargs: dict = {"capture_output": True, "text": True, "timeout": 120, "cwd": str(cluster.root)}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    if cluster.run_as:
        entry = pwd.getpwnam(cluster.run_as)
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        env["HOME"] = str(cluster.root)
    done = subprocess.run(command, env=env, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def start_postgres() -> PostgresCluster:
    """initdb + pg_ctl start of a new cluster; raises RuntimeError when it cannot."""
    bin_dir = server_binaries()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql package (.ci/run does)")
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as") from exc
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="metaopt-pg-"))
    cluster = PostgresCluster(bin_dir, root, free_port(), secrets.token_hex(16), run_as)
    try:
        password_file = root / "pwfile"
        password_file.write_text(cluster.password + "\n")
        password_file.chmod(0o600)
        if run_as:
            entry = pwd.getpwnam(run_as)
            for path in (root, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        _run(cluster, [str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", USER, f"--pwfile={password_file}", "--auth=scram-sha-256",
                       "--encoding=UTF8", "--no-sync"])  # fmt: skip
        password_file.unlink()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {cluster.port} -c unix_socket_directories={root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _run(cluster, [str(bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start"])
    except BaseException:
        cluster.stop()
        raise
    return cluster


_cluster: list[PostgresCluster | None] = []  # started at most once per process
_failure: list[str] = []


def postgres_cluster() -> PostgresCluster | None:
    """The session's cluster, started on first use; None (with :func:`postgres_unavailable` saying why) where it cannot start."""
    if not _cluster:
        try:
            cluster = start_postgres()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _failure.append(str(exc))
            cluster = None
        else:
            atexit.register(cluster.stop)
        _cluster.append(cluster)
    return _cluster[0]


def postgres_unavailable() -> str:
    return _failure[0] if _failure else ""


__all__ = ["PostgresCluster", "postgres_cluster", "postgres_unavailable", "server_binaries", "start_postgres"]
