"""Loading registered models: download only the white-box files of the version's export kind
(``metaopt_core.exports``), check their sha256 against the version's tags, validate them, and build
the loss module or the ``MirrorDescent`` optimiser through the kind. Nothing is unpickled and the
logged model code is never run."""

from __future__ import annotations

import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from metaopt_core.mlops.registry.common import (
    SHA_PREFIX,
    TAG_EXPORT_KIND,
    TAG_KIND,
    ArtifactValidationError,
    ModelNotFoundError,
    WrongModelKindError,
)
from metaopt_core.mlops.registry.fallback import with_fallback
from metaopt_core.mlops.registry.integrity import check_sha256
from metaopt_core.mlops.registry.resolve import existing_store, parse_models_uri, resolve_version
from metaopt_core.mlops.tracking import connect
from metaopt_core.optim.divergence import ShapeMismatchError

ROLES = ("loss", "optimizer")


def fetch_export(uri: str, role: str, destination: Path, tracking_uri: str | None = None) -> tuple[Any, Path, str]:
    """The export behind ``uri`` as a folder: (its export kind, the folder, where it came from).

    ``models:/name/version|stage|@alias``: the version's export kind (tag ``metaopt.export_kind``;
    versions registered before export kinds: their role's kind), its files downloaded into
    ``destination`` and each checked against the sha256 recorded at registration. A path (an
    export folder, a model folder with ``artifacts/``, a ``loss.json``), ``file://``, ``runs:/``,
    ``models:/m-<id>`` or another artifact URI: read where it is (no registry tags to check).
    ``role`` (loss | optimizer) must be what the artifact is."""
    from metaopt_core import exports

    if role not in ROLES:
        raise ValueError(f"role: got {role!r}; allowed: {list(ROLES)}")
    if uri.startswith("file://") or not re.match(r"^[a-zA-Z][\w+.-]*:/", uri):
        local = Path(urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri)
        if not local.exists():
            raise FileNotFoundError(f"uri: {uri!r} is neither an existing path nor a models:/, runs:/ or other artifact URI")
        kind, folder = local_export(local, role, destination)
        return kind, folder, str(local)
    if uri.startswith("models:/") and not re.fullmatch(r"models:/m-[0-9a-f]+/?", uri):
        client = existing_store(tracking_uri)
        ref = parse_models_uri(uri)
        version = resolve_version(client, ref, uri)
        where = f"{uri} (model {ref.name!r} version {version.version})"
        registered_role = version.tags.get(TAG_KIND)
        if registered_role is not None and registered_role != role:
            loader = "load_optimizer" if registered_role == "optimizer" else "load_loss"
            raise WrongModelKindError(f"{where} is a registered {registered_role}, not a {role}; use {loader}")
        try:
            kind = exports.get(version.tags.get(TAG_EXPORT_KIND) or exports.LEGACY_KINDS[role])
        except exports.ExportError as exc:
            raise ArtifactValidationError(f"{where}: {exc} (registered by a newer metaopt-core?)") from None
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(client.get_model_version_download_uri(ref.name, version.version))
        folder = destination / "export"
        (destination / "download").mkdir(parents=True, exist_ok=True)
        for rel in kind.files:
            try:
                path = Path(repo.download_artifacts(f"artifacts/{rel}", str(destination / "download")))
            except (MlflowException, OSError) as exc:
                raise ArtifactValidationError(f"{where}: artifact artifacts/{rel} could not be downloaded ({exc}); not a metaopt {role} model?") from None
            check_sha256({rel: path}, {k[len(SHA_PREFIX) :]: v for k, v in version.tags.items() if k.startswith(SHA_PREFIX)}, where)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            path.replace(folder / rel)
        exports.mark(folder, kind)
        return kind, folder, where
    # runs:/, models:/m-<id>, s3://, mlflow-artifacts:/ ...: MLflow's generic download, no registry tags
    connect(tracking_uri)
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: could not download ({exc.message})") from None
    kind, folder = local_export(fetched, role, destination)
    return kind, folder, uri


def local_export(path: Path, role: str, scratch: Path) -> tuple[Any, Path]:
    """(kind, folder) of a local export: an export folder, a model folder (``artifacts/``), a bare
    ``save_divergence`` folder or one ``loss.json`` file (these two copied into ``scratch`` as an
    export folder)."""
    from metaopt_core import exports

    legacy = exports.get(exports.LEGACY_KINDS[role])
    if path.is_file():
        if role != "loss" or path.suffix != ".json":
            raise ArtifactValidationError(f"{path}: a {role} is a folder (an export or a model), not a file")
        sources = {legacy.files[0]: path}
    else:
        error = None
        for base in (path / "artifacts", path):
            try:
                return exports.kind_of(base, role), base
            except exports.ExportError as exc:
                error = error or exc
        sources = {rel: path / Path(rel).name for rel in legacy.files}  # a bare folder of the files
        if not all(source.is_file() for source in sources.values()):
            raise ArtifactValidationError(f"{path}: no {role} artifact found ({error})")
    folder = scratch / "local-export"
    for rel, source in sources.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(source.read_bytes())
    exports.mark(folder, legacy)
    return legacy, folder


def load_loss_doc(uri: str, *, tracking_uri: str | None = None) -> dict:
    """The validated loss document behind ``uri`` (``models:/...``, ``runs:/...``, a path), read
    through its export kind (complete in memory, whatever files the kind stores)."""
    from metaopt_core import exports

    with tempfile.TemporaryDirectory() as tmp:
        kind, folder, where = fetch_export(uri, "loss", Path(tmp), tracking_uri)
        try:
            return kind.read(folder, where)
        except (exports.ExportError, ValueError) as exc:
            raise ArtifactValidationError(str(exc)) from None


def load_loss(uri: str, *, reduction: str = "mean", tracking_uri: str | None = None, fallback: str | None = None) -> Any:
    """A ready loss module from a registered model (any loss export kind: ``TaylorLoss``, a named
    baseline, a learned neural loss, ...), with the ``lr_scale`` its meta-test measured applied.

    ``uri``: ``models:/itl/production``, ``models:/itl@production``, ``models:/itl/3``, ``runs:/...``,
    or a local export folder / model folder / ``loss.json``. Reads only the white-box files (never
    unpickles), checks them against the sha256 recorded at registration and validates them.
    ``fallback``: what to load instead when ``uri`` has no production version (an explicit opt-in
    with a warning: ``metaopt_core.mlops.registry.fallback``); None: that is an error.
    """
    from metaopt_core import exports

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")

    def load(chosen: str) -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            kind, folder, where = fetch_export(chosen, "loss", Path(tmp), tracking_uri)
            try:
                return kind.build(folder, reduction=reduction, source=where)
            except (exports.ExportError, ValueError) as exc:
                raise ArtifactValidationError(str(exc)) from None

    return with_fallback(load, uri, fallback)


def load_optimizer(uri: str, model: Any, lr: float | None = None, *, weight_decay: float = 0.0, tracking_uri: str | None = None,
                   partial: bool = False, fallback: str | None = None) -> Any:  # fmt: skip
    """A ready optimiser over ``model.parameters()`` from a registered one (a MetaMD divergence:
    ``MirrorDescent``).

    ``lr`` defaults to the one recorded in the artifact (the meta-test's, baked in at registration,
    else the meta-training lr). The model's parameter shapes must match the meta-trained
    architecture (``metaopt models show NAME/VERSION`` states it; a ``ShapeMismatchError`` names
    the first mismatch and both architectures). ``partial=True`` applies the learned metric to the
    layers that match and plain mirror descent (the identity metric) to the others
    (``optimizer.divergence.learned_parameters`` / ``identity_parameters``). ``fallback``: as for
    :func:`load_loss`.
    """
    from metaopt_core import exports

    def load(chosen: str) -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            kind, folder, where = fetch_export(chosen, "optimizer", Path(tmp), tracking_uri)
            try:
                return kind.build(folder, model=model, lr=lr, weight_decay=weight_decay, partial=partial, source=where)
            except exports.ExportError as exc:
                raise ArtifactValidationError(str(exc)) from None
            except ShapeMismatchError as exc:
                raise ShapeMismatchError(f"{where}: {exc}") from None

    return with_fallback(load, uri, fallback)


__all__ = ["fetch_export", "load_loss", "load_loss_doc", "load_optimizer", "local_export"]
