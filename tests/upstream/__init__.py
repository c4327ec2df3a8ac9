"""Released upstream artifacts the contract tests check metaopt against, and their loaders.

Each folder holds files of one upstream release, byte for byte as that release's git tag has them
(large CRDs gzip-compressed): ``SOURCES.json`` names repository, tag, commit, path and git blob id
of each, ``README.md`` says why each is here, and ``vendor.py`` refreshes them from clones. Nothing
here reaches the network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# The supported versions whose artifacts are vendored (infra/README.md, "Supported versions").
KFP_BACKENDS = ("2.5.0", "2.15.0", "2.17.0")
OLDEST_KFP_BACKEND = KFP_BACKENDS[0]
TRAINER_RELEASES = ("v2.1.0", "v2.2.1", "v2.3.0")
KUBEFLOW_MANIFESTS = "v1.11.0"


def sources() -> dict[str, dict]:
    return json.loads((HERE / "SOURCES.json").read_text())


def read_bytes(relative: str) -> bytes:
    """A vendored file's upstream bytes (decompressed where stored as .gz)."""
    data = (HERE / relative).read_bytes()
    return gzip.decompress(data) if relative.endswith(".gz") else data


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ----------------------------------------------------------------------------- KFP protos


@functools.cache
def kfp_pool(version: str) -> Any:
    """A private descriptor pool with the pipeline-spec and kubernetes-platform messages that the
    KFP backend ``version`` is built with (never the kfp SDK's own, newer, modules)."""
    from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, struct_pb2
    from google.rpc import status_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (any_pb2, duration_pb2, struct_pb2, status_pb2):  # what pipeline_spec.proto imports
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    for name in ("pipeline_spec", "kubernetes_executor_config"):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString((HERE / f"kfp-{version}" / f"{name}.binpb").read_bytes()))
    return pool


def kfp_message(version: str, full_name: str) -> Any:
    """A fresh, empty message ``full_name`` (e.g. ``ml_pipelines.PipelineSpec``) of backend ``version``."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(kfp_pool(version).FindMessageTypeByName(full_name))()


def parse_strict(version: str, full_name: str, document: dict) -> Any:
    """``document`` parsed as ``full_name`` of backend ``version``; a field that release does not
    know is an error (``google.protobuf.json_format.ParseError``), as in its API server."""
    from google.protobuf import json_format

    return json_format.ParseDict(document, kfp_message(version, full_name), ignore_unknown_fields=False, descriptor_pool=kfp_pool(version))


# ----------------------------------------------------------------------------- Kubeflow Trainer


@functools.cache
def trainer_crd(release: str, plural: str) -> dict:
    """The CustomResourceDefinition ``trainer.kubeflow.org_<plural>.yaml`` of Trainer ``release``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB of YAML each
    return yaml.load(read_bytes(f"trainer-{release}/trainer.kubeflow.org_{plural}.yaml.gz"), Loader=loader)  # noqa: S506 (a safe loader)


def trainer_roles(release: str) -> list[dict]:
    """The platform roles of Trainer ``release`` (manifests/overlays/kubeflow-platform)."""
    return [doc for doc in yaml.safe_load_all(read_bytes(f"trainer-{release}/kubeflow-trainer-roles.yaml")) if doc]


def kfp_pipeline_runner_rbac(version: str, namespace: str = "kubeflow") -> list[dict]:
    """Standalone KFP's Role and RoleBinding of ``pipeline-runner`` at backend ``version``, in
    ``namespace`` (kustomize puts them there, the subject included, as KFP's kustomization holds the
    ServiceAccount too)."""
    objects = []
    for name in ("pipeline-runner-role.yaml", "pipeline-runner-rolebinding.yaml"):
        obj = yaml.safe_load(read_bytes(f"kfp-{version}/{name}"))
        obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            subject.setdefault("namespace", namespace)
        objects.append(obj)
    return objects


def kubeflow_roles() -> list[dict]:
    """Kubeflow's aggregated ClusterRoles (kubeflow-admin/edit/view) of kubeflow/manifests."""
    return [doc for doc in yaml.safe_load_all(read_bytes(f"kubeflow-manifests-{KUBEFLOW_MANIFESTS}/cluster-roles.yaml")) if doc]
