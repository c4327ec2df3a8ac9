"""Losses as the evaluator takes them: a registry name, a module or a factory, each turned into
something that yields a fresh module per run (and the two-stage forward-correction recipe)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# What a caller may pass as a loss: a registry name, a module (deep-copied per run) or a
# zero-argument factory returning a fresh module.
LossLike = str | nn.Module | Callable[[], nn.Module]


@dataclass(frozen=True)
class TwoStageForward:
    """Forward correction with an *estimated* transition matrix (the thesis's FW competitor):
    stage 1 trains the same architecture with CE on the noisy labels, the anchor-point estimate
    of T is read from its softmax on the training inputs, stage 2 trains a fresh model with
    ``ForwardCorrectedCrossEntropy(T)``."""

    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, transition_matrix: torch.Tensor) -> nn.Module:
        from metaopt_core.losses.registry import get_loss

        return get_loss("forward", transition_matrix=transition_matrix, **dict(self.kwargs))


def loss_factory(value: LossLike, kwargs: Mapping[str, Any] | None = None) -> Callable[[], nn.Module] | TwoStageForward:
    """Turn a loss given by name, module or factory into something that yields a fresh module per
    run. ``forward`` without ``transition_matrix`` becomes the two-stage recipe."""
    kwargs = dict(kwargs or {})
    if isinstance(value, str):
        from metaopt_core.losses.registry import get_loss

        if value.strip().lower() == "forward" and "transition_matrix" not in kwargs:
            return TwoStageForward(kwargs)
        get_loss(value, **kwargs)  # fail now (unknown name / argument), not in the middle of a sweep
        return lambda: get_loss(value, **kwargs)
    if kwargs:
        raise TypeError(f"loss kwargs: only a loss given by name takes kwargs, got {type(value).__name__} with {sorted(kwargs)}")
    if isinstance(value, TwoStageForward):
        return value
    if isinstance(value, nn.Module):
        return lambda: copy.deepcopy(value)
    if callable(value):
        try:
            parameters = [] if isinstance(value, type) else list(inspect.signature(value).parameters.values())
        except (TypeError, ValueError):  # no introspectable signature (a builtin): trust the caller
            parameters = []
        required = [
            p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if required:
            raise TypeError(f"loss factory {value!r}: must take no arguments, takes {required}")
        return value
    raise TypeError(f"loss: got {type(value).__name__}; allowed: a get_loss name, an nn.Module or a zero-argument factory")
