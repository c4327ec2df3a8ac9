"""The container images the components run in (built by the repository's ``Dockerfile``)."""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("metaopt")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0"


VERSION = _version()
IMAGE = f"ghcr.io/metaopt/metaopt:{VERSION}"  # CPU image: every component's base_image
IMAGE_CUDA = f"ghcr.io/metaopt/metaopt:{VERSION}-cuda"  # GPU steps, when a pipeline is compiled with gpu=True

__all__ = ["IMAGE", "IMAGE_CUDA", "VERSION"]
