"""ARL components: initial state, a block of generations in one process, and one generation
split into ask → evaluate shards (fan-out) → tell (fan-in)."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def arl_init(config: str, data: Input[Dataset], state: Output[Artifact], device: str = "", total_steps: int = 0) -> int:
    """The CMA-ES search before its first generation (state.json). ``total_steps`` > 0 replaces the
    config's generations. Returns the number of generations the run will take."""
    from components import runtime

    return runtime.init_state("arl", config, data.path, device, total_steps, state)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def arl_block(
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
    """Generations up to this block's share of the run, in process (candidates trained batched),
    each logged to MLflow; hands on the search state and the best loss so far. Returns the generation reached."""
    from components import runtime

    return runtime.run_block("arl", config, data.path, state_in.path, run_id, block_index, blocks, device, state, learned, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def arl_ask(config: str, state_in: Input[Artifact], candidates: Output[Artifact]) -> int:
    """The next generation's candidate losses (CMA-ES ask). Returns the generation index."""
    from components import runtime

    return runtime.ask(config, state_in.path, candidates)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def arl_evaluate(
    config: str,
    data: Input[Dataset],
    candidates: Input[Artifact],
    shard_index: int,
    shards: int,
    fitness: Output[Artifact],
) -> None:
    """Train the (candidate, pool entry) jobs of one shard; their clean validation accuracies."""
    from components import runtime

    runtime.fan_out("arl", config, data.path, candidates.path, shard_index, shards, fitness)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def arl_tell(
    config: str,
    data: Input[Dataset],
    state_in: Input[Artifact],
    fitness: Input[List[Artifact]],
    run_id: str,
    state: Output[Artifact],
    learned: Output[Model],
    metrics: Output[Metrics],
) -> int:
    """Merge the shards' fitness and take the CMA-ES step (tell); log the generation to MLflow.
    Returns the generation reached."""
    from components import runtime

    return runtime.fan_in("arl", config, data.path, state_in.path, [part.path for part in fitness], run_id, state, learned, metrics)


__all__ = ["arl_ask", "arl_block", "arl_evaluate", "arl_init", "arl_tell"]
