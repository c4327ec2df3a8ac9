"""Meta-test protocol: train base models with each loss, report accuracies and average ranks.

One *cell* is (dataset, condition, architecture): a condition is a label-noise setting
("symmetric 80%") or, for domain shift, the held-out domain. Every (loss x cell x seed) run trains
a fresh model with :func:`metaopt_core.train.fit` and is scored three ways:

- **accuracy at convergence**: clean test accuracy after the last epoch (the ARL protocol: there
  is no clean validation set to early-stop on);
- **accuracy with noisy-validation early stopping**: the epoch with the best accuracy on a
  *selection* split drawn from the training distribution (noisy labels / source domains) is kept,
  and its clean test accuracy reported (ARL Table 3.3);
- **early-stop gap**: early-stopped minus converged accuracy (ARL Table 3.6).

Losses are compared by mean +- std over seeds and by Demsar (2006) average ranks: within each cell
the losses are ranked by mean accuracy (1 = best, ties share the average rank), then ranks are
averaged over cells. A run whose loss went non-finite is *diverged* and scores chance (1/C) at
convergence; early stopping may still keep an epoch completed before the divergence. Seeds vary
the model initialisation and the minibatch order; the data (subset, noisy labels, splits) is fixed
by the ``DataSpec``'s own seed, so every loss and seed sees the same noisy labels.

Learning rate (``lr_protocol``): ``fixed`` trains every loss at one lr (the ARL chapter's
protocol); ``tuned`` trains each (loss, cell) at every lr of a grid and keeps the lr with the best
mean last-epoch accuracy on the selection split (DomainBed's training-domain validation), so a
loss's gradient scale and its learning rate are chosen together. The header of every table says
which protocol produced it.

Entry points: :func:`evaluate` (a whole :class:`EvaluationConfig`, also the CLI
``python -m metaopt_core.evaluate --config ...``), :func:`compare_losses` (a dict of losses over
ready-made :class:`Task` cells, trained as a :class:`TrainingProtocol` says: what the
meta-learners call) and :func:`evaluate_domain_generalisation` (leave-one-domain-out cells).

Modules: ``config`` (the settings), ``tasks`` (cells' data), ``loss_factories`` (a fresh loss
per run), ``runs`` (one trained model), ``compare`` (all of them, ranked), ``report``
(statistics, results, JSON and Markdown), ``cli`` (the command line).
"""

from metaopt_core.evaluate.cli import main
from metaopt_core.evaluate.compare import (
    ProgressCallback,
    compare_losses,
    count_runs,
    evaluate,
    evaluate_domain_generalisation,
)
from metaopt_core.evaluate.config import (
    DEFAULT_LR_GRID,
    LR_PROTOCOLS,
    ArchitectureSpec,
    EvaluationConfig,
    LossSpec,
    LrProtocol,
    OptimizerName,
    TrainingProtocol,
)
from metaopt_core.evaluate.loss_factories import LossLike, TwoStageForward, loss_factory
from metaopt_core.evaluate.report import (
    METRICS,
    CellSummary,
    EvaluationResult,
    RunRecord,
    average_ranks,
    early_stop_index,
    mean_std,
    rank_with_ties,
)
from metaopt_core.evaluate.runs import train_run
from metaopt_core.evaluate.tasks import Task, build_tasks, domain_tasks, noise_condition, noise_task

__all__ = [
    "DEFAULT_LR_GRID",
    "LR_PROTOCOLS",
    "METRICS",
    "ArchitectureSpec",
    "CellSummary",
    "EvaluationConfig",
    "EvaluationResult",
    "LossLike",
    "LossSpec",
    "LrProtocol",
    "OptimizerName",
    "ProgressCallback",
    "RunRecord",
    "Task",
    "TrainingProtocol",
    "TwoStageForward",
    "average_ranks",
    "build_tasks",
    "compare_losses",
    "count_runs",
    "domain_tasks",
    "early_stop_index",
    "evaluate",
    "evaluate_domain_generalisation",
    "loss_factory",
    "main",
    "mean_std",
    "noise_condition",
    "noise_task",
    "rank_with_ties",
    "train_run",
]
