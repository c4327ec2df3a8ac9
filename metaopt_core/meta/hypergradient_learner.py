"""What the two hypergradient learners (ITL, MetaMD) share: an outer step asks for a list of jobs
(ITL: held-out domains; MetaMD: tasks), a shard computes one hypergradient per job, tell takes the
outer step on ω from all of them."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.protocol import LearnerBase, Part, Work, shard_slice


class HypergradientLearner(LearnerBase):
    """A learner implements ``jobs(state, data)`` (JSON-able job descriptions), ``job_from_dict``,
    ``hypergradients(state, jobs, data)`` and ``outer_update(state, hypergradients, data)``;
    ``hypergradient_class`` has ``to_dict``/``from_dict``; ``scalar_metrics`` name the curves
    logged per step."""

    hypergradient_class: ClassVar[type]
    scalar_metrics: ClassVar[tuple[str, ...]] = ()

    def dataset(self, data: PreparedInputs) -> Any:
        return data.datasets[0] if data.datasets else None

    def jobs(self, state: Any, data: PreparedInputs) -> list[Any]:
        raise NotImplementedError

    def job_to_dict(self, job: Any) -> Any:
        return job

    def job_from_dict(self, doc: Any) -> Any:
        return doc

    def hypergradients(self, state: Any, jobs: Sequence[Any], data: PreparedInputs) -> list[Any]:
        raise NotImplementedError

    def outer_update(self, state: Any, hypergradients: Sequence[Any], data: PreparedInputs) -> Any:
        raise NotImplementedError

    def metrics(self, state: Any) -> dict:
        if not state.history:
            return {}
        row = state.history[-1]
        return {"step": row["step"], **{key: row[key] for key in self.scalar_metrics if key in row}}

    def ask(self, state: Any, data: PreparedInputs) -> Work:
        return {"jobs": [self.job_to_dict(job) for job in self.jobs(state, data)]}

    def evaluate(self, state: Any, work: Work, shard: tuple[int, int], data: PreparedInputs) -> Part:
        jobs = [self.job_from_dict(doc) for doc in work["jobs"]]
        chosen = [jobs[i] for i in shard_slice(len(jobs), *shard)]
        grads = self.hypergradients(state, chosen, data) if chosen else []
        return {"hypergradients": [g.to_dict() for g in grads]}

    def tell(self, state: Any, parts: Sequence[Part], data: PreparedInputs) -> Any:
        grads = [self.hypergradient_class.from_dict(doc) for part in parts for doc in part["hypergradients"]]
        return self.outer_update(state, grads, data)


__all__ = ["HypergradientLearner"]
