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

from metaopt_core.mlops.storage.errors import StorageError, StorageNotFoundError
from metaopt_core.mlops.storage.locations import is_s3_uri
from metaopt_core.mlops.storage.operations import (
    S3ReadStream,
    delete,
    download_file,
    exists,
    list_uris,
    open_read,
    read_bytes,
    read_json,
    read_text,
    upload_file,
    write_bytes,
    write_json,
    write_text,
)
from metaopt_core.mlops.storage.s3 import S3Settings, clear_client_cache, s3_client

__all__ = [
    "StorageError",
    "StorageNotFoundError",
    "S3ReadStream",
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
