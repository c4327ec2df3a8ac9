"""The storage operations (read, write, upload, download, list, stream, delete) on local paths,
``file://`` and ``s3://`` URIs. Local writes are atomic through ``metaopt_core.files``; S3 writes
are atomic by nature (one PUT, or a multipart upload that appears whole)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from metaopt_core.files import atomic_file, is_temp_name
from metaopt_core.mlops.storage.errors import StorageNotFoundError
from metaopt_core.mlops.storage.locations import local_errors, local_path_arg, parse_location
from metaopt_core.mlops.storage.s3 import S3Settings, s3_client, s3_errors

logger = logging.getLogger("metaopt_core.mlops.storage")

STREAM_BUFFER_BYTES = 1024 * 1024


def _as_bytes(data: Any, argument: str = "data") -> bytes | memoryview:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    raise TypeError(
        f"{argument} must be bytes, bytearray or memoryview, got {type(data).__name__}" + ("; use write_text() for str" if isinstance(data, str) else "")
    )


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """Return the whole content of the object or file at ``uri``.

    Raises:
        StorageNotFoundError: nothing is stored at ``uri``.
        StorageError: any other failure (permissions, network, S3 error code in the message).
    """
    location = parse_location(uri)
    if location.kind == "local":
        with local_errors("read", location.uri), open(location.path, "rb") as handle:
            return handle.read()
    with s3_errors("read", location.uri):
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
    location = parse_location(uri)
    payload = _as_bytes(data)
    if location.kind == "local":
        with local_errors("write", location.uri), atomic_file(location.path) as handle:
            handle.write(payload)
        return
    settings = S3Settings.from_env()
    with s3_errors("write", location.uri):
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
    source = local_path_arg(local_path, "local_path")
    if not os.path.isfile(source):
        raise StorageNotFoundError(
            f"upload failed for {os.fspath(local_path)}: local_path is not an existing file",
            uri=os.fspath(local_path),
            operation="upload",
        )
    location = parse_location(uri)
    if location.kind == "local":
        with local_errors("upload", location.uri), open(source, "rb") as src, atomic_file(location.path) as dst:
            shutil.copyfileobj(src, dst, STREAM_BUFFER_BYTES)
        return
    settings = S3Settings.from_env()
    with s3_errors("upload", location.uri):
        s3_client(settings).upload_file(source, location.bucket, location.key, Config=settings.transfer_config())
    logger.debug("uploaded %s to %s", source, location.uri)


def download_file(uri: str | os.PathLike[str], local_path: str | os.PathLike[str]) -> None:
    """Copy the object at ``uri`` to the local file ``local_path``, atomically.

    Parent directories of ``local_path`` are created. Large S3 objects are fetched with
    parallel ranged GETs straight to disk.
    """
    location = parse_location(uri)
    destination = local_path_arg(local_path, "local_path")
    if location.kind == "local":
        with local_errors("download", location.uri), open(location.path, "rb") as src:
            with atomic_file(destination) as dst:
                shutil.copyfileobj(src, dst, STREAM_BUFFER_BYTES)
        return
    settings = S3Settings.from_env()
    client = s3_client(settings)
    with local_errors("download", location.uri), atomic_file(destination) as dst:
        with s3_errors("download", location.uri):
            client.download_fileobj(location.bucket, location.key, dst, Config=settings.transfer_config())
    logger.debug("downloaded %s to %s", location.uri, destination)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether an object (S3) or a regular file (local) exists at ``uri``.

    Directories are not objects: ``exists`` is False for a local directory, as it is for an
    S3 prefix. A missing S3 bucket also gives False.
    """
    location = parse_location(uri)
    if location.kind == "local":
        return os.path.isfile(location.path)
    try:
        with s3_errors("exists", location.uri):
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
    location = parse_location(prefix_uri, argument="prefix_uri", need_key=False)
    if location.kind == "s3":
        found: list[str] = []
        with s3_errors("list", location.uri):
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
                for item in page.get("Contents", []):
                    if not is_temp_name(item["Key"].rsplit("/", 1)[-1]):
                        found.append(f"s3://{location.bucket}/{item['Key']}")
        return sorted(found)
    prefix = location.path
    base = os.path.dirname(prefix)
    walk_root = base or "."
    matches: list[str] = []
    with local_errors("list", location.uri):
        for dirpath, dirnames, filenames in os.walk(walk_root):
            # Present paths relative to how the prefix was written ("a/b", not "./a/b").
            shown_dir = dirpath if base else os.path.relpath(dirpath, ".")
            shown_dir = "" if shown_dir == "." else shown_dir
            # Prune subtrees that cannot contain a match.
            dirnames[:] = sorted(d for d in dirnames if _could_match(os.path.join(shown_dir, d) + os.sep, prefix))
            for name in filenames:
                candidate = os.path.join(shown_dir, name)
                if candidate.startswith(prefix) and not is_temp_name(name):
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
    location = parse_location(uri)
    if location.kind == "local":
        with local_errors("open", location.uri):
            return open(location.path, "rb")
    with s3_errors("open", location.uri):
        response = s3_client().get_object(Bucket=location.bucket, Key=location.key)
    raw = S3ReadStream(response["Body"], location.uri)
    return io.BufferedReader(raw, buffer_size=STREAM_BUFFER_BYTES)  # type: ignore[return-value]


class S3ReadStream(io.RawIOBase):
    """Raw stream over a botocore ``StreamingBody`` (anything with ``read(n)`` and ``close()``) that
    reports failures as ``StorageError`` naming ``uri``; ``open_read`` wraps it in a buffered reader."""

    def __init__(self, body: Any, uri: str):
        super().__init__()
        self._body = body
        self._uri = uri

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        with s3_errors("read stream", self._uri):
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
    location = parse_location(uri)
    if location.kind == "local":
        try:
            with local_errors("delete", location.uri):
                os.unlink(location.path)
        except StorageNotFoundError:
            if not missing_ok:
                raise
        return
    client = s3_client()
    if not missing_ok:
        with s3_errors("delete", location.uri):
            client.head_object(Bucket=location.bucket, Key=location.key)
    with s3_errors("delete", location.uri):
        client.delete_object(Bucket=location.bucket, Key=location.key)
    logger.debug("deleted %s", location.uri)


__all__ = [
    "S3ReadStream",
    "delete",
    "download_file",
    "exists",
    "list_uris",
    "open_read",
    "read_bytes",
    "read_json",
    "read_text",
    "upload_file",
    "write_bytes",
    "write_json",
    "write_text",
]
