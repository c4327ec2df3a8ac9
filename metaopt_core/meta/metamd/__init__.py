"""MetaMD — Meta Mirror Descent (thesis chapter 5, Algorithm 9; App C.1–C.2).

The meta-model is a quadratic Bregman divergence B_φ(θ, θ') = ½ (θ − θ')ᵀ M (θ − θ')
(:mod:`metaopt_core.optim`: Kronecker-factored, diagonal or dense M, its own tensors ω); the
optimiser it defines is mirror descent, θ ← θ − η M⁻¹ ∇L (:class:`~metaopt_core.optim.MirrorDescent`).
Every outer step trains fresh base models on a few tasks with the current optimiser for T steps and
takes the hypergradient of a meta-objective with respect to ω:

- ``bound`` (eq 5.7): E_i = B_φ(θ_T⁽ⁱ⁾ ‖ θ_1⁽ⁱ⁾) + k/λ (+ ρ‖M − I‖_F²), λ = smallest eigenvalue of M;
  averaged over the tasks this is the thesis's (1/n) Σ B_φ(θ_T‖θ_1) + k/λ.
- ``trajectory``: E_i = (1/T) Σ_{t=1..T} L_i(θ_t) (+ ρ‖M − I‖_F²), the mean training loss along the
  inner trajectory (the usual learned-optimiser objective). Quadratics use f(θ_t) − f* (same gradient).

Hypergradient methods (``hypergrad.method``):

- ``forward``: exact forward-mode differentiation through the T steps (App C.2, eqs C.14–C.17). For
  quadratic tasks the tangent recursion Z_{t+1} = (I − η M⁻¹ H) Z_t − η (∂M⁻¹/∂ω) g_t is evaluated in
  closed form for all tasks at once; otherwise :func:`~metaopt_core.hypergrad.forward_mode_hypergradient`
  (one inner run per scalar of ω: small meta-models only).
- ``unrolled``: exact reverse-mode differentiation through the T steps
  (:func:`~metaopt_core.hypergrad.unrolled_hypergradient`); memory O(T). The network default.
- ``implicit``: eq 5.28 — the IFT on the rephrased inner problem argmin_θ B_φ(θ, θ_1) s.t.
  θ ∈ argmin L (eqs 5.25–5.27), at the trained θ_T, through
  :func:`~metaopt_core.hypergrad.implicit_hypergradient` with inner objective
  B_φ(θ, θ_1) + μ·L_tr(θ) (μ = ``hypergrad.constraint_weight``; μ = 0 is the thesis: the Lagrangian
  term (L* − L)² vanishes to second order at θ_T) and outer objective the bound. Bound objective only.

  What it computes (measured and explained in docs/details/metamd.md; see
  :func:`~metaopt_core.meta.metamd.divergence.implicit_bregman_hypergradient`): with μ = 0 the inner Hessian
  is M itself and the mixed derivative is ∂(M d)/∂ω, d = θ_T − θ_1, so the indirect term is exactly
  −2 ∂B/∂ω|_θ and the IFT hypergradient of the Bregman term is −∂B/∂ω|_θ — the negative of its
  direct gradient; the thesis's printed eq 5.28 (no minus sign, no direct term) is +2 ∂B/∂ω|_θ. In
  neither case does the training loss or its curvature enter. μ > 0 restricts the implicit response
  of θ to the flat directions of L (for a unique minimiser, none: the hypergradient becomes the direct
  term, which the exact one approaches as T grows).

The outer loop has the shape of ITL's, over a serialisable :class:`MetaMDState`::

    tasks = tasks_for_step(state)                          # this step's tasks (seeded by seed, step)
    grads = [inner_hypergrad(state, task) for task in tasks]   # any machines
    state = outer_update(state, grads)                     # per-task clipping, mean, Adam/SGD on ω

The driver (:mod:`metaopt_core.meta.driver`) chains them through :class:`MetaMDLearner`,
checkpoints after every outer step (``state.json`` + safetensors) and resumes from a checkpoint; a
run killed at any point and resumed ends exactly as an uninterrupted one (CPU). The result holds the learned divergence, saved with
:func:`~metaopt_core.optim.save_divergence` (safetensors + JSON manifest, with the lr η).
``inner.lr_start`` / ``inner.lr_warmup_steps`` ramp η across outer steps (a Kronecker M ≥ I can only
shorten SGD's steps, so it pays only at an η where plain SGD is unstable; see ``InnerConfig``).

Task families (``tasks.family``):

- ``quadratic``: the 2-D problems of :mod:`metaopt_core.meta.metamd.quadratics`; a task is one meta-train
  problem, started at the family's common start.
- ``rotated-domains``: a task is a fresh base model (seeded init) trained on one meta-train domain of
  RotatedMNIST (``tasks.network``); ``held_out_domains`` are never used for meta-training.

Modules, in reading order (the package re-exports the pipeline's names; research-only tooling lives
in :mod:`metaopt_core.meta.metamd.analysis`, which nothing here imports):

- ``config``: the config classes, the η schedule (:func:`config_at`).
- ``quadratics``: the 2-D quadratic problem family and its iterations-to-threshold benchmark.
- ``tasks``: task families, the tasks of a step, a concrete network task and its minibatches.
- ``divergence``: ω ↔ divergence, the ω-only objective terms, the shared implicit hypergradient.
- ``quadratic`` / ``network``: the hypergradients of one task of each family.
- ``state``: :class:`MetaMDState` and :class:`Hypergradient` (serialisable).
- ``step``: one outer step (:func:`inner_hypergrads`, :func:`outer_update`, held-out evaluation).
- ``result``: :func:`result_of`, :class:`MetaMDResult` (the export).
- ``learner``: :class:`MetaMDLearner`, the protocol on top of the above.
- ``analysis``: bound terms of Prop 2, hypergradients by every method and their agreement.
"""

from metaopt_core.meta.metamd.config import (
    DivergenceConfig,
    EvaluationConfig,
    HypergradConfig,
    InnerConfig,
    MetaMDConfig,
    NetworkTasks,
    ObjectiveConfig,
    OuterConfig,
    TaskConfig,
    config_at,
)
from metaopt_core.meta.metamd.divergence import (
    DIVERGENCE_CLASSES,
    build_divergence,
    describe_divergence,
    divergence_at,
    initial_omega,
)
from metaopt_core.meta.metamd.network import network_hypergradient, train_with_mirror_descent
from metaopt_core.meta.metamd.quadratic import (
    quadratic_forward_hypergradients,
    quadratic_hypergradient,
    quadratic_mirror_descent,
)
from metaopt_core.meta.metamd.result import SCALAR_METRICS, MetaMDResult, result_of
from metaopt_core.meta.metamd.state import Hypergradient, MetaMDState
from metaopt_core.meta.metamd.step import evaluate_monitoring, inner_hypergrad, inner_hypergrads, outer_update
from metaopt_core.meta.metamd.tasks import (
    DomainTasks,
    NetworkTask,
    QuadraticTasks,
    Task,
    TaskSet,
    base_model,
    minibatch_stream,
    network_task,
    resolve_domain,
    task_set,
    tasks_for_step,
)

__all__ = [
    "DIVERGENCE_CLASSES",
    "SCALAR_METRICS",
    "DivergenceConfig",
    "DomainTasks",
    "EvaluationConfig",
    "HypergradConfig",
    "Hypergradient",
    "InnerConfig",
    "MetaMDConfig",
    "MetaMDResult",
    "MetaMDState",
    "NetworkTask",
    "NetworkTasks",
    "ObjectiveConfig",
    "OuterConfig",
    "QuadraticTasks",
    "Task",
    "TaskConfig",
    "TaskSet",
    "base_model",
    "build_divergence",
    "config_at",
    "describe_divergence",
    "divergence_at",
    "evaluate_monitoring",
    "initial_omega",
    "inner_hypergrad",
    "inner_hypergrads",
    "minibatch_stream",
    "network_hypergradient",
    "network_task",
    "outer_update",
    "quadratic_forward_hypergradients",
    "quadratic_hypergradient",
    "quadratic_mirror_descent",
    "resolve_domain",
    "result_of",
    "task_set",
    "tasks_for_step",
    "train_with_mirror_descent",
]
