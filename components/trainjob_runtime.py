"""Meta-training in a TrainJob, both ends.

- In the pipeline step (:func:`meta_train`, the body of ``components.trainjob.meta_train``): write
  the configuration next to the run's artifacts, submit the TrainJob (``components.trainjob_client``),
  stream its log into the step's log, wait, then fetch the checkpoint and the export into the
  step's output artifacts. A failed job fails the step.
- In each TrainJob worker (``torchrun -m components.trainjob_runtime ...``, :func:`main`): fetch the
  prepared inputs (every rank) and the checkpoint (rank 0: the last one, else the initial state)
  from storage, run ``metaopt_core.meta.distributed``'s loop, upload the checkpoint after every
  outer step and the export at the end, and log each step's metrics to the pipeline's MLflow run.

URIs are anything ``metaopt_core.mlops.storage`` reads: s3://, file://, or plain paths (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

PREFIX = "[metaopt]"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


# ----------------------------------------------------------------------------- folders in storage


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def download_tree(uri: str, directory: str | Path) -> int:
    """Copy every object under the prefix ``uri/`` into ``directory``; the number of files."""
    from metaopt_core.mlops import storage

    prefix = uri.rstrip("/") + "/"
    found = storage.list_uris(prefix)
    for item in found:
        storage.download_file(item, Path(directory) / item[len(prefix) :])
    return len(found)


def upload_tree(directory: str | Path, uri: str) -> int:
    """Copy every file under ``directory`` to ``uri/<relative path>``; the number of files."""
    from metaopt_core.mlops import storage

    files = [path for path in sorted(Path(directory).rglob("*")) if path.is_file()]
    for path in files:
        storage.upload_file(path, _join(uri, path.relative_to(directory).as_posix()))
    return len(files)


# ----------------------------------------------------------------------------- the worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.trainjob_runtime", description="A TrainJob worker: the distributed outer loop on storage URIs.")
    parser.add_argument("--learner", required=True)
    parser.add_argument("--config-uri", required=True, help="the resolved run configuration (JSON or YAML)")
    parser.add_argument("--data-uri", required=True, help="prepared inputs (a folder prefix)")
    parser.add_argument("--checkpoint-uri", required=True, help="rank 0 resumes from and checkpoints to this folder prefix")
    parser.add_argument("--initial-uri", default="", help="the state to start from when the checkpoint is empty")
    parser.add_argument("--export-uri", required=True, help="rank 0 uploads the export here at the end")
    parser.add_argument("--run-id", default="", help="the pipeline's MLflow run: rank 0 logs every outer step there")
    parser.add_argument("--device", default="")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--backend", default="", choices=["", "gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from metaopt_core.meta import distributed
    from metaopt_core.mlops import storage

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory(prefix="metaopt-trainjob-") as scratch:
        work = Path(scratch)
        config = work / "config.json"
        config.write_bytes(storage.read_bytes(args.config_uri))
        download_tree(args.data_uri, work / "data")
        checkpoint = work / "checkpoint"
        if rank == 0:  # only rank 0 reads the checkpoint; the others receive the state from it
            if download_tree(args.checkpoint_uri, checkpoint):
                say(f"{args.learner}: checkpoint found at {args.checkpoint_uri}")
            elif args.initial_uri:
                download_tree(args.initial_uri, checkpoint)
        local = distributed.build_parser().parse_args([
            "--learner", args.learner, "--config", str(config), "--data", str(work / "data"), "--checkpoint", str(checkpoint),
            "--export", str(work / "learned") if rank == 0 else "", "--steps", str(args.steps), "--device", args.device,
            "--threads", str(args.threads), "--backend", args.backend,
        ])  # fmt: skip
        on_checkpoint = lambda path, step: upload_tree(path, args.checkpoint_uri)
        on_export = lambda path, doc: upload_tree(path, args.export_uri)
        if rank == 0 and args.run_id:
            from metaopt_core.mlops.tracking import Tracker

            with Tracker(run_id=args.run_id) as tracker:
                distributed.run_from_args(local, on_event=tracker.log_step, on_checkpoint=on_checkpoint, on_export=on_export)
        else:
            distributed.run_from_args(local, on_checkpoint=on_checkpoint, on_export=on_export)
    return 0


# ----------------------------------------------------------------------------- the pipeline step


def trainjob_prefix(state_uri: str) -> str:
    """Where a step's TrainJob keeps its files: next to the step's ``state`` output artifact (the
    same place when KFP retries the step, so a retried step resumes the job's checkpoint)."""
    return _join(state_uri.rstrip("/").rsplit("/", 1)[0], "trainjob")


def meta_train(
    learner: str, config: str | Mapping[str, Any], data: Any, state_in: Any, run_id: str, workers: int, nodes: int, gpu: bool,
    image: str, device: str, state: Any, learned: Any, metrics: Any, *, kfp_run_id: str = "", client: Any = None,
    echo: Callable[[str], None] = print,
) -> int:  # fmt: skip
    """The pipeline step: one TrainJob runs every outer step; hand on its checkpoint and export.
    ``kfp_run_id`` names the job (a retried step adopts or replaces its earlier attempt's job;
    components/trainjob_client.py); empty, the SDK picks a random name. Returns the outer step reached."""
    from components import runtime
    from components import trainjob_client as trainjob
    from metaopt_core.meta import driver, registry, runner
    from metaopt_core.meta.inputs import PreparedInputs
    from metaopt_core.mlops import storage

    meta_learner = registry.get(learner)
    resolved = meta_learner.with_device(meta_learner.resolve_config(runtime.config_doc(config)), device)
    prefix = trainjob_prefix(state.uri)
    config_uri = _join(prefix, "config.json")
    storage.write_text(config_uri, json.dumps(resolved.model_dump(mode="json")))
    procs = trainjob.split_workers(workers, nodes)
    command = trainjob.trainjob_command(
        learner, procs, config_uri=config_uri, data_uri=data.uri, checkpoint_uri=_join(prefix, "checkpoint"), initial_uri=state_in.uri,
        export_uri=_join(prefix, "learned"), run_id=run_id, device=device, threads=0 if gpu else 1,
    )  # fmt: skip
    named = {"name": trainjob.trainjob_name(kfp_run_id), "labels": trainjob.trainjob_labels(kfp_run_id)} if kfp_run_id else {}
    request = trainjob.TrainJobRequest(image=image, num_nodes=nodes, procs_per_node=procs, resources_per_node=trainjob.resources_per_node(procs, gpu),
                                       command=command, runtime=trainjob.runtime_for(gpu), **named)  # fmt: skip
    say(f"{meta_learner.name}: {meta_learner.total_steps(resolved)} outer steps in one TrainJob, {workers} workers on {nodes} node(s)")
    trainjob.run_trainjob(client if client is not None else trainjob.make_client(), request, echo=echo)
    download_tree(_join(prefix, "checkpoint"), state.path)
    download_tree(_join(prefix, "learned"), learned.path)
    final = driver.load_state(meta_learner, state.path)
    step = final.step
    inputs = PreparedInputs.load(data.path)
    state.metadata.update({"learner": meta_learner.name, "step": step})
    doc = runner.read_result(learned.path)
    learned.metadata.update({"learner": meta_learner.name, "kind": doc["kind"], "steps": doc["steps"], "fingerprint": inputs.fingerprint})
    for key, value in sorted(meta_learner.metrics(final).items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
    return step


__all__ = ["build_parser", "download_tree", "main", "meta_train", "trainjob_prefix", "upload_tree"]


if __name__ == "__main__":
    raise SystemExit(main())
