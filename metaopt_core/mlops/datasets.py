"""Image-folder datasets in object storage: ``s3://bucket/prefix/`` holding ``<class>/<image>`` or
``<domain>/<class>/<image>`` (the layouts of ``metaopt_core.data.folders``).

- :func:`stage` lists the prefix with ETags and downloads only objects it has not seen into a local
  cache keyed by ETag and size (``METAOPT_DATA_CACHE``, default ``~/.cache/metaopt/objects``), with
  each file's sha256 beside it, so the content manifest (keys, sizes, sha256, ETags) costs one
  listing when nothing changed;
- :func:`push` uploads a local image folder, only the images whose bytes differ from what is there,
  refusing images that do not decode, then **publishes** the dataset version: one object
  ``<prefix>/.metaopt-dataset.json`` listing every image (key, size, sha256, ETag), written last in
  a single PUT. Readers (:func:`stage`, so the pipelines and ``data show``) read exactly the
  published images: objects of a push in progress are not published yet, and an image changed
  since publication fails the read with a clear error instead of mixing two versions. A prefix
  filled by other tools (no published list) is read as listed;
- :func:`describe` summarises a source (fingerprint, class counts, domains, images that do not
  decode, empty class folders) for ``metaopt data show``.

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
    DatasetError,
    FolderContent,
    content_fingerprint,
    empty_folders,
    file_sha256,
    folder_content,
    is_image_key,
    local_folder_content,
    register_fetcher,
    unreadable_images,
)
from metaopt_core.mlops.storage.errors import StorageNotFoundError
from metaopt_core.mlops.storage.locations import check_bucket_name
from metaopt_core.mlops.storage.s3 import s3_client, s3_errors

SHA256_METADATA = "sha256"  # object metadata written by push: lets multipart uploads be compared too
PUBLISHED_KEY = ".metaopt-dataset.json"  # hidden: never an image key
PUBLISHED_FORMAT = "metaopt.published-dataset/1"


class DatasetChangedError(DatasetError):
    """An image changed (or vanished) since the dataset was published: a push is in progress, or
    another tool changed the prefix. Reading again after the push finishes succeeds."""


@dataclass(frozen=True)
class RemoteObject:
    """An object under a prefix: its key relative to the prefix, size and ETag (quotes stripped)."""

    key: str
    size: int
    etag: str


@dataclass
class StageReport:
    """What staging a prefix did: its content, how many objects were downloaded vs cached, whether
    it read a published list, and how many images under the prefix are not published (yet)."""

    content: FolderContent
    downloaded: int = 0
    cached: int = 0
    published: bool = False
    unpublished: int = 0


@dataclass
class PushReport:
    uploaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes_uploaded: int = 0
    fingerprint: str = ""  # of the version published
    images: int = 0
    empty_folders: list[str] = field(default_factory=list)


def split_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b/``): a folder prefix always ends with ``/``."""
    if not uri.lower().startswith("s3://"):
        raise ValueError(f"uri: got {uri!r}; expected s3://bucket/prefix/")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"uri: {uri!r} has no bucket; expected s3://bucket/prefix/")
    check_bucket_name(bucket, uri)
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


def read_published(uri: str) -> dict | None:
    """The published list of the dataset at prefix ``uri`` (None: nothing was published there)."""
    import json

    from metaopt_core.mlops.storage import read_bytes

    bucket, prefix = split_prefix(uri)
    try:
        doc = json.loads(read_bytes(f"s3://{bucket}/{prefix}{PUBLISHED_KEY}"))
    except StorageNotFoundError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != PUBLISHED_FORMAT:
        raise DatasetError(f"{uri}{PUBLISHED_KEY}: not a published dataset list (format {doc.get('format') if isinstance(doc, dict) else doc!r}); "
                           f"publish the dataset again with `metaopt data push DIR {uri}`")  # fmt: skip
    return doc


def _fetch(bucket: str, prefix: str, obj: RemoteObject, report: StageReport) -> tuple[Path, str]:
    """The cached copy of an object (downloaded when its ETag is new) and its sha256."""
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
    return path, sidecar.read_text().strip()


def _published_objects(uri: str, published: dict, images: list[RemoteObject]) -> list[RemoteObject]:
    """The listed objects of the published images; an image changed or gone since: DatasetChangedError."""
    by_key = {obj.key: obj for obj in images}
    chosen = []
    for entry in published.get("entries", []):
        obj = by_key.get(entry["key"])
        if obj is None or obj.etag != entry.get("etag") or obj.size != entry["size"]:
            what = "is gone" if obj is None else "changed"
            raise DatasetChangedError(f"{uri}{entry['key']} {what} since the dataset was published: a push is in progress, or another tool "
                                      f"changed the prefix; read it again when the push has finished (or publish the current content with "
                                      f"`metaopt data push DIR {uri}`)")  # fmt: skip
        chosen.append(obj)
    return chosen


def stage(uri: str, progress: Callable[[str], None] | None = None) -> StageReport:
    """The images under ``uri`` (exactly the published ones, when a list was published), each in the
    local cache (downloaded only when its ETag is new)."""
    bucket, prefix = split_prefix(uri)
    listed = list_objects(uri)
    images = [o for o in listed if is_image_key(o.key)]
    published = read_published(uri)
    objects = _published_objects(uri, published, images) if published is not None else images
    if not objects:
        from metaopt_core.data import DatasetNotFoundError

        raise DatasetNotFoundError(f"{uri} holds no <class>/<image> or <domain>/<class>/<image> objects; upload some with `metaopt data push DIR {uri}`")
    report = StageReport(FolderContent(uri, []), published=published is not None, unpublished=len(images) - len(objects))
    expected = {entry["key"]: entry["sha256"] for entry in (published or {}).get("entries", [])}
    entries, paths = [], {}
    for obj in objects:
        path, sha256 = _fetch(bucket, prefix, obj, report)
        if obj.key in expected and expected[obj.key] != sha256:
            raise DatasetChangedError(f"{uri}{obj.key}: the bytes read have sha256 {sha256[:12]}, the published list says {expected[obj.key][:12]}: "
                                      "changed or corrupted since it was published; publish again with `metaopt data push`")  # fmt: skip
        entries.append(ContentEntry(obj.key, obj.size, sha256, obj.etag))
        paths[obj.key] = path
    report.content = FolderContent(uri, entries, paths)
    report.content.empty_folders = empty_folders([o.key for o in listed], 2 if report.content.layout == "domains" else 1)
    if progress:
        note = "" if published is None else f", {report.unpublished} not published (yet)" if report.unpublished else ", as published"
        progress(f"{uri}: {len(entries)} images, {report.downloaded} downloaded, {report.cached} from the cache{note}")
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


def _refuse_unreadable(content: FolderContent, what: str) -> None:
    bad = unreadable_images(content)
    if bad:
        shown = "; ".join(f"{key} ({reason})" for key, reason in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{what}: {len(bad)} image(s) do not decode: {shown}; fix or remove them (nothing was uploaded)")


def push(directory: str | Path, uri: str, progress: bool = True) -> PushReport:
    """Upload the images of a local folder to the prefix ``uri``, skipping those already there
    with the same bytes, then publish the prefix's images (:data:`PUBLISHED_KEY`, written last);
    a progress bar (bytes) shows long uploads. Images that do not decode are refused before
    anything is uploaded."""
    from tqdm.auto import tqdm

    bucket, prefix = split_prefix(uri)
    local = local_folder_content(directory)
    _refuse_unreadable(local, f"data push {directory}")
    remote = {o.key: o for o in list_objects(uri)}
    report = PushReport(empty_folders=list(local.empty_folders))
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
    published = publish(uri, {entry.key: entry.sha256 for entry in local.entries})
    report.fingerprint, report.images = published["fingerprint"], len(published["entries"])
    return report


def publish(uri: str, known_sha256: dict[str, str] | None = None) -> dict:
    """Publish the images now under the prefix ``uri`` as the dataset's version: their list
    (key, size, sha256, ETag) in one object written last. ``known_sha256``: hashes of images
    whose bytes this process just uploaded or verified; the others come from the previous list
    (same ETag), the ``sha256`` object metadata that push writes, or a download. Returns the list."""
    import datetime as _dt
    import json

    from metaopt_core.mlops.storage import write_bytes

    bucket, prefix = split_prefix(uri)
    previous = {entry["key"]: entry for entry in ((read_published(uri) or {}).get("entries") or [])}
    known = dict(known_sha256 or {})
    report = StageReport(FolderContent(uri, []))
    entries = []
    for obj in (o for o in list_objects(uri) if is_image_key(o.key)):
        sha256 = known.get(obj.key) if obj.key in known else None
        if sha256 is None and previous.get(obj.key, {}).get("etag") == obj.etag:
            sha256 = previous[obj.key]["sha256"]
        if sha256 is None:
            with s3_errors("head", f"s3://{bucket}/{prefix}{obj.key}"):
                sha256 = s3_client().head_object(Bucket=bucket, Key=prefix + obj.key).get("Metadata", {}).get(SHA256_METADATA)
        if sha256 is None:
            sha256 = _fetch(bucket, prefix, obj, report)[1]
        entries.append(ContentEntry(obj.key, obj.size, sha256, obj.etag))
    doc = {"format": PUBLISHED_FORMAT, "fingerprint": content_fingerprint(entries),
           "published_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "entries": [entry.to_dict() for entry in sorted(entries, key=lambda e: e.key)]}  # fmt: skip
    write_bytes(f"s3://{bucket}/{prefix}{PUBLISHED_KEY}", json.dumps(doc, indent=1).encode())  # one PUT: all at once
    return doc


def describe(source: str) -> dict:
    """A folder source (``s3://...``, ``folder:<path>`` or a plain path) as ``metaopt data show``
    prints it: fingerprint, layout, images, bytes, domains and class counts."""
    if "://" not in source and not source.startswith(FOLDER_PREFIX):
        source = FOLDER_PREFIX + source
    staged = stage(source) if source.lower().startswith("s3://") else None
    content = staged.content if staged is not None else folder_content(source)
    manifest = content.manifest()
    extra = {"class_counts": content.class_counts(), "empty_folders": list(content.empty_folders),
             "unreadable": [{"key": key, "reason": reason} for key, reason in unreadable_images(content)]}  # fmt: skip
    if staged is not None:
        extra.update(published=staged.published, unpublished=staged.unpublished)
    return {key: manifest[key] for key in ("source", "fingerprint", "layout", "images", "bytes", "classes", "domains")} | extra


def register() -> None:
    """Register the ``s3`` fetcher (idempotent; importing this module does it)."""
    register_fetcher("s3", stage_s3_folder)


register()

__all__ = [
    "DatasetChangedError",
    "PUBLISHED_FORMAT",
    "PUBLISHED_KEY",
    "PushReport",
    "RemoteObject",
    "SHA256_METADATA",
    "StageReport",
    "cache_root",
    "cached_path",
    "describe",
    "list_objects",
    "publish",
    "push",
    "read_published",
    "register",
    "split_prefix",
    "stage",
    "stage_s3_folder",
]
