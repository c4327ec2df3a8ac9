"""Talking to a (multi-user) Kubeflow Pipelines endpoint: namespace, credentials, and uploading
pipelines so that runs can be started from the UI's Pipelines page.

Credentials, one of (never given on the command line, where shell history and ``ps`` show them):

- a token file (``--token-file PATH``): a bearer token re-read before every request, so the
  projected, rotating service-account token of a pod works (in a Kubeflow notebook or pipeline
  pod: ``/var/run/secrets/kubeflow/pipelines/token``, what kfp reads by itself when none is given);
- an existing bearer token in ``$KFP_TOKEN`` (e.g. ``kubectl create token ... --audience pipelines.kubeflow.org``);
- a session cookie in ``$KFP_COOKIE`` or a file (``--cookie-file``): ``authservice_session=...``
  (Dex / oauth2-proxy in front of the KFP UI) as the browser holds it.

The namespace (``--namespace``, else ``$KFP_NAMESPACE``) is the user's profile namespace in
multi-user Kubeflow: runs, experiments, recurring runs and uploaded pipelines go there.

:func:`upload` compiles nothing itself: it takes a compiled YAML and creates the pipeline
``metaopt-<learner>`` in the namespace, or a new version of it, named after the compile
(``<UTC time>-<content hash>``), so every compile is one more version under Pipelines.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TOKEN_ENV, COOKIE_ENV, NAMESPACE_ENV = "KFP_TOKEN", "KFP_COOKIE", "KFP_NAMESPACE"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubeflow/pipelines/token"


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where and as whom to talk to KFP. Secrets stay out of ``repr`` (and so out of logs and tracebacks)."""

    host: str
    namespace: str | None = None
    token_file: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    cookies: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not re.match(r"^https?://", self.host):
            raise ValueError(f"host: got {self.host!r}; allowed: the Kubeflow Pipelines endpoint URL, e.g. http://localhost:8080")
        given = [name for name in ("token_file", "token", "cookies") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"credentials: got {given}; give one of a token file, ${TOKEN_ENV} or a session cookie")
        if self.namespace is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.namespace):
            raise ValueError(f"namespace: got {self.namespace!r}; allowed: a Kubernetes namespace name (your profile namespace)")
        if self.token_file and not Path(self.token_file).is_file():
            raise ValueError(f"token file: {self.token_file} does not exist (in a Kubeflow pod the token is {IN_CLUSTER_TOKEN})")

    def client_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``kfp.Client`` for this connection."""
        arguments: dict[str, Any] = {"host": self.host}
        if self.namespace:
            arguments["namespace"] = self.namespace
        if self.token_file:
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            arguments["credentials"] = ServiceAccountTokenVolumeCredentials(self.token_file)
        if self.token:
            arguments["existing_token"] = self.token
        if self.cookies:
            arguments["cookies"] = self.cookies
        return arguments


def connection(
    host: str, namespace: str | None = None, *, token_file: str | None = None, cookie_file: str | None = None, env: Mapping[str, str] | None = None
) -> Connection:
    """A :class:`Connection` from the command line's values and the environment (``$KFP_TOKEN``,
    ``$KFP_COOKIE``, ``$KFP_NAMESPACE``)."""
    env = os.environ if env is None else env
    cookies = Path(cookie_file).read_text().strip() if cookie_file else (env.get(COOKIE_ENV) or None)
    return Connection(
        host=host, namespace=namespace or env.get(NAMESPACE_ENV) or None, token_file=token_file,
        token=None if token_file or cookies else (env.get(TOKEN_ENV) or None), cookies=cookies,
    )  # fmt: skip


def connect(conn: Connection) -> Any:
    """A ``kfp.Client`` for ``conn``."""
    import kfp

    return kfp.Client(**conn.client_arguments())


def version_name(path: str | Path, now: datetime.datetime | None = None) -> str:
    """``<UTC time>-<first 10 hex of the YAML's sha256>``: unique per compile, and says which content."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]
    return f"{(now or datetime.datetime.now(datetime.timezone.utc)):%Y%m%d-%H%M%S}-{digest}"


def find_pipeline(client: Any, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline called ``name`` in ``namespace`` (shared pipelines when None), or None."""
    predicate = {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    found = client.list_pipelines(filter=json.dumps(predicate), page_size=2, namespace=namespace)
    pipelines = list(getattr(found, "pipelines", None) or [])
    if len(pipelines) > 1:
        raise ValueError(f"pipeline {name!r}: {len(pipelines)} pipelines have that name in namespace {namespace!r}; delete or rename one")
    return pipelines[0].pipeline_id if pipelines else None


def upload(client: Any, path: str | Path, name: str, *, namespace: str | None = None, description: str = "", version: str | None = None) -> dict:
    """Upload the compiled pipeline at ``path`` as ``name``: a new pipeline (its first version) or
    a new version of the existing one. Returns pipeline id, version id and name, and whether it was created."""
    version = version or version_name(path)
    pipeline_id = find_pipeline(client, name, namespace)
    if pipeline_id is None:  # KFP creates the pipeline with this compile as its first version (named after the pipeline)
        created = client.upload_pipeline(str(path), pipeline_name=name, description=description, namespace=namespace)
        versions = client.list_pipeline_versions(created.pipeline_id, page_size=1)
        first = (getattr(versions, "pipeline_versions", None) or [None])[0]
        return {"pipeline_id": created.pipeline_id, "version_id": getattr(first, "pipeline_version_id", ""),
                "version": getattr(first, "display_name", name), "name": name, "created": True}  # fmt: skip
    added = client.upload_pipeline_version(str(path), pipeline_version_name=version, pipeline_id=pipeline_id, description=description)
    return {"pipeline_id": pipeline_id, "version_id": added.pipeline_version_id, "version": version, "name": name, "created": False}


__all__ = ["COOKIE_ENV", "IN_CLUSTER_TOKEN", "NAMESPACE_ENV", "TOKEN_ENV", "Connection", "connect", "connection", "find_pipeline", "upload", "version_name"]
