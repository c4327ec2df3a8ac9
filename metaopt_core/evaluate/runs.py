"""One run of the meta-test: train one model with one loss on one cell at one seed and lr, and score
it three ways (accuracy at convergence, with early stopping on the selection split, and the gap)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from metaopt_core.evaluate.config import ArchitectureSpec, TrainingProtocol
from metaopt_core.evaluate.loss_factories import TwoStageForward
from metaopt_core.evaluate.report import RunRecord, early_stop_index
from metaopt_core.evaluate.tasks import Task


@torch.no_grad()
def _softmax_outputs(model: nn.Module, data, device, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    out = [torch.softmax(model(data.x[i : i + batch_size].to(device)), -1).cpu() for i in range(0, len(data), batch_size)]
    model.train()
    return torch.cat(out)


def train_run(
    loss: Callable[[], nn.Module] | TwoStageForward,
    task: Task,
    architecture: ArchitectureSpec,
    seed: int,
    lr: float,
    protocol: TrainingProtocol,
    *,
    loss_label: str = "loss",
) -> RunRecord:
    """Train one model at ``lr`` (the protocol's other training settings) and score it.

    A run whose loss went non-finite is *diverged* and scores chance (1/C) at convergence; early
    stopping may still keep an epoch completed before the divergence.
    """
    from metaopt_core.train import fit

    device = protocol.device
    in_channels, image_size = task.train.shape[0], task.train.shape[-1]
    train_kwargs = dict(
        val={"select": task.select, "test": task.test}, optimizer=protocol.optimizer, lr=lr, momentum=protocol.momentum,
        weight_decay=protocol.weight_decay, epochs=protocol.epochs, batch_size=protocol.batch_size, seed=seed, device=device,
    )  # fmt: skip
    start = time.perf_counter()
    if isinstance(loss, TwoStageForward):
        from metaopt_core.losses.registry import get_loss
        from metaopt_core.losses.robust_corrected import estimate_transition_matrix

        stage1 = architecture.build(in_channels, image_size, task.num_classes, seed).to(device or "cpu")
        first = fit(stage1, get_loss("ce"), task.train, **train_kwargs)
        if first.diverged:
            loss_fn = None
        else:
            probs = _softmax_outputs(stage1, task.train, next(stage1.parameters()).device)
            loss_fn = loss.build(estimate_transition_matrix(probs))
    else:
        loss_fn = loss()
    model = architecture.build(in_channels, image_size, task.num_classes, seed).to(device or "cpu")
    if loss_fn is None:  # stage 1 of the two-stage recipe diverged: nothing to correct with
        history, diverged = [{"epoch": 1, "diverged": True, "val_acc/select": task.chance, "val_acc/test": task.chance}], True
    else:
        if isinstance(loss_fn, nn.Module):
            loss_fn = loss_fn.to(device or "cpu")
        result = fit(model, loss_fn, task.train, **train_kwargs)
        history, diverged = result.history, result.diverged
    rows = [
        {
            "epoch": row["epoch"],
            "train_loss": row.get("train_loss"),  # None (valid JSON), not NaN, when not trained
            "train_acc": row.get("train_acc"),
            "select_acc": row["val_acc/select"],
            "test_acc": row["val_acc/test"],
            **({"diverged": True} if row.get("diverged") else {}),
        }
        for row in history
    ]
    # The row of the diverging epoch reflects a half-trained model: only complete epochs count.
    usable = sum(1 for row in rows if not row.get("diverged"))
    chosen = early_stop_index([row["select_acc"] for row in rows], usable)
    return RunRecord(
        loss=loss_label,
        dataset=task.dataset,
        condition=task.condition,
        architecture=architecture.display,
        seed=seed,
        lr=lr,
        converged_acc=task.chance if diverged else rows[-1]["test_acc"],
        early_stop_acc=task.chance if chosen is None else rows[chosen]["test_acc"],
        early_stop_epoch=None if chosen is None else rows[chosen]["epoch"],
        final_select_acc=task.chance if diverged else rows[-1]["select_acc"],
        diverged=diverged,
        seconds=time.perf_counter() - start,
        history=rows,
    )
