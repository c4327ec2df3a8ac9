"""The outer-step components, one set for every learner: the initial state, a block of outer steps
in one process, and one outer step split into ask → evaluate × shards (fan-out) → tell (fan-in).

``learner`` is what :func:`metaopt_core.meta.registry.reference` gives: a registered name, or
``package.module:LearnerClass`` for a learner the step's image knows only by import.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def init_state(learner: str, config: str, data: Input[Dataset], state: Output[Artifact], device: str = "", total_steps: int = 0) -> int:
    """The learner's state before the first outer step. ``total_steps`` > 0 replaces the config's
    outer-step count. Returns the number of outer steps the run will take."""
    from components import outer_steps

    return outer_steps.init_state(learner, config, data.path, device, total_steps, state)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def run_block(
    learner: str,
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    run_id: str,
    block_index: int,
    blocks: int,
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
    device: str = "",
) -> int:
    """Outer steps up to this block's share of the run, in process (inner trainings batched), each
    logged to MLflow; hands on the state and what was learned so far. Returns the step reached."""
    from components import outer_steps

    return outer_steps.run_block(learner, config, data.path, state_in.path, run_id, block_index, blocks, device, state, learned, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ask(learner: str, config: str, data: Input[Dataset], state_in: Input[Artifact], work: Output[Artifact]) -> int:
    """The next outer step's jobs (ARL: candidates × pool entries; ITL: held-out domains; MetaMD:
    tasks). Returns the step about to be taken."""
    from components import outer_steps

    return outer_steps.ask(learner, config, data.path, state_in.path, work)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    learner: str,
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    work: Input[Artifact],
    shard_index: int,
    shards: int,
    part: Output[Artifact],
) -> None:
    """The inner trainings of one shard of the step's jobs (fitness or hypergradients)."""
    from components import outer_steps

    outer_steps.evaluate(learner, config, data.path, state_in.path, work.path, shard_index, shards, part)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tell(
    learner: str,
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    parts: Input[List[Artifact]],
    run_id: str,
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
) -> int:
    """Merge the shards' parts and take the outer step (CMA-ES tell, or the step on ω); log it.
    Returns the step reached."""
    from components import outer_steps

    return outer_steps.tell(learner, config, data.path, state_in.path, [part.path for part in parts], run_id, state, learned, metrics)


__all__ = ["ask", "evaluate", "init_state", "run_block", "tell"]
