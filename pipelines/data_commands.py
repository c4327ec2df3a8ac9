"""The ``metaopt data`` commands: datasets that scheduled pipelines read.

    metaopt data push DIR s3://bucket/prefix/     upload an image folder (only images that changed), then publish it
    metaopt data show URI [--json]                fingerprint, layout, domains, class counts; unreadable images, empty folders

A dataset is ``<class>/<image>`` or ``<domain>/<class>/<image>`` (``metaopt_core.data.folders``);
a pipeline reads it with ``data.source: s3://bucket/prefix/`` (or ``folder:<path>`` on a volume),
and meta-trains again when its fingerprint (the digest of its content manifest) changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_BAD_DATA = 0, 1


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
    print(f"pushed {len(report.uploaded)} image(s) ({report.bytes_uploaded} bytes), {report.unchanged} unchanged, to {args.uri}")
    print(f"published fingerprint {report.fingerprint} ({report.images} images)")
    for folder in report.empty_folders:
        print(f"warning: {folder}/ holds no image: nothing of it was pushed (a class absent there)")
    return EXIT_OK


def format_description(doc: dict) -> str:
    """``metaopt data show`` as text: one line per domain with its class counts, then what is wrong."""
    lines = [f"{doc['source']}", f"  fingerprint  {doc['fingerprint']}", f"  layout       {doc['layout']}",
             f"  images       {doc['images']} ({doc['bytes']} bytes), {len(doc['classes'])} classes"]  # fmt: skip
    if "published" in doc:
        state = "published by `metaopt data push`" if doc["published"] else "not published (read as listed: data push publishes it)"
        lines.append(f"  version      {state}" + (f"; {doc['unpublished']} image(s) not published yet" if doc.get("unpublished") else ""))
    if doc["domains"]:
        lines.append(f"  domains      {', '.join(doc['domains'])}")
    for domain, counts in doc["class_counts"].items():
        label = domain or "classes"
        lines.append(f"  {label:<12} " + ", ".join(f"{name}: {count}" for name, count in counts.items()))
    for folder in doc.get("empty_folders", []):
        lines.append(f"  empty        {folder}/ holds no image (a class absent there)")
    for bad in doc.get("unreadable", []):
        lines.append(f"  unreadable   {bad['key']}: {bad['reason']}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    from metaopt_core.mlops import datasets

    doc = datasets.describe(args.uri)
    print(json.dumps(doc, indent=2) if args.json else format_description(doc))
    if doc["unreadable"]:
        print(f"metaopt: error: {len(doc['unreadable'])} image(s) of {args.uri} do not decode (listed above); the pipeline's data step "
              "refuses them: fix or remove them", file=sys.stderr)  # fmt: skip
        return EXIT_BAD_DATA
    return EXIT_OK


__all__ = ["add_data_commands", "format_description"]
