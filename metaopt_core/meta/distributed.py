"""Any learner's outer loop under torch.distributed: rank 0 owns the outer state, every rank
evaluates its share of each outer step.

    rank 0: state = load(checkpoint) or init        ─┐
    loop:   rank 0: work = ask(state)                 │ one broadcast: (state files, work)
            every rank r of W: part = evaluate(state, work, (r, W))   (batched in process)
            gather(parts) ─► rank 0: state = tell(state, parts); save(checkpoint); on_checkpoint()

Run it with ``torchrun --nproc-per-node N -m metaopt_core.meta.distributed --learner NAME
--config FILE --data DIR --checkpoint DIR`` (gloo on CPU, NCCL when CUDA is there; RANK,
WORLD_SIZE, MASTER_ADDR come from the environment), or without torchrun as one process (no
process group). A restarted job (torchrun ``--max-restarts``, a rescheduled pod) resumes from the
checkpoint rank 0 wrote after the last outer step.

The state travels as the files of its checkpoint directory (``save_state`` on rank 0, bytes
broadcast, ``load_state`` on the others): only the protocol is used, never a learner's name, and
only files our own ranks wrote are unpickled (``broadcast_object_list``). Work and parts are the
protocol's JSON-able dicts. A part does not depend on how the jobs were split (the protocol's
promise, tested by the learners), so W workers reach the state one process reaches.

Local paths only: a caller that keeps checkpoints in object storage syncs them in
``on_checkpoint`` (``components/trainjob_runtime.py`` does, for s3://). No kfp, mlflow or boto3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.protocol import MetaLearner, MetricsCallback, ProgressReporter

PREFIX = "[metaopt]"
CheckpointHook = Callable[[Path, int], None]  # (checkpoint dir, outer step reached), on rank 0


# ----------------------------------------------------------------------------- state as files


def directory_files(directory: str | Path) -> dict[str, bytes]:
    """Every file under ``directory`` as {relative posix path: bytes} (temporary files of an
    atomic write left by a kill are skipped)."""
    from metaopt_core.files import is_temp_name

    root = Path(directory)
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and not is_temp_name(path.name)}  # fmt: skip


def write_directory_files(files: dict[str, bytes], directory: str | Path) -> Path:
    """Replace the contents of ``directory`` with ``files`` (what :func:`directory_files` read).
    Names must be relative paths inside the directory."""
    root = Path(directory)
    for name in files:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            raise ValueError(f"state file name: got {name!r}; allowed: a relative path inside the checkpoint")
    if root.exists():
        shutil.rmtree(root)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# ----------------------------------------------------------------------------- the process group


@dataclass(frozen=True)
class Placement:
    """Where this process is: its rank among ``world`` workers, and on which device index of its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0


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


# ----------------------------------------------------------------------------- the loop


@dataclass
class LoopTimings:
    """Seconds this rank spent per kind of work over the run (the benchmark's breakdown).
    ``wait`` is a barrier before the gather (other ranks still evaluating), measured only when
    asked for, so that ``communication`` is the collectives alone."""

    steps: int = 0
    evaluate: float = 0.0
    tell: float = 0.0  # rank 0: tell + checkpoint (+ on_checkpoint); others: loading the state
    communication: float = 0.0
    wait: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in ("steps", "evaluate", "tell", "communication", "wait", "total")}


def _broadcast(placement: Placement, value: Any) -> Any:
    if placement.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(placement: Placement, part: Any) -> list[Any]:
    if placement.world == 1:
        return [part]
    import torch.distributed as dist

    parts: list[Any] | None = [None] * placement.world if placement.is_root else None
    dist.gather_object(part, parts, dst=0)
    return parts or []


def run_distributed(
    learner: MetaLearner,
    config: BaseModel,
    inputs: PreparedInputs,
    checkpoint_dir: str | Path,
    *,
    placement: Placement | None = None,
    until: int | None = None,
    progress: ProgressReporter | None = None,
    callback: MetricsCallback | None = None,
    on_checkpoint: CheckpointHook | None = None,
    timings: LoopTimings | None = None,
    measure_wait: bool = False,
) -> Any:
    """Outer steps up to ``until`` (default: the config's total), resuming ``checkpoint_dir``
    when it holds a state. Call it on every rank with the same arguments (``checkpoint_dir`` is
    read and written by rank 0 only). ``progress``, ``callback`` and ``on_checkpoint`` run on rank
    0 after each outer step. Returns the state reached (on every rank)."""
    placement = placement or Placement()
    until = learner.total_steps(config) if until is None else until
    timings = timings if timings is not None else LoopTimings()
    started = time.perf_counter()
    checkpoint = Path(checkpoint_dir)
    scratch = None if placement.is_root else Path(tempfile.mkdtemp(prefix=f"metaopt-rank{placement.rank}-"))

    def next_work(state: Any) -> Any:
        return None if learner.done(state) or learner.step(state) >= until else learner.ask(state, inputs)

    try:
        state = None
        message: tuple[dict[str, bytes], Any] | None = None
        if placement.is_root:
            if learner.has_state(checkpoint):
                state = learner.load_state(checkpoint)
                if progress:
                    progress(f"{learner.name}: resuming from {checkpoint} at outer step {learner.step(state)} ({placement.world} workers)")
            else:
                state = learner.init(config, inputs)
                learner.save_state(state, checkpoint)
            message = (directory_files(checkpoint) if placement.world > 1 else {}, next_work(state))
        while True:
            mark = time.perf_counter()
            files, work = _broadcast(placement, message)
            timings.communication += time.perf_counter() - mark
            if not placement.is_root:
                mark = time.perf_counter()
                state = learner.load_state(write_directory_files(files, scratch))
                timings.tell += time.perf_counter() - mark
            if work is None:
                return state
            mark = time.perf_counter()
            part = learner.evaluate(state, work, (placement.rank, placement.world), inputs)
            timings.evaluate += time.perf_counter() - mark
            if measure_wait and placement.world > 1:
                import torch.distributed as dist

                mark = time.perf_counter()
                dist.barrier()
                timings.wait += time.perf_counter() - mark
            mark = time.perf_counter()
            parts = _gather(placement, part)
            timings.communication += time.perf_counter() - mark
            timings.steps += 1
            if placement.is_root:
                mark = time.perf_counter()
                state = learner.tell(state, parts, inputs)
                learner.save_state(state, checkpoint)
                if on_checkpoint:
                    on_checkpoint(checkpoint, learner.step(state))
                row = learner.metrics(state)
                if progress:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and math.isfinite(float(v)))
                    progress(f"{learner.name}: outer step {learner.step(state)}/{until} ({placement.world} workers): {shown}")
                if callback:
                    callback(row)
                message = (directory_files(checkpoint) if placement.world > 1 else {}, next_work(state))
                timings.tell += time.perf_counter() - mark
    finally:
        timings.total += time.perf_counter() - started
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


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


def read_config_file(learner: MetaLearner, path: str | Path) -> BaseModel:
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    return learner.resolve_config(doc, source=str(path))


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def run_from_args(
    args: argparse.Namespace,
    *,
    callback: MetricsCallback | None = None,
    on_checkpoint: CheckpointHook | None = None,
    on_export: Callable[[Path, dict], None] | None = None,
) -> Any:
    """What the entry point does, for callers that add hooks (metrics logging, checkpoint sync).
    Returns the final state."""
    import torch

    from metaopt_core.meta import registry, runner

    if args.threads:
        torch.set_num_threads(args.threads)
    placement = join_process_group(args.backend, args.timeout_min)
    try:
        learner = registry.get(args.learner)
        config = learner.with_device(read_config_file(learner, args.config), args.device or None)
        inputs = PreparedInputs.load(args.data)
        check_inputs = getattr(learner, "check_inputs", None)  # LearnerBase's; the protocol does not require it
        if check_inputs:
            check_inputs(config, inputs)
        timings = LoopTimings()
        state = run_distributed(
            learner, config, inputs, args.checkpoint, placement=placement, until=args.steps or None,
            progress=say if placement.is_root else None, callback=callback if placement.is_root else None,
            on_checkpoint=on_checkpoint if placement.is_root else None, timings=timings,
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


__all__ = [
    "CheckpointHook",
    "LoopTimings",
    "Placement",
    "build_parser",
    "directory_files",
    "join_process_group",
    "leave_process_group",
    "main",
    "read_config_file",
    "run_distributed",
    "run_from_args",
    "write_directory_files",
]


if __name__ == "__main__":
    sys.exit(main())
