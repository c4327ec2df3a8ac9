"""The ``metaopt`` command line.

    metaopt models list
    metaopt models show NAME[/VERSION]
    metaopt models promote NAME VERSION [--force] [--margin M] [--metric NAME] [--lower-is-better]
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
        help="manual promotion to production (stage Production + alias production) by the recorded scores; "
        "pipelines decide with the paired champion/challenger gate instead",
    )
    _add_tracking_uri(promote)
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--force", action="store_true", help="promote even if it does not beat production")
    promote.add_argument("--margin", type=float, default=0.0, help="required improvement over production (default 0)")
    promote.add_argument("--metric", default=None, help="score compared (default: meta_test_accuracy)")
    promote.add_argument("--lower-is-better", action="store_true", help="the metric is an error, not an accuracy")
    promote.add_argument(
        "--score",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="challenger score to record and compare (repeatable); default: the scores registered with it",
    )
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
    if "loss" in info:
        loss = info["loss"]
        print("loss:")
        for key in ("family", "order", "form", "sign", "class_reduction", "normalisation", "params"):
            if key in loss:
                print(f"  {key}: {json.dumps(loss[key])}")
    return EXIT_OK


def _parse_scores(items: Sequence[str]) -> dict[str, float]:
    scores = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            scores[key] = float(value)
        except ValueError:
            raise CommandError(f"--score: got {item!r}; allowed: METRIC=NUMBER, e.g. meta_test_accuracy=0.83") from None
    return scores


def _models_promote(args: argparse.Namespace) -> int:
    from metaopt_core.mlops.registry import promote

    decision = promote(
        args.name,
        args.version,
        _parse_scores(args.score) or None,
        metric=_metric(args),
        margin=args.margin,
        greater_is_better=not args.lower_is_better,
        force=args.force,
        tracking_uri=args.tracking_uri,
    )
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
