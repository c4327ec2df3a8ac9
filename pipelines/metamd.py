"""The ``metamd`` pipeline: MetaMD (thesis chapter 5): a mirror-descent optimiser whose Bregman divergence is meta-learned. Blocks of outer steps; with shards > 1 each step fans the step's tasks out (inner run + hypergradient) and merges them in the outer update.

    from pipelines import metamd
    pipeline = metamd.build()                                # the graph component (KFP)
    metamd.compile("metamd.yaml", PipelineOptions(blocks=4, gpu=True))

The DAG's shape is shared with the other algorithms (see :mod:`pipelines.common`).
"""

# No ``from __future__ import annotations`` anywhere on the pipeline path: KFP reads annotations as types.
from pathlib import Path
from typing import Any, Callable

from pipelines.common import PipelineOptions, build_pipeline, compile_pipeline

ALGORITHM = "metamd"


def build(options: PipelineOptions | None = None, config: dict | None = None) -> Callable[..., Any]:
    """The metamd pipeline for ``options`` (default: 3 blocks, CPU); ``config`` replaces the demo
    configuration as the default of the ``config`` parameter."""
    return build_pipeline(ALGORITHM, options, config)


def compile(path: str | Path, options: PipelineOptions | None = None, config: dict | None = None) -> Path:  # noqa: A001
    """Compile the metamd pipeline to KFP IR YAML at ``path``."""
    return compile_pipeline(ALGORITHM, path, options, config)


__all__ = ["ALGORITHM", "PipelineOptions", "build", "compile"]
