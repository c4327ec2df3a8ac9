"""Loading registered models: download only the white-box files, check their sha256 against the
version's tags, validate them, and build the loss module or the ``MirrorDescent`` optimiser.
Nothing is unpickled and the logged model code is never run."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from metaopt_core.mlops.registry.common import (
    DIVERGENCE_DIR,
    DIVERGENCE_FILES,
    LOSS_FILE,
    SHA_PREFIX,
    TAG_KIND,
    ArtifactValidationError,
    ModelNotFoundError,
    WrongModelKindError,
    loss_from_doc,
    validate_loss_doc,
)
from metaopt_core.mlops.registry.fallback import with_fallback
from metaopt_core.mlops.registry.integrity import check_sha256
from metaopt_core.mlops.registry.resolve import existing_store, parse_models_uri, resolve_version
from metaopt_core.mlops.tracking import connect
from metaopt_core.optim.divergence import ShapeMismatchError


def download_files(uri: str, kind: str, files: list[str], destination: Path, tracking_uri: str | None) -> tuple[dict[str, Path], str]:
    """Fetch the named white-box files of a model into ``destination``; verify registered hashes.

    Returns ``({relative file: local path}, description of where they came from)``.
    """
    if uri.startswith("file://") or not re.match(r"^[a-zA-Z][\w+.-]*:/", uri):
        local = Path(urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri)
        if not local.exists():
            raise FileNotFoundError(f"uri: {uri!r} is neither an existing path nor a models:/, runs:/ or other artifact URI")
        return local_files(local, kind, files), str(local)
    if uri.startswith("models:/") and not re.fullmatch(r"models:/m-[0-9a-f]+/?", uri):
        client = existing_store(tracking_uri)
        ref = parse_models_uri(uri)
        version = resolve_version(client, ref, uri)
        where = f"{uri} (model {ref.name!r} version {version.version})"
        registered_kind = version.tags.get(TAG_KIND)
        if registered_kind is not None and registered_kind != kind:
            loader = "load_optimizer" if registered_kind == "optimizer" else "load_loss"
            raise WrongModelKindError(f"{where} is a registered {registered_kind}, not a {kind}; use {loader}")
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(client.get_model_version_download_uri(ref.name, version.version))
        out = {}
        for rel in files:
            try:
                out[rel] = Path(repo.download_artifacts(f"artifacts/{rel}", str(destination)))
            except (MlflowException, OSError) as exc:
                raise ArtifactValidationError(f"{where}: artifact artifacts/{rel} could not be downloaded ({exc}); not a metaopt {kind} model?") from None
        check_sha256(out, {k[len(SHA_PREFIX) :]: v for k, v in version.tags.items() if k.startswith(SHA_PREFIX)}, where)
        return out, where
    # runs:/, models:/m-<id>, s3://, mlflow-artifacts:/ ...: MLflow's generic download, no registry tags
    connect(tracking_uri)
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: could not download ({exc.message})") from None
    return local_files(fetched, kind, files), uri


def local_files(path: Path, kind: str, files: list[str]) -> dict[str, Path]:
    """Files of a local model: a model directory (``artifacts/...``), a plain directory, or one JSON file."""
    if path.is_file():
        if len(files) != 1:
            raise ArtifactValidationError(f"{path}: a {kind} needs the directory holding {files}, not a file")
        return {files[0]: path}
    for base in (path / "artifacts", path):
        candidates = {rel: base / rel for rel in files}
        if all(p.is_file() for p in candidates.values()):
            return candidates
        if kind == "optimizer":  # a bare save_divergence directory
            bare = {rel: base / Path(rel).name for rel in files}
            if all(p.is_file() for p in bare.values()):
                return bare
    raise ArtifactValidationError(f"{path}: no {kind} artifact found (looked for {files} and artifacts/{files[0]})")


def load_loss_doc(uri: str, *, tracking_uri: str | None = None) -> dict:
    """The validated loss JSON document behind ``uri`` (``models:/...``, ``runs:/...``, a path)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, where = download_files(uri, "loss", [LOSS_FILE], Path(tmp), tracking_uri)
        path = paths[LOSS_FILE]
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactValidationError(f"{where}: {LOSS_FILE} is not valid JSON ({exc})") from None
    return validate_loss_doc(doc, source=f"{where}: {LOSS_FILE}")


def load_loss(uri: str, *, reduction: str = "mean", tracking_uri: str | None = None, fallback: str | None = None) -> Any:
    """A ready loss module (``TaylorLoss`` or a named baseline) from a registered model.

    ``uri``: ``models:/itl/production``, ``models:/itl@production``, ``models:/itl/3``, ``runs:/...``,
    or a local ``loss.json`` / model directory. Reads only the JSON artifact (never unpickles),
    checks it against the sha256 recorded at registration and validates its schema.
    ``fallback``: what to load instead when ``uri`` has no production version (an explicit opt-in
    with a warning: ``metaopt_core.mlops.registry.fallback``); None: that is an error.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")
    return with_fallback(lambda chosen: loss_from_doc(load_loss_doc(chosen, tracking_uri=tracking_uri), reduction=reduction,
                                                      source=f"{chosen}: {LOSS_FILE}"), uri, fallback)  # fmt: skip


def load_optimizer(uri: str, model: Any, lr: float | None = None, *, weight_decay: float = 0.0, tracking_uri: str | None = None,
                   partial: bool = False, fallback: str | None = None) -> Any:  # fmt: skip
    """A ready ``MirrorDescent`` over ``model.parameters()`` from a registered MetaMD divergence.

    ``lr`` defaults to the learning rate recorded at meta-training. The model's parameter shapes
    must match the meta-trained architecture (``metaopt models show NAME/VERSION`` states it; a
    ``ShapeMismatchError`` names the first mismatch and both architectures). ``partial=True``
    applies the learned metric to the layers that match and plain mirror descent (the identity
    metric) to the others (``optimizer.divergence.learned_parameters`` / ``identity_parameters``).
    ``fallback``: as for :func:`load_loss`.
    """
    from metaopt_core.optim.io import DivergenceFormatError
    from metaopt_core.optim.mirror_descent import MirrorDescent

    def load(chosen: str) -> Any:
        files = [f"{DIVERGENCE_DIR}/{f}" for f in DIVERGENCE_FILES]
        with tempfile.TemporaryDirectory() as tmp:
            paths, where = download_files(chosen, "optimizer", files, Path(tmp), tracking_uri)
            directory = Path(tmp) / "loaded"
            directory.mkdir()
            for rel, path in paths.items():
                shutil.copyfile(path, directory / Path(rel).name)
            try:
                return MirrorDescent.from_pretrained(directory, model, lr=lr, weight_decay=weight_decay, partial=partial)
            except DivergenceFormatError as exc:
                raise ArtifactValidationError(f"{where}: {exc}") from None
            except ShapeMismatchError as exc:
                raise ShapeMismatchError(f"{where}: {exc}") from None

    return with_fallback(load, uri, fallback)


__all__ = ["download_files", "load_loss", "load_loss_doc", "load_optimizer", "local_files"]
