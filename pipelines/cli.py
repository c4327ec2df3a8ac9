"""The ``metaopt`` command line.

    metaopt models list
    metaopt models show NAME[/VERSION]
    metaopt models promote NAME VERSION [--margin M] [--confidence C] | --override --reason TEXT
    metaopt loss plot URI -o loss.png

Structure: every command group is a function ``add_<group>_commands(subparsers)`` listed in
``COMMAND_GROUPS``; each leaf command sets ``handler`` (``handler(args) -> int``) with
``parser.set_defaults``. A new group (``run``, ``compile``, ``schedule``) is one more function
appended to ``COMMAND_GROUPS``. Heavy imports (MLflow, torch) happen inside the handlers, so
``metaopt --help`` stays fast.

Errors the user can fix (unknown model, no production version, unreachable tracking server,
storage and S3 credential errors, configuration and YAML errors, bad arguments) print one
``metaopt: error: ...`` line (the cause and what to do; never a secret) and exit with status 2; a promotion that is
rejected by the champion/challenger rule is a normal outcome (exit 0, or 3 with
``--fail-if-rejected`` for scripts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.data_commands import add_data_commands

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REJECTED = 3


class CommandError(Exception):
    """An error to report as one line, without a traceback."""


_TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"


def _add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri`` on a leaf command; SUPPRESS keeps a value given before the command
    (``metaopt --tracking-uri URI models list``) instead of overwriting it with None."""
    parser.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=_TRACKING_URI_HELP)


# ---------------------------------------------------------------------------------------- models


def add_models_commands(subparsers: Any) -> None:
    models = subparsers.add_parser("models", help="registered losses and optimisers (MLflow registry)")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="{list,show,promote}")

    listing = sub.add_parser("list", help="registered models with their production version")
    _add_tracking_uri(listing)
    listing.add_argument("--metric", default=None, help="score column to show (default: meta_test_accuracy)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_models_list)

    show = sub.add_parser("show", help="a model's versions, or one version's provenance and artifact")
    _add_tracking_uri(show)
    show.add_argument("model", metavar="NAME[/VERSION]")
    show.add_argument("--metric", default=None, help="score column to show (default: meta_test_accuracy)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(handler=_models_show)

    promote = sub.add_parser(
        "promote",
        help="promote a version by the pipelines' gate on its recorded meta-test (it must beat every tuned baseline and the "
        "production version it was compared with, with the stated confidence), or --override it with a recorded reason",
    )
    _add_tracking_uri(promote)
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--margin", type=float, default=None, help="required gain over every reference (default: the pipeline's)")
    promote.add_argument("--confidence", type=float, default=None, help="the gate's confidence (default: the pipeline's, 0.95)")
    promote.add_argument("--override", action="store_true", help="promote whatever the gate says; needs --reason, recorded on the version")
    promote.add_argument("--reason", default=None, metavar="TEXT", help="why the gate is overridden (with --override)")
    promote.add_argument("--fail-if-rejected", action="store_true", help=f"exit {EXIT_REJECTED} when not promoted")
    promote.set_defaults(handler=_models_promote)


def _metric(args: argparse.Namespace) -> str:
    from metaopt_core.mlops.registry import DEFAULT_METRIC

    return args.metric or DEFAULT_METRIC


def _models_list(args: argparse.Namespace) -> int:
    from metaopt_core.mlops.registry import list_models
    from metaopt_core.mlops.tracking import markdown_table

    rows = list_models(metric=_metric(args), tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no registered models")
    else:
        print(markdown_table(rows), end="")
    return EXIT_OK


def _split_model_arg(text: str) -> tuple[str, str | None]:
    name, _, version = text.partition("/")
    if not name or (version and not version.isdigit()):
        raise CommandError(f"NAME[/VERSION]: got {text!r}; allowed: a model name, optionally /<version number>")
    return name, version or None


def _models_show(args: argparse.Namespace) -> int:
    from metaopt_core.mlops.registry import describe_model, describe_version
    from metaopt_core.mlops.tracking import markdown_table

    name, version = _split_model_arg(args.model)
    if version is None:
        info = describe_model(name, metric=_metric(args), tracking_uri=args.tracking_uri)
        if args.json:
            print(json.dumps(info, indent=2))
            return EXIT_OK
        print(f"{info['name']} ({info['kind'] or 'unknown kind'}): production version {info['production'] or 'none'}")
        if info.get("fits"):
            print(f"production version {info['production']} fits {info['fits']}: load_optimizer takes a model of that shape")
        if not info["production"] and info["versions"]:
            print(f"nothing is in production: models:/{name}/production does not load (no version passed the gate; the reasons are below)")
        if info["description"]:
            print(info["description"])
        rows = [{k: v for k, v in row.items() if k != "reason"} for row in info["versions"]]
        print(markdown_table(rows) if rows else "no versions", end="")
        reasons = [(row["version"], row["reason"]) for row in info["versions"] if row.get("reason")]
        if reasons:
            print("promotion decisions:")
            for number, reason in reasons:
                print(f"  version {number}: {reason}")
        return EXIT_OK
    info = describe_version(name, version, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{name} version {info['version']}: stage {info['stage']}, aliases {info['aliases'] or 'none'}")
    print(f"created {info['created']} by run {info['run_id']}; source {info['source']}")
    if info.get("fits"):
        print(f"fits {info['fits']}: load_optimizer takes a model of that shape (partial=True: the layers that match)")
    if info.get("description"):
        print(info["description"])
    print("tags:")
    for key, value in info["tags"].items():
        print(f"  {key} = {value}")
    if "artifact" in info:
        print("artifact:")
        for key, value in info["artifact"].items():
            print(f"  {key}: {json.dumps(value)}")
    return EXIT_OK


def _models_promote(args: argparse.Namespace) -> int:
    from metaopt_core.mlops.registry import promote

    if args.override and not (args.reason or "").strip():
        raise CommandError("--override: needs --reason TEXT (why the gate is overridden; it is recorded on the version)")
    if args.reason and not args.override:
        raise CommandError("--reason: only with --override (the gate's own reason is recorded otherwise)")
    decision = promote(args.name, args.version, margin=args.margin, confidence=args.confidence,
                       override_reason=args.reason if args.override else None, tracking_uri=args.tracking_uri)  # fmt: skip
    print(decision)
    print(f"production version of {decision.name}: {decision.production_version or 'none'}")
    if not decision.promoted and args.fail_if_rejected:
        return EXIT_REJECTED
    return EXIT_OK


# ---------------------------------------------------------------------------------------- loss


def add_loss_commands(subparsers: Any) -> None:
    loss = subparsers.add_parser("loss", help="learned losses")
    sub = loss.add_subparsers(dest="loss_command", required=True, metavar="{plot}")
    plot = sub.add_parser("plot", help="plot a loss against cross-entropy (loss vs probability of the labelled class)")
    _add_tracking_uri(plot)
    plot.add_argument("uri", metavar="URI", help="models:/itl/production, models:/itl@production, a loss.json ...")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.add_argument("--no-ce", action="store_true", help="do not draw cross-entropy for comparison")
    plot.add_argument("--title", default=None, help="figure title")
    plot.set_defaults(handler=_loss_plot)


def _loss_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from metaopt_core.mlops.registry import load_loss
    from metaopt_core.mlops.tracking import loss_curves_input
    from metaopt_core.plots import plot_loss_curves

    loss = load_loss(args.uri, tracking_uri=args.tracking_uri)
    output = plot_loss_curves(loss_curves_input({args.uri: loss}, compare_ce=not args.no_ce), Path(args.output), title=args.title)
    print(f"wrote {output}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- entry point


def add_pipeline_group(subparsers: Any) -> None:
    # `run`, `compile`, `schedule` live with the pipelines they drive.
    from pipelines.commands import add_pipeline_commands

    add_pipeline_commands(subparsers)


COMMAND_GROUPS: list[Callable[[Any], None]] = [add_pipeline_group, add_models_commands, add_loss_commands, add_data_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaopt",
        description="Meta-learned losses (ARL, ITL) and optimisers (MetaMD): pipelines and the model registry.",
    )
    parser.add_argument("--tracking-uri", default=None, help=_TRACKING_URI_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in COMMAND_GROUPS:
        add_group(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions reported as one line (the rest keep their traceback: they are bugs). Storage
    errors (``StorageError``: S3 credentials, endpoints, buckets, keys; messages already name the
    URI and what to do, never a secret) and configuration errors (YAML syntax, fields) are the
    user's to fix."""
    errors: list[type[BaseException]] = [CommandError, ValueError, LookupError, FileNotFoundError, ConnectionError, TimeoutError]
    for module, name in (("mlflow.exceptions", "MlflowException"), ("metaopt_core.mlops.storage.errors", "StorageError"), ("yaml", "YAMLError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:  # pragma: no cover - dependencies of the project
            pass
    return tuple(errors)


def one_line(exc: BaseException) -> str:
    """An error as the single line the CLI prints: its lines joined with '; ', spaces collapsed."""
    lines = [" ".join(line.split()) for line in str(exc).strip().splitlines()]
    return "; ".join(line for line in lines if line) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``metaopt`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except _user_errors() as exc:
        print(f"metaopt: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print(f"metaopt: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
