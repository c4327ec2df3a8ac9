"""The MetaLearner protocol and registry: a learner defined here, in the test, is compiled and run
end to end by the same components and pipeline builder as the built-ins (no file under
components/ or pipelines/ knows it), and the built-ins all satisfy the protocol.

The toy learner searches the curvature θ of an order-2 Taylor loss with a (1+K) ask/tell search
on a quadratic objective (θ - 1.5)²: cheap, deterministic, and with a known answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
from pydantic import Field

from metaopt_core.config import ConfigError, StrictModel
from metaopt_core.meta import LearnerBase, MetaLearner, MetaTestReport, PreparedInputs, driver, registry, runner, shard_slice
from pipelines.builder import PipelineOptions, compile_pipeline

TARGET = 1.5
ROOT = Path(__file__).resolve().parents[1]


class ToyConfig(StrictModel):
    algorithm: str = "toy"
    name: str = "toy"
    steps: int = Field(4, ge=1)
    candidates: int = Field(5, ge=1)
    spread: float = Field(1.0, gt=0.0)
    device: str = "cpu"


class ToyMetaTest(StrictModel):
    tolerance: float = Field(0.5, gt=0.0)


class ToyState:
    """theta, the step, one history row per step; saved as JSON."""

    def __init__(self, config: dict, theta: float = 0.0, step: int = 0, history: list | None = None):
        self.config, self.theta, self.step, self.history = config, theta, step, list(history or [])

    @property
    def finished(self) -> bool:
        return self.step >= self.config["steps"]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state.json").write_text(json.dumps(self.__dict__))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ToyState:
        return cls(**json.loads((Path(directory) / "state.json").read_text()))


def objective(theta: float) -> float:
    return (theta - TARGET) ** 2


class ToyLearner(LearnerBase):
    name = "toy"
    kind = "loss"
    description = "Toy: a one-parameter Taylor loss found by a (1+K) search (a test learner)"
    config_class = ToyConfig
    meta_test_class = ToyMetaTest
    state_class = ToyState
    steps_field = "steps"
    history_keys = ("objective",)

    def init(self, config: ToyConfig, data: PreparedInputs) -> ToyState:
        return ToyState(config.model_dump(mode="json"))

    def ask(self, state: ToyState, data: PreparedInputs) -> dict:
        count, spread = state.config["candidates"], state.config["spread"] / (state.step + 1)
        return {"candidates": [state.theta + spread * (2 * i / max(count - 1, 1) - 1) for i in range(count)]}

    def evaluate(self, state: ToyState, work: dict, shard: tuple[int, int], data: PreparedInputs) -> dict:
        chosen = shard_slice(len(work["candidates"]), *shard)
        return {"scores": {str(i): objective(work["candidates"][i]) for i in chosen}, "candidates": work["candidates"]}

    def tell(self, state: ToyState, parts: Sequence[dict], data: PreparedInputs) -> ToyState:
        scores = {int(i): value for part in parts for i, value in part["scores"].items()}
        candidates = parts[0]["candidates"]
        if sorted(scores) != list(range(len(candidates))):
            raise ValueError(f"parts: cover candidates {sorted(scores)}; expected each of 0..{len(candidates) - 1} once")
        best = min(scores, key=lambda i: (scores[i], i))
        theta = candidates[best] if scores[best] < objective(state.theta) else state.theta
        row = {"step": state.step + 1, "objective": objective(theta), "theta": theta}
        return ToyState(state.config, theta, state.step + 1, [*state.history, row])

    def export(self, state: ToyState, data: PreparedInputs) -> tuple[str, dict]:
        from metaopt_core.losses.document import document_of_loss
        from metaopt_core.losses.taylor import TaylorLoss

        return "loss-document", document_of_loss(TaylorLoss([0.5, 0.0, 0.0, 1.0, state.theta], order=2))

    def meta_test(self, config: ToyConfig, artifact_dir: Path, data: PreparedInputs, settings: ToyMetaTest, *,
                  champion_dir: Path | None = None, progress=None) -> MetaTestReport:  # fmt: skip
        from metaopt_core import exports

        theta = exports.read(artifact_dir)["params"][-1]
        score = float(abs(theta - TARGET) < settings.tolerance)
        units = 12  # the gate needs >= 10 independent units; a baseline that scores 0 on each
        paired = {"learned": [score] * units, "constant": [0.0] * units}
        if champion_dir is not None:
            paired["champion"] = [float(abs(exports.read(champion_dir)["params"][-1] - TARGET) < settings.tolerance)] * units
        return MetaTestReport(f"toy: theta {theta:.4f}\n", {"meta_test_accuracy": score}, "meta_test_accuracy", True,
                              paired=paired, units=[{"seed": seed} for seed in range(units)], settings={"seeds": list(range(units))})  # fmt: skip


REFERENCE = f"{__name__}:ToyLearner"


@pytest.fixture(autouse=True, scope="module")
def registered_toy():
    """Registered for this module's tests only (other modules list the registry's names)."""
    registry.register(ToyLearner)
    yield
    registry.unregister("toy")


@pytest.fixture
def toy() -> MetaLearner:
    return registry.get("toy")


# ----------------------------------------------------------------------------- the protocol, in process


def test_builtin_learners_satisfy_the_protocol():
    for name in registry.BUILTIN:
        learner = registry.get(name)
        assert isinstance(learner, MetaLearner) and learner.name == name and learner.kind in ("loss", "optimizer")
        assert registry.reference(name) == name  # built-ins travel by name
    assert {"arl", "itl", "metamd", "toy"} <= set(registry.names())


def test_an_unknown_learner_names_the_known_ones():
    with pytest.raises(registry.UnknownLearnerError, match=r"got 'atl'; allowed: \[.*'arl'.*'itl'"):
        registry.get("atl")
    with pytest.raises(registry.UnknownLearnerError, match="cannot import"):
        registry.get("no_such_package.module:Learner")
    with pytest.raises(ValueError, match="built-in learner's"):
        registry.register(type("Impostor", (ToyLearner,), {"name": "arl"}))
    with pytest.raises(ConfigError, match="field 'algorithm': got 'toy'; this learner is 'arl'"):
        registry.get("arl").resolve_config({"algorithm": "toy"})


def test_a_learner_is_found_by_import_reference_in_a_fresh_process():
    import subprocess
    import sys

    code = f"from metaopt_core.meta import registry; print(registry.get({REFERENCE!r}).name, registry.reference('toy'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["toy", REFERENCE]
    assert registry.reference("toy") == REFERENCE


def test_in_process_loop_and_sharded_steps_reach_the_same_state(toy, tmp_path):
    config = toy.resolve_config({"steps": 4})
    inputs = toy.prepare(config)
    driver.save_state(toy.init(config, inputs), tmp_path / "ckpt")
    in_process = runner.run_block(toy, config, inputs, tmp_path / "ckpt", 4)
    assert in_process.step == 4 and toy.done(in_process)
    assert objective(in_process.theta) < objective(0.0) / 10  # the search found the target
    sharded = toy.init(config, inputs)
    for step in range(4):
        work = runner.write_work(toy, sharded, inputs, tmp_path / f"work-{step}")
        parts = [runner.write_part(toy, sharded, work, i, 3, inputs, tmp_path / f"part-{step}-{i}") for i in range(3)]
        sharded = runner.tell_parts(toy, sharded, parts, inputs)
    assert sharded.theta == in_process.theta and sharded.history == in_process.history
    # a finished run asks nothing and passes its state on
    work = runner.write_work(toy, sharded, inputs, tmp_path / "work-done")
    assert work == {"finished": True}
    assert runner.tell_parts(toy, sharded, [runner.write_part(toy, sharded, work, 0, 1, inputs, tmp_path / "done")], inputs) is sharded


def test_blocks_resume_from_the_checkpoint(toy, tmp_path):
    config = toy.resolve_config({"steps": 4})
    inputs = toy.prepare(config)
    driver.save_state(toy.init(config, inputs), tmp_path / "ckpt")
    targets = [runner.block_target(4, b, 3) for b in range(3)]
    for until in targets:
        state = runner.run_block(toy, config, inputs, tmp_path / "ckpt", until)
        assert state.step == until and driver.load_state(toy, tmp_path / "ckpt").step == until
    driver.save_state(toy.init(config, inputs), tmp_path / "whole")
    assert runner.run_block(toy, config, inputs, tmp_path / "whole", 4).history == state.history


def test_glue_never_dispatches_on_a_learner_name():
    """Components, pipelines and the shared meta modules call the protocol; only a learner's own
    package (and the registry's table of built-ins) knows its name."""
    names = "|".join(re.escape(name) for name in registry.BUILTIN)
    pattern = re.compile(rf"""(algorithm|learner|name)\s*(==|!=|in)\s*\(?["']({names})["']|import_module\(f["']metaopt_core\.meta""")
    packages = tuple(f"metaopt_core/meta/{ref.split(':')[0].split('.')[2]}/" for ref in registry.BUILTIN.values())
    offenders = []
    for folder in ("components", "pipelines", "metaopt_core"):
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(packages):
                continue
            offenders += [f"{relative}: {line.strip()}" for line in path.read_text().splitlines() if pattern.search(line)]
    assert offenders == []


def test_there_is_one_outer_loop():
    """The driver is the only code that loops ask → evaluate → tell (a learner implements steps)."""
    offenders = []
    for folder in ("components", "pipelines", "metaopt_core", "scripts", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if path.relative_to(ROOT).as_posix() != "metaopt_core/meta/driver.py" and re.search(r"while not .*(finished|done\()", text):
                offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []


# ----------------------------------------------------------------------------- the pipeline


def test_the_toy_learner_compiles_with_the_generic_builder(tmp_path):
    import yaml

    path = compile_pipeline("toy", tmp_path / "toy.yaml", PipelineOptions(blocks=2, shards=2))
    spec = next(yaml.safe_load_all(path.read_text()))
    assert spec["pipelineInfo"]["name"] == "metaopt-toy"
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["model_name"]["defaultValue"] == "toy"
    assert parameters["config"]["defaultValue"]["steps"] == 4  # the config class's defaults are the demo
    # every step is told where to find the learner (a fresh process has not registered it)
    text = path.read_text()
    assert text.count(REFERENCE) >= 5


@pytest.mark.slow
def test_the_toy_learner_runs_end_to_end_with_the_local_runner(mlflow_server, tmp_path):
    from metaopt_core import load_loss
    from pipelines.local import run_local

    options = PipelineOptions(blocks=2, shards=2, cluster_env=False, retries=False)
    lines: list[str] = []
    summary = run_local("toy", {"steps": 2}, options=options, tracking_uri=mlflow_server, workdir=tmp_path, echo=lines.append)
    assert (summary["status"], summary["decision"], summary["algorithm"]) == ("trained", "promoted", "toy")
    assert any("shard 2/2" in line for line in lines)
    loss = load_loss("models:/toy/production", tracking_uri=mlflow_server)
    # the registered loss is the one the two outer steps found: the search moves towards theta 1.5
    assert loss.params[-1].item() == pytest.approx(TARGET, abs=0.5)
    again = run_local("toy", {"steps": 2}, options=options, tracking_uri=mlflow_server, workdir=tmp_path, echo=lines.append)
    assert again["status"] == "skipped"
