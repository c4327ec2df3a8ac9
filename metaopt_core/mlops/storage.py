"""Byte storage at local paths, ``file://`` URIs and ``s3://bucket/key`` URIs.

One small API for every place that persists something (checkpoints, meta-training states,
datasets, exported losses), so that the same code runs on a laptop (plain paths), in
``kfp.local`` (``file://``) and on a cluster (S3 or MinIO)::

    write_bytes("s3://metaopt/runs/42/state.json", payload)
    data = read_bytes("/tmp/runs/42/state.json")
    write_json("file:///tmp/cfg.json", {"lr": 0.1})

Configuration (read from the environment on every call, so tests and pods can change it):

- credentials: the standard AWS chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, shared config files, IRSA web identity, ...). This module never reads,
  stores or prints the key values itself; boto3 resolves them.
- endpoint: ``S3_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL`` (MinIO, moto, Ceph ...). With
  a custom endpoint the client uses path-style addressing (``http://host:9000/bucket/key``),
  which S3-compatible servers need because their buckets have no DNS names.
- region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``us-east-1``.
- ``METAOPT_S3_MAX_ATTEMPTS`` (default 5): total attempts per request under botocore's
  *standard* retry mode (exponential backoff with jitter on throttling, 5xx and connection
  errors).
- ``METAOPT_S3_MULTIPART_THRESHOLD_MB`` (default 8) and ``METAOPT_S3_MULTIPART_CHUNKSIZE_MB``
  (default 8, at least 5 as S3 requires): above the threshold, uploads go through a multipart
  upload and downloads through parallel ranged GETs.

Atomicity (a reader never sees half a file):

- local writes go to a temporary file in the destination directory, are flushed and fsynced,
  then renamed over the destination with ``os.replace``, which POSIX guarantees to be atomic
  within one file system. A concurrent reader opens either the old file or the new one.
- S3 needs no such care: a single PUT and a completed multipart upload both become visible all
  at once (S3 has strong read-after-write consistency since 2020; MinIO behaves the same), and
  an interrupted multipart upload never becomes an object.

Errors: every failure is a :class:`StorageError` (an ``OSError``) whose message names the
operation, the URI and, for S3, the error code (``NoSuchBucket``, ``AccessDenied`` ...); a
missing object or path is a :class:`StorageNotFoundError`, which is also a
``FileNotFoundError``. Credentials never appear in messages, logs or reprs: botocore exceptions
are replaced (not chained) by messages built here, and any credential value that an upstream
message might echo is masked.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

__all__ = [
    "StorageError",
    "StorageNotFoundError",
    "S3Settings",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "read_json",
    "write_json",
    "upload_file",
    "download_file",
    "exists",
    "list_uris",
    "open_read",
    "delete",
    "s3_client",
    "clear_client_cache",
    "is_s3_uri",
]

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MULTIPART_THRESHOLD_MB = 8
DEFAULT_MULTIPART_CHUNKSIZE_MB = 8
# S3 rejects multipart parts below 5 MiB (except the last one).
_MIN_MULTIPART_CHUNKSIZE_MB = 5
_TEMP_SUFFIX = ".metaopt-tmp"
_STREAM_BUFFER_BYTES = _MIB

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
# Errors
# --------------------------------------------------------------------------------------------


class StorageError(OSError):
    """A storage operation failed.

    Attributes:
        uri: the URI or path the operation was about.
        operation: what was attempted (``read``, ``write``, ``list`` ...).
        code: the S3 error code (``AccessDenied``, ``NoSuchBucket`` ...), the botocore error
            class name for client-side failures, or ``None`` for local file-system errors.
    """

    def __init__(self, message: str, *, uri: str, operation: str, code: str | None = None):
        super().__init__(message)
        self.uri = uri
        self.operation = operation
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):  # keyword-only arguments need help to survive pickling
        return (_rebuild_error, (type(self), self.args[0], self.uri, self.operation, self.code))


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, bucket or path does not exist."""

    def __init__(self, message: str, *, uri: str, operation: str, code: str | None = None):
        super().__init__(message, uri=uri, operation=operation, code=code)
        self.errno = errno.ENOENT
        self.filename = uri


def _rebuild_error(cls, message, uri, operation, code):
    return cls(message, uri=uri, operation=operation, code=code)


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
                raise ValueError(
                    f"{endpoint_name}={endpoint!r} is not an endpoint URL: "
                    "expected http://host[:port] or https://host[:port]"
                )
            if parts.username or parts.password:
                # Never echo the value: it holds a password.
                raise ValueError(
                    f"{endpoint_name} must not contain credentials (user:password@); "
                    "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead"
                )
        region = (
            env.get("AWS_REGION", "").strip() or env.get("AWS_DEFAULT_REGION", "").strip()
        ) or "us-east-1"
        max_attempts = _int_env(env, "METAOPT_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, minimum=1)
        threshold_mb = _int_env(
            env, "METAOPT_S3_MULTIPART_THRESHOLD_MB", DEFAULT_MULTIPART_THRESHOLD_MB, minimum=1
        )
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
        cleaned = _SIGNATURE_RE.sub(r"\1***", _scrub(message))
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
                dirnames[:] = [
                    d for d in dirnames if d.isidentifier() and d not in ("data", "__pycache__")
                ]
                relative = os.path.relpath(dirpath, directory)
                module_prefix = root if relative == "." else root + "." + relative.replace(os.sep, ".")
                names.add(module_prefix)
                names.update(
                    f"{module_prefix}.{name[:-3]}"
                    for name in filenames
                    if name.endswith(".py") and name != "__init__.py"
                )
    names.update(
        name
        for name in list(logging.Logger.manager.loggerDict)
        if name.split(".", 1)[0] in _REDACTED_LOGGER_ROOTS
    )
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
            _known_secrets = _known_secrets | {
                value
                for value in (frozen.access_key, frozen.secret_key, frozen.token)
                if value and len(value) >= 4
            }
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
# URI parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    kind: Literal["local", "s3"]
    uri: str  # as the caller wrote it, for messages
    path: str = ""  # local file-system path
    as_file_uri: bool = False  # render local results as file:// URIs
    bucket: str = ""
    key: str = ""


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an S3 object or prefix (``s3://...``)."""
    return isinstance(uri, str) and uri.lower().startswith("s3://")


def _parse(uri: str | os.PathLike[str], *, argument: str = "uri", need_key: bool = True) -> _Location:
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise TypeError(
            f"{argument} must be a str or os.PathLike (a path, file:// or s3:// URI), "
            f"got {type(uri).__name__}"
        )
    if not uri:
        raise ValueError(f"{argument} is empty; expected a path, file:// URI or s3:// URI")
    if is_s3_uri(uri):
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{argument}={uri!r} has no bucket name; expected s3://bucket/key")
        if need_key and (not key or key.endswith("/")):
            raise ValueError(
                f"{argument}={uri!r} names a bucket or prefix, not an object; "
                "expected s3://bucket/key with a non-empty key not ending in '/'"
            )
        return _Location(kind="s3", uri=uri, bucket=bucket, key=key)
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{argument}={uri!r} names host {parts.netloc!r}; only local file:// URIs "
                "(file:///abs/path or file://localhost/abs/path) are supported"
            )
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"{argument}={uri!r} has no absolute path; expected file:///abs/path")
        return _Location(kind="local", uri=uri, path=path, as_file_uri=True)
    if scheme and "://" in uri:
        raise ValueError(
            f"{argument}={uri!r} has unsupported scheme {scheme!r}; "
            "allowed: plain paths, file:// URIs and s3:// URIs"
        )
    return _Location(kind="local", uri=uri, path=uri)


def _local_path_arg(path: str | os.PathLike[str], argument: str) -> str:
    location = _parse(path, argument=argument)
    if location.kind != "local":
        raise ValueError(f"{argument}={location.uri!r} must be a local path or file:// URI")
    return location.path


# --------------------------------------------------------------------------------------------
# Error translation
# --------------------------------------------------------------------------------------------


def _scrub(text: str) -> str:
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


def _translate_s3_error(exc: BaseException, operation: str, uri: str) -> StorageError:
    original = _find_botocore_error(exc) or exc
    if isinstance(original, ClientError):
        error = original.response.get("Error", {}) or {}
        metadata = original.response.get("ResponseMetadata", {}) or {}
        code = str(error.get("Code") or metadata.get("HTTPStatusCode") or "Unknown")
        status = metadata.get("HTTPStatusCode")
        detail = _scrub(str(error.get("Message") or "")).strip()
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
        cls = StorageNotFoundError if code in _NOT_FOUND_CODES else StorageError
        return cls(message, uri=uri, operation=operation, code=code)
    code = type(original).__name__
    detail = _scrub(str(original))
    return StorageError(
        f"{operation} failed for {uri}: {code}: {detail}", uri=uri, operation=operation, code=code
    )


_BOTO_FAILURES: tuple[type[BaseException], ...] = (ClientError, BotoCoreError, Boto3Error)


@contextlib.contextmanager
def _s3_errors(operation: str, uri: str) -> Iterator[None]:
    try:
        yield
    except _BOTO_FAILURES as exc:
        # `from None`: the botocore exception must not travel along in tracebacks.
        raise _translate_s3_error(exc, operation, uri) from None


@contextlib.contextmanager
def _local_errors(operation: str, uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageNotFoundError(
            f"{operation} failed for {uri}: no such file or directory"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != uri else ""),
            uri=uri,
            operation=operation,
        ) from exc
    except OSError as exc:
        raise StorageError(
            f"{operation} failed for {uri}: {exc.strerror or exc}", uri=uri, operation=operation
        ) from exc


# --------------------------------------------------------------------------------------------
# Local atomic writes
# --------------------------------------------------------------------------------------------


def _current_umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux
    # publishes it in /proc instead.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def _atomic_local_file(path: str) -> Iterator[BinaryIO]:
    """Yield a temp file beside ``path``; on success fsync it and rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=_TEMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _as_bytes(data: Any, argument: str = "data") -> bytes | memoryview:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    raise TypeError(
        f"{argument} must be bytes, bytearray or memoryview, got {type(data).__name__}"
        + ("; use write_text() for str" if isinstance(data, str) else "")
    )


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """Return the whole content of the object or file at ``uri``.

    Raises:
        StorageNotFoundError: nothing is stored at ``uri``.
        StorageError: any other failure (permissions, network, S3 error code in the message).
    """
    location = _parse(uri)
    if location.kind == "local":
        with _local_errors("read", location.uri), open(location.path, "rb") as handle:
            return handle.read()
    with _s3_errors("read", location.uri):
        response = s3_client().get_object(Bucket=location.bucket, Key=location.key)
        with contextlib.closing(response["Body"]) as body:
            data = body.read()
    logger.debug("read %d bytes from %s", len(data), location.uri)
    return data


def write_bytes(uri: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Store ``data`` at ``uri``, replacing what was there, atomically.

    Local: temp file in the same directory + ``os.replace`` (parents are created). S3: one PUT
    below the multipart threshold, a multipart upload above it; either becomes visible whole.
    """
    location = _parse(uri)
    payload = _as_bytes(data)
    if location.kind == "local":
        with _local_errors("write", location.uri), _atomic_local_file(location.path) as handle:
            handle.write(payload)
        return
    settings = S3Settings.from_env()
    with _s3_errors("write", location.uri):
        s3_client(settings).upload_fileobj(
            io.BytesIO(payload),
            location.bucket,
            location.key,
            Config=settings.transfer_config(),
        )
    logger.debug("wrote %d bytes to %s", len(payload), location.uri)


def read_text(uri: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    """Return the content at ``uri`` decoded as text."""
    return read_bytes(uri).decode(encoding)


def write_text(uri: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Store ``text`` at ``uri`` (encoded), atomically like :func:`write_bytes`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    write_bytes(uri, text.encode(encoding))


def read_json(uri: str | os.PathLike[str]) -> Any:
    """Parse the JSON document at ``uri``.

    Raises:
        ValueError: the content is not valid JSON (the message names ``uri``).
    """
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{os.fspath(uri)} does not hold valid JSON: {exc}") from exc


def write_json(uri: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Serialise ``obj`` as JSON (keys sorted, so equal objects give equal bytes) to ``uri``.

    The object is serialised before anything is written, so a value JSON cannot represent
    (``TypeError``) or a NaN (``ValueError``; JSON has no NaN) leaves the destination untouched.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False)
    write_bytes(uri, (text + "\n").encode("utf-8"))


def upload_file(local_path: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    """Copy the local file ``local_path`` to ``uri`` (S3 or local), atomically.

    Large files go to S3 as a parallel multipart upload without being read into memory.
    """
    source = _local_path_arg(local_path, "local_path")
    if not os.path.isfile(source):
        raise StorageNotFoundError(
            f"upload failed for {os.fspath(local_path)}: local_path is not an existing file",
            uri=os.fspath(local_path),
            operation="upload",
        )
    location = _parse(uri)
    if location.kind == "local":
        with _local_errors("upload", location.uri), open(source, "rb") as src, _atomic_local_file(
            location.path
        ) as dst:
            shutil.copyfileobj(src, dst, _STREAM_BUFFER_BYTES)
        return
    settings = S3Settings.from_env()
    with _s3_errors("upload", location.uri):
        s3_client(settings).upload_file(
            source, location.bucket, location.key, Config=settings.transfer_config()
        )
    logger.debug("uploaded %s to %s", source, location.uri)


def download_file(uri: str | os.PathLike[str], local_path: str | os.PathLike[str]) -> None:
    """Copy the object at ``uri`` to the local file ``local_path``, atomically.

    Parent directories of ``local_path`` are created. Large S3 objects are fetched with
    parallel ranged GETs straight to disk.
    """
    location = _parse(uri)
    destination = _local_path_arg(local_path, "local_path")
    if location.kind == "local":
        with _local_errors("download", location.uri), open(location.path, "rb") as src:
            with _atomic_local_file(destination) as dst:
                shutil.copyfileobj(src, dst, _STREAM_BUFFER_BYTES)
        return
    settings = S3Settings.from_env()
    client = s3_client(settings)
    with _local_errors("download", location.uri), _atomic_local_file(destination) as dst:
        with _s3_errors("download", location.uri):
            client.download_fileobj(
                location.bucket, location.key, dst, Config=settings.transfer_config()
            )
    logger.debug("downloaded %s to %s", location.uri, destination)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether an object (S3) or a regular file (local) exists at ``uri``.

    Directories are not objects: ``exists`` is False for a local directory, as it is for an
    S3 prefix. A missing S3 bucket also gives False.
    """
    location = _parse(uri)
    if location.kind == "local":
        return os.path.isfile(location.path)
    try:
        with _s3_errors("exists", location.uri):
            s3_client().head_object(Bucket=location.bucket, Key=location.key)
    except StorageNotFoundError:
        return False
    return True


def list_uris(prefix_uri: str | os.PathLike[str]) -> list[str]:
    """All objects/files whose URI starts with ``prefix_uri``, sorted, recursively.

    Prefix semantics are S3's on every backend: ``.../runs/1`` matches ``.../runs/1/a`` and
    ``.../runs/10/b``; end the prefix with ``/`` to list one "directory". Results are written
    in the caller's style (plain paths, ``file://`` URIs or ``s3://`` URIs). A prefix that
    matches nothing gives ``[]``; a missing bucket raises :class:`StorageNotFoundError`.
    Temporary files of in-progress atomic writes are not listed.
    """
    location = _parse(prefix_uri, argument="prefix_uri", need_key=False)
    if location.kind == "s3":
        found: list[str] = []
        with _s3_errors("list", location.uri):
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
                for item in page.get("Contents", []):
                    if not _is_temp_name(item["Key"].rsplit("/", 1)[-1]):
                        found.append(f"s3://{location.bucket}/{item['Key']}")
        return sorted(found)
    prefix = location.path
    base = os.path.dirname(prefix)
    walk_root = base or "."
    matches: list[str] = []
    with _local_errors("list", location.uri):
        for dirpath, dirnames, filenames in os.walk(walk_root):
            # Present paths relative to how the prefix was written ("a/b", not "./a/b").
            shown_dir = dirpath if base else os.path.relpath(dirpath, ".")
            shown_dir = "" if shown_dir == "." else shown_dir
            # Prune subtrees that cannot contain a match.
            dirnames[:] = sorted(
                d
                for d in dirnames
                if _could_match(os.path.join(shown_dir, d) + os.sep, prefix)
            )
            for name in filenames:
                candidate = os.path.join(shown_dir, name)
                if candidate.startswith(prefix) and not _is_temp_name(name):
                    matches.append(candidate)
    matches.sort()
    if location.as_file_uri:
        return [Path(p).as_uri() for p in matches]
    return matches


def _could_match(directory_with_sep: str, prefix: str) -> bool:
    return directory_with_sep.startswith(prefix) or prefix.startswith(directory_with_sep)


def open_read(uri: str | os.PathLike[str]) -> BinaryIO:
    """Open ``uri`` for streaming reads without loading it into memory.

    Returns a buffered, forward-only binary file object (``read``, ``readinto``, ``readline``,
    iteration) to be closed by the caller, ideally with ``with``. For S3 it streams the GET
    response body; a failure mid-stream raises :class:`StorageError`. Code that needs to seek
    (``torch.load``, ``zipfile``) should use ``io.BytesIO(read_bytes(uri))`` instead.
    """
    location = _parse(uri)
    if location.kind == "local":
        with _local_errors("open", location.uri):
            return open(location.path, "rb")
    with _s3_errors("open", location.uri):
        response = s3_client().get_object(Bucket=location.bucket, Key=location.key)
    raw = _S3RawStream(response["Body"], location.uri)
    return io.BufferedReader(raw, buffer_size=_STREAM_BUFFER_BYTES)  # type: ignore[return-value]


class _S3RawStream(io.RawIOBase):
    """Raw stream over a botocore StreamingBody that reports failures as StorageError."""

    def __init__(self, body: Any, uri: str):
        super().__init__()
        self._body = body
        self._uri = uri

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        with _s3_errors("read stream", self._uri):
            chunk = self._body.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()

    def __repr__(self) -> str:
        return f"<S3 stream {self._uri}>"


def delete(uri: str | os.PathLike[str], *, missing_ok: bool = False) -> None:
    """Delete the object or file at ``uri``.

    Raises:
        StorageNotFoundError: nothing is stored at ``uri`` and ``missing_ok`` is False. (S3's
            DELETE succeeds on missing keys, so S3 is checked with a HEAD first.)
    """
    location = _parse(uri)
    if location.kind == "local":
        try:
            with _local_errors("delete", location.uri):
                os.unlink(location.path)
        except StorageNotFoundError:
            if not missing_ok:
                raise
        return
    client = s3_client()
    if not missing_ok:
        with _s3_errors("delete", location.uri):
            client.head_object(Bucket=location.bucket, Key=location.key)
    with _s3_errors("delete", location.uri):
        client.delete_object(Bucket=location.bucket, Key=location.key)
    logger.debug("deleted %s", location.uri)
