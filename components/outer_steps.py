"""What the outer-step components do when they run (``components.learner``): the initial state,
a block of outer steps in process, and one outer step as ask → evaluate shards → tell. Each reads
its inputs, calls the learner through :mod:`metaopt_core.meta.runner`, and writes the state, the
learned loss/optimiser so far and the step's metrics (MLflow and KFP)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from components.runtime import config_doc, copy_tree, learner_setup, log_kfp_metrics, say, tracked


def _hand_on(meta_learner: Any, new_state: Any, inputs: Any, state: Any, learned: Any, metrics: Any) -> int:
    """Export what was learned so far (the state is saved already), log the last step's metrics; the step reached."""
    from metaopt_core.meta import runner

    step = new_state.step
    state.metadata.update({"learner": meta_learner.name, "step": step})
    doc = runner.export(meta_learner, new_state, inputs, learned.path)
    learned.metadata.update({"learner": meta_learner.name, "kind": doc["kind"], "steps": doc["steps"], "fingerprint": inputs.fingerprint})
    log_kfp_metrics(metrics, meta_learner.metrics(new_state))
    return step


def init_state(learner: str, config: str | Mapping[str, Any], data_path: str, device: str, total_steps: int, state: Any) -> int:
    """The state before the first outer step, on ``device`` (empty: the config's). ``total_steps``
    > 0 replaces the config's outer-step count (sharded pipelines have one outer step per block).
    Returns the number of outer steps the run will take."""
    from metaopt_core.meta import driver

    meta_learner, resolved, inputs = learner_setup(learner, config, data_path, device)
    if total_steps > 0 and total_steps != meta_learner.total_steps(resolved):
        say(f"{meta_learner.name}: {total_steps} outer steps (one per pipeline block) instead of the config's {meta_learner.total_steps(resolved)}")
        resolved = meta_learner.with_total_steps(resolved, total_steps)
    driver.save_state(meta_learner.init(resolved, inputs), state.path)
    state.metadata.update({"learner": meta_learner.name, "step": 0})
    return meta_learner.total_steps(resolved)


def run_block(
    learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, run_id: str, block_index: int, blocks_count: int,
    device: str, state: Any, learned: Any, metrics: Any,
) -> int:  # fmt: skip
    """Block ``block_index`` of ``blocks_count``: resume the state and run outer steps up to this
    block's share of the run, logging every step to MLflow; hand on the state and the learned
    loss/optimiser so far. Returns the step reached."""
    from metaopt_core.meta import runner

    meta_learner, resolved, inputs = learner_setup(learner, config, data_path, device)
    total = meta_learner.total_steps(resolved)
    until = runner.block_target(total, block_index, blocks_count)
    copy_tree(state_in_path, state.path)
    say(f"{meta_learner.name}: block {block_index + 1}/{blocks_count}: outer steps up to {until} of {total}")

    from components.resume import adopted_events, load_state, persistent_checkpoint
    from metaopt_core.faults import fault_point
    from metaopt_core.mlops.tracking import config_hash

    start = load_state(meta_learner, state.path).step
    with tracked(run_id) as tracker, persistent_checkpoint(meta_learner, inputs.fingerprint, config_hash(config_doc(config)), state.path, say) as kept:
        for event in adopted_events(meta_learner, kept, start, total) if kept and tracker else []:
            tracker.log_step(event)  # steps an earlier run took: recorded here too, not taken again

        def on_event(event: Any) -> None:  # a step's event comes after its checkpoint is written
            if event.kind != "resumed":  # every block resumes its predecessor's state by design
                say(event.line())
            if tracker:
                tracker.log_step(event)
            if event.kind == "step":
                fault_point(f"outer-step-{event.step}")

        reached = runner.run_block(meta_learner, resolved, inputs, kept or state.path, until, total=total, on_event=on_event)
        if kept:
            copy_tree(str(kept), state.path)
    return _hand_on(meta_learner, reached, inputs, state, learned, metrics)


def ask(learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, work: Any) -> int:
    """The next outer step's jobs (one JSON file). Returns the step about to be taken."""
    from metaopt_core.meta import driver, runner

    meta_learner, _, inputs = learner_setup(learner, config, data_path)
    current = driver.load_state(meta_learner, state_in_path)
    runner.write_work(meta_learner, current, inputs, work.path)
    step = current.step
    work.metadata.update({"learner": meta_learner.name, "step": step})
    if meta_learner.done(current):  # stopped by itself: the remaining blocks pass the state on
        say(f"{meta_learner.name}: the run finished at step {step}; nothing to ask")
    else:
        say(f"{meta_learner.name}: outer step {step + 1}: work asked")
    return step


def evaluate(learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, work_path: str, shard_index: int,
             shards: int, part: Any) -> None:  # fmt: skip
    """One shard of the next outer step's work (the inner trainings)."""
    from metaopt_core.meta import driver, runner

    meta_learner, _, inputs = learner_setup(learner, config, data_path)
    current = driver.load_state(meta_learner, state_in_path)
    say(f"{meta_learner.name}: shard {shard_index + 1}/{shards}")
    runner.write_part(meta_learner, current, runner.read_work(meta_learner, work_path), shard_index, shards, inputs, part.path)
    part.metadata.update({"learner": meta_learner.name, "shard": shard_index, "shards": shards})


def tell(
    learner: str, config: str | Mapping[str, Any], data_path: str, state_in_path: str, part_paths: Sequence[str], run_id: str,
    state: Any, learned: Any, metrics: Any,
) -> int:  # fmt: skip
    """Merge the shards of one outer step, take it, log it to MLflow, hand on state and result."""
    from metaopt_core.meta import driver, runner

    meta_learner, _, inputs = learner_setup(learner, config, data_path)
    previous = driver.load_state(meta_learner, state_in_path)
    if meta_learner.done(previous):
        say(f"{meta_learner.name}: the run already finished at step {previous.step}; nothing to merge")
        new_state = previous
    else:
        with tracked(run_id) as tracker:  # a failed merge marks the MLflow run FAILED
            new_state = runner.tell_parts(meta_learner, previous, part_paths, inputs)
            total = meta_learner.total_steps(meta_learner.config_of(new_state))  # sharded runs: one step per block
            event = driver.StepEvent("step", meta_learner.name, new_state.step, total, meta_learner.metrics(new_state), workers=len(part_paths))
            say(event.line())
            if tracker:
                tracker.log_step(event)
    driver.save_state(new_state, state.path)
    return _hand_on(meta_learner, new_state, inputs, state, learned, metrics)
