"""One MetaMD outer step, in the two halves the pipeline runs on different machines:
:func:`inner_hypergrads` (train on this step's tasks, one :class:`Hypergradient` each) and
:func:`outer_update` (check, clip, average, optimiser step on ω, history row), plus the held-out
monitoring the update records every ``evaluation.every`` steps (meta-training problems only)."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from metaopt_core.data.prepare import PreparedData
from metaopt_core.meta.metamd import quadratics
from metaopt_core.meta.metamd.config import MetaMDConfig, config_at
from metaopt_core.meta.metamd.divergence import describe_divergence, divergence_at, omega_digest, regulariser_grad
from metaopt_core.meta.metamd.network import network_hypergradient, train_with_mirror_descent
from metaopt_core.meta.metamd.quadratic import quadratic_forward_hypergradients, quadratic_hypergradient
from metaopt_core.meta.metamd.state import Hypergradient, MetaMDState
from metaopt_core.meta.metamd.tasks import DomainTasks, QuadraticTasks, Task, TaskSet, network_task, seed_sequence, task_set, tasks_for_step
from metaopt_core.meta.outer import nanmean, optimizer_step
from metaopt_core.optim import Divergence


def task_hypergradient(config: MetaMDConfig, tasks: TaskSet, div: Divergence, task: Task, method: str) -> tuple[Tensor, float, dict]:
    """One task's hypergradient by ``method`` (ω-only terms excluded): (flat gradient, value, metrics)."""
    if task.kind == "quadratic":
        if not isinstance(tasks, QuadraticTasks):
            raise ValueError(f"task: got a quadratic task {task.key!r} for tasks.family {config.tasks.family!r}")
        return quadratic_hypergradient(config, div, tasks.meta_train.subset([task.index]), method)
    if not isinstance(tasks, DomainTasks):
        raise ValueError(f"task: got a domain task {task.key!r} for tasks.family {config.tasks.family!r}")
    if task.domain in tasks.held_out:
        raise ValueError(f"task: domain {task.domain!r} is held out (tasks.network.held_out_domains); meta-training never uses it")
    return network_hypergradient(config, div, network_task(config, tasks, task), method)


def inner_hypergrads(state: MetaMDState, tasks: Sequence[Task] | None = None, *, data: TaskSet | PreparedData | None = None) -> list[Hypergradient]:
    """The hypergradients of the state's next outer step for ``tasks`` (default: all of
    :func:`tasks_for_step`). Quadratic tasks with the forward method run together through the
    closed-form recursion; everything else runs task by task. A task's result does not depend on
    which other tasks are computed alongside it."""
    config = config_at(state.metamd_config, state.step)
    if state.finished:
        raise ValueError(f"inner_hypergrads: the run is finished (step {state.step} of {config.outer.steps})")
    task_data = task_set(config, data)
    tasks = list(tasks_for_step(state, task_data) if tasks is None else tasks)
    device = torch.device(config.device) if config.tasks.family != "quadratic" else torch.device("cpu")
    div = divergence_at(config, state.omega, task_data, device=device)
    digest = omega_digest(state.omega)
    reg_value, reg_grad = regulariser_grad(config, div)
    method = config.hypergrad.method
    results: list[Hypergradient] = []

    def finish(task: Task, grad: Tensor, value: float, metrics: dict, seconds: float) -> Hypergradient:
        grad = grad.to(state.omega.dtype).cpu() + reg_grad.to(state.omega.dtype)
        value = value + reg_value
        finite = bool(torch.isfinite(grad).all()) and math.isfinite(value)
        metrics = {**metrics, "seconds": seconds, "task_value": value - reg_value, "lr": config.inner.lr}
        if not finite:
            return Hypergradient(state.step, task, digest, torch.zeros_like(grad), float("nan"), True, metrics)
        return Hypergradient(state.step, task, digest, grad, value, False, metrics)

    if method == "forward" and isinstance(task_data, QuadraticTasks) and all(t.kind == "quadratic" for t in tasks):
        started = time.perf_counter()
        problems = task_data.meta_train.subset([t.index for t in tasks])
        grads, values, extra = quadratic_forward_hypergradients(config, div, problems)
        seconds = (time.perf_counter() - started) / max(1, len(tasks))
        for position, task in enumerate(tasks):
            metrics = {key: float(v[position]) for key, v in extra.items()}
            results.append(finish(task, grads[position], float(values[position]), metrics, seconds))
        return results
    for task in tasks:
        started = time.perf_counter()
        try:
            grad, value, metrics = task_hypergradient(config, task_data, div, task, method)
        except FloatingPointError:
            grad, value, metrics = torch.full_like(state.omega, float("nan")), float("nan"), {}
        results.append(finish(task, grad, value, metrics, time.perf_counter() - started))
    return results


def inner_hypergrad(state: MetaMDState, task: Task, *, data: TaskSet | PreparedData | None = None) -> Hypergradient:
    """Train a fresh model on ``task`` with the current MirrorDescent for T steps and return the
    hypergradient of the meta-objective (one job of the pipeline's fan-out)."""
    return inner_hypergrads(state, [task], data=data)[0]


def outer_update(state: MetaMDState, hypergradients: Sequence[Hypergradient], *, data: TaskSet | PreparedData | None = None) -> MetaMDState:
    """Average one step's hypergradients (one per task of :func:`tasks_for_step`, each exactly once),
    clip, and take an outer optimiser step on ω. Returns a new state; the input is not modified."""
    config = state.metamd_config
    if state.finished:
        raise ValueError(f"outer_update: the run is finished (step {state.step} of {config.outer.steps})")
    if not hypergradients:
        raise ValueError("outer_update: got no hypergradients")
    digest = omega_digest(state.omega)
    for item in hypergradients:
        if item.step != state.step:
            raise ValueError(f"outer_update: hypergradient for task {item.task.key!r} is from step {item.step}; the state is at step {state.step}")
        if item.omega_sha256 != digest:
            raise ValueError(f"outer_update: hypergradient for task {item.task.key!r} was computed at another ω than the state's")
    task_data = task_set(config, data)
    expected = [t.key for t in tasks_for_step(state, task_data)]
    got = [h.task.key for h in hypergradients]
    if sorted(got) != sorted(expected):
        raise ValueError(f"outer_update: got hypergradients for tasks {sorted(got)}; step {state.step} needs exactly {sorted(expected)}")
    ordered = sorted(hypergradients, key=lambda h: expected.index(h.task.key))  # arrival order must not matter
    usable = [h for h in ordered if not h.diverged]
    if not usable:
        raise RuntimeError(f"outer_update: every inner run of step {state.step} diverged or gave a non-finite hypergradient; lower inner.lr or outer.lr")
    grads = [h.grad.to(state.omega.dtype) for h in usable]
    task_norms = [float(g.norm()) for g in grads]
    clip = config.outer.clip_norm
    if clip is not None:  # per task: one task near the stability edge must not swamp the others (and Adam's second moment)
        grads = [g * (clip / n) if n > clip else g for g, n in zip(grads, task_norms)]
    combined = torch.stack(grads).mean(0)
    raw_norm = float(combined.norm())
    omega, optimizer = optimizer_step(state.omega, combined, state.optimizer, state.step + 1, config.outer)
    div_after = divergence_at(config, omega, task_data)
    row: dict[str, Any] = {
        "step": state.step + 1,
        "lr": config.inner.lr_at(state.step),
        "objective": nanmean([h.value for h in ordered]),
        "task_objective": nanmean([h.metrics.get("task_value", float("nan")) for h in ordered]),
        "hypergrad_norm": raw_norm,
        "task_hypergrad_norm_max": max(task_norms),
        "clipped": sum(n > clip for n in task_norms) if clip is not None else 0,
        "diverged": sum(h.diverged for h in ordered),
        "seconds": float(sum(h.metrics.get("seconds", 0.0) for h in ordered)),
        **{k: v for k, v in describe_divergence(div_after).items()},
    }
    for key in ("final_loss", "first_loss", "final_suboptimality", "final_grad_norm", "solve_rel_residual"):
        values = [h.metrics[key] for h in ordered if isinstance(h.metrics.get(key), (int, float))]
        if values:
            row[key] = nanmean(values)
    row["tasks"] = {h.task.key: {"value": h.value, **{k: v for k, v in h.metrics.items() if isinstance(v, (int, float, str)) or v is None}} for h in ordered}
    new_state = MetaMDState(copy.deepcopy(state.config), omega, optimizer, state.step + 1, [*state.history, row])
    every = config.evaluation.every
    if every and (new_state.step % every == 0 or new_state.finished):
        row.update(evaluate_monitoring(new_state, task_data))
    return new_state


def evaluate_monitoring(state: MetaMDState, data: TaskSet | PreparedData | None = None) -> dict[str, float]:
    """Monitoring metrics of the state's optimiser (keys prefixed ``monitor_``), on meta-training
    problems only (the meta-test's problems and domains are never looked at before the meta-test;
    the split manifest records this phase). Quadratics: median / mean iterations to the threshold
    on the meta-train problems and the fraction that converged. Networks: the mean training loss
    along T steps and the final minibatch loss on each meta-training domain, averaged over
    ``evaluation.seeds`` fresh models (seeds apart from the tasks' own)."""
    config = config_at(state.metamd_config, state.step)
    tasks = task_set(config, data)
    if isinstance(tasks, QuadraticTasks):
        family = config.tasks.quadratic
        div = divergence_at(config, state.omega, tasks)
        with torch.no_grad():
            M = div.to_dense()
        counts = quadratics.iterations_to_threshold(tasks.meta_train, "metamd", config.inner.lr, tol=family.tol, max_iters=family.max_iters, metric=M)
        summary = quadratics.summarise(counts, family.max_iters)
        return {f"monitor_iterations_{k}": v for k, v in summary.items()}
    div = divergence_at(config, state.omega, tasks, device=config.device)
    trajectory_means, finals = [], []
    for domain in tasks.meta_train:
        for seed in range(config.evaluation.seeds):
            init_seed, data_seed = seed_sequence(config.seed, seed, 0xE7A1).generate_state(2)
            concrete = network_task(config, tasks, Task("domain", seed, domain, int(init_seed), int(data_seed)))
            _, losses = train_with_mirror_descent(config, div, concrete)
            trajectory_means.append(sum(losses) / len(losses))
            finals.append(losses[-1])
    return {"monitor_trajectory_loss": nanmean(trajectory_means), "monitor_final_loss": nanmean(finals)}


__all__ = ["evaluate_monitoring", "inner_hypergrad", "inner_hypergrads", "outer_update", "task_hypergradient"]
