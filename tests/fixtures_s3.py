"""A real S3-speaking server for tests: moto in server mode, in its own process.

Reusable by any test that needs S3 (storage, the MLflow artifact store, pipelines):

    from tests.fixtures_s3 import moto_server_url, s3_endpoint  # noqa: F401  (fixtures)

    def test_something(s3_endpoint):
        s3_endpoint.url            # "http://127.0.0.1:<port>"
        s3_endpoint.bucket         # a fresh, empty bucket for this test
        s3_endpoint.env            # AWS_*, S3_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL
        s3_endpoint.uri("a/b")     # "s3://<bucket>/a/b"

``s3_endpoint`` already puts ``env`` into ``os.environ`` (monkeypatch) for the test; a
subprocess such as ``mlflow server`` gets it with ``env={**os.environ, **s3_endpoint.env}``.
The credentials are fake and distinctive, so tests can assert they never leak.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

FAKE_ACCESS_KEY_ID = "AKIAMETAOPTFAKE0KEY1"
FAKE_SECRET_ACCESS_KEY = "metaopt-fake-secret-9Qz7-must-never-be-printed"
FAKE_SESSION_TOKEN = "metaopt-fake-session-token-Lw3x-must-never-be-printed"
REGION = "us-east-1"

# Variables that would point boto3 elsewhere or change retry/transfer behaviour.
_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
    "METAOPT_S3_MAX_ATTEMPTS",
    "METAOPT_S3_MULTIPART_THRESHOLD_MB",
    "METAOPT_S3_MULTIPART_CHUNKSIZE_MB",
)


@dataclass(frozen=True)
class S3Endpoint:
    """Connection facts for the test S3 server and one bucket on it."""

    url: str
    bucket: str
    region: str = REGION
    access_key_id: str = field(default=FAKE_ACCESS_KEY_ID, repr=False)
    secret_access_key: str = field(default=FAKE_SECRET_ACCESS_KEY, repr=False)
    session_token: str = field(default=FAKE_SESSION_TOKEN, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, metaopt storage and MLflow at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            **({"AWS_SESSION_TOKEN": self.session_token} if self.session_token else {}),
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "S3_ENDPOINT_URL": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
            # Keep a developer's ~/.aws out of the picture.
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
        }

    def uri(self, key: str = "") -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key}"

    def client(self):
        """A plain boto3 client for setting up and inspecting state, independent of metaopt."""
        return _admin_client(self.url, self.region, self.access_key_id, self.secret_access_key, self.session_token)


@functools.lru_cache(maxsize=4)
def _admin_client(url: str, region: str, access_key_id: str, secret: str, token: str):
    # Cached: creating a boto3 client costs ~0.3 s of CPU, once per test adds up.
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret,
        aws_session_token=token or None,
        config=Config(s3={"addressing_style": "path"}),
    )


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                raise RuntimeError(f"moto server exited with {process.returncode}:\n{log.read()[-4000:]}")
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {url} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def _moto_server() -> Iterator[str]:
    """``python -m moto.server`` on a free port, stopped afterwards."""
    pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w+", prefix="moto-server-", suffix=".log", delete=False) as log:
        log_path = log.name
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_until_answering(url, process, log_path, timeout_s=60)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        os.unlink(log_path)


@pytest.fixture(scope="session")
def moto_server_url() -> Iterator[str]:
    """Start ``python -m moto.server`` on a free port (no authentication); yield its URL; stop it afterwards."""
    with _moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[S3Endpoint]:
    """A second moto server with authentication on, like a real S3 or MinIO: requests must be
    signed with an access key moto's IAM knows (an IAM user allowed ``s3:*``) and its secret; a
    wrong secret is ``SignatureDoesNotMatch``, an unknown key ``InvalidAccessKeyId``. Yields the
    endpoint with that user's credentials (no session token) and a bucket on it."""
    import boto3

    with _moto_server() as url:
        admin = {"endpoint_url": url, "region_name": REGION, "aws_access_key_id": FAKE_ACCESS_KEY_ID, "aws_secret_access_key": FAKE_SECRET_ACCESS_KEY}
        iam = boto3.session.Session().client("iam", **admin)
        iam.create_user(UserName="metaopt-test")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="metaopt-test", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="metaopt-test")["AccessKey"]
        bucket = f"auth-{uuid.uuid4().hex[:12]}"
        boto3.session.Session().client("s3", **admin).create_bucket(Bucket=bucket)
        # from now on every request is authenticated (moto's documented switch: INITIAL_NO_AUTH_ACTION_COUNT)
        reset = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(reset, timeout=10).close()
        yield S3Endpoint(url=url, bucket=bucket, access_key_id=key["AccessKeyId"], secret_access_key=key["SecretAccessKey"], session_token="")


@pytest.fixture
def s3_endpoint(moto_server_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """A fresh bucket on the moto server, with the AWS/S3/MLflow variables set for the test."""
    endpoint = S3Endpoint(url=moto_server_url, bucket=f"test-{uuid.uuid4().hex[:20]}")
    for name in _ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in endpoint.env.items():
        monkeypatch.setenv(name, value)
    endpoint.client().create_bucket(Bucket=endpoint.bucket)
    _forget_storage_clients()
    yield endpoint
    _forget_storage_clients()


@pytest.fixture
def s3_auth_endpoint(s3_auth_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """The authenticating server's endpoint, with its user's credentials in the environment."""
    for name in (*_ENV_TO_CLEAR, "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_auth_server.env.items():
        monkeypatch.setenv(name, value)
    _forget_storage_clients()
    yield s3_auth_server
    _forget_storage_clients()


def _forget_storage_clients() -> None:
    # Cached clients hold the credentials they were created with.
    try:
        from metaopt_core.mlops import storage
    except ImportError:
        return
    storage.clear_client_cache()
