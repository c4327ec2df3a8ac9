# syntax=docker/dockerfile:1
#
# The metaopt image that every Kubeflow component runs in. One Dockerfile, two variants, both
# built by `make image` (docker or podman) and tagged <version>-<first 12 hex of the git commit>,
# the tag `metaopt compile` uses by default:
#
#   CPU   ghcr.io/metaopt/metaopt:<version>-<commit>         e.g. ghcr.io/metaopt/metaopt:0.1.0-d46a6b54547a
#   CUDA  ghcr.io/metaopt/metaopt:<version>-<commit>-cuda    (TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130)
#
# By hand: docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t ghcr.io/metaopt/metaopt:0.1.0-<commit> .
# GIT_COMMIT is baked in as METAOPT_GIT_COMMIT (runs and registered versions record it as
# metaopt.git_commit). constraints.txt pins every dependency (`make constraints` regenerates it),
# so two builds of one commit install the same versions.
#
# Why the CUDA variant keeps the slim Python base: the CUDA torch wheels carry the CUDA 13.0
# user-space libraries (cuBLAS, cuDNN, NCCL ... as nvidia-* pip packages), so an nvidia/cuda
# base would only ship a second copy. The GPU node supplies the driver (>= 580 for CUDA 13)
# through the NVIDIA device plugin / container toolkit. BASE_IMAGE can still be swapped (an
# internal mirror, a pinned digest, or e.g. nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04):
# any Debian/Ubuntu base works; if it has no python3, Python comes from apt, and it must be
# >= 3.11 (Ubuntu 24.04: 3.12; Ubuntu 22.04's 3.10 is too old for the build step below).
#
# No ENTRYPOINT: Kubeflow Pipelines sets each step's command. No secrets are baked in:
# credentials arrive as environment variables from Kubernetes Secrets at run time.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=10001

LABEL org.opencontainers.image.title="metaopt" \
      org.opencontainers.image.description="Meta-learned losses (ARL, ITL) and optimisers (MetaMD) on Kubeflow + MLflow" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/metaopt/metaopt"

# NVIDIA_DRIVER_CAPABILITIES lets the NVIDIA runtime mount the CUDA driver libraries when a
# GPU is allocated. NVIDIA_VISIBLE_DEVICES is deliberately not set: the device plugin sets it
# per pod, and a baked-in "all" would expose every GPU of a node to pods that requested none.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Layer 1: Python (only if the base lacks it), the unprivileged user, and a virtual
# environment owned by that user, so a step that must `pip install` at run time (KFP
# lightweight components do when their kfp version differs) can, without root.
RUN set -eux; \
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, base has {sys.version}"'; \
    groupadd --gid "${APP_UID}" metaopt; \
    useradd --uid "${APP_UID}" --gid metaopt --create-home --shell /usr/sbin/nologin metaopt; \
    python3 -m venv "${VIRTUAL_ENV}"; \
    mkdir -p /app; \
    chown -R metaopt:metaopt "${VIRTUAL_ENV}" /app

USER ${APP_UID}
WORKDIR /app

# Layer 2: the dependency list, extracted from the two pyproject.toml files alone (the library
# metaopt-core and the pipeline app, which depends on it), so that source edits do not invalidate
# the (large) dependency layers below.
COPY --chown=metaopt:metaopt pyproject.toml constraints.txt /app/
COPY --chown=metaopt:metaopt app/pyproject.toml /app/app/pyproject.toml
RUN python -c "\
import re, tomllib; \
deps = [d for f in ('/app/pyproject.toml', '/app/app/pyproject.toml') for d in tomllib.load(open(f, 'rb'))['project']['dependencies']]; \
name = lambda d: re.match(r'[A-Za-z0-9_.-]+', d).group(0).lower(); \
torch = [d for d in deps if name(d) in ('torch', 'torchvision')]; \
rest = [d for d in deps if name(d) not in ('torch', 'torchvision', 'metaopt-core')]; \
assert torch, 'pyproject.toml lists no torch dependency'; \
open('/tmp/requirements-torch.txt', 'w').write('\n'.join(torch) + '\n'); \
open('/tmp/requirements.txt', 'w').write('\n'.join(rest) + '\n')" \
 && python -m pip install --upgrade pip "setuptools>=68" wheel

# Layer 3: torch and torchvision from the index of the chosen variant (CPU or CUDA wheels).
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" -c /app/constraints.txt -r /tmp/requirements-torch.txt

# Layer 4: everything else from PyPI; torch is already satisfied and stays the variant's build.
RUN python -m pip install -c /app/constraints.txt -r /tmp/requirements.txt

# Layer 5: the project itself (small, changes often), and the commit it was built from: declared
# here, after the dependency layers, so a new commit reuses them.
ARG GIT_COMMIT=""
ARG VERSION=0.1.0
LABEL org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.version="${VERSION}"
ENV METAOPT_GIT_COMMIT=${GIT_COMMIT}
COPY --chown=metaopt:metaopt README.md /app/README.md
COPY --chown=metaopt:metaopt metaopt_core /app/metaopt_core
COPY --chown=metaopt:metaopt components /app/components
COPY --chown=metaopt:metaopt pipelines /app/pipelines
COPY --chown=metaopt:metaopt configs /app/configs
RUN python -m pip install --no-deps --no-build-isolation /app /app/app \
 && rm -rf /app/build /app/*.egg-info /app/app/build /app/app/*.egg-info \
 && python -m pip check \
 && python -c "import metaopt_core, components, pipelines, torch; print('metaopt image ok, torch', torch.__version__)"

CMD ["metaopt", "--help"]
