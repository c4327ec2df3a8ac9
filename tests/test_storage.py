"""metaopt_core.mlops.storage against local paths, file:// URIs and a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from metaopt_core.files import current_umask
from metaopt_core.mlops import storage
from metaopt_core.mlops.storage import StorageError, StorageNotFoundError
from tests.fixtures_s3 import (  # noqa: F401  (pytest fixtures)
    FAKE_ACCESS_KEY_ID,
    FAKE_SECRET_ACCESS_KEY,
    FAKE_SESSION_TOKEN,
    S3Endpoint,
    free_port,
    moto_server_url,
    s3_endpoint,
)

MIB = 1024 * 1024


@dataclass
class Backend:
    """A place to store things, addressed the way callers would address it."""

    name: str
    root: str  # no trailing slash

    def uri(self, relative: str) -> str:
        return f"{self.root}/{relative}"


@pytest.fixture(params=["path", "file_uri", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "path":
        return Backend("path", str(tmp_path / "store"))
    if request.param == "file_uri":
        return Backend("file_uri", (tmp_path / "store").as_uri())
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return Backend("s3", endpoint.uri("store"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------
# Round trips, on every backend
# ------------------------------------------------------------------------------------------


def test_bytes_round_trip_and_overwrite(backend: Backend) -> None:
    uri = backend.uri("nested/dir/blob.bin")
    every_byte = bytes(range(256)) * 3
    storage.write_bytes(uri, every_byte)
    assert storage.read_bytes(uri) == every_byte

    storage.write_bytes(uri, b"second version")
    assert storage.read_bytes(uri) == b"second version"

    storage.write_bytes(uri, b"")
    assert storage.read_bytes(uri) == b""


def test_text_and_json_round_trip(backend: Backend) -> None:
    document = {"loss": "taylor", "params": [0.5, -1.25, 3e-8], "nested": {"ß": "ünïcode", "n": 3}}
    storage.write_json(backend.uri("cfg.json"), document)
    assert storage.read_json(backend.uri("cfg.json")) == document
    # Sorted keys and fixed indentation: equal documents give byte-identical files.
    expected = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    assert storage.read_bytes(backend.uri("cfg.json")) == expected.encode("utf-8")

    storage.write_text(backend.uri("note.txt"), "ligne 1\nligne 2 ✓\n")
    assert storage.read_text(backend.uri("note.txt")) == "ligne 1\nligne 2 ✓\n"


def test_upload_and_download_file(backend: Backend, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    payload = os.urandom(300_000)
    source.write_bytes(payload)
    storage.upload_file(source, backend.uri("up/source.bin"))
    assert storage.read_bytes(backend.uri("up/source.bin")) == payload

    target = tmp_path / "down" / "deeper" / "copy.bin"  # parents are created
    storage.download_file(backend.uri("up/source.bin"), target)
    assert target.read_bytes() == payload
    # file:// works for the local side too.
    storage.download_file(backend.uri("up/source.bin"), (tmp_path / "copy2.bin").as_uri())
    assert (tmp_path / "copy2.bin").read_bytes() == payload


def test_exists_and_delete(backend: Backend) -> None:
    uri = backend.uri("d/x.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"1")
    assert storage.exists(uri)
    # A "directory" is not an object on any backend.
    assert not storage.exists(backend.uri("d"))

    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(StorageNotFoundError) as info:
        storage.delete(uri)
    assert uri in str(info.value) and "delete" in str(info.value)
    storage.delete(uri, missing_ok=True)  # no error


def test_list_uris_has_s3_prefix_semantics_everywhere(backend: Backend) -> None:
    for relative in ["runs/1/a.json", "runs/1/sub/b.json", "runs/10/c.json", "other/d.json"]:
        storage.write_bytes(backend.uri(relative), b"{}")

    assert storage.list_uris(backend.uri("runs/1/")) == [
        backend.uri("runs/1/a.json"),
        backend.uri("runs/1/sub/b.json"),
    ]
    # Without the slash the prefix also matches runs/10, exactly as on S3.
    assert storage.list_uris(backend.uri("runs/1")) == [
        backend.uri("runs/1/a.json"),
        backend.uri("runs/1/sub/b.json"),
        backend.uri("runs/10/c.json"),
    ]
    assert storage.list_uris(backend.uri("runs/1/a")) == [backend.uri("runs/1/a.json")]
    assert storage.list_uris(backend.uri("nothing/here/")) == []
    assert len(storage.list_uris(backend.uri(""))) == 4
    # Everything listed can be read back with the URI as returned.
    assert all(storage.read_bytes(u) == b"{}" for u in storage.list_uris(backend.uri("")))


def test_missing_object_raises_file_not_found_naming_the_uri(backend: Backend, tmp_path: Path) -> None:
    missing = backend.uri("no/such/object.bin")
    calls: list[tuple[str, Callable[[], object]]] = [
        ("read", lambda: storage.read_bytes(missing)),
        ("read", lambda: storage.read_json(missing)),
        ("open", lambda: storage.open_read(missing)),
        ("download", lambda: storage.download_file(missing, tmp_path / "out.bin")),
    ]
    for operation, call in calls:
        with pytest.raises(StorageNotFoundError) as info:
            call()
        error = info.value
        assert isinstance(error, FileNotFoundError)
        assert error.uri == missing and error.operation == operation
        assert missing in str(error) and operation in str(error)
    assert not (tmp_path / "out.bin").exists(), "a failed download must leave no file behind"


def test_open_read_streams_large_objects_in_chunks(backend: Backend) -> None:
    lines = b"".join(b"line %06d\n" % i for i in range(1000))
    payload = lines + os.urandom(3 * MIB)
    uri = backend.uri("big/stream.bin")
    storage.write_bytes(uri, payload)

    digest = hashlib.sha256()
    with storage.open_read(uri) as stream:
        assert stream.readline() == b"line 000000\n"
        digest.update(b"line 000000\n")
        sizes = []
        while chunk := stream.read(256 * 1024):
            sizes.append(len(chunk))
            digest.update(chunk)
    assert digest.hexdigest() == sha256(payload)
    assert len(sizes) >= 12, "the object should arrive in many bounded chunks"
    assert max(sizes) <= 256 * 1024


# ------------------------------------------------------------------------------------------
# Local specifics: atomicity, permissions, cleanup
# ------------------------------------------------------------------------------------------


def test_concurrent_reader_only_ever_sees_complete_versions(tmp_path: Path) -> None:
    size = 4 * MIB
    versions = [bytes([value]) * size for value in (0xA1, 0xB2, 0xC3)]
    target = str(tmp_path / "checkpoint.bin")
    storage.write_bytes(target, versions[0])

    def is_complete(data: bytes) -> bool:
        return any(data == version for version in versions)

    # The checker does catch a torn file (half new, half old).
    assert not is_complete(versions[1][: size // 2] + versions[0][size // 2 :])

    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            storage.write_bytes(target, versions[writes % len(versions)])
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    seen: dict[int, int] = {}
    torn = 0
    reads = 0
    deadline = time.monotonic() + 30
    try:
        # Keep reading until every version has been observed mid-stream of rewrites.
        while (len(seen) < len(versions) or reads < 30 or writes < 6) and time.monotonic() < deadline:
            data = storage.read_bytes(target)
            reads += 1
            if is_complete(data):
                seen[data[0]] = seen.get(data[0], 0) + 1
            else:
                torn += 1
    finally:
        stop.set()
        thread.join()
    assert torn == 0, f"{torn} of {reads} reads saw a partially written file"
    assert len(seen) == len(versions), f"reader saw only versions {sorted(seen)} in {reads} reads"
    assert writes >= 6 and reads >= 30, f"too little overlap: {writes} writes, {reads} reads"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.bin"]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_failed_serialisation_leaves_previous_content_untouched(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    storage.write_json(target, {"step": 1})
    with pytest.raises(TypeError):
        storage.write_json(target, {"step": 2, "bad": object()})
    with pytest.raises(ValueError):
        storage.write_json(target, {"step": 2, "loss": float("nan")})
    assert storage.read_json(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_gives_normal_permissions_and_hides_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    storage.write_bytes(target, b"x")
    expected_mode = 0o666 & ~current_umask()
    assert (target.stat().st_mode & 0o777) == expected_mode
    # A temp file of a write in progress (e.g. of a crashed writer) is never listed.
    (tmp_path / ".b.bin.k3j4.metaopt-tmp").write_bytes(b"partial")
    assert storage.list_uris(str(tmp_path) + "/") == [str(target)]


def test_relative_paths_are_listed_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("out/run1/a.bin", b"a")
    storage.write_bytes("outside.bin", b"b")
    assert storage.list_uris("out/") == ["out/run1/a.bin"]
    assert storage.list_uris("out") == ["out/run1/a.bin", "outside.bin"]
    assert storage.read_bytes(storage.list_uris("outs")[0]) == b"b"


def test_local_write_over_a_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(StorageError) as info:
        storage.write_bytes(tmp_path / "adir", b"x")
    assert str(tmp_path / "adir") in str(info.value) and "write" in str(info.value)


# ------------------------------------------------------------------------------------------
# S3 specifics: multipart, error codes, credentials, retries, client settings
# ------------------------------------------------------------------------------------------


def test_multipart_upload_and_ranged_download(s3_endpoint: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_S3_MULTIPART_THRESHOLD_MB", "5")
    monkeypatch.setenv("METAOPT_S3_MULTIPART_CHUNKSIZE_MB", "5")
    payload = os.urandom(12 * MIB)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    client = s3_endpoint.client()

    storage.upload_file(source, s3_endpoint.uri("big/file.bin"))
    etag = client.head_object(Bucket=s3_endpoint.bucket, Key="big/file.bin")["ETag"]
    # A multipart object's ETag ends in -<number of parts>: 5 + 5 + 2 MiB.
    assert etag.strip('"').endswith("-3"), etag

    storage.write_bytes(s3_endpoint.uri("big/bytes.bin"), payload)
    etag = client.head_object(Bucket=s3_endpoint.bucket, Key="big/bytes.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag

    storage.write_bytes(s3_endpoint.uri("small.bin"), b"tiny")
    etag = client.head_object(Bucket=s3_endpoint.bucket, Key="small.bin")["ETag"]
    assert "-" not in etag, "below the threshold a single PUT is used"

    target = tmp_path / "back.bin"
    storage.download_file(s3_endpoint.uri("big/file.bin"), target)
    assert sha256(target.read_bytes()) == sha256(payload)
    assert sha256(storage.read_bytes(s3_endpoint.uri("big/bytes.bin"))) == sha256(payload)


def test_missing_bucket_errors_name_the_code(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    uri = "s3://metaopt-no-such-bucket/k.bin"
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    for operation, call in [
        ("read", lambda: storage.read_bytes(uri)),
        ("write", lambda: storage.write_bytes(uri, b"x")),
        ("upload", lambda: storage.upload_file(source, uri)),
        ("list", lambda: storage.list_uris("s3://metaopt-no-such-bucket/")),
    ]:
        with pytest.raises(StorageNotFoundError) as info:
            call()
        assert info.value.code == "NoSuchBucket", operation
        assert "NoSuchBucket" in str(info.value) and operation in str(info.value)
        assert "s3://metaopt-no-such-bucket/" in str(info.value)
    assert storage.exists(uri) is False


def _all_text_about(error: BaseException) -> str:
    return "\n".join(
        [
            str(error),
            repr(error),
            "".join(traceback.format_exception(error)),
            repr(pickle.loads(pickle.dumps(error))),
        ]
    )


def test_credentials_never_appear_in_errors_or_logs(
    s3_endpoint: S3Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)  # the most a user could switch on, botocore's wire logs included
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    errors: list[StorageError] = []
    for call in [
        lambda: storage.read_bytes("s3://metaopt-no-such-bucket/k"),
        lambda: storage.read_bytes(s3_endpoint.uri("missing-key")),
        lambda: storage.write_bytes("s3://metaopt-no-such-bucket/k", b"x"),
        lambda: storage.upload_file(source, "s3://metaopt-no-such-bucket/k"),
        lambda: storage.delete(s3_endpoint.uri("missing-key")),
    ]:
        with pytest.raises(StorageError) as info:
            call()
        errors.append(info.value)
    storage.write_bytes(s3_endpoint.uri("ok"), b"fine")  # a successful request is logged too

    # Nothing listens on this port: a connection error after bounded retries.
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("METAOPT_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/key")
    assert info.value.code == "EndpointConnectionError"
    errors.append(info.value)

    assert any(r.name.startswith("botocore") for r in caplog.records), "wire logging was captured"
    logged = caplog.text
    for secret in (FAKE_SECRET_ACCESS_KEY, FAKE_SESSION_TOKEN, FAKE_ACCESS_KEY_ID):
        assert secret not in logged
        for error in errors:
            assert secret not in _all_text_about(error)
    for error in errors:
        assert error.code and error.code in str(error)
        assert error.uri in str(error)


class _ScriptedS3(http.server.BaseHTTPRequestHandler):
    """Answers GETs with S3 InternalError for the first `failures` requests, then the object."""

    failures = 0
    requests = 0
    body = b"payload after transient failures"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        cls = type(self)
        cls.requests += 1
        if cls.requests <= cls.failures:
            error = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                b"<Message>We encountered an internal error. Please try again.</Message></Error>"
            )
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(cls.body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.end_headers()
        self.wfile.write(cls.body)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def scripted_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_ScriptedS3]]:
    handler = type("Handler", (_ScriptedS3,), {"failures": 0, "requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    for name, value in {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    storage.clear_client_cache()
    yield handler
    server.shutdown()
    server.server_close()
    storage.clear_client_cache()


def test_transient_server_errors_are_retried(scripted_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_S3_MAX_ATTEMPTS", "3")
    scripted_s3.failures = 2
    assert storage.read_bytes("s3://bucket/obj") == _ScriptedS3.body
    assert scripted_s3.requests == 3


def test_retries_are_bounded(scripted_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_S3_MAX_ATTEMPTS", "3")
    scripted_s3.failures = 10**6
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/obj")
    assert scripted_s3.requests == 3, "max attempts counts the first try"
    assert info.value.code == "InternalError"
    assert "InternalError" in str(info.value) and "HTTP 500" in str(info.value)
    assert not isinstance(info.value, FileNotFoundError)


def test_settings_from_environment() -> None:
    settings = storage.S3Settings.from_env(
        {
            "S3_ENDPOINT_URL": "http://minio.metaopt:9000",
            "MLFLOW_S3_ENDPOINT_URL": "http://ignored:9000",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_REGION": "eu-central-1",
            "METAOPT_S3_MAX_ATTEMPTS": "7",
            "METAOPT_S3_MULTIPART_THRESHOLD_MB": "16",
        }
    )
    assert settings.endpoint_url == "http://minio.metaopt:9000"
    assert settings.region == "eu-central-1"  # AWS_REGION wins, as in the AWS SDKs
    assert settings.max_attempts == 7
    assert settings.multipart_threshold == 16 * MIB
    assert settings.multipart_chunksize == 8 * MIB

    fallback = storage.S3Settings.from_env({"MLFLOW_S3_ENDPOINT_URL": "https://s3.local"})
    assert fallback.endpoint_url == "https://s3.local" and fallback.region == "us-east-1"
    assert storage.S3Settings.from_env({}).endpoint_url is None


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"S3_ENDPOINT_URL": "minio:9000"}, "S3_ENDPOINT_URL='minio:9000'"),
        ({"METAOPT_S3_MAX_ATTEMPTS": "zero"}, "METAOPT_S3_MAX_ATTEMPTS='zero'"),
        ({"METAOPT_S3_MAX_ATTEMPTS": "0"}, "integers >= 1"),
        ({"METAOPT_S3_MULTIPART_CHUNKSIZE_MB": "1"}, "integers >= 5"),
    ],
)
def test_bad_settings_are_rejected_with_the_variable_named(env: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        storage.S3Settings.from_env(env)
    assert fragment in str(info.value)


def test_endpoint_with_embedded_password_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValueError) as info:
        storage.S3Settings.from_env({"S3_ENDPOINT_URL": "http://user:hunter2pass@minio:9000"})
    assert "hunter2pass" not in str(info.value) and "S3_ENDPOINT_URL" in str(info.value)


def test_clients_are_cached_per_endpoint_and_region(s3_endpoint: S3Endpoint, monkeypatch) -> None:
    first = storage.s3_client()
    assert storage.s3_client() is first
    assert first.meta.config.s3["addressing_style"] == "path"
    assert first.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage.s3_client() is not first
    assert storage.s3_client().meta.region_name == "eu-west-3"


@pytest.mark.parametrize(
    ("uri", "error", "fragment"),
    [
        ("s3://", ValueError, "no bucket name"),
        ("s3://bucket", ValueError, "names a bucket or prefix"),
        ("s3://bucket/prefix/", ValueError, "names a bucket or prefix"),
        ("gs://bucket/key", ValueError, "unsupported scheme 'gs'"),
        ("file://otherhost/x", ValueError, "names host 'otherhost'"),
        ("", ValueError, "uri is empty"),
        (42, TypeError, "uri must be a str or os.PathLike"),
    ],
)
def test_bad_uris_are_rejected_clearly(uri, error, fragment) -> None:
    with pytest.raises(error) as info:
        storage.read_bytes(uri)
    assert fragment in str(info.value)


def test_write_bytes_rejects_text_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as info:
        storage.write_bytes(tmp_path / "x", "text")  # type: ignore[arg-type]
    assert "data must be bytes" in str(info.value) and "write_text" in str(info.value)


def test_storage_errors_survive_pickling() -> None:
    error = StorageNotFoundError("read failed for s3://b/k: no such object", uri="s3://b/k", operation="read", code="NoSuchKey")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is StorageNotFoundError
    assert (clone.uri, clone.operation, clone.code, str(clone)) == ("s3://b/k", "read", "NoSuchKey", str(error))
    assert isinstance(clone, FileNotFoundError) and isinstance(clone, OSError)


def test_open_read_on_s3_reports_a_broken_stream(s3_endpoint: S3Endpoint) -> None:
    storage.write_bytes(s3_endpoint.uri("obj"), b"abcdef" * 1000)
    with storage.open_read(s3_endpoint.uri("obj")) as healthy:
        assert isinstance(healthy.raw, storage.S3ReadStream)
        assert healthy.read(6) == b"abcdef"

    class Broken:
        def read(self, amount: int) -> bytes:
            from botocore.exceptions import ReadTimeoutError

            raise ReadTimeoutError(endpoint_url=s3_endpoint.url)

        def close(self) -> None:
            pass

    stream = io.BufferedReader(storage.S3ReadStream(Broken(), s3_endpoint.uri("obj")))
    with pytest.raises(StorageError) as info, stream:
        stream.read()
    assert info.value.code == "ReadTimeoutError"
    assert s3_endpoint.uri("obj") in str(info.value) and "read stream" in str(info.value)
