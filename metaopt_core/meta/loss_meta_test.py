"""The meta-test every loss learner shares: the learned loss against named baseline losses on the
learner's held-out tasks, through the evaluator (``metaopt_core.evaluate``), scored as the
registry records and promotion compares (``meta_test_accuracy``, higher is better)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from metaopt_core.meta.protocol import MetaTestReport, ProgressReporter

LEARNED = "learned"


def _scores(result: Any) -> dict[str, float]:
    """The learned loss's mean accuracy over the cells (at convergence: ``meta_test_accuracy``, the
    promotion metric; with early stopping), its average rank, and each baseline's accuracies."""
    scores: dict[str, float] = {}
    for label in result.losses:
        converged = [result.summary(label, cell).converged_mean for cell in result.cells]
        early = [result.summary(label, cell).early_stop_mean for cell in result.cells]
        prefix = "meta_test_" if label == LEARNED else f"baseline.{label}."
        scores[prefix + "accuracy"] = sum(converged) / len(converged)
        scores[prefix + "accuracy_early_stop"] = sum(early) / len(early)
    scores["meta_test_rank"] = float(result.ranks["converged"][LEARNED])
    return scores


def compare_learned_loss(
    title: str,
    loss_document: Mapping[str, Any],
    baselines: Sequence[str],
    tasks: Sequence[Any],
    training: Mapping[str, Any],
    *,
    device: str | None = None,
    progress: ProgressReporter | None = None,
) -> MetaTestReport:
    """Train the learned loss and each baseline on every task with the same ``training`` settings
    (model, seeds, epochs, batch_size, momentum, lr) and report the table and scores."""
    from metaopt_core import evaluate
    from metaopt_core.losses.document import loss_from_document

    losses: dict[str, Any] = {LEARNED: loss_from_document(loss_document)}
    for name in baselines:
        if name == LEARNED:
            raise ValueError(f"meta_test.baselines: {LEARNED!r} is the meta-trained loss's own label; pick another name")
        losses[name] = name

    def on_run(event: dict) -> None:
        if progress:
            progress(f"meta-test {event['done']}/{event['total']}: {event['loss']} on {event['dataset']} · {event['condition']} · "
                     f"{event['architecture']} seed {event['seed']}: accuracy {event['converged_acc']:.4f}")  # fmt: skip

    protocol = evaluate.TrainingProtocol(architectures=[training["model"]], seeds=list(training["seeds"]), epochs=training["epochs"],
                                         batch_size=training["batch_size"], momentum=training["momentum"], lr=training["lr"],
                                         device=device)  # fmt: skip
    result = evaluate.compare_losses(losses, tasks, protocol, progress=on_run)
    heading = f"### {title}: learned loss vs {', '.join(baselines) or 'nothing'}\n\n"
    return MetaTestReport(heading + result.to_markdown(), _scores(result), "meta_test_accuracy", True, result.to_dict())


__all__ = ["LEARNED", "compare_learned_loss"]
