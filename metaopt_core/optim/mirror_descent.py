"""MirrorDescent: the MetaMD optimiser, theta <- theta - lr * M^{-1} (g + weight_decay * theta).

A ``torch.optim.Optimizer`` driven by a ``Divergence`` (thesis eq 5.1 with phi = 1/2 theta^T M theta,
closed form in App C.1). The divergence covers the optimiser's parameters in order: the
parameters of all param groups, concatenated, must match ``divergence.param_shapes`` one to one
(``KroneckerBregman.for_model(model)`` with ``model.parameters()`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from .divergence import Divergence, ShapeMismatchError, _fmt_shape

STATE_KEY = "divergence"


def _check_number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}; allowed: a finite float")
    if positive and value <= 0:
        raise ValueError(f"{name}: got {value!r}; allowed: > 0")
    if not positive and value < 0:
        raise ValueError(f"{name}: got {value!r}; allowed: >= 0")
    return float(value)


class MirrorDescent(torch.optim.Optimizer):
    """Mirror descent with a quadratic Bregman divergence: p <- p - lr * M^{-1} (grad + weight_decay * p).

    Args:
        params: the parameters (or param groups) to optimise, in the divergence's parameter order.
        divergence: the learned ``Divergence``; its own tensors are not updated by ``step``.
        lr: learning rate (per group overridable).
        weight_decay: L2 coefficient added to the gradient before preconditioning, as in SGD.
        compile: run the update through ``torch.compile`` (``True``: inductor; a string names
            another backend). Off by default: on the 2-core CPU it measured slower than eager
            (docs/benchmarks.md); try it on a GPU.

    ``state_dict()`` includes the divergence's factors (under ``"divergence"``), so that
    ``load_state_dict`` restores an optimiser that continues exactly; it copies them into this
    optimiser's divergence in place. Computation follows each parameter's device and dtype.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        divergence: Divergence,
        lr: float,
        weight_decay: float = 0.0,
        compile: bool | str = False,
    ) -> None:
        if not isinstance(divergence, Divergence):
            raise TypeError(f"divergence: got {type(divergence).__name__}; allowed: a metaopt_core.optim.Divergence")
        defaults = dict(
            lr=_check_number("lr", lr, positive=True),
            weight_decay=_check_number("weight_decay", weight_decay, positive=False),
        )
        self.divergence = divergence
        self._apply_update = divergence.apply_update_
        if compile:
            self._apply_update = torch.compile(divergence.apply_update_, backend="inductor" if compile is True else compile, dynamic=False)
        super().__init__(params, defaults)
        attached = sum(len(g["params"]) for g in self.param_groups)
        if attached != len(divergence.param_names):
            missing = len(divergence.param_names) - attached
            position = attached
            raise ShapeMismatchError(
                f"params: got {attached} parameters; the divergence covers {len(divergence.param_names)} "
                f"({missing} missing, the first is #{position} {divergence.param_names[position]!r} "
                f"with shape {_fmt_shape(divergence.param_shapes[position])})"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters must continue the divergence's parameter list in order."""
        start = sum(len(g["params"]) for g in self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_number("lr", group["lr"], positive=True)
        _check_number("weight_decay", group["weight_decay"], positive=False)
        names, shapes = self.divergence.param_names, self.divergence.param_shapes
        for k, p in enumerate(group["params"]):
            position = start + k
            if position >= len(names):
                self.param_groups.pop()
                raise ShapeMismatchError(
                    f"params: parameter #{position} with shape {_fmt_shape(p.shape)} is beyond the {len(names)} parameters the divergence covers"
                )
            if p.shape != shapes[position]:
                self.param_groups.pop()
                raise ShapeMismatchError(
                    f"params: parameter #{position} {names[position]!r}: divergence expects shape "
                    f"{_fmt_shape(shapes[position])}, got shape {_fmt_shape(p.shape)}"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One mirror-descent step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        offset = 0
        for group in self.param_groups:
            indices: list[int] = []
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for k, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"MirrorDescent does not support sparse gradients (parameter #{offset + k})")
                indices.append(offset + k)
                params.append(p)
                grads.append(p.grad)
            offset += len(group["params"])
            if not params:
                continue
            self._apply_update(indices, params, grads, group["lr"], group["weight_decay"])
        return loss

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The usual optimiser state plus ``"divergence"``: kind, layout and a copy of the factors."""
        state = super().state_dict()
        state[STATE_KEY] = {
            "kind": self.divergence.kind,
            "parameters": [[n, list(s)] for n, s in self.divergence.names_and_shapes],
            "description": self.divergence.description(),
            "tensors": {k: v.detach().clone() for k, v in self.divergence.state_dict().items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the optimiser state and copy the saved factors into this optimiser's divergence."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_KEY, None)
        if not isinstance(saved, dict) or "tensors" not in saved:
            raise ValueError(
                f"state_dict[{STATE_KEY!r}]: missing or malformed; a MirrorDescent state_dict carries the divergence's kind, description and tensors"
            )
        if saved.get("kind") != self.divergence.kind:
            raise ValueError(f"state_dict[{STATE_KEY!r}]['kind']: got {saved.get('kind')!r}; this optimiser's divergence is {self.divergence.kind!r}")
        self.divergence.check_shapes([(n, s) for n, s in saved.get("parameters", [])], what="saved state")
        if saved.get("description") != self.divergence.description():
            raise ValueError(f"state_dict[{STATE_KEY!r}]['description']: the saved block layout differs from this divergence's")
        with torch.no_grad():
            self.divergence.load_state_dict(saved["tensors"])
        super().load_state_dict(state_dict)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | PathLike[str],
        model: nn.Module,
        lr: float | None = None,
        weight_decay: float = 0.0,
        *,
        partial: bool = False,
    ) -> MirrorDescent:
        """Load a saved divergence (``save_divergence``), attach it to ``model`` and optimise its parameters.

        ``lr`` defaults to the learning rate the divergence was meta-trained with (from the manifest).
        ``partial``: see :func:`metaopt_core.optim.io.attach` (the learned metric on the layers
        that fit, the identity on the others; ``optimizer.divergence.learned_parameters`` lists them).
        """
        from .io import attach, load_divergence

        divergence, manifest = load_divergence(directory)
        divergence = attach(divergence, model, partial=partial)
        if lr is None:
            lr = manifest.get("lr")
            if lr is None:
                raise ValueError(f"lr: not given and the manifest in {str(directory)!r} records no meta-training lr; pass lr=")
        return cls(model.parameters(), divergence, lr=lr, weight_decay=weight_decay)
