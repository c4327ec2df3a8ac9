"""Every storage, credential and YAML mistake ends in one ``metaopt: error:`` line that says what is
wrong and what to do: no traceback, no secret. Against a moto S3 server with authentication on
(``s3_auth_server``: a wrong secret really fails the signature check)."""

from __future__ import annotations

import logging

import pytest

from pipelines.cli import main
from tests.fixtures_s3 import s3_auth_endpoint, s3_auth_server  # noqa: F401  (fixtures)
from tests.test_datasets import image_folder

WRONG_SECRET = "wrong-secret-Vb81-must-never-be-printed"


def _cli(*argv: str) -> int:
    """``metaopt ARGV`` as a fresh process would run it: S3 clients are cached per process, with the
    credentials they were created with, and the root logger is at Python's default, WARNING (other
    tests of the session may have left it lower, with handlers on streams that are gone)."""
    from metaopt_core.mlops.storage import clear_client_cache

    clear_client_cache()
    level = logging.root.level
    logging.root.setLevel(logging.WARNING)
    try:
        return main(list(argv))
    finally:
        logging.root.setLevel(level)


def _one_error_line(capsys, *secrets: str) -> str:
    captured = capsys.readouterr()
    for secret in secrets:
        assert secret not in captured.out + captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metaopt: error: "), captured.err
    return lines[0]


@pytest.fixture
def pets(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METAOPT_S3_MAX_ATTEMPTS", "1")  # a refused connection is not retried for seconds
    return image_folder(tmp_path / "pets", domains=(), per_class=2)


def test_s3_credential_and_endpoint_errors_are_one_line(s3_auth_endpoint, pets, monkeypatch, capsys):
    uri = s3_auth_endpoint.uri("pets/")
    secret = s3_auth_endpoint.secret_access_key
    assert _cli("data", "push", str(pets), uri, "--quiet") == 0  # the right credentials work
    capsys.readouterr()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    assert _cli("data", "show", uri) == 2
    line = _one_error_line(capsys, secret, WRONG_SECRET)
    assert "SignatureDoesNotMatch" in line and "check AWS_SECRET_ACCESS_KEY" in line and uri in line

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    assert _cli("data", "push", str(pets), uri, "--quiet") == 2
    assert "InvalidAccessKeyId" in (line := _one_error_line(capsys, secret, WRONG_SECRET)) and "check AWS_ACCESS_KEY_ID" in line

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert _cli("data", "show", uri) == 2
    assert "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in _one_error_line(capsys, secret)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_auth_endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert _cli("data", "show", uri) == 2
    assert "could not connect to the S3 endpoint http://127.0.0.1:9: check S3_ENDPOINT_URL" in _one_error_line(capsys, secret)


def test_bucket_and_key_mistakes_are_one_line(s3_auth_endpoint, pets, capsys):
    assert _cli("data", "show", "s3://Bad_Bucket!/pets/") == 2
    assert "bucket name 'Bad_Bucket!' is not valid; allowed: 3-63 lowercase letters" in _one_error_line(capsys)
    assert _cli("data", "push", str(pets), "s3://no-such-bucket-of-metaopt/pets/", "--quiet") == 2
    assert "NoSuchBucket" in (line := _one_error_line(capsys)) and "create the bucket or check its name" in line
    assert _cli("data", "show", s3_auth_endpoint.uri("nothing-here/")) == 2
    assert "holds no <class>/<image>" in _one_error_line(capsys)


def test_yaml_mistakes_are_one_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("algorithm: itl\ndata:\n  source: digits\n  angles: [0, 45\nouter: {steps: 2}\n")
    assert _cli("run", "itl", "--config", str(config)) == 2
    line = _one_error_line(capsys)
    assert f"{config}: not valid YAML at line" in line
    assert _cli("compile", "itl", "-o", str(tmp_path / "x.yaml"), "--config", str(config)) == 2
    assert "not valid YAML" in _one_error_line(capsys)
    assert _cli("run", "itl", "--set", "outer.steps=[1, 2") == 2
    assert "--set 'outer.steps=[1, 2': not valid YAML" in _one_error_line(capsys)
