"""The pipeline commands of the ``metaopt`` CLI: ``run``, ``compile`` and ``schedule``.

    metaopt run LEARNER|all [--config FILE] [--local | --host URL]
    metaopt run LEARNER --local --workers N [--config FILE]     (torch.distributed on this machine)
    metaopt compile LEARNER -o FILE.yaml [--blocks N] [--shards K] [--gpu] [--workers N [--nodes M]]
    metaopt schedule create LEARNER --host URL --cron "0 0 3 * * 0" [--config-uri URI]
    metaopt schedule list --host URL
    metaopt schedule delete ID --host URL
    metaopt pipelines upload LEARNER --host URL [--namespace NS]     (a new pipeline version per upload)

Cluster commands take --namespace and credentials (--token-file, --cookie-file, $KFP_TOKEN,
$KFP_COOKIE: pipelines/kfp_client.py); compiles take --image / --image-cuda / --resources.

LEARNER is any registered learner (the built-ins of ``metaopt_core.meta.registry.BUILTIN``, entry
points of the ``metaopt.learners`` group) or an import reference ``package.module:LearnerClass``.
``pipelines.cli`` adds them with :func:`add_pipeline_commands`. Every handler returns an exit
status; heavy imports (kfp, torch, MLflow) happen inside the handlers so ``metaopt --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pipelines.cluster_commands import (
    add_connection_arguments,
    add_image_and_resource_arguments,
    add_upload_command,
    connection_of,
    image_and_resource_options,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _at_least(minimum: int, flag: str, allowed: str) -> Any:
    """An argparse type: an int >= ``minimum`` (argparse reports the error before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: an integer, {allowed}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"got {value}; allowed: {allowed}")
        return value

    parse.__name__ = flag  # what argparse names in "invalid <type> value"
    return parse


def _add_shape(parser: argparse.ArgumentParser, *, gpu: bool = True) -> None:
    parser.add_argument("--blocks", type=int, default=None, help="meta-training blocks in the DAG (default 3)")
    parser.add_argument("--shards", type=int, default=1,
                        help="fan each outer step out over K parallel tasks (K > 1: one outer step per block; default 1)")  # fmt: skip
    if gpu:
        parser.add_argument("--gpu", action="store_true", help="meta-training and meta-test steps request an NVIDIA GPU (cluster only)")
    parser.add_argument("--workers", type=_at_least(0, "--workers", "0 (the default: no torch.distributed workers) or more"), default=0, metavar="N",
                        help="meta-train with N >= 1 torch.distributed workers: on a cluster one TrainJob step; with --local one torchrun "
                             "on this machine (docs/pipelines.md); 0, the default, does not")  # fmt: skip
    parser.add_argument("--nodes", type=_at_least(1, "--nodes", "1 or more"), default=1, metavar="M",
                        help="cluster: spread the --workers over M nodes (default 1)")  # fmt: skip
    if gpu:  # cluster-only options, like --gpu
        parser.add_argument("--data-pvc", default="", metavar="CLAIM",
                            help="mount this PersistentVolumeClaim into the data step (data source: folder:<--data-mount>/...)")  # fmt: skip
        parser.add_argument("--data-mount", default="/data", metavar="PATH", help="where --data-pvc is mounted (default /data)")
        add_image_and_resource_arguments(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE", help="run configuration (default: configs/<algorithm>-demo.yaml)")
    parser.add_argument("--force-retrain", action="store_true", help="meta-train even if data and config are unchanged since the last meta-training")
    parser.add_argument("--model-name", default=None, help="registered model name (default: the algorithm's name)")
    parser.add_argument("--meta-test", action="append", default=[], metavar="KEY=VALUE",
                        help="meta-test setting, repeatable (values are YAML): --meta-test epochs=5 --meta-test seeds=[0,1]")  # fmt: skip
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: metaopt)")
    parser.add_argument("--promotion-margin", type=float, default=None, help="required meta-test improvement over production (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a configuration field, repeatable (dot path, YAML value): --set outer.steps=5")  # fmt: skip


def add_pipeline_commands(subparsers: Any) -> None:
    """Register ``run``, ``compile`` and ``schedule`` on the ``metaopt`` parser's subparsers."""
    run = subparsers.add_parser("run", help="run a meta-training pipeline: locally (kfp.local + MLflow on ./mlflow.db) or on a KFP cluster")
    run.add_argument("algorithm", metavar="LEARNER", help="which learner's pipeline: a registered name, package.module:Class, or 'all' (the built-ins in turn)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run here with kfp.local (the default)")
    where.add_argument("--host", default=None, metavar="URL", help="submit to the Kubeflow Pipelines endpoint at URL")
    add_connection_arguments(run, host_required=False)
    _add_run_arguments(run)
    _add_shape(run)
    run.add_argument("--preset", choices=["quick", "demo"], default=None,
                     help="quick: the demo configurations shortened for a first local run (its measured time: docs/benchmarks.md; "
                          "the default for local runs without --config); demo: the configuration as written")  # fmt: skip
    run.add_argument("--tracking-uri", default=None, help="local runs: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    run.add_argument("--config-uri", default=None, metavar="URI", help="cluster runs: a configuration the cluster reads (s3://...)")
    run.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="cluster runs: wait up to SECONDS for the run to finish")
    run.set_defaults(handler=_run)

    compile_ = subparsers.add_parser("compile", help="compile a pipeline to Kubeflow Pipelines IR YAML")
    compile_.add_argument("algorithm", metavar="LEARNER", help="a registered learner name or package.module:Class")
    compile_.add_argument("-o", "--output", required=True, metavar="FILE.yaml")
    compile_.add_argument("--config", default=None, metavar="FILE", help="default of the 'config' parameter (default: the demo configuration)")
    compile_.add_argument("--no-cluster-env", action="store_true", help="do not attach the metaopt-runtime ConfigMap / metaopt-s3 Secret")
    _add_shape(compile_)
    compile_.set_defaults(handler=_compile)

    schedule = subparsers.add_parser("schedule", help="recurring meta-training runs on a KFP cluster (re-trains only on new data)")
    sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="{create,list,delete}")
    create = sub.add_parser("create", help="a recurring run on a 6-field cron schedule (seconds first)")
    create.add_argument("algorithm", metavar="LEARNER", help="a registered learner name or package.module:Class")
    add_connection_arguments(create)
    create.add_argument("--cron", required=True, help='six fields, seconds first: "0 0 3 * * 0" = Sundays 03:00:00')
    create.add_argument("--name", default=None, help="recurring run name (default metaopt-<algorithm>-scheduled)")
    create.add_argument("--config-uri", default=None, metavar="URI", help="a configuration the cluster reads at every run (s3://...)")
    create.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once (default 1)")
    create.add_argument("--catchup", action="store_true", help="after downtime, run once per missed slot (default: once)")
    _add_run_arguments(create)
    _add_shape(create)
    create.set_defaults(handler=_schedule_create)
    listing = sub.add_parser("list", help="recurring runs at the endpoint")
    add_connection_arguments(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_schedule_list)
    delete = sub.add_parser("delete", help="delete a recurring run")
    delete.add_argument("id", metavar="ID")
    add_connection_arguments(delete)
    delete.set_defaults(handler=_schedule_delete)
    add_upload_command(subparsers, _add_shape)


# ----------------------------------------------------------------------------- helpers


def _options(args: argparse.Namespace, *, local: bool) -> Any:
    from pipelines.builder import PipelineOptions

    values: dict[str, Any] = {"shards": args.shards, "gpu": bool(getattr(args, "gpu", False))}
    if getattr(args, "workers", 0):
        values.update(workers=args.workers, nodes=args.nodes)
    if args.blocks is not None:
        values["blocks"] = args.blocks
    if getattr(args, "data_pvc", ""):
        values.update(data_volume=args.data_pvc, data_mount=args.data_mount)
    if local:
        if values["gpu"]:
            raise ValueError("--gpu: the local runner is CPU only; use it with --host, `metaopt compile` or `metaopt schedule`")
        if values.get("data_volume"):
            raise ValueError("--data-pvc: the local runner mounts no volumes; name the folder as the data source (folder:<path>)")
        values["cluster_env"] = False
        values["retries"] = False  # locally a failure is a bug or a bad setting: repeating it helps nobody
        if image_and_resource_options(args):
            raise ValueError("--image / --image-cuda / --resources: cluster options; the local runner uses this Python environment")
    else:
        values["cluster_env"] = not getattr(args, "no_cluster_env", False)
        values.update(image_and_resource_options(args))
    return PipelineOptions(**values)


pipeline_options = _options  # public: the cluster commands build their options the same way


def _key_values(items: list[str], flag: str = "--meta-test", example: str = "epochs=5 or seeds=[0,1]") -> dict:
    from metaopt_core.config import parse_yaml

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag}: got {item!r}; allowed: KEY=VALUE, e.g. {example}")
        settings[key.strip()] = parse_yaml(value, f"{flag} {item!r}")
    return settings


def _meta_test_settings(items: list[str]) -> dict:
    return _key_values(items)


def _preset(args: argparse.Namespace, *, local: bool) -> str:
    preset = getattr(args, "preset", None)
    return preset if preset is not None else "quick" if local and not args.config else "demo"


def meta_test_settings_for(args: argparse.Namespace, algorithm: str, *, local: bool) -> dict | None:
    """The meta-test settings of one learner: the preset's (the learner's defaults with the
    preset's changes), then ``--meta-test`` over the learner's defaults (what the pipeline's
    ``meta_test_settings`` parameter holds when none are given), checked before any work; None
    when neither changes anything."""
    from pipelines.builder import learner_of, preset_meta_test

    given = {**preset_meta_test(_preset(args, local=local), algorithm), **_meta_test_settings(args.meta_test)}
    if not given:
        return None
    learner = learner_of(algorithm)
    settings = {**learner.default_meta_test, **given}
    learner.resolve_meta_test(settings, source="--meta-test")
    return settings


def run_overrides(args: argparse.Namespace, algorithm: str, *, local: bool) -> dict:
    """The preset's overrides (quick by default for local runs of the demo configurations), then --set."""
    from pipelines.builder import preset_overrides

    overrides = preset_overrides(_preset(args, local=local), algorithm)
    overrides.update(_key_values(args.overrides, "--set", "outer.steps=5 or train.epochs=4"))
    return overrides


def _algorithms(args: argparse.Namespace) -> list[str]:
    from metaopt_core.meta import registry

    if args.algorithm != "all":
        registry.get(args.algorithm)  # an unknown name fails here, listing the known ones
        return [args.algorithm]
    if args.config or getattr(args, "config_uri", None):
        raise ValueError("--config / --config-uri: give them with one learner (each has its own configuration schema), not with 'all'")
    return list(registry.BUILTIN)


# ----------------------------------------------------------------------------- handlers


def _run(args: argparse.Namespace) -> int:
    algorithms = _algorithms(args)
    settings_of = {algorithm: meta_test_settings_for(args, algorithm, local=not args.host) for algorithm in algorithms}
    if args.host:
        return _run_remote(args, algorithms, settings_of)
    if args.config_uri or args.wait is not None or args.namespace or args.token_file or args.cookie_file:
        raise ValueError("--config-uri / --wait / --namespace / --token-file / --cookie-file: for cluster runs (--host); locally use --config FILE")
    if args.workers:
        from pipelines.distributed_local import run_workers

        return run_workers(args, algorithms, overrides={a: run_overrides(args, a, local=True) for a in algorithms}, settings=settings_of)
    from pipelines.local import PipelineFailed, format_summary, run_local

    options = _options(args, local=True)
    started = time.monotonic()
    summaries = []
    for algorithm in algorithms:
        try:
            summary = run_local(
                algorithm, args.config, options=options, tracking_uri=args.tracking_uri, force_retrain=args.force_retrain,
                model_name=args.model_name, meta_test_settings=settings_of[algorithm], experiment=args.experiment or "metaopt",
                promotion_margin=args.promotion_margin or 0.0, overrides=run_overrides(args, algorithm, local=True) or None,
            )  # fmt: skip
        except PipelineFailed as exc:
            print(f"metaopt: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        summaries.append(summary)
        print(format_summary(summary), flush=True)
        print(flush=True)
    if len(summaries) > 1:
        print(f"all pipelines done in {time.monotonic() - started:.0f} s:")
        for s in summaries:
            production = f"models:/{s['model_name']}/{s['production_version']}" if s.get("production_version") else "none (nothing to load yet)"
            print(f"  {s['algorithm']:7s} {s['status']:8s} {s.get('decision', '-'):9s} production {production}")
    return EXIT_OK


def _run_remote(args: argparse.Namespace, algorithms: list[str], settings_of: dict[str, dict | None]) -> int:
    from pipelines import remote

    if args.tracking_uri:
        raise ValueError("--tracking-uri: cluster runs use the MLflow server of the metaopt-runtime ConfigMap")
    options = _options(args, local=False)
    for algorithm in algorithms:
        config = args.config
        overrides = run_overrides(args, algorithm, local=False)
        if overrides:
            from metaopt_core.config import read_config
            from pipelines.builder import default_config

            if args.config_uri:
                raise ValueError("--set / --preset quick: change the file behind --config-uri instead (the cluster reads it as is)")
            config = read_config(config or default_config(algorithm), overrides, algorithm=algorithm)
        arguments = remote.pipeline_arguments(
            algorithm, config, config_uri=args.config_uri, force_retrain=args.force_retrain, model_name=args.model_name,
            meta_test_settings=settings_of[algorithm], experiment=args.experiment, promotion_margin=args.promotion_margin,
        )  # fmt: skip
        result = remote.submit(algorithm, connection_of(args), arguments, options=options, wait_s=args.wait)
        print(f"{algorithm}: submitted run {result['run_id']} ({result['state']}): {result['url']}")
    return EXIT_OK


def _compile(args: argparse.Namespace) -> int:
    from metaopt_core.config import read_config
    from pipelines.builder import compile_pipeline

    options = _options(args, local=False)
    config = read_config(args.config, algorithm=args.algorithm) if args.config else None
    path = compile_pipeline(args.algorithm, args.output, options, config)
    print(f"{args.algorithm}: wrote {path} ({options.describe()})")
    return EXIT_OK


def _schedule_create(args: argparse.Namespace) -> int:
    from pipelines import remote

    cron = remote.validate_cron(args.cron)  # before anything else: the most common mistake
    config = args.config
    overrides = run_overrides(args, args.algorithm, local=False)
    if overrides:
        from metaopt_core.config import read_config
        from pipelines.builder import default_config

        if args.config_uri:
            raise ValueError("--set: change the file behind --config-uri instead (the cluster reads it as is)")
        config = read_config(config or default_config(args.algorithm), overrides, algorithm=args.algorithm)
    arguments = remote.pipeline_arguments(
        args.algorithm, config, config_uri=args.config_uri, force_retrain=args.force_retrain, model_name=args.model_name,
        meta_test_settings=meta_test_settings_for(args, args.algorithm, local=False), experiment=args.experiment,
        promotion_margin=args.promotion_margin,
    )  # fmt: skip
    created = remote.schedule_create(args.algorithm, connection_of(args), cron, arguments, options=_options(args, local=False), name=args.name,
                                     max_concurrency=args.max_concurrency, catchup=args.catchup)  # fmt: skip
    print(f"{args.algorithm}: recurring run {created['id']} ({created['name']}) on '{created['cron']}'")
    return EXIT_OK


def _schedule_list(args: argparse.Namespace) -> int:
    from pipelines import remote

    rows = remote.schedule_list(connection_of(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no recurring runs")
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['id']}  {row['name']:{width}s}  {row['cron']:16s}  {row['status']}")
    return EXIT_OK


def _schedule_delete(args: argparse.Namespace) -> int:
    from pipelines import remote

    remote.schedule_delete(connection_of(args), args.id)
    print(f"deleted recurring run {args.id}")
    return EXIT_OK


__all__ = ["add_pipeline_commands", "meta_test_settings_for", "pipeline_options", "run_overrides"]
