"""MetaMD's meta-model: the Bregman divergence as a flat vector ω (build, initialise, rebuild from
ω, digest, describe), the meta-objective's ω-only terms (k/λ, ρ‖M − I‖_F²), and the implicit
hypergradient of the Bregman term (eq 5.28), which the quadratic and network stacks share."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from metaopt_core.config import coerce
from metaopt_core.data.prepare import PreparedData
from metaopt_core.hypergrad import HypergradResult, implicit_hypergradient
from metaopt_core.meta.checkpoint import omega_digest
from metaopt_core.meta.metamd.config import MetaMDConfig, run_dtype
from metaopt_core.meta.metamd.tasks import DomainTasks, TaskSet, base_model, seed_sequence, task_set
from metaopt_core.optim import DenseBregman, DiagonalBregman, Divergence, KroneckerBregman

DIVERGENCE_CLASSES: dict[str, type[Divergence]] = {
    "kronecker": KroneckerBregman,
    "diagonal": DiagonalBregman,
    "dense": DenseBregman,
}


def build_divergence(config: MetaMDConfig, data: TaskSet | PreparedData | None = None) -> Divergence:
    """A divergence with M = I for the config's parameter shapes (2-D θ, or the base network's
    parameters), in the run's dtype, on CPU."""
    config = coerce(MetaMDConfig, config)
    kind = config.divergence.kind
    cls = DIVERGENCE_CLASSES[kind]
    options: dict[str, Any] = {"dtype": run_dtype(config)}
    if kind == "dense":
        options["epsilon"] = config.divergence.epsilon
    if config.tasks.family == "quadratic":
        return cls.for_shapes([("theta", (2,))], **options)
    tasks = task_set(config, data)
    assert isinstance(tasks, DomainTasks)
    model = base_model(config, tasks, seed=0)
    return cls.for_model(model, **options)


def initial_omega(config: MetaMDConfig, data: TaskSet | PreparedData | None = None) -> Tensor:
    """ω at the start: M = I, except the Kronecker factors, Gaussian of norm ≈ ``init_scale`` (seeded)."""
    config = coerce(MetaMDConfig, config)
    div = build_divergence(config, data)
    if config.divergence.kind == "kronecker" and config.divergence.init_scale > 0:
        generator = torch.Generator().manual_seed(int(seed_sequence(config.seed, 0x1417).generate_state(1)[0]))
        with torch.no_grad():
            for factor in div.parameters():
                noise = torch.randn(factor.shape, generator=generator, dtype=torch.float64)
                factor.copy_(noise * (config.divergence.init_scale / math.sqrt(max(1, factor.numel()))))
    return parameters_to_vector(div.parameters()).detach().clone()


def divergence_at(config: MetaMDConfig, omega: Tensor, data: TaskSet | PreparedData | None = None, device: torch.device | str = "cpu") -> Divergence:
    """The divergence whose tensors are the flat ω (in ``parameters()`` order)."""
    div = build_divergence(config, data)
    expected = sum(p.numel() for p in div.parameters())
    if omega.numel() != expected:
        raise ValueError(f"omega: got {omega.numel()} numbers; the config's divergence has {expected}")
    with torch.no_grad():
        vector_to_parameters(omega.detach().to(run_dtype(config)).clone(), div.parameters())
    return div.to(device)


def flatten_grads(grads: Sequence[Tensor]) -> Tensor:
    """Detached gradients concatenated into one flat vector (ω's ``parameters()`` order)."""
    return torch.cat([g.detach().reshape(-1) for g in grads])


def regulariser(config: MetaMDConfig, div: Divergence) -> Tensor:
    """The terms of the meta-objective that depend on ω directly: k/λ (bound) and ρ‖M − I‖_F²."""
    objective = config.objective
    total = torch.zeros((), dtype=run_dtype(config), device=next(div.parameters()).device)
    if objective.kind == "bound" and objective.k:
        total = total + objective.k / div.strong_convexity()
    if objective.rho:
        total = total + objective.rho * div.frobenius_reg()
    return total


def regulariser_grad(config: MetaMDConfig, div: Divergence) -> tuple[float, Tensor]:
    """(value, flat gradient on CPU) of :func:`regulariser`; a zero gradient when it is constant."""
    params = list(div.parameters())
    value = regulariser(config, div)
    if not value.requires_grad:
        return float(value), torch.zeros(sum(p.numel() for p in params), dtype=run_dtype(config))
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return float(value.detach()), flatten_grads([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]).cpu()


def describe_divergence(div: Divergence) -> dict[str, Any]:
    """Scalars that summarise M: λ (smallest eigenvalue), ‖M − I‖_F and, for 2-D θ, M itself."""
    with torch.no_grad():
        out: dict[str, Any] = {
            "lambda": float(div.strong_convexity()),
            "frobenius_distance": float(div.frobenius_reg().clamp_min(0).sqrt()),
        }
        if sum(math.prod(s) for s in div.param_shapes) == 2:
            out["M"] = div.to_dense().tolist()
        if isinstance(div, KroneckerBregman):
            out["factor_norms_sq"] = {"a": [float(a @ a) for a in div.a], "b": [float(b @ b) for b in div.b]}
    return out


def implicit_bregman_hypergradient(
    config: MetaMDConfig, div: Divergence, params: list[Tensor], start: list[Tensor], train_loss: Callable[[], Tensor]
) -> tuple[HypergradResult, dict[str, Any]]:
    """Eq 5.28 by :func:`~metaopt_core.hypergrad.implicit_hypergradient` on the rephrased inner problem
    argmin_θ B_φ(θ, θ_1) s.t. θ ∈ argmin L (eqs 5.25–5.27): inner objective B_φ(θ, θ_1) + μ·L_tr(θ)
    (μ = ``hypergrad.constraint_weight``), outer objective B_φ(θ, θ_1) (ω-only terms are added by the
    caller). ``params`` are leaf tensors at θ_T. Returns (HypergradResult, metrics).

    What it computes (docs/details/metamd.md): with μ = 0 the inner Hessian is M itself and the mixed
    derivative is ∂(M d)/∂ω, d = θ_T − θ_1, so the indirect term is exactly −2 ∂B/∂ω|_θ and the result
    is −∂B/∂ω|_θ; the thesis's printed eq 5.28 (no minus sign, no direct term) is +2 ∂B/∂ω|_θ. The
    training loss does not enter. μ > 0 restricts θ's implicit response to the flat directions of L.
    """
    hyper = config.hypergrad
    mu = hyper.constraint_weight

    def inner_loss() -> Tensor:
        value = div.bregman(params, start)
        if mu:
            value = value + mu * train_loss()
        return value

    def outer_loss() -> Tensor:
        return div.bregman(params, start)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = implicit_hypergradient(
            inner_loss, outer_loss, params, list(div.parameters()),
            method=hyper.solver, terms=hyper.terms, alpha=hyper.alpha, damping=hyper.damping,
        )  # fmt: skip
    metrics = {
        "solve_rel_residual": result.solve_rel_residual,
        "solve_iterations": result.iterations,
        "direct_norm": float(flatten_grads(result.direct).norm()),
        "indirect_norm": float(flatten_grads(result.indirect).norm()),
        "solver_warning": next((str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)), None),
    }
    return result, metrics


__all__ = [
    "DIVERGENCE_CLASSES",
    "build_divergence",
    "describe_divergence",
    "divergence_at",
    "flatten_grads",
    "implicit_bregman_hypergradient",
    "initial_omega",
    "omega_digest",
    "regulariser",
    "regulariser_grad",
]
