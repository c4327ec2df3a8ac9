"""The neural loss: a small MLP over each class's (probability, label), ML3's representation
(Bechtle et al. 2021), as a family of the representation table (``neural``).

    loss(logits, y) = Σ_c g_ω(p_c, y_c),  p = softmax(logits), y one-hot
    g_ω(p, y) = MLP_ω(p, y) + s_ω · (y log p, log p, p, y)

The MLP (``hidden`` layers, ``activation``, a linear output) is ML3's loss network. It is applied
to each class and summed, so one learned loss serves any number of classes and treats the classes
alike (ML3's network reads the whole (f(x), y) vector; this is its class-wise form). The linear
skip ``s`` over four fixed features lets the family express cross-entropy exactly (s = (−1, 0, 0,
0), output layer 0): the ``"ce-like"`` start, from which meta-training adjusts the loss;
``"random"`` is ML3's own start (a random network, no skip).

ω is one flat vector: every layer's weight (out × in, row-major) then bias, input to output, then
the 4 skip weights. White-box: the document holds the architecture and ω; the export kind
(:mod:`.export`) stores ω as named safetensors. Everything here is functional in ω, free of
data-dependent control flow: it works under ``torch.func.vmap`` and inside double backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt_core.losses.document import field_error, is_finite_number
from metaopt_core.losses.families import CE_LIKE, InitSpec, as_vector, one_hot_if_indices

ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "softplus": F.softplus}
INPUTS = ("p", "y")  # the MLP's inputs, per class
SKIP_FEATURES = ("y*log(p)", "log(p)", "p", "y")  # the linear skip's features, per class
RANDOM = "random"
MAX_WIDTH = 256


def layer_sizes(hidden: Sequence[int]) -> list[tuple[int, int]]:
    """(in, out) of each layer of the loss network."""
    widths = [len(INPUTS), *hidden, 1]
    return list(zip(widths[:-1], widths[1:]))


def layer_names(hidden: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of ω in order, with their shapes (what the safetensors file names)."""
    names: list[tuple[str, tuple[int, ...]]] = []
    for index, (fan_in, fan_out) in enumerate(layer_sizes(hidden)):
        names += [(f"layer{index}.weight", (fan_out, fan_in)), (f"layer{index}.bias", (fan_out,))]
    return [*names, ("skip", (len(SKIP_FEATURES),))]


@dataclass(frozen=True)
class NeuralLossFamily:
    """ML3's loss network (see the module docstring). ``init_scale``: the standard deviation of the
    seeded random weights of a start (``init_seed``)."""

    hidden: tuple[int, ...] = (16,)
    activation: str = "tanh"
    init_scale: float = 0.5
    init_seed: int = 0
    kind: str = "neural"
    export_kind: ClassVar[str] = "neural-loss"

    def __post_init__(self):
        hidden = tuple(self.hidden)
        if not 1 <= len(hidden) <= 3 or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WIDTH for w in hidden):
            raise ValueError(f"hidden: got {list(hidden)!r}; allowed: 1 to 3 layer widths, each an int in [1, {MAX_WIDTH}]")
        object.__setattr__(self, "hidden", hidden)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: got {self.activation!r}; allowed: {sorted(ACTIVATIONS)}")
        if not (is_finite_number(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale: got {self.init_scale!r}; allowed: a finite number > 0")

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in layer_names(self.hidden))

    def init(self, spec: InitSpec) -> Tensor:
        """ω to start from: ``"ce-like"`` (random hidden layers, output layer 0, skip = cross-entropy:
        the loss *is* CE), ``"random"`` (every layer random, no skip: ML3's start) or the numbers."""
        if not isinstance(spec, str):
            return as_vector(spec, self.num_params, "init")
        if spec not in (CE_LIKE, RANDOM):
            raise ValueError(f"init: got {spec!r}; allowed for family 'neural': {[CE_LIKE, RANDOM]} or a list of {self.num_params} numbers")
        generator = torch.Generator().manual_seed(self.init_seed)
        tensors = []
        last = len(layer_sizes(self.hidden)) - 1
        for name, shape in layer_names(self.hidden):
            if name == "skip":
                value = torch.tensor([-1.0, 0.0, 0.0, 0.0]) if spec == CE_LIKE else torch.zeros(shape)
            elif spec == CE_LIKE and name.startswith(f"layer{last}."):
                value = torch.zeros(shape)  # the network adds nothing yet; its gradient still flows
            elif name.endswith(".weight"):
                value = self.init_scale * torch.randn(shape, generator=generator) / math.sqrt(shape[1])
            else:
                value = torch.zeros(shape)
            tensors.append(value.reshape(-1))
        return torch.cat(tensors).to(torch.float32)

    def unflatten(self, params: Tensor) -> dict[str, Tensor]:
        """ω as named tensors (views; works on a vmapped (n,) vector)."""
        out, offset = {}, 0
        for name, shape in layer_names(self.hidden):
            size = math.prod(shape)
            out[name] = params[..., offset : offset + size].reshape(*params.shape[:-1], *shape)
            offset += size
        return out

    def _per_class(self, params: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        """(..., C) values g(p_c, y_c)."""
        tensors = self.unflatten(params)
        y = one_hot_if_indices(target, logits)
        log_p = F.log_softmax(logits, dim=-1)
        p = log_p.exp()
        hidden = torch.stack([p, y], dim=-1)  # (..., C, 2)
        act = ACTIVATIONS[self.activation]
        layers = len(layer_sizes(self.hidden))
        for index in range(layers):
            hidden = hidden @ tensors[f"layer{index}.weight"].transpose(-1, -2) + tensors[f"layer{index}.bias"]
            if index < layers - 1:
                hidden = act(hidden)
        features = torch.stack([y * log_p, log_p, p, y], dim=-1)
        return hidden[..., 0] + (features * tensors["skip"]).sum(-1)

    def functional(self, params: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return self._per_class(params, logits, target).sum(-1).mean(-1)

    def scales(self, params: Tensor, classes: int) -> Tensor:
        return torch.ones(params.shape[0], dtype=params.dtype, device=params.device)

    def per_example(self, params: Tensor, scale: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        return self._per_class(params, logits, target).sum(-1) * scale

    def to_module(self, params: Tensor | Sequence[float], reduction: str = "mean") -> NeuralLoss:
        return NeuralLoss(self, as_vector(params, self.num_params), reduction)

    def to_dict(self, params: Tensor | Sequence[float]) -> dict:
        """The white-box document: architecture and ω (``params``, in the order of :func:`layer_names`)."""
        return {"family": self.kind, "hidden": list(self.hidden), "activation": self.activation, "inputs": list(INPUTS),
                "skip_features": list(SKIP_FEATURES), "output": "sum over classes of g(p_c, y_c)",
                "init_scale": self.init_scale, "init_seed": self.init_seed,
                "params": [float(v) for v in as_vector(params, self.num_params)]}  # fmt: skip

    def describe(self) -> dict:
        return {"kind": self.kind, "hidden": list(self.hidden), "activation": self.activation}

    # ------------------------------------------------------------------ documents of family "neural"

    @classmethod
    def validate_document(cls, doc: Mapping[str, Any], source: str) -> None:
        """``hidden`` (1 to 3 widths), ``activation`` (ACTIVATIONS), ``params`` (num_params finite numbers)."""
        hidden = doc.get("hidden")
        if not isinstance(hidden, list):
            raise field_error(source, "hidden", hidden, f"a list of 1 to 3 layer widths, each an int in [1, {MAX_WIDTH}]")
        try:
            family = cls(hidden=tuple(hidden), activation=doc.get("activation"), init_scale=doc.get("init_scale", 0.5), init_seed=doc.get("init_seed", 0))
        except ValueError as exc:  # "<field>: got <value>; allowed: <values>"
            field, _, rest = str(exc).partition(": got ")
            raise field_error(source, field, doc.get(field), rest.partition("; allowed: ")[2]) from None
        params = doc.get("params")
        if not isinstance(params, list) or len(params) != family.num_params:
            got = f"{len(params)} values" if isinstance(params, list) else params
            raise field_error(source, "params", got, f"a list of {family.num_params} numbers (hidden {list(family.hidden)})")
        for index, value in enumerate(params):
            if not is_finite_number(value):
                raise field_error(source, f"params[{index}]", value, "a finite number")

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> tuple[NeuralLossFamily, Tensor]:
        family = cls(hidden=tuple(doc["hidden"]), activation=doc["activation"], init_scale=doc.get("init_scale", 0.5), init_seed=doc.get("init_seed", 0))
        return family, as_vector(doc["params"], family.num_params)

    @classmethod
    def module_from_document(cls, doc: Mapping[str, Any], reduction: str, source: str) -> NeuralLoss:
        family, params = cls.from_document(doc)
        return family.to_module(params, reduction)


class NeuralLoss(nn.Module):
    """A learned neural loss, a drop-in for ``nn.CrossEntropyLoss`` (ω frozen as a buffer)."""

    def __init__(self, family: NeuralLossFamily, params: Tensor, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: got {reduction!r}; allowed: ['mean', 'sum', 'none']")
        self.family, self.reduction = family, reduction
        self.register_buffer("params", as_vector(params, family.num_params))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        per_example = self.family.per_example(self.params.to(logits.dtype), 1.0, logits, target)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()

    def to_dict(self) -> dict:
        return self.family.to_dict(self.params)

    def extra_repr(self) -> str:
        return f"hidden={list(self.family.hidden)}, activation={self.family.activation!r}, reduction={self.reduction!r}"


__all__ = ["ACTIVATIONS", "INPUTS", "NeuralLoss", "NeuralLossFamily", "RANDOM", "SKIP_FEATURES", "layer_names", "layer_sizes"]
