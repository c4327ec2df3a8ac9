"""Refresh the vendored upstream artifacts of the contract tests (run by hand, never by the tests).

    python tests/upstream/vendor.py MIRRORS_DIR

MIRRORS_DIR holds bare clones named ``<owner>+<repo>/repo`` (kubeflow+pipelines, kubeflow+trainer,
kubeflow+manifests). Every file is taken with ``git show <tag>:<path>`` from the release tag, so
what lands here is the released file byte for byte; the large CRDs are stored gzip-compressed
(mtime 0, so re-running is byte-stable). The KFP descriptors are the serialized
``FileDescriptorProto`` that the backend binary of that release is built with: the ``rawDesc`` of
the generated Go code (``api/v2alpha1/go/pipelinespec/pipeline_spec.pb.go``,
``kubernetes_platform/go/kubernetesplatform/kubernetes_executor_config.pb.go``), read here so the
tests need neither protoc nor Go. ``SOURCES.json`` records, per file, the repository, tag, commit
and git blob id of the source, which anyone can check against GitHub.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

KFP_RELEASES = ["2.5.0", "2.15.0", "2.17.0"]
TRAINER_RELEASES = ["v2.1.0", "v2.2.1", "v2.3.0"]
MANIFESTS_RELEASE = "v1.11.0"

KFP_FILES = {  # vendored name -> path in kubeflow/pipelines
    "pipeline_spec.proto": "api/v2alpha1/pipeline_spec.proto",
    "kubernetes_executor_config.proto": "kubernetes_platform/proto/kubernetes_executor_config.proto",
}
KFP_MANIFESTS = {  # standalone KFP's pipeline-runner rights (what the local overlay adds to)
    "pipeline-runner-role.yaml": "manifests/kustomize/base/pipeline/pipeline-runner-role.yaml",
    "pipeline-runner-rolebinding.yaml": "manifests/kustomize/base/pipeline/pipeline-runner-rolebinding.yaml",
}
KFP_DESCRIPTORS = {  # vendored name -> (Go file, Go variable holding the raw descriptor)
    "pipeline_spec.binpb": ("api/v2alpha1/go/pipelinespec/pipeline_spec.pb.go", "file_pipeline_spec_proto_rawDesc"),
    "kubernetes_executor_config.binpb": (
        "kubernetes_platform/go/kubernetesplatform/kubernetes_executor_config.pb.go",
        "file_kubernetes_executor_config_proto_rawDesc",
    ),
}
TRAINER_FILES = {
    "trainer.kubeflow.org_clustertrainingruntimes.yaml.gz": "manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "trainer.kubeflow.org_trainjobs.yaml.gz": "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml",
    "kubeflow-trainer-roles.yaml": "manifests/overlays/kubeflow-platform/kubeflow-trainer-roles.yaml",
}
MANIFESTS_FILES = {"cluster-roles.yaml": "common/kubeflow-roles/base/cluster-roles.yaml"}

_GO_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34, "'": 39}


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True, capture_output=True).stdout


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _go_string(literal: str) -> bytes:
    """The bytes of one Go interpreted string literal's body (without the quotes)."""
    out, i = bytearray(), 0
    while i < len(literal):
        char = literal[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        kind = literal[i + 1]
        if kind == "x":
            out.append(int(literal[i + 2 : i + 4], 16))
            i += 4
        elif kind in "01234567":
            out.append(int(literal[i + 1 : i + 4], 8))
            i += 4
        elif kind in ("u", "U"):
            width = 4 if kind == "u" else 8
            out += chr(int(literal[i + 2 : i + 2 + width], 16)).encode()
            i += 2 + width
        else:
            out.append(_GO_ESCAPES[kind])
            i += 2
    return bytes(out)


def go_raw_descriptor(source: str, variable: str) -> bytes:
    """The serialized FileDescriptorProto that protoc-gen-go embedded as ``variable``: a
    ``[]byte{0x0a, ...}`` (protoc-gen-go < 1.36) or a concatenated string constant (1.36+)."""
    match = re.search(rf"(?:var|const) {variable} = (\[\]byte\{{(.*?)\n\}}|\"\"(.*?)\n\n)", source, flags=re.S)
    if match is None:
        raise SystemExit(f"{variable} not found")
    if match.group(2) is not None:
        return bytes(int(token, 16) for token in re.findall(r"0x[0-9a-fA-F]{2}", match.group(2)))
    return b"".join(_go_string(part) for part in re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(3)))


def main(mirrors: Path) -> None:
    sources: dict[str, dict] = {}

    def record(target: Path, repo_name: str, repo: Path, tag: str, path: str, data: bytes, note: str = "") -> None:
        commit = git(repo, "rev-parse", f"{tag}^{{commit}}").decode().strip()
        entry = {"repository": f"https://github.com/{repo_name}", "tag": tag, "commit": commit, "path": path,
                 "url": f"https://github.com/{repo_name}/blob/{tag}/{path}", "git_blob": blob_id(data)}  # fmt: skip
        if note:
            entry["note"] = note
        sources[str(target.relative_to(HERE))] = entry

    pipelines = mirrors / "kubeflow+pipelines" / "repo"
    for tag in KFP_RELEASES:
        folder = HERE / f"kfp-{tag}"
        folder.mkdir(exist_ok=True)
        for name, path in {**KFP_FILES, **KFP_MANIFESTS}.items():
            data = git(pipelines, "show", f"{tag}:{path}")
            (folder / name).write_bytes(data)
            record(folder / name, "kubeflow/pipelines", pipelines, tag, path, data)
        for name, (path, variable) in KFP_DESCRIPTORS.items():
            data = git(pipelines, "show", f"{tag}:{path}")
            (folder / name).write_bytes(go_raw_descriptor(data.decode(), variable))
            record(folder / name, "kubeflow/pipelines", pipelines, tag, path, data, f"the FileDescriptorProto of Go variable {variable}")
    trainer = mirrors / "kubeflow+trainer" / "repo"
    for tag in TRAINER_RELEASES:
        folder = HERE / f"trainer-{tag}"
        folder.mkdir(exist_ok=True)
        for name, path in TRAINER_FILES.items():
            data = git(trainer, "show", f"{tag}:{path}")
            if name.endswith(".gz"):
                (folder / name).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
                record(folder / name, "kubeflow/trainer", trainer, tag, path, data, "gzip-compressed; git_blob is of the uncompressed file")
            else:
                (folder / name).write_bytes(data)
                record(folder / name, "kubeflow/trainer", trainer, tag, path, data)
    manifests = mirrors / "kubeflow+manifests" / "repo"
    folder = HERE / f"kubeflow-manifests-{MANIFESTS_RELEASE}"
    folder.mkdir(exist_ok=True)
    for name, path in MANIFESTS_FILES.items():
        data = git(manifests, "show", f"{MANIFESTS_RELEASE}:{path}")
        (folder / name).write_bytes(data)
        record(folder / name, "kubeflow/manifests", manifests, MANIFESTS_RELEASE, path, data)
    (HERE / "SOURCES.json").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
