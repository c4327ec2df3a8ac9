"""Image-folder datasets in object storage: ``s3://bucket/prefix/`` holding ``<class>/<image>`` or
``<domain>/<class>/<image>`` (the layouts of ``metaopt_core.data.folders``).

- :func:`stage` lists the prefix with ETags and downloads only objects it has not seen into a local
  cache keyed by ETag and size (``METAOPT_DATA_CACHE``, default ``~/.cache/metaopt/objects``), with
  each file's sha256 beside it, so the content manifest (keys, sizes, sha256, ETags) costs one
  listing when nothing changed;
- :func:`push` uploads a local image folder, only the images whose bytes differ from what is there;
- :func:`describe` summarises a source (fingerprint, class counts, domains) for ``metaopt data show``.

Importing this module registers the ``s3`` fetcher with ``metaopt_core.data`` (the data package
never imports boto3); endpoint and credentials come from the environment as for
``metaopt_core.mlops.storage`` (``S3_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``, the AWS variables).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from metaopt_core.data.folders import (
    FOLDER_PREFIX,
    ContentEntry,
    FolderContent,
    file_sha256,
    folder_content,
    is_image_key,
    local_folder_content,
    register_fetcher,
)
from metaopt_core.mlops.storage.s3 import s3_client, s3_errors

SHA256_METADATA = "sha256"  # object metadata written by push: lets multipart uploads be compared too


@dataclass(frozen=True)
class RemoteObject:
    """An object under a prefix: its key relative to the prefix, size and ETag (quotes stripped)."""

    key: str
    size: int
    etag: str


@dataclass
class StageReport:
    """What staging a prefix did: its content, and how many objects were downloaded vs cached."""

    content: FolderContent
    downloaded: int = 0
    cached: int = 0


@dataclass
class PushReport:
    uploaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes_uploaded: int = 0


def split_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b/``): a folder prefix always ends with ``/``."""
    if not uri.lower().startswith("s3://"):
        raise ValueError(f"uri: got {uri!r}; expected s3://bucket/prefix/")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"uri: {uri!r} has no bucket; expected s3://bucket/prefix/")
    return bucket, (prefix.rstrip("/") + "/") if prefix.strip("/") else ""


def list_objects(uri: str) -> list[RemoteObject]:
    """Every object under the prefix ``uri`` (keys relative to it, sorted)."""
    bucket, prefix = split_prefix(uri)
    found = []
    with s3_errors("list", uri):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found.append(RemoteObject(item["Key"][len(prefix) :], int(item["Size"]), str(item.get("ETag", "")).strip('"')))
    return sorted(found, key=lambda o: o.key)


def cache_root() -> Path:
    return Path(os.environ.get("METAOPT_DATA_CACHE") or Path.home() / ".cache" / "metaopt" / "objects")


def cached_path(etag: str, size: int) -> Path:
    """Where the object with this ETag and size is cached (the same bytes under any key or bucket share it)."""
    name = hashlib.sha256(f"{etag}:{size}".encode()).hexdigest()
    return cache_root() / name[:2] / name


def _atomic_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".tmp-") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def stage(uri: str, progress: Callable[[str], None] | None = None) -> StageReport:
    """The images under ``uri``, each in the local cache (downloaded only when its ETag is new)."""
    bucket, prefix = split_prefix(uri)
    objects = [o for o in list_objects(uri) if is_image_key(o.key)]
    if not objects:
        from metaopt_core.data import DatasetNotFoundError

        raise DatasetNotFoundError(f"{uri} holds no <class>/<image> or <domain>/<class>/<image> objects; upload some with `metaopt data push DIR {uri}`")
    report = StageReport(FolderContent(uri, []))
    entries, paths = [], {}
    for obj in objects:
        path, sidecar = cached_path(obj.etag, obj.size), cached_path(obj.etag, obj.size).with_suffix(".sha256")
        if path.exists() and sidecar.exists() and path.stat().st_size == obj.size:
            report.cached += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as handle:
                partial = handle.name
            with s3_errors("download", f"s3://{bucket}/{prefix}{obj.key}"):
                s3_client().download_file(bucket, prefix + obj.key, partial)
            os.replace(partial, path)
            _atomic_text(sidecar, file_sha256(path))
            report.downloaded += 1
        entries.append(ContentEntry(obj.key, obj.size, sidecar.read_text().strip(), obj.etag))
        paths[obj.key] = path
    report.content = FolderContent(uri, entries, paths)
    if progress:
        progress(f"{uri}: {len(entries)} images, {report.downloaded} downloaded, {report.cached} from the cache")
    return report


def stage_s3_folder(uri: str) -> FolderContent:
    """The ``s3`` fetcher of ``metaopt_core.data.folders``."""
    return stage(uri).content


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unchanged(entry: ContentEntry, path: Path, remote: RemoteObject | None, bucket: str, key: str) -> bool:
    if remote is None or remote.size != entry.size:
        return False
    if "-" not in remote.etag:  # a single-part upload's ETag is the MD5 of its bytes
        return remote.etag == _md5(path)
    with s3_errors("head", f"s3://{bucket}/{key}"):  # multipart: compare the sha256 push recorded
        head = s3_client().head_object(Bucket=bucket, Key=key)
    return head.get("Metadata", {}).get(SHA256_METADATA) == entry.sha256


def push(directory: str | Path, uri: str, progress: bool = True) -> PushReport:
    """Upload the images of a local folder to the prefix ``uri``, skipping those already there
    with the same bytes; a progress bar (bytes) shows long uploads."""
    from tqdm.auto import tqdm

    bucket, prefix = split_prefix(uri)
    local = local_folder_content(directory)
    remote = {o.key: o for o in list_objects(uri)}
    report = PushReport()
    todo = []
    for entry in local.entries:
        if _unchanged(entry, local.paths[entry.key], remote.get(entry.key), bucket, prefix + entry.key):
            report.unchanged += 1
        else:
            todo.append(entry)
    client = s3_client()
    with tqdm(total=sum(e.size for e in todo), unit="B", unit_scale=True, desc=f"push {uri}", disable=not progress or not todo) as bar:
        for entry in todo:
            key = prefix + entry.key
            with s3_errors("upload", f"s3://{bucket}/{key}"):
                client.upload_file(str(local.paths[entry.key]), bucket, key, ExtraArgs={"Metadata": {SHA256_METADATA: entry.sha256}},
                                   Callback=bar.update)  # fmt: skip
            report.uploaded.append(entry.key)
            report.bytes_uploaded += entry.size
    return report


def describe(source: str) -> dict:
    """A folder source (``s3://...``, ``folder:<path>`` or a plain path) as ``metaopt data show``
    prints it: fingerprint, layout, images, bytes, domains and class counts."""
    if "://" not in source and not source.startswith(FOLDER_PREFIX):
        source = FOLDER_PREFIX + source
    manifest = folder_content(source).manifest()
    counts: dict[str, dict[str, int]] = {}
    for entry in manifest["entries"]:
        parts = entry["key"].split("/")
        domain = parts[0] if len(parts) == 3 else ""
        counts.setdefault(domain, {}).setdefault(parts[-2], 0)
        counts[domain][parts[-2]] += 1
    return {key: manifest[key] for key in ("source", "fingerprint", "layout", "images", "bytes", "classes", "domains")} | {"class_counts": counts}


def register() -> None:
    """Register the ``s3`` fetcher (idempotent; importing this module does it)."""
    register_fetcher("s3", stage_s3_folder)


register()

__all__ = [
    "PushReport",
    "RemoteObject",
    "SHA256_METADATA",
    "StageReport",
    "cache_root",
    "cached_path",
    "describe",
    "list_objects",
    "push",
    "register",
    "split_prefix",
    "stage",
    "stage_s3_folder",
]
