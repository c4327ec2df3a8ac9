"""Hypergradients on the 2-D quadratic tasks: the exact closed-form forward mode for many problems at
once (App C.2, eqs C.14–C.17), the library routines one problem at a time (forward, unrolled,
implicit), and the plain mirror-descent run they share."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from metaopt_core.hypergrad import HypergradResult, forward_mode_hypergradient, unrolled_hypergradient
from metaopt_core.meta.metamd.config import MetaMDConfig
from metaopt_core.meta.metamd.divergence import flatten_grads, implicit_bregman_hypergradient
from metaopt_core.meta.metamd.quadratics import QuadraticProblems
from metaopt_core.optim import Divergence


def _metric_jacobians(div: Divergence) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(M, P = M⁻¹, ∂M/∂ω, ∂P/∂ω) of a 2-D divergence; the Jacobians are (2, 2, p)."""
    params = list(div.parameters())
    M = div.to_dense()
    rows = []
    for i in range(2):
        for j in range(2):
            grads = torch.autograd.grad(M[i, j], params, retain_graph=True, allow_unused=True)
            rows.append(flatten_grads([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]))
    dM = torch.stack(rows).reshape(2, 2, -1)
    M = M.detach()
    P = torch.linalg.inv(M)
    dP = -torch.einsum("ij,jkp,kl->ilp", P, dM, P)
    return M, P, dM, dP


def quadratic_forward_hypergradients(config: MetaMDConfig, div: Divergence, problems: QuadraticProblems) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Exact forward-mode hypergradients (eqs C.14–C.17) of the meta-objective's task term for every
    problem at once, in closed form (H = 2Q is known).

    Tangent recursion, Z_t = dθ_t/dω (n, 2, p): θ_{t+1} = θ_t − η P g_t,
    Z_{t+1} = Z_t − η P H Z_t − η (∂P/∂ω) g_t with P = M⁻¹, g_t = H θ_t − b (+ wd θ_t).

    Returns (per-problem gradients (n, p), per-problem values (n,), extra per-problem metrics).
    The ω-only terms (k/λ, ρ‖M − I‖²) are not included.
    """
    eta, steps, wd = config.inner.lr, config.inner.steps, config.inner.weight_decay
    M, P, dM, dP = _metric_jacobians(div)
    H = 2.0 * problems.Q + wd * torch.eye(2, dtype=problems.Q.dtype)
    b = problems.b
    f_star = problems.optimal_value()
    n, p = len(problems), dM.shape[-1]
    theta = problems.start.expand(n, 2).clone()
    Z = torch.zeros(n, 2, p, dtype=theta.dtype)
    trajectory = config.objective.kind == "trajectory"
    grad = torch.zeros(n, p, dtype=theta.dtype)
    value = torch.zeros(n, dtype=theta.dtype)
    for _ in range(steps):
        g = torch.einsum("nij,nj->ni", H, theta) - b
        theta = theta - eta * g @ P.T
        Z = Z - eta * torch.einsum("ij,njk,nkp->nip", P, H, Z) - eta * torch.einsum("ijp,nj->nip", dP, g)
        if trajectory:
            g_new = 2.0 * torch.einsum("nij,nj->ni", problems.Q, theta) - b  # ∇f (no decay: the training loss)
            grad += torch.einsum("ni,nip->np", g_new, Z) / steps
            value += (problems.loss(theta) - f_star) / steps
    final_grad_norm = (2.0 * torch.einsum("nij,nj->ni", problems.Q, theta) - b).norm(dim=-1)
    if not trajectory:
        d = theta - problems.start
        grad = torch.einsum("ni,ij,njp->np", d, M, Z) + 0.5 * torch.einsum("ni,ijp,nj->np", d, dM, d)
        value = 0.5 * torch.einsum("ni,ij,nj->n", d, M, d)
    extra = {"final_suboptimality": problems.loss(theta) - f_star, "final_grad_norm": final_grad_norm}
    return grad, value, extra


def _quadratic_closures(config: MetaMDConfig, problem: QuadraticProblems):
    """(f, the inner step's loss with decay, f*) of a single problem, as functions of [θ]."""
    Q, b = problem.Q[0], problem.b[0]
    f_star = float(problem.optimal_value()[0])
    wd = config.inner.weight_decay

    def f(params: Sequence[Tensor]) -> Tensor:
        theta = params[0]
        return theta @ Q @ theta - b @ theta

    def step_loss(params: list[Tensor], t: int) -> Tensor:
        return f(params) + (0.5 * wd * (params[0] ** 2).sum() if wd else 0.0)

    return f, step_loss, f_star


def quadratic_mirror_descent(config: MetaMDConfig, div: Divergence, problems: QuadraticProblems) -> tuple[Tensor, float]:
    """θ_T of T mirror-descent steps on every problem (n, 2), and the mean over problems of the
    trajectory objective (1/T) Σ_t (f(θ_t) − f*). No graph."""
    with torch.no_grad():
        P = torch.linalg.inv(div.to_dense())
        H = 2.0 * problems.Q + config.inner.weight_decay * torch.eye(2, dtype=problems.Q.dtype)
        theta = problems.start.expand(len(problems), 2).clone()
        f_star = problems.optimal_value()
        total = torch.zeros(len(problems), dtype=theta.dtype)
        for _ in range(config.inner.steps):
            theta = theta - config.inner.lr * (torch.einsum("nij,nj->ni", H, theta) - problems.b) @ P.T
            total += (problems.loss(theta) - f_star) / config.inner.steps
    return theta, float(total.mean())


def quadratic_implicit(
    config: MetaMDConfig, div: Divergence, problem: QuadraticProblems, theta_T: Tensor | None = None
) -> tuple[HypergradResult, dict[str, Any]]:
    """Eq 5.28 (:func:`~metaopt_core.meta.metamd.divergence.implicit_bregman_hypergradient`) for one
    problem at its θ_T (``theta_T``, (1, 2), or computed here), with L_tr = f. Returns
    (HypergradResult, metrics)."""
    f, _, _ = _quadratic_closures(config, problem)
    if theta_T is None:
        theta_T = quadratic_mirror_descent(config, div, problem)[0]
    theta = theta_T[0].clone().requires_grad_(True)
    return implicit_bregman_hypergradient(config, div, [theta], [problem.start.clone()], lambda: f([theta]))


def quadratic_hypergradient(config: MetaMDConfig, div: Divergence, problem: QuadraticProblems, method: str) -> tuple[Tensor, float, dict]:
    """The hypergradient of one quadratic problem's task term by ``method`` through the library
    routines (``forward``: :func:`forward_mode_hypergradient`; ``unrolled``:
    :func:`unrolled_hypergradient`; ``implicit``: eq 5.28). Returns (flat gradient, value, metrics);
    the ω-only terms are not included."""
    f, step_loss, f_star = _quadratic_closures(config, problem)
    meta = list(div.parameters())
    steps, eta = config.inner.steps, config.inner.lr
    start = problem.start.clone()
    with torch.no_grad():
        theta_T, trajectory_value = quadratic_mirror_descent(config, div, problem)
        bregman_value = float(div.bregman([theta_T[0]], [start]))
    value = trajectory_value if config.objective.kind == "trajectory" else bregman_value
    if method in ("forward", "unrolled"):
        if config.objective.kind == "trajectory":
            trajectory_loss = lambda params, t: (f(params) - f_star) / steps  # noqa: E731
            outer_loss = None
        else:
            trajectory_loss = None
            outer_loss = lambda params: div.bregman(params, [start])  # noqa: E731
        routine = forward_mode_hypergradient if method == "forward" else unrolled_hypergradient
        grads = routine([start], step_loss, outer_loss, meta, steps=steps, lr=eta,
                        precondition=lambda grads, t: div.precondition(grads), trajectory_loss=trajectory_loss)  # fmt: skip
        return flatten_grads(grads), value, {}
    if method != "implicit":
        raise ValueError(f"method: got {method!r}; allowed: ['forward', 'unrolled', 'implicit']")
    result, metrics = quadratic_implicit(config, div, problem, theta_T)
    return flatten_grads(result.grads), bregman_value, metrics


__all__ = [
    "quadratic_forward_hypergradients",
    "quadratic_hypergradient",
    "quadratic_implicit",
    "quadratic_mirror_descent",
]
