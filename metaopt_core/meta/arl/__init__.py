"""ARL — Automated Robust Loss (thesis chapter 3, Algorithm 6).

CMA-ES (pycma) searches the parameters of the Taylor-polynomial loss
(:mod:`metaopt_core.losses.taylor`). Every generation it samples ``population_size`` losses; each
loss trains every entry of the meta-train *pool* — architectures on one dataset (AR) or one
architecture on several datasets (DR) — on *noisy* training labels, and is scored by the *clean*
validation accuracy averaged over the pool (see :mod:`.fitness` for the fitness convention).

The outer loop is three pure steps over a serialisable :class:`ARLState`, so a pipeline can run
them as separate components and fan the evaluation out over machines::

    candidates = ask(state)                          # (λ, n) loss parameters of one generation
    parts = [evaluate(candidates, pool, shard=(i, k)) for i in range(k)]   # any machines
    state = tell(state, Fitness.merge(parts))        # CMA-ES update, best-so-far, history

The driver (:mod:`metaopt_core.meta.driver`) chains them through :class:`ARLLearner`, checkpoints
after every generation and resumes from a checkpoint; a run killed at any point and resumed ends
exactly as an uninterrupted one (CPU).

Read the modules in this order:

- :mod:`.config` — :class:`ARLConfig` and its parts (pool, inner training);
- :mod:`.pool` — the (architecture, dataset) entries every candidate trains on;
- :mod:`.search` — CMA-ES with its own NumPy RNG, and the verified replay used on resume;
- :mod:`.state` — :class:`ARLState` (``state.json``), :func:`ask` and :func:`tell`;
- :mod:`.fitness` — :func:`evaluate` (inner training via :mod:`metaopt_core.population`) and
  :class:`Fitness`;
- :mod:`.result` — :func:`result_of` and :class:`ARLResult` (the export);
- :mod:`.learner` — :class:`ARLLearner`, the protocol on top of the above.
"""

from metaopt_core.meta.arl.config import ARLConfig, InnerTraining, ModelSpec, PoolSpec
from metaopt_core.meta.arl.fitness import FITNESS_CONVENTION, WORST_FITNESS, Fitness, evaluate, member_seeds, shard_jobs
from metaopt_core.meta.arl.pool import Pool, PoolEntry, build_pool
from metaopt_core.meta.arl.result import ARLResult, result_of
from metaopt_core.meta.arl.search import CMASearch, replay
from metaopt_core.meta.arl.state import STATE_FILE, STATE_FORMAT, ARLState, Candidates, ask, search_of, tell

__all__ = [
    "ARLConfig",
    "ARLResult",
    "ARLState",
    "CMASearch",
    "Candidates",
    "FITNESS_CONVENTION",
    "Fitness",
    "InnerTraining",
    "ModelSpec",
    "Pool",
    "PoolEntry",
    "PoolSpec",
    "STATE_FILE",
    "STATE_FORMAT",
    "WORST_FITNESS",
    "ask",
    "build_pool",
    "evaluate",
    "member_seeds",
    "replay",
    "result_of",
    "search_of",
    "shard_jobs",
    "tell",
]
