"""Meta-training as a pipeline runs it, for any learner: blocks of outer steps handed from step to
step through checkpoint folders, or one outer step fanned out over shards through JSON files.

    learner = registry.get(name)
    config = learner.resolve_config(doc)
    inputs = learner.prepare(config)                       # datasets + one fingerprint
    driver.save_state(learner.init(config, inputs), "ckpt")
    for b in range(blocks):                                # the driver, checkpoint every step
        state = run_block(learner, config, inputs, "ckpt", block_target(total, b, blocks))
    export(learner, state, inputs, "learned")              # the export kind's files, history.json
    report = meta_test(learner, config, "learned", inputs, settings, champion_dir=production)

With shards, one outer step is :func:`write_work` (ask) → :func:`write_part` × shards (evaluate) →
:func:`tell_parts` (tell). A part does not depend on how the jobs were split, so both routes reach
the same state. Nothing here imports kfp, mlflow or boto3, or knows a learner by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel

from metaopt_core.meta import driver
from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.protocol import FINISHED, MetaLearner, MetaTestReport, ProgressReporter, Work

WORK_FORMAT = "metaopt.pipeline.work/1"
PART_FORMAT = "metaopt.pipeline.part/1"
RESULT_FORMAT = "metaopt.pipeline.result/1"


def block_target(total: int, block_index: int, blocks: int) -> int:
    """The outer step block ``block_index`` (0-based) of ``blocks`` runs up to: the steps are split
    as evenly as possible, the last block always ends at ``total``."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks: got {blocks!r}; allowed: an int >= 1")
    if isinstance(block_index, bool) or not isinstance(block_index, int) or not 0 <= block_index < blocks:
        raise ValueError(f"block_index: got {block_index!r}; allowed: 0..{blocks - 1}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total: got {total!r}; allowed: an int >= 1")
    return max(1, math.ceil(total * (block_index + 1) / blocks))


def run_block(
    learner: MetaLearner,
    config: BaseModel,
    inputs: PreparedInputs,
    checkpoint_dir: str | Path,
    until: int,
    *,
    total: int | None = None,
    on_event: driver.EventHook | None = None,
) -> Any:
    """Resume the state in ``checkpoint_dir`` and run outer steps up to step ``until`` (fewer when
    the learner stops by itself), checkpointing after every step. Returns the state reached.
    ``total`` (the run's full length) only makes events read 'step k/total'."""
    if not driver.has_state(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint_dir: no state at {checkpoint_dir} (save the learner's initial state there first)")
    return driver.run(learner, config, inputs, checkpoint_dir, until=until, total=total, on_event=on_event)


def train(
    learner: MetaLearner,
    config: BaseModel,
    checkpoint_dir: str | Path | None = None,
    *,
    inputs: PreparedInputs | None = None,
    on_event: driver.EventHook | None = None,
) -> tuple[Any, PreparedInputs]:
    """Meta-train in this process (scripts, notebooks): prepare the inputs unless given, then the
    driver from scratch or from the checkpoint in ``checkpoint_dir``. Returns (state, inputs)."""
    inputs = inputs if inputs is not None else learner.prepare(config)
    return driver.run(learner, config, inputs, checkpoint_dir, on_event=on_event), inputs


# ----------------------------------------------------------------------------- one outer step, sharded


def _write_json(path: Path, doc: Mapping[str, Any]) -> Path:
    from metaopt_core.files import atomic_write_text

    return atomic_write_text(path, json.dumps(doc))


def _read_json(path: str | Path, name: str, expected: str, learner: MetaLearner) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing")
    doc = json.loads(path.read_text())
    if doc.get("format") != expected or doc.get("learner") != learner.name:
        raise ValueError(f"{path}: format {doc.get('format')!r} for {doc.get('learner')!r}; expected {expected!r} for {learner.name!r}")
    return doc


def write_work(learner: MetaLearner, state: Any, inputs: PreparedInputs, directory: str | Path) -> Work:
    """Ask: the next outer step's jobs as ``work.json`` in ``directory`` (``finished`` when the run
    has stopped, so later shards and the merge pass the state on)."""
    work = {FINISHED: True} if learner.done(state) else learner.ask(state, inputs)
    _write_json(Path(directory) / "work.json", {"format": WORK_FORMAT, "learner": learner.name, "step": state.step, "work": work})
    return work


def read_work(learner: MetaLearner, path: str | Path) -> Work:
    return _read_json(path, "work.json", WORK_FORMAT, learner)["work"]


def write_part(learner: MetaLearner, state: Any, work: Work, index: int, shards: int, inputs: PreparedInputs, directory: str | Path) -> Path:
    """Evaluate shard ``index`` of ``shards`` of the work; save it as ``part.json`` in ``directory``."""
    part = None if work.get(FINISHED) else learner.evaluate(state, work, (index, shards), inputs)
    return _write_json(Path(directory) / "part.json", {"format": PART_FORMAT, "learner": learner.name, "shard": [index, shards], "part": part})


def tell_parts(learner: MetaLearner, state: Any, part_paths: Sequence[str | Path], inputs: PreparedInputs) -> Any:
    """Merge the shards' parts of one outer step and take it (every job must be in exactly one
    part; the learner checks). A finished run passes its state on."""
    if learner.done(state):
        return state
    parts = [_read_json(p, "part.json", PART_FORMAT, learner)["part"] for p in part_paths]
    if not parts or any(part is None for part in parts):
        raise ValueError(f"parts: got {len(parts)}, {sum(p is None for p in parts)} of them empty; every shard of an unfinished run evaluates")
    return learner.tell(state, parts, inputs)


# ----------------------------------------------------------------------------- export, meta-test


def export(learner: MetaLearner, state: Any, inputs: PreparedInputs, directory: str | Path) -> dict:
    """Write what was learned as its export kind (:mod:`metaopt_core.exports`: the kind's files and
    ``export.json``), ``history.json`` and ``result.json`` (learner, role, export kind, steps,
    fingerprint). Returns the ``result.json`` document."""
    from metaopt_core import exports

    directory = Path(directory)
    kind_name, artifact = learner.export(state, inputs)
    kind = exports.get(kind_name)
    if kind.role != learner.kind:
        raise ValueError(f"{learner.name}: exported a {kind.role} ({kind.name}); the learner's kind is {learner.kind!r}")
    exports.save(directory, kind_name, artifact, state.history)
    doc = {
        "format": RESULT_FORMAT,
        "learner": learner.name,
        "kind": kind.role,
        "export_kind": kind.name,
        "steps": state.step,
        "fingerprint": inputs.fingerprint,
        "files": list(kind.files),
    }
    _write_json(directory / "result.json", doc)
    return doc


def read_result(directory: str | Path) -> dict:
    """``result.json`` of an exported result, plus its ``history``. The artifact itself is read
    from the folder through its kind (``metaopt_core.exports.read(directory)``)."""
    directory = Path(directory)
    path = directory / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"no exported result at {directory} (result.json missing)")
    doc = json.loads(path.read_text())
    if doc.get("format") != RESULT_FORMAT:
        raise ValueError(f"result {path}: format {doc.get('format')!r}; expected {RESULT_FORMAT!r}")
    doc["history"] = json.loads((directory / "history.json").read_text()) if (directory / "history.json").exists() else []
    if "export_kind" not in doc:  # exported before export kinds: the folder says
        from metaopt_core import exports

        doc["export_kind"] = exports.kind_of(directory, doc.get("kind")).name
    return doc


def meta_test(
    learner: MetaLearner,
    config: BaseModel,
    learned_dir: str | Path,
    inputs: PreparedInputs,
    settings: Mapping[str, Any] | BaseModel | None = None,
    *,
    champion_dir: str | Path | None = None,
    progress: ProgressReporter | None = None,
) -> MetaTestReport:
    """Meta-test an exported result with the learner's protocol (its ``meta_test_class`` settings).
    ``champion_dir``: the production version's export folder (``registry.load_champion``),
    re-evaluated in the same run on the same units; None if there is none."""
    from metaopt_core import exports

    exported = read_result(learned_dir)
    if exported["learner"] != learner.name:
        raise ValueError(f"learned_dir: holds a {exported['learner']!r} result; the config is {learner.name!r}")
    if champion_dir is not None:
        exports.kind_of(champion_dir, learner.kind)  # a champion of the learner's role, or an error naming it
    return learner.meta_test(config, Path(learned_dir), inputs, learner.resolve_meta_test(settings), champion_dir=champion_dir, progress=progress)


__all__ = [
    "PART_FORMAT",
    "RESULT_FORMAT",
    "WORK_FORMAT",
    "block_target",
    "export",
    "meta_test",
    "read_result",
    "read_work",
    "run_block",
    "tell_parts",
    "train",
    "write_part",
    "write_work",
]
