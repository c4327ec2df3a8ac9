"""Plot helpers shared by the meta-learners: a learned loss beside hand-designed ones, and
meta-training curves. PNG files via matplotlib's object API (no pyplot, no global backend change).

The loss view is the thesis's Figure 3.2: the loss of one example against the predicted
probability p of its labelled class. A class-separable loss (the Taylor family) also depends on
the other classes' probabilities; the plot spreads the remaining mass 1 − p evenly over them, the
same convention for every loss, so the curves are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

LossCallable = Callable[[Tensor, Tensor], Tensor]
X_KEYS = ("generation", "step", "outer_step", "epoch", "iteration")


def probability_grid(points: int = 199, low: float = 0.005, high: float = 0.995) -> Tensor:
    if points < 2 or not 0.0 < low < high < 1.0:
        raise ValueError(f"probability grid: got points={points}, low={low}, high={high}; need points >= 2 and 0 < low < high < 1")
    return torch.linspace(low, high, points, dtype=torch.float64)


def loss_curve(loss: LossCallable, probabilities: Tensor, num_classes: int = 10) -> Tensor:
    """Loss of one example (label 0) whose labelled class has probability p, for each p given;
    the other classes share 1 − p evenly. ``loss(logits, target)`` may reduce over the batch, so
    it is called one example at a time."""
    if num_classes < 2:
        raise ValueError(f"num_classes: got {num_classes}; allowed: >= 2")
    values = []
    target = torch.zeros(1, dtype=torch.long)
    for p in probabilities.tolist():
        probs = torch.full((1, num_classes), (1.0 - p) / (num_classes - 1), dtype=torch.float32)
        probs[0, 0] = p
        with torch.no_grad():
            value = loss(probs.log(), target)
        value = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if value.numel() != 1:
            raise ValueError(f"loss returned {value.numel()} values for one example; it must reduce to a scalar")
        values.append(float(value[0]))
    return torch.tensor(values, dtype=torch.float64)


def plot_loss_curves(
    losses: Mapping[str, LossCallable],
    path: str | Path,
    *,
    num_classes: int = 10,
    points: int = 199,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Two panels: each loss against p (labelled-class probability) as is, and min-max scaled to
    [0, 1] (the shape, whatever the loss's scale — a Taylor loss's offset and scale do not matter
    to training beyond the learning rate). Returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not losses:
        raise ValueError("losses: got none; give at least one {label: loss}")
    grid = probability_grid(points)
    curves = {label: loss_curve(loss, grid, num_classes) for label, loss in losses.items()}
    figure = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(figure)
    raw, scaled = figure.subplots(1, 2)
    for label, values in curves.items():
        finite = torch.isfinite(values)
        raw.plot(grid[finite].numpy(), values[finite].numpy(), label=label)
        low, high = values[finite].min(), values[finite].max()
        span = float(high - low) if finite.any() else 0.0
        shape = (values - low) / span if span > 0 else torch.zeros_like(values)
        scaled.plot(grid[finite].numpy(), shape[finite].numpy(), label=label)
    raw.set(xlabel="predicted probability of the labelled class", ylabel="loss of the example", title="as is")
    scaled.set(xlabel="predicted probability of the labelled class", ylabel="min-max scaled", title="shape")
    for axes in (raw, scaled):
        axes.grid(alpha=0.3)
    scaled.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, dpi)


def plot_history(
    history: Sequence[Mapping[str, float]],
    keys: Sequence[str],
    path: str | Path,
    *,
    x: str | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One panel per key (rows), plotted against ``x`` — by default the first of
    ``generation``/``step``/``outer_step``/``epoch``/``iteration`` present in the rows, else the
    row index. Rows missing a key are skipped for that key. Returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("history: got no rows")
    if not keys:
        raise ValueError("keys: got none; name at least one metric of the history rows")
    present = set().union(*(row.keys() for row in history))
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"keys: {missing} appear in no history row; available: {sorted(present)}")
    if x is None:
        x = next((k for k in X_KEYS if all(k in row for row in history)), None)
    elif not all(x in row for row in history):
        raise ValueError(f"x: {x!r} is missing from some history rows; available: {sorted(present)}")
    figure = Figure(figsize=(6, 1.2 + 1.8 * len(keys)))
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for axes, key in zip(axes_list, keys):
        pairs = [(row[x] if x else i, row[key]) for i, row in enumerate(history) if key in row and _is_number(row[key])]
        axes.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", markersize=3)
        axes.set_ylabel(key)
        axes.grid(alpha=0.3)
    axes_list[-1].set_xlabel(x or "row")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, dpi)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _save(figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path
