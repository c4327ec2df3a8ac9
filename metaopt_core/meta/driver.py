"""The one outer loop: any learner, in process, per pipeline block and under torch.distributed.

    state = open_state(...)                       rank 0: the checkpoint (compatibility-checked) or init
    loop:   rank 0: work = ask(state)             one broadcast: (state files, work); world 1: none
            every rank r of W: part = evaluate(state, work, (r, W))   (batched in process)
            gather(parts) ─► rank 0: state = tell(state, parts); save(checkpoint); on_checkpoint()
            rank 0: on_event(StepEvent("step", ...))

One process is the case W = 1 (no process group, no communication): it evaluates the whole work
as one shard, which every learner batches. A part does not depend on how the jobs were split (the
protocol's promise, tested per learner), so W workers reach the state one process reaches.

Resume has one rule (:func:`open_state`): a checkpoint is resumed only under a config that equals
its own except for the learner's :meth:`~metaopt_core.meta.protocol.LearnerBase.resumable_fields`
(the step budget, the device, ...); any other difference is refused, naming the field. The resumed
state then carries the new config (so more steps run, on the new device).

Progress is a typed :class:`StepEvent` (resumed, one per outer step, ended) that the CLI prints
(``event.line()``), components log to MLflow (``Tracker.log_step``) and tests inspect; nobody
parses progress text. The state travels between ranks as the files of its checkpoint directory
(only files our own rank 0 wrote are unpickled, by ``broadcast_object_list``). Local paths only:
callers that keep checkpoints in object storage sync them in ``on_checkpoint``. No kfp, mlflow or
boto3, and no learner's name.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal

from pydantic import BaseModel

from metaopt_core.meta.checkpoint import check_resumable
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.protocol import STATE_FILE, MetaLearner

CheckpointHook = Callable[[Path, int], None]  # (checkpoint dir, outer step reached), on rank 0


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StepEvent:
    """What the loop reports, on rank 0. ``kind``: ``resumed`` (a checkpoint was resumed at
    ``step``), ``step`` (outer step ``step`` was taken and checkpointed; ``metrics`` are its
    numbers) or ``ended`` (the loop returns: ``reason`` says why). ``total`` is the run's length
    (a pipeline block runs to its own target, the reader wants the run's)."""

    kind: Literal["resumed", "step", "ended"]
    learner: str
    step: int
    total: int
    metrics: dict = field(default_factory=dict)
    workers: int = 1
    checkpoint: str = ""
    reason: str = ""

    def line(self) -> str:
        """The event as one progress line."""
        where = f" ({self.workers} workers)" if self.workers > 1 else ""
        if self.kind == "resumed":
            return f"{self.learner}: resumed from {self.checkpoint} at outer step {self.step}/{self.total}{where}"
        if self.kind == "ended":
            return f"{self.learner}: {self.reason} at outer step {self.step}/{self.total}"
        shown = ", ".join(f"{k} {float(v):.4g}" for k, v in self.metrics.items()
                          if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)))  # fmt: skip
        return f"{self.learner}: outer step {self.step}/{self.total}{where}: {shown}"


EventHook = Callable[[StepEvent], None]


# ----------------------------------------------------------------------------- checkpoints


def has_state(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete checkpoint."""
    return (Path(directory) / STATE_FILE).exists()


def load_state(learner: MetaLearner, directory: str | Path) -> Any:
    return learner.state_class.load(directory)


def save_state(state: Any, directory: str | Path) -> Path:
    return state.save(directory)


def open_state(learner: MetaLearner, config: BaseModel, inputs: PreparedInputs, checkpoint_dir: str | Path) -> tuple[Any, bool]:
    """(state, resumed): the checkpoint in ``checkpoint_dir`` under ``config`` when there is one
    (refused with the field named when ``config`` differs from its own outside the learner's
    resumable fields), else the learner's initial state, saved there. A resumed state carries
    ``config``."""
    checkpoint = Path(checkpoint_dir)
    if not has_state(checkpoint):
        state = learner.init(config, inputs)
        save_state(state, checkpoint)
        return state, False
    state = load_state(learner, checkpoint)
    wanted = config.model_dump(mode="json")
    check_resumable(state.config, wanted, checkpoint, learner.resumable_fields())
    state.config = wanted
    return state, True


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


# ----------------------------------------------------------------------------- where this process is


@dataclass(frozen=True)
class Placement:
    """Where this process is: its rank among ``world`` workers, and on which device index of its
    node. The default is one process (no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, part: Any) -> list[Any]:
        """Every rank's ``part`` on rank 0 (in rank order); [] elsewhere."""
        if self.world == 1:
            return [part]
        import torch.distributed as dist

        parts: list[Any] | None = [None] * self.world if self.is_root else None
        dist.gather_object(part, parts, dst=0)
        return parts or []

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


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


# ----------------------------------------------------------------------------- the loop


def run(
    learner: MetaLearner,
    config: BaseModel,
    inputs: PreparedInputs,
    checkpoint_dir: str | Path | None = None,
    *,
    until: int | None = None,
    total: int | None = None,
    placement: Placement | None = None,
    on_event: EventHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    timings: LoopTimings | None = None,
    measure_wait: bool = False,
) -> Any:
    """Outer steps up to step ``until`` (default: the config's total; fewer when the learner stops
    by itself), resuming ``checkpoint_dir`` when it holds a state (see :func:`open_state`) and
    checkpointing there after every step (``None``: a temporary folder, nothing kept). Call it on
    every rank with the same arguments; ``checkpoint_dir`` is read and written by rank 0 only, and
    ``on_event`` / ``on_checkpoint`` run there. ``total`` only makes events read 'step k/total'.
    Returns the state reached (on every rank)."""
    placement = placement or Placement()
    until = learner.total_steps(config) if until is None else until
    total = total or learner.total_steps(config)
    timings = timings if timings is not None else LoopTimings()
    started = time.perf_counter()
    own_checkpoint = checkpoint_dir is None and placement.is_root
    checkpoint = Path(tempfile.mkdtemp(prefix="metaopt-ckpt-")) if own_checkpoint else Path(checkpoint_dir or ".")
    scratch = None if placement.is_root else Path(tempfile.mkdtemp(prefix=f"metaopt-rank{placement.rank}-"))

    def emit(kind: str, state: Any, **extra: Any) -> None:
        if on_event is not None:
            on_event(StepEvent(kind, learner.name, int(state.step), total, workers=placement.world, **extra))  # type: ignore[arg-type]

    def next_work(state: Any) -> Any:
        return None if learner.done(state) or state.step >= until else learner.ask(state, inputs)

    try:
        state = None
        message: tuple[dict[str, bytes], Any] | None = None
        if placement.is_root:
            state, resumed = open_state(learner, config, inputs, checkpoint)
            if resumed:
                emit("resumed", state, checkpoint=str(checkpoint))
            message = (directory_files(checkpoint) if placement.world > 1 else {}, next_work(state))
        while True:
            mark = time.perf_counter()
            files, work = placement.broadcast(message)
            timings.communication += time.perf_counter() - mark
            if not placement.is_root:
                mark = time.perf_counter()
                state = load_state(learner, write_directory_files(files, scratch))
                timings.tell += time.perf_counter() - mark
            if work is None:
                if placement.is_root:
                    emit("ended", state, reason="finished" if learner.done(state) else "block done")
                return state
            mark = time.perf_counter()
            part = learner.evaluate(state, work, (placement.rank, placement.world), inputs)
            timings.evaluate += time.perf_counter() - mark
            if measure_wait:
                mark = time.perf_counter()
                placement.barrier()
                timings.wait += time.perf_counter() - mark
            mark = time.perf_counter()
            parts = placement.gather(part)
            timings.communication += time.perf_counter() - mark
            timings.steps += 1
            if placement.is_root:
                mark = time.perf_counter()
                state = learner.tell(state, parts, inputs)
                save_state(state, checkpoint)
                if on_checkpoint:
                    on_checkpoint(checkpoint, int(state.step))
                emit("step", state, metrics=learner.metrics(state))
                message = (directory_files(checkpoint) if placement.world > 1 else {}, next_work(state))
                timings.tell += time.perf_counter() - mark
    finally:
        timings.total += time.perf_counter() - started
        for folder in (scratch, checkpoint if own_checkpoint else None):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "CheckpointHook",
    "EventHook",
    "LoopTimings",
    "Placement",
    "StepEvent",
    "directory_files",
    "has_state",
    "load_state",
    "open_state",
    "run",
    "save_state",
    "write_directory_files",
]
