"""One ITL outer step: the hypergradients of the held-out domains (their inner trainings batched
together), then their aggregation (PCGrad or mean) and the outer optimiser's update of ω.

    grads = inner_hypergrads(state)          # or one inner_hypergrad per domain, on any machines
    state = outer_update(state, grads)       # PCGrad + Adam on ω
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from metaopt_core.data.prepare import PreparedData
from metaopt_core.hypergrad import pcgrad
from metaopt_core.meta.itl.domains import DomainSet, domain_set, make_job
from metaopt_core.meta.itl.hypergrad import Hypergradient, hypergradient_of, source_accuracy
from metaopt_core.meta.itl.inner import train_inner
from metaopt_core.meta.itl.state import ITLState
from metaopt_core.meta.outer import nanmean as _nanmean
from metaopt_core.meta.outer import optimizer_step


def inner_hypergrads(
    state: ITLState,
    held_out_domains: Sequence[str | int] | None = None,
    *,
    data: PreparedData | DomainSet | None = None,
    batched: bool | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[Hypergradient]:
    """The hypergradients of the next outer step for the given held-out domains (default: every
    domain), their inner trainings batched together when the config allows. The result for a
    domain does not depend on which other domains are computed alongside it."""
    config = state.itl_config
    if state.finished:
        raise ValueError(f"inner_hypergrads: the run is finished (step {state.step} of {config.outer.steps})")
    domains = domain_set(config, data)
    if state.domains is not None and state.domains != domains.names:
        raise ValueError(f"data: domains {domains.names} differ from the state's {state.domains} (another dataset?)")
    chosen = list(range(len(domains.names))) if held_out_domains is None else [domains.index(d) for d in held_out_domains]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"held_out_domains: got duplicates in {list(held_out_domains or [])}")
    jobs = [make_job(config, domains, state.step, d) for d in chosen]
    started = time.perf_counter()
    lrs = config.inner.lr_grid or [config.inner.lr]
    # every job at every lr of the grid (the deployment protocol: the user tunes the lr), then each
    # job's hypergradient at the lr its source domains' validation prefers
    at_lr = {lr: (with_inner_lr(config, lr), train_inner(with_inner_lr(config, lr), domains, jobs, state.omega, batched=batched, progress=progress))
             for lr in lrs}  # fmt: skip
    train_seconds = (time.perf_counter() - started) / max(1, len(jobs))
    out = []
    for j, job in enumerate(jobs):
        lr = lrs[0] if len(lrs) == 1 else max(lrs, key=lambda rate: source_accuracy(at_lr[rate][0], domains, job, at_lr[rate][1][j]))
        gradient = hypergradient_of(at_lr[lr][0], domains, job, at_lr[lr][1][j], state.omega, state.step, train_seconds)
        gradient.metrics["inner_lr"] = lr
        out.append(gradient)
    return out


def with_inner_lr(config, lr: float):
    """``config`` with the inner lr ``lr`` (everything else as it is)."""
    return config if lr == config.inner.lr else config.model_copy(update={"inner": config.inner.model_copy(update={"lr": lr})})


def inner_hypergrad(state: ITLState, held_out_domain: str | int, *, data: PreparedData | DomainSet | None = None) -> Hypergradient:
    """Train a fresh model on every domain but ``held_out_domain`` with the current loss, then the
    IFT hypergradient of that domain's cross-entropy w.r.t. ω (one job of the pipeline's fan-out)."""
    return inner_hypergrads(state, [held_out_domain], data=data)[0]


def aggregate(gradients: Sequence[Tensor], method: str, seed: int, step: int) -> Tensor:
    """Combine per-domain hypergradients: PCGrad (visiting order seeded by (seed, step)) or mean."""
    stacked = torch.stack([g.to(torch.float32) for g in gradients])
    if method == "mean":
        return stacked.mean(0)
    if method == "pcgrad":
        pc_seed = int(np.random.SeedSequence([seed, step, 0x9C]).generate_state(1)[0] % (2**31))
        return pcgrad(stacked, seed=pc_seed)
    raise ValueError(f"aggregation: got {method!r}; allowed: ['pcgrad', 'mean']")


def outer_update(state: ITLState, hypergradients: Sequence[Hypergradient]) -> ITLState:
    """Aggregate one step's hypergradients (one per domain, each exactly once) and take an outer
    optimiser step on ω. Returns a new state; the input is not modified."""
    config = state.itl_config
    if state.finished:
        raise ValueError(f"outer_update: the run is finished (step {state.step} of {config.outer.steps})")
    if not hypergradients:
        raise ValueError("outer_update: got no hypergradients")
    omega_now = [float(v) for v in state.omega]
    for item in hypergradients:
        if item.step != state.step:
            raise ValueError(f"outer_update: hypergradient for domain {item.domain!r} is from step {item.step}; the state is at step {state.step}")
        if item.omega != omega_now:
            raise ValueError(f"outer_update: hypergradient for domain {item.domain!r} was computed at another ω than the state's")
    names = [item.domain for item in hypergradients]
    if len(set(names)) != len(names):
        raise ValueError(f"outer_update: domains given more than once: {sorted({n for n in names if names.count(n) > 1})}")
    expected = state.domains
    if expected is not None and sorted(names) != sorted(expected):
        raise ValueError(f"outer_update: got hypergradients for {sorted(names)}; every step needs exactly {sorted(expected)}")
    # a fixed order (not arrival order) so the aggregation is the same however the fan-out returned
    ordered = sorted(hypergradients, key=lambda h: names.index(h.domain) if expected is None else expected.index(h.domain))
    usable = [h for h in ordered if not h.diverged]
    if not usable:
        raise RuntimeError(
            f"outer_update: every inner training of step {state.step} diverged or gave a non-finite hypergradient; lower inner.lr or change the loss's start"
        )
    gradients = [torch.tensor(h.grad, dtype=torch.float32) for h in usable]
    combined = aggregate(gradients, config.outer.aggregation, config.seed, state.step)
    raw_norm = float(combined.norm())
    scale = _scale_indices(config)
    if scale is not None:  # the loss's scale is the tuned lr's job: learn its shape (see OuterConfig.fixed_scale)
        direction = state.omega[scale] / state.omega[scale].norm().clamp_min(1e-12)
        combined = combined.clone()
        combined[scale] -= (combined[scale] @ direction) * direction
    if config.outer.clip_norm is not None and raw_norm > config.outer.clip_norm:
        combined = combined * (config.outer.clip_norm / raw_norm)
    omega, optimizer = optimizer_step(state.omega, combined, state.optimizer, state.step + 1, config.outer)
    if scale is not None:
        omega = omega.clone()
        omega[scale] *= state.omega[scale].norm() / omega[scale].norm().clamp_min(1e-12)

    metrics = [h.metrics for h in ordered]
    row = {
        "step": state.step + 1,
        "heldout_ce": _nanmean([m["heldout_ce"] for m in metrics]),
        "heldout_acc": _nanmean([m["heldout_acc"] for m in metrics]),
        "source_acc": _nanmean([m["source_acc"] for m in metrics]),
        "outer_objective": _nanmean([m["outer_objective"] for m in metrics]),
        "inner_grad_norm": _nanmean([m["inner_grad_norm"] for m in metrics]),
        "inner_grad_norm_max": max((m["inner_grad_norm"] for m in metrics if math.isfinite(m["inner_grad_norm"])), default=float("nan")),
        "hypergrad_norm": raw_norm,
        "domain_hypergrad_norm": _nanmean([m["hypergrad_norm"] for m in metrics]),
        "solve_rel_residual": _nanmean([m.get("solve_rel_residual", float("nan")) for m in metrics]),
        "epochs": _nanmean([float(m["epochs"]) for m in metrics]),
        # the inner lr the jobs trained at (geometric mean; chosen per job with an lr grid)
        "inner_lr": math.exp(_nanmean([math.log(m.get("inner_lr", config.inner.lr)) for m in metrics])),
        "converged": sum(bool(m["converged"]) for m in metrics),
        "solver_warnings": sum(bool(m.get("solver_warning")) for m in metrics),
        "diverged": sum(h.diverged for h in ordered),
        "seconds": float(sum(m.get("seconds", 0.0) for m in metrics)),
        "omega_before": omega_now,
        "omega": [float(v) for v in omega],
        "update": [float(v) for v in combined],
        "per_domain": {h.domain: {k: v for k, v in h.metrics.items() if k != "epoch_grad_norms"} | {"grad": h.grad} for h in ordered},
    }
    return ITLState(copy.deepcopy(state.config), omega, optimizer, state.step + 1, [*state.history, row], state.domains)


def _scale_indices(config) -> slice | None:
    """The coefficients whose norm stays fixed, or None (see ``OuterConfig.fixed_scale``)."""
    fixed = config.outer.fixed_scale if config.outer.fixed_scale is not None else bool(config.inner.lr_grid)
    return getattr(config.loss_family(), "scale_indices", None) if fixed else None


def with_domains(state: ITLState, data: PreparedData | DomainSet | None = None) -> ITLState:
    """Record the dataset's domain names in the state (so ``outer_update`` can insist on one
    hypergradient per domain). :func:`run` does this; a pipeline does it once after preparing data."""
    domains = domain_set(state.itl_config, data)
    if state.domains is not None and state.domains != domains.names:
        raise ValueError(f"data: domains {domains.names} differ from the state's {state.domains} (another dataset?)")
    state.domains = list(domains.names)
    return state
