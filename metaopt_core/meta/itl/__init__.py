"""ITL — Implicit Taylor Loss (thesis chapter 4, Algorithms 7 and 8).

A parametric loss L_ω (a family of :mod:`metaopt_core.losses.families`: the Taylor polynomial of any order,
or iSCE) is meta-learned for domain generalisation by gradient descent on ω:

    outer:  min_ω  M(θ*(ω)) = cross-entropy of θ*(ω) on a held-out domain
    inner:  θ*(ω) = argmin_θ L_ω(θ; source domains)

Every outer step holds each of the m domains out in turn (leave-one-domain-out): a fresh model is
trained on the other m − 1 domains with the current loss — at most ``inner.max_epochs`` epochs of
SGD, stopping early once the gradient norm of the inner objective falls to ``inner.grad_tol`` —
then the implicit-function-theorem hypergradient dM/dω is computed with Hessian-vector products
only (:func:`metaopt_core.hypergrad.implicit_hypergradient`, truncated Neumann series or CG).
The m hypergradients are combined by PCGrad (or their mean) and an outer optimiser (Adam or SGD)
updates ω.

The outer loop is two pure steps over a serialisable :class:`ITLState`, the same shape as ARL's
ask/evaluate/tell, so a pipeline can fan the inner trainings out::

    grads = [inner_hypergrad(state, domain) for domain in domains]   # any machines
    state = outer_update(state, grads)                               # PCGrad + Adam on ω

Determinism and resume. Everything random in a step — initial weights, minibatch order, the
hypergradient's data subsets, PCGrad's visiting order — is seeded from (seed, step, domain), and
the outer optimiser's state is part of :class:`ITLState` (saved as JSON + safetensors). A run
killed at any point and resumed from its checkpoint therefore ends exactly as an uninterrupted
one (on CPU; the batched and sequential paths agree up to float reassociation, so switching
between them on resume is allowed but not bitwise).

Read the modules in this order:

- :mod:`.config` — :class:`ITLConfig` and its parts;
- :mod:`.domains` — the domains of a dataset and the inner jobs of a step (seeds, data subsets);
- :mod:`.inner` — inner training (batched through :func:`metaopt_core.population.train_batched`,
  or sequential);
- :mod:`.hypergrad` — the IFT hypergradient of one held-out domain and :class:`Hypergradient`;
- :mod:`.state` — :class:`ITLState` and its checkpoint;
- :mod:`.outer_step` — :func:`inner_hypergrads`, :func:`aggregate`, :func:`outer_update`;
- :mod:`.result` — :func:`result_of`, :class:`ITLResult` and :data:`SCALAR_METRICS` (the export);
- :mod:`.learner` — :class:`ITLLearner`, the protocol on top of the above (the driver runs it).
"""

from metaopt_core.meta.itl.config import FamilyConfig, HypergradConfig, InnerConfig, ITLConfig, OuterConfig
from metaopt_core.meta.itl.domains import DomainSet, InnerJob, domain_set, job_seeds, make_job
from metaopt_core.meta.itl.hypergrad import HYPERGRAD_FORMAT, Hypergradient, hypergradient_of
from metaopt_core.meta.itl.inner import (
    TrainedModel,
    build_inner_model,
    can_batch,
    train_inner,
    train_job_sequential,
    train_jobs_batched,
)
from metaopt_core.meta.itl.outer_step import aggregate, inner_hypergrad, inner_hypergrads, optimizer_step, outer_update, with_domains
from metaopt_core.meta.itl.result import SCALAR_METRICS, ITLResult, result_of
from metaopt_core.meta.itl.state import STATE_FORMAT, ITLState

__all__ = [
    "DomainSet",
    "FamilyConfig",
    "HYPERGRAD_FORMAT",
    "HypergradConfig",
    "Hypergradient",
    "ITLConfig",
    "ITLResult",
    "ITLState",
    "InnerConfig",
    "InnerJob",
    "OuterConfig",
    "SCALAR_METRICS",
    "STATE_FORMAT",
    "TrainedModel",
    "aggregate",
    "build_inner_model",
    "can_batch",
    "domain_set",
    "hypergradient_of",
    "inner_hypergrad",
    "inner_hypergrads",
    "job_seeds",
    "make_job",
    "optimizer_step",
    "outer_update",
    "result_of",
    "train_inner",
    "train_job_sequential",
    "train_jobs_batched",
    "with_domains",
]
