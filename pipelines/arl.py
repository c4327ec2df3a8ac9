"""The ``arl`` pipeline: ARL (thesis chapter 3): CMA-ES over the Taylor loss's parameters, fitness = clean validation accuracy after training on noisy labels. Blocks of generations; with shards > 1 each generation is ask → evaluate × shards → tell.

    from pipelines import arl
    pipeline = arl.build()                                # the graph component (KFP)
    arl.compile("arl.yaml", PipelineOptions(blocks=4, gpu=True))

The DAG's shape is shared with the other algorithms (see :mod:`pipelines.common`).
"""

# No ``from __future__ import annotations`` anywhere on the pipeline path: KFP reads annotations as types.
from pathlib import Path
from typing import Any, Callable

from pipelines.common import PipelineOptions, build_pipeline, compile_pipeline

ALGORITHM = "arl"


def build(options: PipelineOptions | None = None, config: dict | None = None) -> Callable[..., Any]:
    """The arl pipeline for ``options`` (default: 3 blocks, CPU); ``config`` replaces the demo
    configuration as the default of the ``config`` parameter."""
    return build_pipeline(ALGORITHM, options, config)


def compile(path: str | Path, options: PipelineOptions | None = None, config: dict | None = None) -> Path:  # noqa: A001
    """Compile the arl pipeline to KFP IR YAML at ``path``."""
    return compile_pipeline(ALGORITHM, path, options, config)


__all__ = ["ALGORITHM", "PipelineOptions", "build", "compile"]
