"""The meta-test every loss learner shares: the learned loss, the production version's loss (the
champion, when there is one) and named baseline losses, each at its own lr tuned on the selection
split, on the learner's held-out tasks, through the evaluator (``metaopt_core.evaluate``, tuned lr
protocol). Scored as the registry records (``meta_test_accuracy``, higher is better), with the
per-(task, seed) paired scores the promotion gate compares (:mod:`metaopt_core.gate`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter

LEARNED = "learned"
CHAMPION = "champion"
LR_GRID_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)  # a grid around the meta-training lr, factor 3 apart


def lr_grid_around(lr: float, factors: Sequence[float] = LR_GRID_FACTORS) -> list[float]:
    """The default lr grid of a loss meta-test: ``lr`` times each factor (5 values, factor 3 apart)."""
    return [float(f"{lr * factor:.6g}") for factor in factors]


def _scores(result: Any) -> dict[str, float]:
    """The learned loss's mean accuracy over the cells (at convergence: ``meta_test_accuracy``, the
    registry's metric; with early stopping), its average rank, and the other candidates' accuracies."""
    scores: dict[str, float] = {}
    for label in result.losses:
        converged = [result.summary(label, cell).converged_mean for cell in result.cells]
        early = [result.summary(label, cell).early_stop_mean for cell in result.cells]
        prefix = "meta_test_" if label == LEARNED else f"{label}." if label == CHAMPION else f"baseline.{label}."
        scores[prefix + "accuracy"] = sum(converged) / len(converged)
        scores[prefix + "accuracy_early_stop"] = sum(early) / len(early)
    scores["meta_test_rank"] = float(result.ranks["converged"][LEARNED])
    return scores


def paired_scores(result: Any) -> tuple[dict[str, list[float]], list[dict]]:
    """(label -> accuracy at convergence of every (cell, seed) at the label's chosen lr, the units):
    the same units in the same order for every label."""
    units = [{"dataset": cell[0], "condition": cell[1], "architecture": cell[2], "seed": seed}
             for cell in result.cells for seed in result.settings["seeds"]]  # fmt: skip
    chosen = {(r.loss, r.dataset, r.condition, r.architecture, r.seed): r.converged_acc for r in result.runs if r.selected}
    paired = {label: [chosen[(label, u["dataset"], u["condition"], u["architecture"], u["seed"])] for u in units] for label in result.losses}
    return paired, units


def compare_learned_loss(
    title: str,
    loss_document: Mapping[str, Any],
    baselines: Sequence[str],
    tasks: Sequence[Any],
    training: Mapping[str, Any],
    *,
    champion: Mapping[str, Any] | None = None,
    device: str | None = None,
    progress: ProgressReporter | None = None,
) -> MetaTestReport:
    """Train the learned loss, the champion's loss (``champion``: the production version's loss
    document, or None) and each baseline on every task with the same ``training`` settings (model,
    seeds, epochs, batch_size, momentum, ``lr_grid``): each (candidate, task) at the lr of the grid
    with the best mean last-epoch accuracy on the task's *selection* split (never its test split).
    Report the table, the scores, the paired per-(task, seed) scores and the settings."""
    from metaopt_core import evaluate
    from metaopt_core.losses.document import loss_from_document

    losses: dict[str, Any] = {LEARNED: loss_from_document(loss_document)}
    if champion is not None:
        losses[CHAMPION] = loss_from_document(champion)
    for name in baselines:
        if name in (LEARNED, CHAMPION):
            raise ValueError(f"meta_test.baselines: {name!r} is a candidate's own label; pick another name")
        losses[name] = name

    def on_run(event: dict) -> None:
        if progress:
            progress(f"meta-test {event['done']}/{event['total']}: {event['loss']} on {event['dataset']} · {event['condition']} · "
                     f"{event['architecture']} seed {event['seed']} lr {event['lr']:g}: accuracy {event['converged_acc']:.4f}")  # fmt: skip

    protocol = evaluate.TrainingProtocol(architectures=[training["model"]], seeds=list(training["seeds"]), epochs=training["epochs"],
                                         batch_size=training["batch_size"], momentum=training["momentum"], lr_protocol="tuned",
                                         lr_grid=list(training["lr_grid"]), device=device)  # fmt: skip
    result = evaluate.compare_losses(losses, tasks, protocol, progress=on_run)
    paired, units = paired_scores(result)
    chosen_lr = {label: {" · ".join(cell): result.summary(label, cell).lr for cell in result.cells} for label in result.losses}
    settings = {"lr_protocol": "tuned", "lr_selection": "best mean last-epoch accuracy on each task's selection split",
                "lr_grid": [float(v) for v in training["lr_grid"]], "epochs": training["epochs"], "seeds": list(training["seeds"]),
                "model": training["model"], "batch_size": training["batch_size"], "momentum": training["momentum"],
                "candidates": list(losses), "baselines": list(baselines), "chosen_lr": chosen_lr}  # fmt: skip
    heading = f"### {title}: learned loss vs {', '.join(list(losses)[1:]) or 'nothing'}\n\n"
    details = {**result.to_dict(), "meta_test_settings": settings, "paired": paired, "units": units}
    return MetaTestReport(heading + result.to_markdown(), _scores(result), "meta_test_accuracy", True, details,
                          paired=paired, units=units, settings=settings)  # fmt: skip


__all__ = ["CHAMPION", "LEARNED", "LR_GRID_FACTORS", "compare_learned_loss", "lr_grid_around", "paired_scores"]
