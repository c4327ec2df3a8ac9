"""S3 plumbing of the storage API: settings from the environment, the cached boto3 clients, the
masking of credentials (in our messages and in botocore's DEBUG logs), and the translation of
botocore failures into ``StorageError`` (replaced, not chained, so no credential travels along)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from metaopt_core.mlops.storage.errors import StorageError, StorageNotFoundError

logger = logging.getLogger("metaopt_core.mlops.storage")

_MIB = 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MULTIPART_THRESHOLD_MB = 8
DEFAULT_MULTIPART_CHUNKSIZE_MB = 8
# S3 rejects multipart parts below 5 MiB (except the last one).
_MIN_MULTIPART_CHUNKSIZE_MB = 5

# Error codes meaning "the thing you named is not there". HEAD requests carry no body, so
# botocore reports their 404 as the bare status code.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)


# --------------------------------------------------------------------------------------------
# Settings and clients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """Where and how to talk to S3; holds no credentials, so it is safe to log or print."""

    endpoint_url: str | None
    region: str
    max_attempts: int
    multipart_threshold: int
    multipart_chunksize: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Build settings from environment variables (see the module docstring)."""
        env = os.environ if environ is None else environ
        endpoint_name, endpoint = None, None
        for name in ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            if env.get(name, "").strip():
                endpoint_name, endpoint = name, env[name].strip()
                break
        if endpoint is not None:
            parts = urllib.parse.urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{endpoint_name}={endpoint!r} is not an endpoint URL: expected http://host[:port] or https://host[:port]")
            if parts.username or parts.password:
                # Never echo the value: it holds a password.
                raise ValueError(f"{endpoint_name} must not contain credentials (user:password@); use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
        region = (env.get("AWS_REGION", "").strip() or env.get("AWS_DEFAULT_REGION", "").strip()) or "us-east-1"
        max_attempts = _int_env(env, "METAOPT_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, minimum=1)
        threshold_mb = _int_env(env, "METAOPT_S3_MULTIPART_THRESHOLD_MB", DEFAULT_MULTIPART_THRESHOLD_MB, minimum=1)
        chunksize_mb = _int_env(
            env,
            "METAOPT_S3_MULTIPART_CHUNKSIZE_MB",
            DEFAULT_MULTIPART_CHUNKSIZE_MB,
            minimum=_MIN_MULTIPART_CHUNKSIZE_MB,
        )
        return cls(
            endpoint_url=endpoint,
            region=region,
            max_attempts=max_attempts,
            multipart_threshold=threshold_mb * _MIB,
            multipart_chunksize=chunksize_mb * _MIB,
        )

    def transfer_config(self) -> TransferConfig:
        """Managed-transfer settings: multipart above the threshold, parallel parts."""
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=4,
            use_threads=True,
        )


def _int_env(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; allowed: integers >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is too small; allowed: integers >= {minimum}")
    return value


_clients: dict[tuple[str | None, str, int], Any] = {}
_clients_lock = threading.Lock()
# Credential values seen when clients were created, masked out of any message we build.
# Replaced, never mutated, so readers (the logging filter, possibly on another thread or
# inside client creation) need no lock.
_known_secrets: frozenset[str] = frozenset()


_SIGNATURE_RE = re.compile(r"(Signature=)[0-9a-fA-F]+")
_REDACTED_LOGGER_ROOTS = ("botocore", "boto3", "s3transfer", "urllib3")
_redaction_installed = False


class _RedactCredentials(logging.Filter):
    """Mask credential values in botocore's DEBUG records.

    botocore logs request headers and canonical requests at DEBUG, which include the access
    key id and the session token; anyone switching root logging to DEBUG would leak them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        cleaned = _SIGNATURE_RE.sub(r"\1***", scrub(message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _install_log_redaction() -> None:
    """Attach the redacting filter to every logger of the AWS SDK and its HTTP stack.

    Logger filters are not inherited by child loggers, so each module logger gets one. Module
    names are taken from the package directories, so loggers of modules imported later (they
    call logging.getLogger(__name__) and get the same object) are covered too.
    """
    global _redaction_installed
    if _redaction_installed:
        return
    redactor = _RedactCredentials()
    names: set[str] = set(_REDACTED_LOGGER_ROOTS)
    for root in _REDACTED_LOGGER_ROOTS:
        try:
            package = __import__(root)
        except ImportError:
            continue
        for directory in getattr(package, "__path__", []):
            for dirpath, dirnames, filenames in os.walk(directory):
                # Skip botocore's service-model data tree and caches: no modules there.
                dirnames[:] = [d for d in dirnames if d.isidentifier() and d not in ("data", "__pycache__")]
                relative = os.path.relpath(dirpath, directory)
                module_prefix = root if relative == "." else root + "." + relative.replace(os.sep, ".")
                names.add(module_prefix)
                names.update(f"{module_prefix}.{name[:-3]}" for name in filenames if name.endswith(".py") and name != "__init__.py")
    names.update(name for name in list(logging.Logger.manager.loggerDict) if name.split(".", 1)[0] in _REDACTED_LOGGER_ROOTS)
    for name in names:
        logger_ = logging.getLogger(name)
        if not any(isinstance(f, _RedactCredentials) for f in logger_.filters):
            logger_.addFilter(redactor)
    _redaction_installed = True


def s3_client(settings: S3Settings | None = None):
    """The boto3 S3 client for ``settings`` (default: from the environment), created lazily.

    Clients are cached per (endpoint, region, max attempts) and are thread-safe.
    """
    global _known_secrets
    settings = settings or S3Settings.from_env()
    cache_key = (settings.endpoint_url, settings.region, settings.max_attempts)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is not None:
            return client
        _install_log_redaction()
        s3_options: dict[str, Any] = {}
        checksum_options: dict[str, str] = {}
        if settings.endpoint_url:
            s3_options["addressing_style"] = "path"
            # botocore >= 1.36 adds CRC checksums with aws-chunked uploads by default; many
            # S3-compatible servers (older MinIO, Ceph) reject them. Only checksum on demand.
            checksum_options = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        config = Config(
            region_name=settings.region,
            signature_version="s3v4",
            # total_max_attempts counts the first try; botocore's "max_attempts" would not.
            retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
            s3=s3_options or None,
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
            **checksum_options,
        )
        # A Session per client: boto3's default session is not safe to share across threads
        # while clients are being created.
        session = boto3.session.Session()
        credentials = session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            _known_secrets = _known_secrets | {value for value in (frozen.access_key, frozen.secret_key, frozen.token) if value and len(value) >= 4}
        client = session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=config,
        )
        _clients[cache_key] = client
        logger.debug(
            "created S3 client endpoint=%s region=%s max_attempts=%d",
            settings.endpoint_url or "<aws default>",
            settings.region,
            settings.max_attempts,
        )
        return client


def clear_client_cache() -> None:
    """Forget cached S3 clients (after credentials or endpoints change, e.g. in tests)."""
    with _clients_lock:
        _clients.clear()


# --------------------------------------------------------------------------------------------
# Error translation
# --------------------------------------------------------------------------------------------


def scrub(text: str) -> str:
    """Mask any credential value that an upstream message might contain."""
    secrets = set(_known_secrets)  # a snapshot of an immutable set
    for name in _CREDENTIAL_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            secrets.add(value)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _find_botocore_error(exc: BaseException) -> BaseException | None:
    """boto3's managed transfers wrap botocore errors; dig the original out."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ClientError, BotoCoreError)):
            return current
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__
    return None


# What to do about an S3 error code, appended to its message (the CLI prints that one line).
_WHAT_TO_DO = {
    "InvalidAccessKeyId": "the endpoint does not know this access key id: check AWS_ACCESS_KEY_ID (and that S3_ENDPOINT_URL is the server it belongs to)",
    "SignatureDoesNotMatch": "the secret key does not match the access key id: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "these credentials may not do this: check the access key's policy for this bucket",
    "InvalidToken": "the session token is not valid: refresh AWS_SESSION_TOKEN, or unset it with long-lived keys",
    "ExpiredToken": "the session token has expired: refresh AWS_SESSION_TOKEN",
    "NoSuchBucket": "create the bucket or check its name",
    "InvalidBucketName": "bucket names are 3-63 lowercase letters, digits, '.' and '-'",
}
# Client-side failures (no answer from S3): the exception class -> what it means and what to do.
_CLIENT_FAILURES = {
    "NoCredentialsError": "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run where an IAM role provides them)",
    "PartialCredentialsError": "incomplete S3 credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "could not connect to the S3 endpoint {endpoint}: check S3_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL) and that the server is running",
    "ConnectTimeoutError": "the S3 endpoint {endpoint} did not answer in time: check S3_ENDPOINT_URL and the network",
    "ReadTimeoutError": "the S3 endpoint {endpoint} stopped answering: try again, or check the server",
}


def _endpoint() -> str:
    with contextlib.suppress(ValueError):
        return S3Settings.from_env().endpoint_url or "of AWS"
    return "(S3_ENDPOINT_URL is not a valid URL)"


def _translate_s3_error(exc: BaseException, operation: str, uri: str) -> StorageError:
    original = _find_botocore_error(exc) or exc
    if isinstance(original, ClientError):
        error = original.response.get("Error", {}) or {}
        metadata = original.response.get("ResponseMetadata", {}) or {}
        code = str(error.get("Code") or metadata.get("HTTPStatusCode") or "Unknown")
        status = metadata.get("HTTPStatusCode")
        detail = scrub(str(error.get("Message") or "")).strip()
        if code == "404":
            code = "NotFound"
        what = {
            "NoSuchBucket": "the bucket does not exist",
            "NoSuchKey": "no such object",
            "NotFound": "no such object",
        }.get(code, detail)
        message = f"{operation} failed for {uri}: S3 error {code}"
        if status:
            message += f" (HTTP {status})"
        if what:
            message += f": {what}"
        if code in _WHAT_TO_DO:
            message += f"; {_WHAT_TO_DO[code]}"
        cls = StorageNotFoundError if code in _NOT_FOUND_CODES else StorageError
        return cls(message, uri=uri, operation=operation, code=code)
    code = type(original).__name__
    if code in _CLIENT_FAILURES:
        detail = _CLIENT_FAILURES[code].format(endpoint=_endpoint())
    else:  # e.g. ParamValidationError: botocore's own text, on one line
        detail = " ".join(scrub(str(original)).split())
    return StorageError(f"{operation} failed for {uri}: {code}: {detail}", uri=uri, operation=operation, code=code)


_BOTO_FAILURES: tuple[type[BaseException], ...] = (ClientError, BotoCoreError, Boto3Error)


@contextlib.contextmanager
def s3_errors(operation: str, uri: str) -> Iterator[None]:
    """Turn botocore/boto3 failures inside the block into ``StorageError`` naming ``operation`` and ``uri``."""
    try:
        yield
    except _BOTO_FAILURES as exc:
        # `from None`: the botocore exception must not travel along in tracebacks.
        raise _translate_s3_error(exc, operation, uri) from None


__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MULTIPART_CHUNKSIZE_MB",
    "DEFAULT_MULTIPART_THRESHOLD_MB",
    "S3Settings",
    "clear_client_cache",
    "s3_client",
    "s3_errors",
    "scrub",
]
