"""Cluster pieces of the ``metaopt`` CLI: how a command reaches Kubeflow Pipelines (endpoint,
namespace, credentials), the image and step-size options of a compile, and ``metaopt pipelines upload``.

    metaopt pipelines upload LEARNER --host URL [--namespace NS] [--token-file PATH | --cookie-file PATH]
                             [--config FILE] [--gpu] [--image REF] [--resources KIND.FIELD=VALUE] [--version NAME]

Credentials never go on the command line: a token file, ``$KFP_TOKEN`` or a cookie
(``--cookie-file`` / ``$KFP_COOKIE``); see ``pipelines/kfp_client.py``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.kfp_client import COOKIE_ENV, NAMESPACE_ENV, TOKEN_ENV


def add_connection_arguments(parser: argparse.ArgumentParser, *, host_required: bool = True) -> None:
    """``--host`` (unless the caller has it), ``--namespace``, ``--token-file``, ``--cookie-file``."""
    if host_required:
        parser.add_argument("--host", required=True, metavar="URL", help="the Kubeflow Pipelines endpoint")
    parser.add_argument("--namespace", default=None, metavar="NS",
                        help=f"multi-user Kubeflow: your profile namespace (default ${NAMESPACE_ENV}; standalone KFP: none)")  # fmt: skip
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help=f"a file holding a bearer token, re-read per request (in a Kubeflow pod: the service-account token "
                             f"/var/run/secrets/kubeflow/pipelines/token); else ${TOKEN_ENV} holds one")  # fmt: skip
    parser.add_argument("--cookie-file", default=None, metavar="PATH",
                        help=f"a file holding the session cookie (authservice_session=...); else ${COOKIE_ENV}")  # fmt: skip


def add_image_and_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """``--image``, ``--image-cuda`` and ``--resources`` of a cluster compile."""
    parser.add_argument("--image", default=None, metavar="REF",
                        help="the steps' image (default $METAOPT_IMAGE, else ghcr.io/metaopt/metaopt:<version>-<commit>); a digest pins it")  # fmt: skip
    parser.add_argument("--image-cuda", default=None, metavar="REF",
                        help="the GPU steps' image (default: --image's tag + -cuda; else $METAOPT_IMAGE_CUDA, else $METAOPT_IMAGE's -cuda variant, "
                             "else the -cuda tag); required with --gpu when --image is a digest")  # fmt: skip
    parser.add_argument("--resources", action="append", default=[], metavar="KIND.FIELD=VALUE",
                        help="change a step kind's size, repeatable: train.memory_limit=32Gi, meta_test.timeout=6h "
                             "(kinds: control, data, train, meta_test, submit; fields: cpu, cpu_limit, memory, memory_limit, timeout)")  # fmt: skip


def image_and_resource_options(args: argparse.Namespace) -> dict[str, Any]:
    """The PipelineOptions fields the arguments of :func:`add_image_and_resource_arguments` give."""
    from pipelines.resources import parse_overrides

    values: dict[str, Any] = {}
    if getattr(args, "image", None):
        values["image"] = args.image
    if getattr(args, "image_cuda", None):
        values["image_cuda"] = args.image_cuda
    if getattr(args, "resources", None):
        values["resources"] = parse_overrides(args.resources)
    return values


def connection_of(args: argparse.Namespace) -> Any:
    """The :class:`~pipelines.kfp_client.Connection` the arguments describe."""
    from pipelines.kfp_client import connection

    return connection(args.host, getattr(args, "namespace", None), token_file=getattr(args, "token_file", None),
                      cookie_file=getattr(args, "cookie_file", None))  # fmt: skip


def add_upload_command(subparsers: Any, add_shape: Any) -> None:
    """``metaopt pipelines upload``; ``add_shape`` adds the compile options (blocks, shards, gpu, ...)."""
    group = subparsers.add_parser("pipelines", help="pipelines in the Kubeflow Pipelines UI")
    sub = group.add_subparsers(dest="pipelines_command", required=True, metavar="{upload}")
    up = sub.add_parser("upload", help="compile and upload a pipeline: created the first time, then a new version per upload")
    up.add_argument("algorithm", metavar="LEARNER", help="a registered learner name or package.module:Class")
    add_connection_arguments(up)
    up.add_argument("--config", default=None, metavar="FILE", help="default of the 'config' parameter (default: the demo configuration)")
    up.add_argument("--version", default=None, metavar="NAME", help="version name (default: <UTC time>-<content hash>)")
    add_shape(up)
    up.set_defaults(handler=_upload)


def _upload(args: argparse.Namespace) -> int:
    from metaopt_core.config import read_config
    from pipelines import remote
    from pipelines.commands import pipeline_options

    options = pipeline_options(args, local=False)
    config = read_config(args.config, algorithm=args.algorithm) if args.config else None
    done = remote.upload_pipeline(args.algorithm, connection_of(args), options=options, config=config, version=args.version)
    print(f"{args.algorithm}: pipeline {done['name']} ({done['pipeline_id']}), version {done['version']} ({done['version_id']})")
    return 0


__all__ = ["add_connection_arguments", "add_image_and_resource_arguments", "add_upload_command", "connection_of", "image_and_resource_options"]
