"""ITL components: initial state, a block of outer steps in one process, and one outer step split
into per-domain hypergradient shards (fan-out) → outer update (fan-in)."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def itl_init(config: str, data: Input[Dataset], state: Output[Artifact], device: str = "", total_steps: int = 0) -> int:
    """The loss parameters ω and the outer optimiser before the first step. ``total_steps`` > 0
    replaces the config's outer.steps. Returns the number of outer steps the run will take."""
    from components import runtime

    return runtime.init_state("itl", config, data.path, device, total_steps, state)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def itl_block(
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
    """Outer steps up to this block's share of the run, in process (the leave-one-domain-out inner
    trainings batched), each logged to MLflow; hands on the state and the loss so far."""
    from components import runtime

    return runtime.run_block("itl", config, data.path, state_in.path, run_id, block_index, blocks, device, state, learned, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def itl_inner_hypergrad(
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    shard_index: int,
    shards: int,
    hypergradients: Output[Artifact],
) -> None:
    """For the held-out domains of one shard: train on the other domains with the current loss,
    then the implicit hypergradient of the held-out cross-entropy."""
    from components import runtime

    runtime.fan_out("itl", config, data.path, state_in.path, shard_index, shards, hypergradients)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def itl_outer_update(
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    hypergradients: Input[List[Artifact]],
    run_id: str,
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
) -> int:
    """Aggregate the shards' hypergradients (PCGrad or mean) and take the outer step on ω; log it."""
    from components import runtime

    return runtime.fan_in("itl", config, data.path, state_in.path, [part.path for part in hypergradients], run_id, state, learned, metrics)


__all__ = ["itl_block", "itl_init", "itl_inner_hypergrad", "itl_outer_update"]
