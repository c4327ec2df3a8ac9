"""Meta-training that survives a kill of the whole run: checkpoints a later pipeline run finds.

Within one pipeline run, blocks hand their state on as artifacts and a retried block resumes from
its input. A killed ``metaopt run`` (``kill -9``, a reboot) loses those artifacts' run, so the
local runner also points the blocks at a folder that outlives the run (``$METAOPT_CHECKPOINT_ROOT``,
``.metaopt/checkpoints/``): a block checkpoints every outer step into
``<root>/<learner>-<data fingerprint>-<config hash>/`` (the same key as the new-data check's, so
moving the data does not change it), and a later run of the same data and configuration adopts
that state when it is further along than the block's input: no outer step is taken twice (the
adopted steps' metrics are logged into the new MLflow run as well, so its curves are whole). The
folder is removed when a pipeline run of that key finishes (FINISHED), so ``--force-retrain``
after a finished run trains from the start. Unset root (a cluster): blocks work as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

CHECKPOINT_ROOT_ENV = "METAOPT_CHECKPOINT_ROOT"


def load_state(meta_learner: Any, directory: str | Path) -> Any:
    from metaopt_core.meta.driver import load_state as driver_load_state

    return driver_load_state(meta_learner, directory)


def checkpoint_key(learner_name: str, fingerprint: str, config_digest: str) -> str:
    return f"{learner_name}-{fingerprint[:16]}-{config_digest[:16]}"


def checkpoint_dir(learner_name: str, fingerprint: str, config_digest: str) -> Path | None:
    """The persistent checkpoint folder of (learner, data, configuration); None when no root is set."""
    root = os.environ.get(CHECKPOINT_ROOT_ENV, "").strip()
    if not root or not fingerprint or not config_digest:
        return None
    return Path(root) / checkpoint_key(learner_name, fingerprint, config_digest)


def _replace(source: str | Path, destination: Path) -> None:
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination)


@contextlib.contextmanager
def persistent_checkpoint(meta_learner: Any, fingerprint: str, config_digest: str, state_in_path: str | Path,
                          say: Any = print) -> Iterator[Path | None]:  # fmt: skip
    """The folder a block should run in: the persistent checkpoint of its (data, configuration),
    holding the further along of the block's input state and an earlier run's checkpoint, locked
    for the block; None when there is no root, or another run of the same key holds it (that run
    keeps it, this one works on its own artifacts)."""
    directory = checkpoint_dir(meta_learner.name, fingerprint, config_digest)
    if directory is None:
        yield None
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{meta_learner.name}: another run of this data and configuration holds {directory}; this block checkpoints only into its own state")
            yield None
            return
        current = load_state(meta_learner, state_in_path).step
        saved = _saved_step(meta_learner, directory)
        if saved is not None and saved > current:
            say(f"{meta_learner.name}: resuming meta-training at outer step {saved} from the checkpoint an earlier run of this data and "
                f"configuration left in {directory} (steps 1-{saved} are not taken again)")  # fmt: skip
        else:
            _replace(state_in_path, directory)
        yield directory


def adopted_events(meta_learner: Any, directory: Path, after: int, total: int) -> list[Any]:
    """The outer steps after step ``after`` that the checkpoint in ``directory`` holds (an earlier
    run took them), as step events: logged into this run too, so its curves are whole."""
    from metaopt_core.meta.driver import StepEvent

    state = load_state(meta_learner, directory)
    wanted = set(getattr(meta_learner, "scalar_metrics", ()) or ())
    events = []
    for row in state.history or []:
        step = row.get("step", row.get("generation"))
        if not isinstance(step, int) or step <= after:
            continue
        metrics = {key: value for key, value in row.items()
                   if (key in wanted if wanted else isinstance(value, (int, float))) and key not in ("step", "generation")}  # fmt: skip
        events.append(StepEvent("step", meta_learner.name, step, total, metrics=metrics))
    return events


def _saved_step(meta_learner: Any, directory: Path) -> int | None:
    from metaopt_core.meta.driver import has_state

    if not has_state(directory):
        return None
    try:
        return load_state(meta_learner, directory).step
    except (OSError, ValueError, KeyError):  # a checkpoint that does not load is started over, not trusted
        return None


def discard(learner_name: str, fingerprint: str, config_digest: str) -> Path | None:
    """Remove the persistent checkpoint of a (data, configuration) whose meta-training finished."""
    directory = checkpoint_dir(learner_name, fingerprint, config_digest)
    if directory is None or not directory.exists():
        return None
    shutil.rmtree(directory, ignore_errors=True)
    directory.with_name(directory.name + ".lock").unlink(missing_ok=True)
    return directory


__all__ = ["CHECKPOINT_ROOT_ENV", "adopted_events", "checkpoint_dir", "checkpoint_key", "discard", "persistent_checkpoint"]
