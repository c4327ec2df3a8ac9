"""The container images the components run in (built by the repository's ``Dockerfile``).

The default reference is ``ghcr.io/metaopt/metaopt:<version>-<commit>`` (CPU) and the same with
``-cuda`` (GPU steps): the version of metaopt-core and the first 12 hex digits of the git commit
the image is built from (``make image`` tags it so; inside the image the commit is
``METAOPT_GIT_COMMIT``, baked in at build time). Without a known commit the tag is the version
alone. ``METAOPT_IMAGE`` / ``METAOPT_IMAGE_CUDA`` replace the defaults, and so do the compile
options ``--image`` / ``--image-cuda``; a digest (``repo@sha256:...``) pins the exact image.
"""

from __future__ import annotations

import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

REPOSITORY = "ghcr.io/metaopt/metaopt"
CUDA_SUFFIX = "-cuda"
IMAGE_ENV, IMAGE_CUDA_ENV, COMMIT_ENV = "METAOPT_IMAGE", "METAOPT_IMAGE_CUDA", "METAOPT_GIT_COMMIT"
_REPO_ROOT = Path(__file__).resolve().parents[1]
# name[:tag][@sha256:digest], as `docker pull` accepts it; a tag or a digest is required below. A
# port belongs to the registry host, the component before a "/": in `image:1` the 1 is a tag.
_REFERENCE = re.compile(r"^(?P<name>(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
                        r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")  # fmt: skip


def package_version() -> str:
    """The installed metaopt-core version (0.1.0 in a source tree that was never installed)."""
    try:
        return metadata.version("metaopt-core")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def source_commit() -> str | None:
    """The full git commit of this code: ``METAOPT_GIT_COMMIT`` (set in the image), else the checkout's HEAD; None when unknown."""
    baked = os.environ.get(COMMIT_ENV, "").strip()
    if re.fullmatch(r"[0-9a-f]{40}", baked):
        return baked
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def default_tag(version: str | None = None, commit: str | None = None) -> str:
    """``<version>-<commit[:12]>``, or ``<version>`` when the commit is unknown."""
    version = version or package_version()
    commit = commit if commit is not None else source_commit()
    return f"{version}-{commit[:12]}" if commit else version


def validate_image(reference: str, what: str = "image") -> str:
    """A pullable, pinned reference: a tag other than ``latest``, or a sha256 digest."""
    match = _REFERENCE.match(reference or "")
    if not match or not (match["tag"] or match["digest"]):
        raise ValueError(f"{what}: got {reference!r}; allowed: REPOSITORY:TAG or REPOSITORY@sha256:<64 hex>, e.g. {REPOSITORY}:{default_tag()}")
    if match["tag"] == "latest" and not match["digest"]:
        raise ValueError(f"{what}: got {reference!r}; 'latest' moves between builds: use the version-commit tag or a digest")
    return reference


def cuda_variant(reference: str) -> str | None:
    """The CUDA image ``make image`` builds beside ``reference`` (its tag + ``-cuda``); None for a
    digest, whose CUDA twin has a digest of its own that no rule derives."""
    match = _REFERENCE.match(reference or "")
    if not match or match["digest"] or not match["tag"]:
        return None
    return f"{match['name']}:{match['tag']}{CUDA_SUFFIX}"


def resolve_images(image: str = "", image_cuda: str = "", *, gpu: bool = False) -> tuple[str, str]:
    """(CPU image, CUDA image) of a compile. The CUDA image is, in this order: ``image_cuda``; the
    CUDA variant of ``image``; ``$METAOPT_IMAGE_CUDA``; the CUDA variant of ``$METAOPT_IMAGE``; the
    version-commit tag. So ``--image X`` alone gives ``X-cuda`` to the GPU steps, never the default
    registry's. A digest has no derivable CUDA twin: with ``gpu`` that is an error naming the option."""
    tag = default_tag()
    env_cpu, env_cuda = os.environ.get(IMAGE_ENV, ""), os.environ.get(IMAGE_CUDA_ENV, "")
    cpu = validate_image(image, "image") if image else validate_image(env_cpu or f"{REPOSITORY}:{tag}", IMAGE_ENV)
    for explicit, base, what in ((image_cuda, image, "image_cuda"), (env_cuda, env_cpu, IMAGE_CUDA_ENV)):
        if explicit:
            return cpu, validate_image(explicit, what)
        if base:
            derived = cuda_variant(base)
            if derived is None and gpu:
                raise ValueError(f"image_cuda: the CPU image {base!r} is pinned by digest, so its CUDA image cannot be derived; "
                                 f"allowed: name it with --image-cuda (or ${IMAGE_CUDA_ENV}) as REPOSITORY:TAG or REPOSITORY@sha256:<64 hex>")  # fmt: skip
            return cpu, validate_image(derived or f"{REPOSITORY}:{tag}{CUDA_SUFFIX}", "image_cuda")
    return cpu, validate_image(f"{REPOSITORY}:{tag}{CUDA_SUFFIX}", "image_cuda")


def default_images() -> tuple[str, str]:
    """(CPU image, CUDA image) when the compile names none: from ``METAOPT_IMAGE`` /
    ``METAOPT_IMAGE_CUDA`` (the CUDA one derived from the CPU one when only that is set), else the
    version-commit tags of this checkout."""
    return resolve_images()


VERSION = package_version()
IMAGE, IMAGE_CUDA = default_images()  # every component's base_image; the builder sets the compile-time choice per task

__all__ = [
    "COMMIT_ENV",
    "CUDA_SUFFIX",
    "IMAGE",
    "IMAGE_CUDA",
    "IMAGE_CUDA_ENV",
    "IMAGE_ENV",
    "REPOSITORY",
    "VERSION",
    "cuda_variant",
    "default_images",
    "default_tag",
    "package_version",
    "resolve_images",
    "source_commit",
    "validate_image",
]
