"""The implicit-function-theorem hypergradient dM/dω of one held-out domain at a trained inner
model (thesis Alg 8: Hessian-vector products only, truncated Neumann series or CG), with the
job's metrics, and :class:`Hypergradient`, the serialisable result a pipeline fans in.

Which data each number uses (for domain d held out):

- the hypergradient's inner loss: a fixed seeded subset of the other domains' *train* splits;
- the outer objective M (whose gradient drives ω): d's *train* split (subset ``outer_examples``);
- reported ``heldout_ce`` / ``heldout_acc``: d's *val* split, never used for a gradient;
- reported ``source_acc``: the other domains' *val* splits.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from metaopt_core.data.sources import ImageData
from metaopt_core.hypergrad import implicit_hypergradient
from metaopt_core.meta.itl.config import ITLConfig
from metaopt_core.meta.itl.domains import DomainSet, InnerJob
from metaopt_core.meta.itl.inner import TrainedModel, build_inner_model, one_hot

HYPERGRAD_FORMAT = "metaopt.itl.hypergradient/1"


@dataclass
class Hypergradient:
    """dM/dω for one held-out domain at one outer step, and how the inner job went.

    ``omega`` is the loss the inner model was trained with (``outer_update`` checks it). A diverged
    inner training yields a zero hypergradient with ``diverged = True``; it is left out of the
    aggregation.
    """

    step: int
    domain: str
    omega: list[float]
    grad: list[float]
    diverged: bool
    metrics: dict

    def to_dict(self) -> dict:
        return {"format": HYPERGRAD_FORMAT, "step": self.step, "domain": self.domain, "omega": self.omega,
                "grad": self.grad, "diverged": self.diverged, "metrics": self.metrics}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: Mapping) -> Hypergradient:
        if doc.get("format") != HYPERGRAD_FORMAT:
            raise ValueError(f"hypergradient: format {doc.get('format')!r}; expected {HYPERGRAD_FORMAT!r}")
        return cls(int(doc["step"]), str(doc["domain"]), [float(v) for v in doc["omega"]],
                   [float(v) for v in doc["grad"]], bool(doc["diverged"]), dict(doc["metrics"]))  # fmt: skip


@torch.no_grad()
def _scores(model_fn: Callable[[Tensor], Tensor], data: ImageData, chunk: int, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a model on a split."""
    total_ce, correct = 0.0, 0
    for start in range(0, len(data), chunk):
        x = data.x[start : start + chunk].to(device)
        y = data.y[start : start + chunk].to(device)
        logits = model_fn(x)
        total_ce += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    count = max(1, len(data))
    return total_ce / count, correct / count


def _concat_splits(parts: Sequence[ImageData]) -> ImageData:
    return ImageData(
        torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes, "sources-val", ids=torch.cat([p.ids for p in parts])
    )


def source_accuracy(config: ITLConfig, data: DomainSet, job: InnerJob, trained: TrainedModel) -> float:
    """The trained model's accuracy on the job's source domains' validation splits (what the inner
    lr is chosen by); -inf for a diverged model."""
    if trained.diverged:
        return float("-inf")
    device = torch.device(config.device)
    skeleton = build_inner_model(config, data, job).to(device).eval()
    state = ({name: value.to(device) for name, value in trained.params.items()}, {name: value.to(device) for name, value in trained.buffers.items()})
    source_val = _concat_splits([data.val[d] for d in range(len(data.names)) if d != job.domain])
    _, accuracy = _scores(lambda x: functional_call(skeleton, state, (x,)), source_val, config.inner.eval_batch_size, device)
    return accuracy


def hypergradient_of(config: ITLConfig, data: DomainSet, job: InnerJob, trained: TrainedModel, omega: Tensor, step: int, seconds: float = 0.0) -> Hypergradient:
    """The IFT hypergradient of the held-out cross-entropy w.r.t. ω at the trained model, plus the
    job's metrics (see the module docstring for which split each number uses)."""
    device = torch.device(config.device)
    family = config.loss_family()
    started = time.perf_counter()
    skeleton = build_inner_model(config, data, job).to(device).eval()
    names = list(trained.params)
    buffers = {name: value.to(device) for name, value in trained.buffers.items()}

    def forward(params_by_name: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(skeleton, ({**params_by_name}, buffers), (x,))

    frozen = {name: value.to(device) for name, value in trained.params.items()}
    chunk = config.inner.eval_batch_size
    heldout_ce, heldout_acc = _scores(lambda x: forward(frozen, x), data.val[job.domain], chunk, device)
    source_val = _concat_splits([data.val[d] for d in range(len(data.names)) if d != job.domain])
    _, source_acc = _scores(lambda x: forward(frozen, x), source_val, chunk, device)
    metrics: dict[str, Any] = {
        "heldout_ce": heldout_ce, "heldout_acc": heldout_acc, "source_acc": source_acc,
        "epochs": trained.epochs, "steps": trained.steps, "converged": trained.converged,
        "epoch_grad_norms": list(trained.grad_norms),
    }  # fmt: skip
    omega_list = [float(v) for v in omega.detach().cpu()]
    if trained.diverged:
        metrics.update(inner_grad_norm=float("nan"), outer_objective=float("nan"), hypergrad_norm=0.0,
                       seconds=seconds + time.perf_counter() - started)  # fmt: skip
        return Hypergradient(step, job.name, omega_list, [0.0] * len(omega_list), True, metrics)

    params = [frozen[name].clone().requires_grad_(True) for name in names]
    meta = omega.detach().to(device).clone().requires_grad_(True)
    x_all, y_all = data.tensors_on(device)
    x_check = x_all[job.check.to(device)]
    y_check = one_hot(y_all[job.check.to(device)], data.num_classes, x_all.dtype)
    x_target, y_target = x_all[job.target.to(device)], y_all[job.target.to(device)]

    decay = config.inner.weight_decay

    def inner_loss() -> Tensor:
        # the objective SGD with weight decay minimises: L_ω + (decay / 2) ||θ||² (its stationary
        # point is where the IFT is applied)
        value = family.functional(meta, forward(dict(zip(names, params)), x_check), y_check)
        if decay:
            value = value + 0.5 * decay * sum((p**2).sum() for p in params)
        return value

    def outer_loss() -> Tensor:
        return F.cross_entropy(forward(dict(zip(names, params)), x_target), y_target)

    hyper = config.hypergrad
    # The solver warns when the Neumann series grows (alpha too large, or negative curvature at an
    # unconverged inner model) or CG meets negative curvature: record it per job instead of
    # printing it six times per step; the residual below measures the damage.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = implicit_hypergradient(
            inner_loss, outer_loss, params, [meta], method=hyper.method, terms=hyper.terms, alpha=hyper.alpha, damping=hyper.damping
        )
    solver_warnings = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    with torch.no_grad():
        outer_value = float(outer_loss())
    gradient = result.grads[0].detach().cpu()
    finite = bool(torch.isfinite(gradient).all())
    metrics.update(
        inner_grad_norm=result.inner_grad_norm,
        outer_grad_norm=result.outer_grad_norm,
        outer_objective=outer_value,
        hypergrad_norm=float(gradient.norm()) if finite else float("nan"),
        direct_norm=float(result.direct[0].norm()),
        indirect_norm=float(result.indirect[0].norm()),
        solve_iterations=result.iterations,
        solve_rel_residual=result.solve_rel_residual,
        solver_warning=solver_warnings[0] if solver_warnings else None,
        seconds=seconds + time.perf_counter() - started,
    )
    if not finite:  # a blown-up Neumann series: treat like a divergence rather than poison ω
        metrics["nonfinite_hypergradient"] = True
        return Hypergradient(step, job.name, omega_list, [0.0] * len(omega_list), True, metrics)
    return Hypergradient(step, job.name, omega_list, [float(v) for v in gradient], False, metrics)
