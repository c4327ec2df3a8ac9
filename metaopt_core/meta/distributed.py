"""Any learner's outer loop under torch.distributed: the entry point a torchrun worker runs.

    torchrun --nproc-per-node N -m metaopt_core.meta.distributed --learner NAME --config FILE --data DIR --checkpoint DIR

(gloo on CPU, NCCL when CUDA is there; RANK, WORLD_SIZE, MASTER_ADDR come from the environment;
without torchrun one process, no process group). Each rank joins the process group and runs
:func:`metaopt_core.meta.driver.run` with its :class:`~metaopt_core.meta.driver.Placement`: rank 0
owns the outer state and checkpoints it after every step, every rank evaluates its shard. A
restarted job (torchrun ``--max-restarts``, a rescheduled pod) resumes from rank 0's last checkpoint.
No kfp, mlflow or boto3: ``components/trainjob_runtime.py`` adds MLflow logging and object storage
through the hooks of :func:`run_from_args`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from metaopt_core.meta.driver import CheckpointHook, EventHook, LoopTimings, Placement, StepEvent
from metaopt_core.meta.inputs import PreparedInputs

PREFIX = "[metaopt]"


# ----------------------------------------------------------------------------- the process group


def join_process_group(backend: str = "", timeout_min: float = 120.0) -> Placement:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK);
    without those variables, one process and no group. ``backend`` "": NCCL when CUDA is
    available, else gloo. Under NCCL each rank computes on ``cuda:LOCAL_RANK``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Placement()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # object collectives and the learner's "cuda" use this device
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_min)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps one store across restarts and init_process_group's key prefix is the same
        # in every attempt: a restarted rank could read a dead peer's address (gloo then retries a
        # refused connection, or waits on stale counters, for the whole timeout). One prefix per attempt.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store.set_timeout(timeout)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"metaopt/attempt_{attempt}", store), rank=rank, world_size=world, timeout=timeout)
    return Placement(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metaopt_core.meta.distributed",
        description="A learner's outer loop under torch.distributed (run it with torchrun --nproc-per-node N; alone: one process).",
    )
    parser.add_argument("--learner", required=True, help="a registered learner name or package.module:LearnerClass")
    parser.add_argument("--config", required=True, metavar="FILE", help="run configuration (YAML or JSON)")
    parser.add_argument("--data", required=True, metavar="DIR", help="prepared inputs (inputs.json + datasets), read by every rank")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="rank 0 resumes from and checkpoints to this folder after every outer step")
    parser.add_argument("--export", default="", metavar="DIR", help="rank 0 exports the result here at the end (loss.json | divergence/, result.json)")
    parser.add_argument("--steps", type=int, default=0, help="run up to this outer step (default: the config's total)")
    parser.add_argument("--device", default="", help="replace the config's device (cpu, cuda)")
    parser.add_argument("--backend", default="", choices=["", "gloo", "nccl"], help="default: nccl with CUDA, else gloo")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's; torchrun sets OMP_NUM_THREADS=1)")
    parser.add_argument("--timeout-min", type=float, default=120.0, help="collective timeout (a rank waits this long for the others)")
    parser.add_argument("--timings", default="", metavar="FILE", help="write each rank's LoopTimings as JSON lines to FILE.rank<r>")
    return parser


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def run_from_args(
    args: argparse.Namespace,
    *,
    on_event: EventHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    on_export: Callable[[Path, dict], None] | None = None,
) -> Any:
    """What the entry point does, for callers that add hooks (metrics logging, checkpoint sync;
    rank 0 prints every event's line and then calls ``on_event``). Returns the final state."""
    import torch

    from metaopt_core.meta import driver, registry, runner
    from metaopt_core.meta.run_config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    placement = join_process_group(args.backend, args.timeout_min)
    try:
        learner = registry.get(args.learner)
        config = learner.with_device(load_config(args.config, algorithm=learner.name), args.device or None)
        inputs = PreparedInputs.load(args.data)
        check_inputs = getattr(learner, "check_inputs", None)  # LearnerBase's; the protocol does not require it
        if check_inputs:
            check_inputs(config, inputs)
        timings = LoopTimings()

        def report(event: StepEvent) -> None:
            say(event.line())
            if on_event:
                on_event(event)

        state = driver.run(
            learner, config, inputs, args.checkpoint, placement=placement, until=args.steps or None,
            on_event=report if placement.is_root else None, on_checkpoint=on_checkpoint if placement.is_root else None, timings=timings,
        )  # fmt: skip
        if args.timings:
            Path(f"{args.timings}.rank{placement.rank}").write_text(json.dumps({"rank": placement.rank, "world": placement.world, **timings.as_dict()}))
        if placement.is_root and args.export:
            doc = runner.export(learner, state, inputs, args.export)
            say(f"{learner.name}: exported step {doc['steps']} to {args.export}")
            if on_export:
                on_export(Path(args.export), doc)
        return state
    finally:
        leave_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    run_from_args(build_parser().parse_args(argv))
    return 0


__all__ = ["build_parser", "join_process_group", "leave_process_group", "main", "run_from_args"]


if __name__ == "__main__":
    sys.exit(main())
