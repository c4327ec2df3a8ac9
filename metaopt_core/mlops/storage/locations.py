"""Parsing what the storage API is given (plain paths, ``file://`` and ``s3://`` URIs) into a
``Location``, and turning local file-system errors into ``StorageError``."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from metaopt_core.mlops.storage.errors import StorageError, StorageNotFoundError


@dataclass(frozen=True)
class Location:
    """Where a URI points: a local path or an S3 bucket and key."""

    kind: Literal["local", "s3"]
    uri: str  # as the caller wrote it, for messages
    path: str = ""  # local file-system path
    as_file_uri: bool = False  # render local results as file:// URIs
    bucket: str = ""
    key: str = ""


# S3's (and MinIO's) rule for bucket names: 3-63 lowercase letters, digits, '.' and '-', starting
# and ending with a letter or digit. Checked before any request: botocore's own check answers with
# a regex, and an endpoint with a confusing error code.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_bucket_name(bucket: str, uri: str, argument: str = "uri") -> str:
    """``bucket`` if it is a valid S3 bucket name, else a ``ValueError`` naming it and the rule."""
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"{argument}={uri!r}: bucket name {bucket!r} is not valid; allowed: 3-63 lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return bucket


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an S3 object or prefix (``s3://...``)."""
    return isinstance(uri, str) and uri.lower().startswith("s3://")


def parse_location(uri: str | os.PathLike[str], *, argument: str = "uri", need_key: bool = True) -> Location:
    """Parse a path, ``file://`` or ``s3://`` URI; errors name ``argument``. ``need_key``: an S3 object, not a prefix."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise TypeError(f"{argument} must be a str or os.PathLike (a path, file:// or s3:// URI), got {type(uri).__name__}")
    if not uri:
        raise ValueError(f"{argument} is empty; expected a path, file:// URI or s3:// URI")
    if is_s3_uri(uri):
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{argument}={uri!r} has no bucket name; expected s3://bucket/key")
        check_bucket_name(bucket, uri, argument)
        if need_key and (not key or key.endswith("/")):
            raise ValueError(f"{argument}={uri!r} names a bucket or prefix, not an object; expected s3://bucket/key with a non-empty key not ending in '/'")
        return Location(kind="s3", uri=uri, bucket=bucket, key=key)
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{argument}={uri!r} names host {parts.netloc!r}; only local file:// URIs (file:///abs/path or file://localhost/abs/path) are supported"
            )
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"{argument}={uri!r} has no absolute path; expected file:///abs/path")
        return Location(kind="local", uri=uri, path=path, as_file_uri=True)
    if scheme and "://" in uri:
        raise ValueError(f"{argument}={uri!r} has unsupported scheme {scheme!r}; allowed: plain paths, file:// URIs and s3:// URIs")
    return Location(kind="local", uri=uri, path=uri)


def local_path_arg(path: str | os.PathLike[str], argument: str) -> str:
    """The file-system path of a local path or ``file://`` URI (``ValueError`` for S3)."""
    location = parse_location(path, argument=argument)
    if location.kind != "local":
        raise ValueError(f"{argument}={location.uri!r} must be a local path or file:// URI")
    return location.path


@contextlib.contextmanager
def local_errors(operation: str, uri: str) -> Iterator[None]:
    """Turn ``OSError`` inside the block into ``StorageError`` (``StorageNotFoundError`` for ENOENT)."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageNotFoundError(
            f"{operation} failed for {uri}: no such file or directory" + (f" ({exc.filename})" if exc.filename and str(exc.filename) != uri else ""),
            uri=uri,
            operation=operation,
        ) from exc
    except OSError as exc:
        raise StorageError(f"{operation} failed for {uri}: {exc.strerror or exc}", uri=uri, operation=operation) from exc


__all__ = ["Location", "check_bucket_name", "is_s3_uri", "local_errors", "local_path_arg", "parse_location"]
