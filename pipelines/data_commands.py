"""The ``metaopt data`` commands: datasets that scheduled pipelines read.

    metaopt data push DIR s3://bucket/prefix/     upload an image folder (only images that changed)
    metaopt data show URI [--json]                fingerprint, layout, domains and class counts

A dataset is ``<class>/<image>`` or ``<domain>/<class>/<image>`` (``metaopt_core.data.folders``);
a pipeline reads it with ``data.source: s3://bucket/prefix/`` (or ``folder:<path>`` on a volume),
and meta-trains again when its fingerprint (the digest of its content manifest) changes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

EXIT_OK = 0


def add_data_commands(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="datasets in object storage or folders: push, show")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{push,show}")
    push = sub.add_parser("push", help="upload a local image folder to s3://bucket/prefix/ (only images that changed)")
    push.add_argument("directory", metavar="DIR", help="<class>/<image> or <domain>/<class>/<image> folder")
    push.add_argument("uri", metavar="URI", help="s3://bucket/prefix/ (endpoint and credentials from S3_ENDPOINT_URL and the AWS variables)")
    push.add_argument("--quiet", action="store_true", help="no progress bar")
    push.set_defaults(handler=_push)
    show = sub.add_parser("show", help="a dataset's fingerprint, layout, domains and class counts")
    show.add_argument("uri", metavar="URI", help="s3://bucket/prefix/, folder:<path> or a path")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)


def _push(args: argparse.Namespace) -> int:
    from metaopt_core.mlops import datasets

    report = datasets.push(args.directory, args.uri, progress=not args.quiet)
    after = datasets.describe(args.uri)
    print(f"pushed {len(report.uploaded)} image(s) ({report.bytes_uploaded} bytes), {report.unchanged} unchanged, to {args.uri}")
    print(f"fingerprint {after['fingerprint']} ({after['images']} images)")
    return EXIT_OK


def format_description(doc: dict) -> str:
    """``metaopt data show`` as text: one line per domain with its class counts."""
    lines = [f"{doc['source']}", f"  fingerprint  {doc['fingerprint']}", f"  layout       {doc['layout']}",
             f"  images       {doc['images']} ({doc['bytes']} bytes), {len(doc['classes'])} classes"]  # fmt: skip
    if doc["domains"]:
        lines.append(f"  domains      {', '.join(doc['domains'])}")
    for domain, counts in doc["class_counts"].items():
        label = domain or "classes"
        lines.append(f"  {label:<12} " + ", ".join(f"{name}: {count}" for name, count in counts.items()))
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    from metaopt_core.mlops import datasets

    doc = datasets.describe(args.uri)
    print(json.dumps(doc, indent=2) if args.json else format_description(doc))
    return EXIT_OK


__all__ = ["add_data_commands", "format_description"]
