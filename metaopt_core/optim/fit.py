"""Which model a learned divergence fits, and using it on a model it fits only in part.

A MetaMD divergence is learned for one architecture: one metric block per parameter shape
(``KroneckerBregman``: a Kronecker-factored block per layer; ``DiagonalBregman``: a scale per
element). :func:`describe_architecture` says which architecture in words ("an MLP 784-256-10"),
for ``metaopt models show``, the run summary and the errors of ``load_optimizer``.

:func:`fit_divergence` builds, for another model, a divergence of the same kind over *its*
parameters: the learned block on every layer that matches one of the learned layers (the same
parameter name, ignoring a DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefix, and the same
shape; by position when no name matches at all), and the identity metric (M = I, plain gradient
steps: what mirror descent does with the Euclidean mirror map) on the others. ``load_optimizer(...,
partial=True)`` uses it; without ``partial`` a model that does not fit is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .divergence import DenseBregman, DiagonalBregman, Divergence, ShapeMismatchError
from .kronecker import KroneckerBregman

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED = 12  # parameters named in a description; more are counted


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def describe_architecture(names_and_shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """``an MLP 784-256-10 (parameters 1.weight (256, 784), 1.bias (256,), ...)`` for a chain of
    linear layers, else ``a network of N parameters (...)``: what a divergence fits, in words."""
    items = [(str(name), tuple(int(d) for d in shape)) for name, shape in names_and_shapes]
    listed = ", ".join(f"{name} {_fmt(shape)}" for name, shape in items[:_LISTED]) + (f", and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
    weights = [shape for _, shape in items if len(shape) >= 2]
    widths = [weights[0][1]] if weights and all(len(shape) == 2 for shape in weights) else []
    for rows, cols in weights if widths else []:
        if cols != widths[-1]:
            widths = []
            break
        widths.append(rows)
    kind = f"an MLP {'-'.join(map(str, widths))}" if widths else f"a network of {len(items)} parameter tensors"
    return f"{kind} (parameters {listed})"


def describe_model(model: nn.Module) -> str:
    return describe_architecture((name, p.shape) for name, p in model.named_parameters())


def _plain(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _matches(div: Divergence, named: list[tuple[str, torch.Size]]) -> dict[int, int]:
    """Model parameter index -> divergence parameter index, for parameters of the same name (else
    position) and shape."""
    learned = {_plain(name): k for k, name in enumerate(div.param_names)}
    by_name = any(_plain(name) in learned for name, _ in named)
    found = {}
    for i, (name, shape) in enumerate(named):
        j = learned.get(_plain(name)) if by_name else (i if i < len(div.param_names) else None)
        if j is not None and tuple(div.param_shapes[j]) == tuple(shape):
            found[i] = j
    return found


@torch.no_grad()
def fit_divergence(div: Divergence, model: nn.Module) -> tuple[Divergence, list[str], list[str]]:
    """``(divergence over model's parameters, names with the learned metric, names with the
    identity)``; see the module docstring. A dense divergence couples every parameter with every
    other: it fits all or nothing (``ShapeMismatchError``)."""
    if isinstance(div, DenseBregman) or not isinstance(div, (KroneckerBregman, DiagonalBregman)):
        raise ShapeMismatchError(f"partial=True: a {div.kind} divergence couples all its parameters, so it cannot be applied to part of a model")
    named = [(name, p.shape) for name, p in model.named_parameters()]
    match = _matches(div, named)
    dtype = next(div.parameters()).dtype
    target = type(div).for_model(model, dtype=dtype)
    learned: set[int] = set()
    if isinstance(div, DiagonalBregman):
        for i, j in match.items():
            target.log_scale[i].copy_(div.log_scale[j])
            learned.add(i)
    else:
        index = {name: i for i, (name, _) in enumerate(named)}
        source_block = {div.blocks[k].parameter: k for k in range(len(div.blocks))}
        for t, block in enumerate(target.blocks):
            i = index[block.parameter]
            j = match.get(i)
            k = source_block.get(div.param_names[j]) if j is not None else None
            if k is None:
                continue
            source_bias = div.blocks[k].bias
            if (block.bias is None) != (source_bias is None):
                continue  # one ties a bias to this layer, the other not: not the same block
            if block.bias is not None and match.get(index[block.bias]) != div.param_names.index(source_bias):
                continue
            target.a[t].copy_(div.a[k])
            target.b[t].copy_(div.b[k])
            learned.update({i} | ({index[block.bias]} if block.bias is not None else set()))
    names = [name for name, _ in named]
    return target, [names[i] for i in sorted(learned)], [names[i] for i in range(len(names)) if i not in learned]


__all__ = ["describe_architecture", "describe_model", "fit_divergence"]
