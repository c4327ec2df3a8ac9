"""MetaMD's meta-test candidates, each at its own tuned lr: the learned divergence (mirror descent),
the production version's divergence (the champion, when there is one), SGD (the identity
divergence), SGD with momentum and Adam. Every candidate gets the same lr grid and budget; its lr
is the grid's best on the *meta-training* tasks, then it runs on the held-out tasks, where every
(task, seed) unit is one paired score for the promotion gate.

Network tasks: accuracy on the held-out domain's test split after each horizon (the
meta-training horizon T and multiples of it: an optimiser meta-trained for T steps is deployed for
longer), each horizon a gate stratum (the version must win at every one), each candidate's lr
chosen per horizon; a run whose loss went non-finite scores chance. Every unit is one seed's own
rebuild of the held-out domain from the meta-test part (its own images, split and initialisation).
Quadratic tasks: iterations to the gradient-norm threshold per held-out problem (lower is better; a
run that never gets there counts ``max_iters``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metaopt_core.meta.metamd import quadratics
from metaopt_core.meta.metamd.tasks import DomainTasks, QuadraticTasks, Task, network_task
from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter

LEARNED = "learned"
CHAMPION = "champion"
BASELINES = ("sgd", "sgd-m", "adam")
NETWORK_LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # plus the learned divergence's own lr


def network_lr_grid(learned_lr: float) -> list[float]:
    """The default lr grid of the network meta-test: 0.003 … 1 (SGD's and Adam's ranges) and the
    lr the divergence was meta-trained at."""
    return sorted({*NETWORK_LR_GRID, float(learned_lr)})


def _optimizer(candidate: Any, params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from metaopt_core.optim import MirrorDescent

    if candidate == "sgd":  # mirror descent with the identity divergence
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if candidate == "sgd-m":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if candidate == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return MirrorDescent(params, candidate, lr=lr, weight_decay=weight_decay)


def network_run(config: Any, tasks: DomainTasks, candidate: Any, task: Task, val: Any, lr: float, steps: int) -> dict:
    """Train the task's base model from its seeded init with ``candidate`` (a divergence or a
    baseline name) at ``lr`` for ``steps`` steps; its val accuracy (chance if it diverged)."""
    concrete = network_task(config, tasks, task, steps=steps)
    model = concrete.model
    if not isinstance(candidate, str):
        candidate = candidate.to(config.device)
    optimizer = _optimizer(candidate, list(model.parameters()), lr, config.inner.weight_decay)
    final = float("nan")
    for t in range(steps):
        index = concrete.batches[t]
        loss = F.cross_entropy(model(concrete.x[index]), concrete.y[index])
        final = float(loss.detach())
        if not math.isfinite(final):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    diverged = not math.isfinite(final)
    with torch.no_grad():
        logits = model(val.x.to(concrete.x.device))
        accuracy = float((logits.argmax(-1).cpu() == val.y).float().mean())
        diverged = diverged or not bool(torch.isfinite(logits).all())
    chance = 1.0 / tasks.data.num_classes
    return {"accuracy": chance if diverged else accuracy, "final_loss": final, "diverged": diverged}


def _unit_task(config: Any, domain: str, seed: int, salt: int) -> Task:
    init_seed, data_seed = np.random.SeedSequence([config.seed, seed, salt]).generate_state(2)
    return Task("domain", seed, domain, int(init_seed), int(data_seed))


def network_meta_test(
    config: Any,
    candidates: Mapping[str, Any],
    tune_on: Sequence[tuple[DomainTasks, str, Any]],
    test_on: Sequence[tuple[DomainTasks, str, Any, int]],
    lr_grid: Sequence[float],
    horizons: Sequence[int],
    tune_seeds: int,
    progress: ProgressReporter | None = None,
) -> MetaTestReport:
    """For every horizon (steps): each candidate's lr is the grid's best mean val accuracy over
    ``tune_on`` (meta-training domains: a task set, a domain, the split scored) x ``tune_seeds``;
    then every unit of ``test_on`` (a task set, its held-out domain, its test split, the unit's
    seed) at that lr. The units of one horizon form one gate stratum."""
    from metaopt_core.evaluate.report import unit_summary

    grid = [float(v) for v in lr_grid]
    chosen: dict[str, dict[str, float]] = {label: {} for label in candidates}
    tuning: dict[str, dict[str, dict[str, float]]] = {label: {} for label in candidates}
    units: list[dict] = []
    rows: dict[str, list[dict]] = {label: [] for label in candidates}
    for steps in horizons:
        stratum = f"{steps} steps"
        for label, candidate in candidates.items():
            table = {}
            for lr in grid:
                runs = [network_run(config, tasks, candidate, _unit_task(config, domain, seed, 0x7A0E), val, lr, steps)
                        for tasks, domain, val in tune_on for seed in range(tune_seeds)]  # fmt: skip
                table[f"{lr:g}"] = float(np.mean([r["accuracy"] for r in runs]))
            chosen[label][stratum] = max(grid, key=lambda lr: table[f"{lr:g}"])  # first in grid order on ties
            tuning[label][stratum] = table
            if progress:
                progress(f"meta-test: {label} at {steps} steps: lr {chosen[label][stratum]:g} chosen on the meta-training domains")
        for tasks, domain, test, seed in test_on:
            units.append({"domain": domain, "seed": seed, "steps": steps, "stratum": stratum, "test": len(test)})
            task = _unit_task(config, domain, seed, 0x7E57)
            for label, candidate in candidates.items():
                row = network_run(config, tasks, candidate, task, test, chosen[label][stratum], steps)
                rows[label].append({"domain": domain, "seed": seed, "steps": steps, **row})
            if progress:
                progress(f"meta-test: held-out {domain} seed {seed}, {steps} steps: " + ", ".join(f"{k} {rows[k][-1]['accuracy']:.3f}" for k in rows))
    paired = {label: [r["accuracy"] for r in rows[label]] for label in candidates}
    strata = list(dict.fromkeys(u["stratum"] for u in units))
    tables = {stratum: {label: unit_summary([r["accuracy"] for r, u in zip(rows[label], units) if u["stratum"] == stratum]) for label in candidates}
              for stratum in strata}  # fmt: skip

    def mean(label: str, key: str, stratum: str) -> float:
        values = [r[key] for r, u in zip(rows[label], units) if u["stratum"] == stratum and math.isfinite(r[key])]
        return sum(values) / len(values) if values else float("nan")

    settings = {"lr_grid": grid, "lr_selection": "best mean val accuracy on the meta-training domains, per horizon", "horizons": list(horizons),
                "seeds": sorted({u["seed"] for u in units}), "replicates": len(units) // max(1, len(strata)), "tuned_on": [d for _, d, _ in tune_on],
                "tested_on": sorted({u["domain"] for u in units}), "candidates": list(candidates), "chosen_lr": chosen, "tuning": tuning,
                "strata": strata, "tune_seeds": tune_seeds}  # fmt: skip
    grid_text = ", ".join(f"{v:g}" for v in grid)
    lines = [f"### MetaMD meta-test: held-out {', '.join(settings['tested_on'])}, {settings['replicates']} independent units per horizon", "",
             f"Each optimiser at its own lr from {{{grid_text}}}, chosen per horizon on the meta-training domains "
             f"({', '.join(settings['tuned_on'])}: best mean val accuracy); every unit its own draw of the held-out domain, split and "
             "initialisation; diverged runs score chance. The gate needs a win at every horizon. Test accuracy: mean [95 % CI], median, worst.", ""]  # fmt: skip
    for stratum in strata:
        lines += [f"**{stratum}**", "", "| optimiser | lr | mean [95 % CI] | median | worst | final minibatch loss | diverged |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for label in candidates:
            row = tables[stratum][label]
            diverged = sum(r["diverged"] for r, u in zip(rows[label], units) if u["stratum"] == stratum)
            lines.append(f"| {label} | {chosen[label][stratum]:g} | {row['mean'] * 100:.1f} [{row['ci_low'] * 100:.1f}, {row['ci_high'] * 100:.1f}] | "
                         f"{row['median'] * 100:.1f} | {row['worst'] * 100:.1f} | {mean(label, 'final_loss', stratum):.4f} | {diverged} |")  # fmt: skip
        lines.append("")
    first = strata[0]
    scores = {"meta_test_accuracy": float(np.mean(paired[LEARNED])), "meta_test_final_loss": mean(LEARNED, "final_loss", first)}
    for stratum in strata:
        key = stratum.replace(" ", "_")
        scores[f"meta_test_accuracy_{key}"] = tables[stratum][LEARNED]["mean"]
        for label in candidates:
            if label != LEARNED:
                prefix = f"{label}." if label == CHAMPION else f"baseline.{label}."
                scores[prefix + f"accuracy_{key}"] = tables[stratum][label]["mean"]
    for label in candidates:
        if label != LEARNED:
            prefix = f"{label}." if label == CHAMPION else f"baseline.{label}."
            scores[prefix + "accuracy"] = float(np.mean(paired[label]))
    deployment = {"lr": chosen[LEARNED][first]}  # the registered divergence's lr: chosen at the meta-training horizon (settings: every horizon's)
    details = {"runs": rows, "tables": tables, "meta_test_settings": settings, "paired": paired, "units": units, "deployment": deployment}
    return MetaTestReport("\n".join(lines) + "\n", scores, "meta_test_accuracy", True, details, paired=paired, units=units, settings=settings,
                          deployment=deployment)  # fmt: skip


def quadratic_meta_test(config: Any, tasks: QuadraticTasks, metrics: Mapping[str, Any], lr_grid: Sequence[float] | None) -> MetaTestReport:
    """``metrics``: label -> the 2x2 metric M of a divergence (mirror descent) or a baseline name.
    Each candidate's lr: the grid's fewest mean iterations on the meta-train problems; then
    iterations per held-out problem at that lr (the paired units)."""
    family = config.tasks.quadratic
    grid = [float(v) for v in (quadratics.default_lr_grid("sgd") if lr_grid is None else lr_grid)]
    counted: dict[str, list[float]] = {}
    chosen: dict[str, float] = {}
    summary: dict[str, dict] = {}
    for label, metric in metrics.items():
        optimizer, options = (metric, {}) if isinstance(metric, str) else ("metamd", {"metric": metric})
        chosen[label], _ = quadratics.tune_lr(tasks.meta_train, optimizer, grid, tol=family.tol, max_iters=family.max_iters, **options)
        counts = quadratics.iterations_to_threshold(tasks.held_out, optimizer, chosen[label], tol=family.tol, max_iters=family.max_iters, **options)
        counted[label] = [float(family.max_iters if c == quadratics.NOT_CONVERGED else c) for c in counts]
        summary[label] = quadratics.summarise(np.asarray(counts), family.max_iters)
    n = len(tasks.held_out)
    units = [{"problem": i} for i in range(n)]
    settings = {"lr_grid": grid, "lr_selection": "fewest mean iterations on the meta-train problems", "max_iters": family.max_iters,
                "tol": family.tol, "seeds": [], "replicates": n, "candidates": list(metrics), "chosen_lr": chosen}  # fmt: skip
    lines = [f"### MetaMD meta-test: {n} held-out quadratics, threshold ||grad|| < {family.tol:g}", "",
             f"Each optimiser at its own lr from a {len(grid)}-point grid ({grid[0]:g} … {grid[-1]:g}), chosen on the "
             f"{len(tasks.meta_train)} meta-train problems (fewest mean iterations).", "",
             "| optimiser | lr | median iterations | mean iterations | converged |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for label, row in summary.items():
        lines.append(f"| {label} | {chosen[label]:.4g} | {row['median']:.0f} | {row['mean']:.1f} | {row['converged']:.0%} |")
    scores = {"meta_test_iterations": summary[LEARNED]["median"], "meta_test_converged": summary[LEARNED]["converged"]}
    for label in summary:
        if label != LEARNED:
            prefix = f"{label}." if label == CHAMPION else f"baseline.{label}."
            scores.update({prefix + "iterations": summary[label]["median"], prefix + "converged": summary[label]["converged"]})
    deployment = {"lr": chosen[LEARNED]}
    details = {"summary": summary, "meta_test_settings": settings, "paired": counted, "units": units, "deployment": deployment}
    return MetaTestReport("\n".join(lines) + "\n", scores, "meta_test_iterations", False, details, paired=counted, units=units, settings=settings,
                          deployment=deployment)  # fmt: skip


__all__ = ["BASELINES", "CHAMPION", "LEARNED", "NETWORK_LR_GRID", "network_lr_grid", "network_meta_test", "network_run", "quadratic_meta_test"]
