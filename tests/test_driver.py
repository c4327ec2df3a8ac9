"""The one outer loop (``metaopt_core.meta.driver``) with every registered learner: a run killed
after an outer step and resumed ends exactly where an uninterrupted run ends; a resume refuses a
config that would change what the run computes (naming the field) and runs the extra steps of a
longer budget with the new config; progress arrives as typed events.

(Several processes under torchrun: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import pytest

from metaopt_core import exports
from metaopt_core.config import ConfigError
from metaopt_core.meta import driver, registry, runner
from metaopt_core.meta.driver import LoopTimings, StepEvent
from tests.fixtures_learners import learner_names, tiny
from tests.test_learner_protocol import ToyLearner

TIMING_KEYS = ("seconds",)  # wall times: the only numbers two equal runs may differ in


class Killed(Exception):
    pass


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def checkpoint(directory) -> dict:
    """The checkpoint's ``state.json`` (it names the sha256 of any tensor file), without wall times."""
    return without_timings(json.loads((directory / "state.json").read_text()))


def exported(learner, state, inputs, directory) -> dict:
    """What the export kind shows of the exported artifact."""
    runner.export(learner, state, inputs, directory)
    return exports.kind_of(directory).describe(directory)


@pytest.fixture(scope="module")
def toy():
    registry.register(ToyLearner)
    yield registry.get("toy")
    registry.unregister("toy")


@pytest.mark.parametrize("name", learner_names())
def test_kill_and_resume_equals_an_uninterrupted_run(name, tmp_path):
    learner, config, inputs = tiny(name, steps=3)
    whole = driver.run(learner, config, inputs, tmp_path / "whole")
    assert whole.step == 3 and len(whole.history) == 3

    def kill_after_the_first_step(event: StepEvent) -> None:
        if event.kind == "step" and event.step == 1:
            raise Killed  # after the checkpoint: what a kill between two steps leaves behind

    with pytest.raises(Killed):
        driver.run(learner, config, inputs, tmp_path / "killed", on_event=kill_after_the_first_step)
    assert driver.load_state(learner, tmp_path / "killed").step == 1
    events: list[StepEvent] = []
    resumed = driver.run(learner, config, inputs, tmp_path / "killed", on_event=events.append)
    assert [(e.kind, e.step) for e in events] == [("resumed", 1), ("step", 2), ("step", 3), ("ended", 3)]
    assert events[0].line() == f"{name}: resumed from {tmp_path / 'killed'} at outer step 1/3"
    assert without_timings(resumed.history) == without_timings(whole.history)
    assert checkpoint(tmp_path / "killed") == checkpoint(tmp_path / "whole")
    assert exported(learner, resumed, inputs, tmp_path / "a") == exported(learner, whole, inputs, tmp_path / "b")


@pytest.mark.parametrize("name", learner_names())
def test_resume_refuses_a_changed_run_and_runs_the_extra_steps_of_a_longer_one(name, tmp_path):
    learner, config, inputs = tiny(name, steps=1)
    driver.run(learner, config, inputs, tmp_path)
    longer = learner.with_total_steps(config, 2)
    changed = learner.resolve_config({**longer.model_dump(mode="json"), "seed": config.seed + 1})
    with pytest.raises(ConfigError, match=r"field 'seed': checkpoint has 0, config has 1; only \[.*\] may change on resume"):
        driver.run(learner, changed, inputs, tmp_path)
    state = driver.run(learner, longer, inputs, tmp_path)
    assert state.step == 2 and learner.total_steps(learner.config_of(state)) == 2  # the new budget, carried by the state
    assert learner.resumable_fields()[:2] == (learner.steps_field, "device")


def test_the_reported_resume_bug_more_steps_and_another_inner_lr(toy, tmp_path):
    """A learner on the default path resumed with more steps and a different setting raised no
    error, stopped at the old step count and kept the old setting; now the setting is refused and
    more steps alone run the extra steps with the new config."""
    config = toy.resolve_config({"steps": 2, "spread": 1.0})
    inputs = toy.prepare(config)
    driver.run(toy, config, inputs, tmp_path)
    with pytest.raises(ConfigError, match="field 'spread'"):
        driver.run(toy, toy.resolve_config({"steps": 4, "spread": 0.5}), inputs, tmp_path)
    state = driver.run(toy, toy.resolve_config({"steps": 4, "spread": 1.0}), inputs, tmp_path)
    assert state.step == 4 and state.config["steps"] == 4


def test_itl_refuses_another_inner_lr_on_resume(tmp_path):
    learner, config, inputs = tiny("itl", steps=1)
    driver.run(learner, config, inputs, tmp_path)
    doc = learner.with_total_steps(config, 2).model_dump(mode="json")
    doc["inner"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="field 'inner.lr'"):
        driver.run(learner, learner.resolve_config(doc), inputs, tmp_path)


def test_events_name_the_runs_total_and_hooks_see_every_checkpoint(toy, tmp_path):
    config = toy.resolve_config({"steps": 4})
    inputs = toy.prepare(config)
    driver.save_state(toy.init(config, inputs), tmp_path)
    events: list[StepEvent] = []
    checkpoints: list[int] = []
    timings = LoopTimings()
    state = driver.run(toy, config, inputs, tmp_path, until=2, on_event=events.append, on_checkpoint=lambda path, step: checkpoints.append(step),
                       timings=timings)  # fmt: skip
    assert state.step == 2 and not toy.done(state) and checkpoints == [1, 2] and timings.steps == 2
    assert [(e.kind, e.step, e.total) for e in events] == [("resumed", 0, 4), ("step", 1, 4), ("step", 2, 4), ("ended", 2, 4)]
    assert events[2].metrics == toy.metrics(state) and events[2].metrics["step"] == 2
    assert events[2].line().startswith("toy: outer step 2/4: objective ") and events[-1].reason == "block done"
    # a pipeline block reports the run's total, not its own target
    lines: list[str] = []
    runner.run_block(toy, config, inputs, tmp_path, 3, total=4, on_event=lambda e: lines.append(e.line()))
    assert lines[0] == f"toy: resumed from {tmp_path} at outer step 2/4"
    assert lines[1].startswith("toy: outer step 3/4: ") and lines[2] == "toy: block done at outer step 3/4"
    finished = driver.run(toy, config, inputs, tmp_path)
    assert finished.step == 4 and driver.run(toy, config, inputs, tmp_path).history == finished.history  # finished: nothing asked


def test_without_a_checkpoint_folder_nothing_is_kept(toy):
    config = toy.resolve_config({"steps": 2})
    state = driver.run(toy, config, toy.prepare(config))
    assert state.step == 2 and toy.done(state)
