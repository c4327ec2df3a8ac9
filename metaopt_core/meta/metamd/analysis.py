"""Research-only MetaMD tooling, kept apart from what the pipeline runs (nothing in the package's
``__init__`` imports it): the terms of the generalisation bound of Proposition 2 (eq 5.8) for a
learned divergence, and the hypergradient of one task by every method with their agreement, for
validating the implicit hypergradient against the exact ones. Used by ``scripts/metamd_*.py``."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from metaopt_core.config import coerce
from metaopt_core.data.prepare import PreparedData
from metaopt_core.hypergrad import HypergradResult
from metaopt_core.meta.metamd.config import MetaMDConfig
from metaopt_core.meta.metamd.divergence import divergence_at, flatten_grads
from metaopt_core.meta.metamd.network import network_implicit
from metaopt_core.meta.metamd.quadratic import quadratic_forward_hypergradients, quadratic_implicit
from metaopt_core.meta.metamd.step import task_hypergradient
from metaopt_core.meta.metamd.tasks import Task, TaskSet, network_task, task_set
from metaopt_core.optim import Divergence


def generalisation_bound_terms(
    divergence: Divergence,
    n_tasks: int,
    delta: float,
    r: float,
    C: float,
    *,
    lr: float | None = None,
    steps: int | None = None,
    lipschitz: float | None = None,
    mean_bregman: float | None = None,
) -> dict[str, Any]:
    """The terms of the generalisation bound of Proposition 2 (thesis eq 5.8) for a learned divergence.

    As printed in the thesis: if ‖M − I‖_F ≤ C and ‖θ_1 − θ*‖₂ ≤ r, then with probability ≥ 1 − δ
    over the n meta-train tasks,

        E[Σ_{t=1..T} (l(θ_t) − l(θ*))] ≤ (1/n) Σ_i B_φ(θ*⁽ⁱ⁾‖θ_1⁽ⁱ⁾)/η          (empirical_term)
                                         + η T L² / (2λ)                         (optimisation_term)
                                         + C r² / (2√n)                          (rademacher_term)
                                         + 3 C r² √(ln(2/δ) / (8n))              (confidence_term)

    with λ the smallest eigenvalue of M. The last two come from Prop 3 (Bartlett & Mendelson) with
    R̂_n ≤ C r²/(2√n) (eqs 5.12–5.24) and sup-norm a = C r²/2. Re-deriving them from the proof gives
    three differences, reported alongside as ``*_rederived``: Prop 3 has 2R̂_n, so the Rademacher term
    is C r²/√n; B_φ(θ*‖θ_1) = ½ θ̃ᵀMθ̃ ≤ ½‖M‖₂ r² ≤ ½(1 + C) r², so a = (1 + C) r²/2; and both bound the
    Bregman average, which enters the regret bound divided by η. So

        rademacher_term_rederived = C r² / (η √n),
        confidence_term_rederived = 3 (1 + C) r² / (2η) · √(ln(2/δ) / (2n)).

    Args:
        divergence: the learned divergence (gives λ and ‖M − I‖_F).
        n_tasks: n, the number of meta-train tasks.
        delta: δ in (0, 1).
        r: bound on ‖θ_1 − θ*‖₂ (> 0).
        C: bound on ‖M − I‖_F (>= 0); ``constraint_holds`` says whether the divergence satisfies it
            (the bound applies only then).
        lr, steps, lipschitz: η, T and L for the optimisation term (omitted if any is missing).
        mean_bregman: (1/n) Σ B_φ(θ_T⁽ⁱ⁾‖θ_1⁽ⁱ⁾) on the meta-train tasks (θ_T standing in for θ*),
            for the empirical term (omitted if missing; it also needs ``lr``).

    Returns:
        dict with ``lambda``, ``frobenius_distance``, ``constraint_holds``, the four terms (None when
        an input is missing), ``total`` (None unless all four are known), the rederived terms and
        ``total_rederived``.
    """
    if not isinstance(divergence, Divergence):
        raise TypeError(f"divergence: got {type(divergence).__name__}; allowed: a metaopt_core.optim.Divergence")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks: got {n_tasks!r}; allowed: an int >= 1")
    for name, value, low, high in (("delta", delta, 0.0, 1.0),):
        if not isinstance(value, (int, float)) or not low < value < high:
            raise ValueError(f"{name}: got {value!r}; allowed: a number in ({low}, {high})")
    if not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise ValueError(f"r: got {r!r}; allowed: a finite number > 0")
    if not isinstance(C, (int, float)) or not math.isfinite(C) or C < 0:
        raise ValueError(f"C: got {C!r}; allowed: a finite number >= 0")
    for name, value in (("lr", lr), ("lipschitz", lipschitz)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name}: got {value!r}; allowed: a finite number > 0, or None")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps: got {steps!r}; allowed: an int >= 1, or None")
    if mean_bregman is not None and (not isinstance(mean_bregman, (int, float)) or not math.isfinite(mean_bregman) or mean_bregman < 0):
        raise ValueError(f"mean_bregman: got {mean_bregman!r}; allowed: a finite number >= 0, or None")
    with torch.no_grad():
        lam = float(divergence.strong_convexity())
        distance = float(divergence.frobenius_reg().clamp_min(0).sqrt())
    n = n_tasks
    log_term = math.log(2.0 / delta)
    empirical = mean_bregman / lr if (mean_bregman is not None and lr is not None) else None
    optimisation = lr * steps * lipschitz**2 / (2.0 * lam) if None not in (lr, steps, lipschitz) else None
    rademacher = C * r**2 / (2.0 * math.sqrt(n))
    confidence = 3.0 * C * r**2 * math.sqrt(log_term / (8.0 * n))
    terms = [empirical, optimisation, rademacher, confidence]
    out: dict[str, Any] = {
        "lambda": lam,
        "frobenius_distance": distance,
        "constraint_holds": distance <= C,
        "n_tasks": n,
        "delta": float(delta),
        "r": float(r),
        "C": float(C),
        "empirical_term": empirical,
        "optimisation_term": optimisation,
        "rademacher_term": rademacher,
        "confidence_term": confidence,
        "total": sum(terms) if None not in terms else None,
    }
    if lr is not None:
        rademacher_re = C * r**2 / (lr * math.sqrt(n))
        confidence_re = 3.0 * (1.0 + C) * r**2 / (2.0 * lr) * math.sqrt(log_term / (2.0 * n))
        out["rademacher_term_rederived"] = rademacher_re
        out["confidence_term_rederived"] = confidence_re
        rederived = [empirical, optimisation, rademacher_re, confidence_re]
        out["total_rederived"] = sum(rederived) if None not in rederived else None
    return out


def agreement(estimate: Tensor, reference: Tensor) -> dict[str, float]:
    """Cosine similarity and relative error ‖estimate − reference‖ / ‖reference‖ of two flat vectors."""
    estimate, reference = estimate.double().flatten(), reference.double().flatten()
    denominator = float(estimate.norm() * reference.norm())
    cosine = float(estimate @ reference) / denominator if denominator > 0 else float("nan")
    scale = float(reference.norm())
    return {"cosine": cosine, "rel_error": float((estimate - reference).norm()) / scale if scale > 0 else float("nan")}


def hypergradients_by_method(
    config: MetaMDConfig | Mapping[str, Any],
    omega: Tensor,
    task: Task,
    methods: Sequence[str] = ("forward", "unrolled", "implicit"),
    *,
    data: TaskSet | PreparedData | None = None,
    constraint_weights: Sequence[float] = (),
) -> dict[str, Tensor]:
    """The task term's hypergradient (ω-only terms excluded) at ``omega`` by each method, for
    validating the implicit hypergradient against the exact ones.

    ``forward`` (quadratic tasks: the closed-form recursion), ``forward_generic`` (the library's
    forward mode), ``unrolled``; ``implicit`` always differentiates the bound's Bregman term (its
    only objective) with the config's solver and adds ``implicit_direct`` (∂B/∂ω with θ_T held
    fixed), ``implicit_indirect`` and ``implicit_thesis_literal`` (eq 5.28 as printed,
    +(∂E/∂θ)(∂²B/∂θ²)⁻¹(∂²B/∂θ∂ω) = −indirect); ``implicit_mu=<μ>`` for each ``constraint_weights``.
    """
    config = coerce(MetaMDConfig, config)
    tasks = task_set(config, data)
    device = torch.device(config.device) if config.tasks.family != "quadratic" else torch.device("cpu")
    out: dict[str, Tensor] = {}
    for method in methods:
        div = divergence_at(config, omega, tasks, device=device)
        if method == "forward" and task.kind == "quadratic":
            grads, _, _ = quadratic_forward_hypergradients(config, div, tasks.meta_train.subset([task.index]))
            out["forward"] = grads[0].detach()
        elif method in ("forward", "forward_generic", "unrolled"):
            grad, _, _ = task_hypergradient(config, tasks, div, task, "unrolled" if method == "unrolled" else "forward")
            out[method] = grad.detach().cpu()
        elif method == "implicit":
            for mu in (config.hypergrad.constraint_weight, *constraint_weights):
                cfg = config.model_copy(update={"hypergrad": config.hypergrad.model_copy(update={"constraint_weight": float(mu)})})
                result, _ = implicit_result(cfg, tasks, divergence_at(config, omega, tasks, device=device), task)
                if mu == config.hypergrad.constraint_weight:
                    out["implicit"] = flatten_grads(result.grads).cpu()
                    out["implicit_direct"] = flatten_grads(result.direct).cpu()
                    out["implicit_indirect"] = flatten_grads(result.indirect).cpu()
                    out["implicit_thesis_literal"] = -flatten_grads(result.indirect).cpu()
                else:
                    out[f"implicit_mu={mu:g}"] = flatten_grads(result.grads).cpu()
        else:
            raise ValueError(f"methods: got {method!r}; allowed: ['forward', 'forward_generic', 'unrolled', 'implicit']")
    return out


def implicit_result(config: MetaMDConfig, tasks: TaskSet, div: Divergence, task: Task) -> tuple[HypergradResult, dict[str, Any]]:
    """The full eq 5.28 result (grads, direct and indirect terms) and metrics for one task."""
    if task.kind == "quadratic":
        return quadratic_implicit(config, div, tasks.meta_train.subset([task.index]))
    result, metrics, _, _ = network_implicit(config, div, network_task(config, tasks, task))
    return result, metrics


__all__ = ["agreement", "generalisation_bound_terms", "hypergradients_by_method", "implicit_result"]
