"""MetaMD components: initial state, a block of outer steps in one process, and one outer step
split into per-task hypergradient shards (fan-out) → outer update (fan-in)."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def metamd_init(config: str, data: Input[Dataset], state: Output[Artifact], device: str = "", total_steps: int = 0) -> int:
    """The divergence's tensors ω and the outer optimiser before the first step. ``total_steps`` > 0
    replaces the config's outer.steps. Returns the number of outer steps the run will take."""
    from components import runtime

    return runtime.init_state("metamd", config, data.path, device, total_steps, state)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def metamd_block(
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
    """Outer steps up to this block's share of the run, in process, each logged to MLflow; hands on
    the state and the learned divergence so far."""
    from components import runtime

    return runtime.run_block("metamd", config, data.path, state_in.path, run_id, block_index, blocks, device, state, learned, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def metamd_inner_hypergrad(
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    shard_index: int,
    shards: int,
    hypergradients: Output[Artifact],
) -> None:
    """For the tasks of one shard: train a fresh model with the current mirror descent for T steps,
    then the hypergradient of the meta-objective."""
    from components import runtime

    runtime.fan_out("metamd", config, data.path, state_in.path, shard_index, shards, hypergradients)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def metamd_outer_update(
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    hypergradients: Input[List[Artifact]],
    run_id: str,
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
) -> int:
    """Average the shards' hypergradients (clipped per task) and take the outer step on ω; log it."""
    from components import runtime

    return runtime.fan_in("metamd", config, data.path, state_in.path, [part.path for part in hypergradients], run_id, state, learned, metrics)


__all__ = ["metamd_block", "metamd_init", "metamd_inner_hypergrad", "metamd_outer_update"]
