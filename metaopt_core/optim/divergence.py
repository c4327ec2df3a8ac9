"""Bregman divergences for MetaMD (thesis chapter 5): the meta-model of a mirror-descent optimiser.

With the mirror map phi(theta) = 1/2 theta^T M theta (M symmetric positive definite) the Bregman
divergence is B_phi(theta, theta') = 1/2 (theta - theta')^T M (theta - theta') and the mirror-descent
step has the closed form theta <- theta - lr * M^{-1} grad (thesis eq 5.1, App C.1).

A ``Divergence`` is an ``nn.Module`` whose own parameters are the meta-parameters (learned by the
outer loop). It covers an ordered list of named base-model parameter shapes and, for tensors of
those shapes, computes (all differentiable w.r.t. the meta-parameters):

- ``precondition(grads)``: M^{-1} g per parameter,
- ``metric_product(deltas)``: M d per parameter,
- ``bregman(theta, theta_ref)``: 1/2 sum (theta - theta_ref)^T M (theta - theta_ref),
- ``frobenius_reg()``: ||M - I||_F^2 (thesis eqs 5.29-5.32),
- ``strong_convexity()``: lambda = smallest eigenvalue of M (thesis eq 5.7 uses min over blocks of
  sigma_min(M_zeta); M is symmetric positive definite, so singular values are eigenvalues),
- ``to_dense()``: M itself, acting on ``torch.cat([t.flatten() for t in tensors])`` (tests, tiny
  problems).

Vectorisation convention, used everywhere: a tensor is flattened row-major (``t.flatten()``), as
PyTorch stores it.

Families:

- ``KroneckerBregman`` (:mod:`metaopt_core.optim.kronecker`): block-diagonal, one
  Kronecker-factored block per layer (the thesis's parameterisation, section 5.4.2).
- ``DiagonalBregman``: M = diag(exp(s)) with one learned log-scale per parameter element
  (the Meta-SGD-like special case).
- ``DenseBregman``: one dense M = L L^T + eps I over all parameters (tiny problems such as the
  thesis's 2-D quadratics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

NamesAndShapes = Iterable[tuple[str, Sequence[int]]] | Mapping[str, Sequence[int]]


class ShapeMismatchError(ValueError):
    """Tensors or a model do not match the parameter shapes a divergence was built for."""


def _normalise_names_and_shapes(names_and_shapes: NamesAndShapes) -> tuple[tuple[str, ...], tuple[torch.Size, ...]]:
    items = list(names_and_shapes.items()) if isinstance(names_and_shapes, Mapping) else list(names_and_shapes)
    if not items:
        raise ValueError("names_and_shapes: got an empty list; a divergence needs at least one parameter")
    names: list[str] = []
    shapes: list[torch.Size] = []
    seen: set[str] = set()
    for position, item in enumerate(items):
        try:
            name, shape = item
        except (TypeError, ValueError):
            raise ValueError(f"names_and_shapes[{position}]: got {item!r}; allowed: a (name, shape) pair") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"names_and_shapes[{position}] name: got {name!r}; allowed: a non-empty string")
        if name in seen:
            raise ValueError(f"names_and_shapes[{position}] name: {name!r} appears twice; names must be unique")
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ValueError(f"names_and_shapes[{position}] shape of {name!r}: got {shape!r}; allowed: a sequence of ints") from None
        if any(d < 0 for d in dims) or any(int(d) != d for d in shape):
            raise ValueError(f"names_and_shapes[{position}] shape of {name!r}: got {tuple(shape)!r}; allowed: non-negative integer dimensions")
        seen.add(name)
        names.append(name)
        shapes.append(torch.Size(dims))
    return tuple(names), tuple(shapes)


def _fmt_shape(shape: Sequence[int]) -> str:
    return str(tuple(int(d) for d in shape))


class Divergence(nn.Module):
    """Base class: a quadratic Bregman divergence over an ordered list of named parameter shapes.

    Subclasses define ``kind`` (the manifest tag), the math methods and ``description()`` /
    ``from_description()`` (the JSON block layout written by ``metaopt_core.optim.io``).
    """

    kind: ClassVar[str] = ""

    def __init__(self, names_and_shapes: NamesAndShapes) -> None:
        super().__init__()
        self.param_names, self.param_shapes = _normalise_names_and_shapes(names_and_shapes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_shapes(cls, names_and_shapes: NamesAndShapes, **options: Any) -> Divergence:
        """Build for an explicit ordered list of ``(name, shape)`` pairs (or a name -> shape mapping)."""
        return cls(names_and_shapes, **options)

    @classmethod
    def for_model(cls, model: nn.Module, **options: Any) -> Divergence:
        """Build for ``model.named_parameters()``, in that order (the order of ``model.parameters()``)."""
        return cls.for_shapes([(name, p.shape) for name, p in model.named_parameters()], **options)

    @classmethod
    def for_params(cls, params: Iterable[Tensor], **options: Any) -> Divergence:
        """Build for a raw list of tensors; they are named ``"0"``, ``"1"``, ... by position."""
        return cls.for_shapes([(str(i), t.shape) for i, t in enumerate(params)], **options)

    # ------------------------------------------------------------------ checks
    @property
    def names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(s)) for n, s in zip(self.param_names, self.param_shapes)]

    def check_shapes(self, names_and_shapes: Iterable[tuple[str, Sequence[int]]], what: str = "model") -> None:
        """Raise ``ShapeMismatchError`` naming the first parameter whose shape differs (by position).

        Names are reported but not required to match (a DDP- or compile-wrapped model prefixes them).
        """
        got = list(names_and_shapes)
        for position, expected_name in enumerate(self.param_names):
            expected_shape = self.param_shapes[position]
            if position >= len(got):
                raise ShapeMismatchError(
                    f"parameter #{position} {expected_name!r}: divergence expects shape "
                    f"{_fmt_shape(expected_shape)}, but the {what} has only {len(got)} parameters"
                )
            got_name, got_shape = got[position]
            if tuple(got_shape) != tuple(expected_shape):
                raise ShapeMismatchError(
                    f"parameter #{position} {expected_name!r}: divergence expects shape "
                    f"{_fmt_shape(expected_shape)}, got shape {_fmt_shape(got_shape)} "
                    f"(the {what}'s parameter {got_name!r})"
                )
        if len(got) > len(self.param_names):
            extra_name, extra_shape = got[len(self.param_names)]
            raise ShapeMismatchError(
                f"parameter #{len(self.param_names)} {extra_name!r} with shape {_fmt_shape(extra_shape)}: "
                f"the {what} has {len(got)} parameters but the divergence covers only {len(self.param_names)}"
            )

    def _tensor_list(self, tensors: Iterable[Tensor], arg: str) -> list[Tensor]:
        tensors = list(tensors)
        if len(tensors) != len(self.param_names):
            raise ShapeMismatchError(f"{arg}: got {len(tensors)} tensors; the divergence covers {len(self.param_names)} parameters")
        for position, (t, name, shape) in enumerate(zip(tensors, self.param_names, self.param_shapes)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{arg}[{position}] ({name!r}): got {type(t).__name__}; allowed: a torch.Tensor")
            if t.shape != shape:
                raise ShapeMismatchError(f"{arg}[{position}] ({name!r}): expected shape {_fmt_shape(shape)}, got shape {_fmt_shape(t.shape)}")
        return tensors

    # ------------------------------------------------------------------ math (subclasses)
    def forward(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """``precondition(grads)``: lets ``torch.func.functional_call`` swap in meta-parameter values."""
        return self.precondition(grads)

    def precondition(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """M^{-1} g for each tensor of ``grads`` (same order and shapes as the parameters)."""
        raise NotImplementedError

    def metric_product(self, deltas: Sequence[Tensor]) -> list[Tensor]:
        """M d for each tensor of ``deltas``."""
        raise NotImplementedError

    def frobenius_reg(self) -> Tensor:
        """||M - I||_F^2 over the whole (block-diagonal) M."""
        raise NotImplementedError

    def strong_convexity(self) -> Tensor:
        """lambda: the smallest eigenvalue of M (= min over blocks of sigma_min(M_zeta))."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The dense M acting on ``torch.cat([t.flatten() for t in tensors])``. For small problems only."""
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        """JSON-serialisable ``{"options": ..., "blocks": [...]}``: how the factors map to parameters."""
        raise NotImplementedError

    @classmethod
    def from_description(cls, names_and_shapes: NamesAndShapes, description: Mapping[str, Any]) -> Divergence:
        """Rebuild (with initial factors) from ``description()``; raises ``ValueError`` if it is inconsistent."""
        raise NotImplementedError

    def bregman(self, theta: Sequence[Tensor], theta_ref: Sequence[Tensor]) -> Tensor:
        """B_phi(theta, theta_ref) = 1/2 sum (theta - theta_ref)^T M (theta - theta_ref)."""
        theta = self._tensor_list(theta, "theta")
        theta_ref = self._tensor_list(theta_ref, "theta_ref")
        deltas = [t - r for t, r in zip(theta, theta_ref)]
        products = self.metric_product(deltas)
        return 0.5 * sum((d * p).sum() for d, p in zip(deltas, products))

    @torch.no_grad()
    def apply_update_(
        self,
        indices: Sequence[int],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lr: float,
        weight_decay: float = 0.0,
    ) -> None:
        """In place, without autograd: ``params[k] -= lr * M^{-1} (grads[k] + weight_decay * params[k])``.

        Used by ``MirrorDescent.step``. ``indices`` are the positions of ``params`` in ``param_names``;
        parameters not listed (no gradient) count as having a zero gradient and are not updated.
        This generic version goes through ``precondition``; subclasses override it with in-place
        fast paths.
        """
        if weight_decay:
            grads = torch._foreach_add(list(grads), list(params), alpha=weight_decay)
        full = [torch.zeros(s, device=grads[0].device, dtype=grads[0].dtype) for s in self.param_shapes]
        for i, g in zip(indices, grads):
            full[i] = g
        steps = self.precondition(full)
        torch._foreach_add_(list(params), [steps[i].to(p.dtype) for i, p in zip(indices, params)], alpha=-lr)


# ====================================================================================== diagonal


class DiagonalBregman(Divergence):
    """M = diag(exp(s)): one learned positive scale per parameter element (Meta-SGD-like).

    exp keeps every scale positive without constraints; s = 0 gives M = I (plain SGD).
    The factor of parameter k is ``log_scale.k`` with the parameter's shape.
    """

    kind: ClassVar[str] = "diagonal"

    def __init__(
        self,
        names_and_shapes: NamesAndShapes,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(names_and_shapes)
        self.log_scale = nn.ParameterList([nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)) for shape in self.param_shapes])

    def _scale(self, k: int, like: Tensor) -> Tensor:
        return self.log_scale[k].to(device=like.device, dtype=like.dtype)

    def precondition(self, grads: Sequence[Tensor]) -> list[Tensor]:
        grads = self._tensor_list(grads, "grads")
        return [g * torch.exp(-self._scale(k, g)) for k, g in enumerate(grads)]

    def metric_product(self, deltas: Sequence[Tensor]) -> list[Tensor]:
        deltas = self._tensor_list(deltas, "deltas")
        return [d * torch.exp(self._scale(k, d)) for k, d in enumerate(deltas)]

    def frobenius_reg(self) -> Tensor:
        return sum(((torch.exp(s) - 1.0) ** 2).sum() for s in self.log_scale)

    def strong_convexity(self) -> Tensor:
        return torch.exp(torch.stack([s.min() for s in self.log_scale if s.numel()]).min())

    def to_dense(self) -> Tensor:
        return torch.diag(torch.exp(torch.cat([s.flatten() for s in self.log_scale])))

    @torch.no_grad()
    def apply_update_(
        self,
        indices: Sequence[int],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lr: float,
        weight_decay: float = 0.0,
    ) -> None:
        if weight_decay:
            grads = torch._foreach_add(list(grads), list(params), alpha=weight_decay)
        inv_scales = torch._foreach_exp([-self._scale(i, g) for i, g in zip(indices, grads)])
        torch._foreach_addcmul_(list(params), list(grads), inv_scales, value=-lr)

    def description(self) -> dict[str, Any]:
        return {
            "options": {"parameterisation": "exp"},
            "blocks": [{"parameter": name, "factor": f"log_scale.{k}"} for k, name in enumerate(self.param_names)],
        }

    @classmethod
    def from_description(cls, names_and_shapes: NamesAndShapes, description: Mapping[str, Any]) -> DiagonalBregman:
        div = cls(names_and_shapes)
        _require_same_description(div, description)
        return div


# ====================================================================================== dense


class DenseBregman(Divergence):
    """One dense SPD M = L L^T + eps I over all parameters (flattened and concatenated in order).

    L is the lower triangle of the learned ``raw_factor`` (dim x dim); it starts at sqrt(1 - eps) I so
    that M = I. eps > 0 bounds lambda from below. Holds dim^2 numbers: for tiny problems (2-D
    quadratics, a handful of parameters); ``max_dim`` guards against building it for a network.
    """

    kind: ClassVar[str] = "dense"

    def __init__(
        self,
        names_and_shapes: NamesAndShapes,
        *,
        epsilon: float = 1e-4,
        max_dim: int = 4096,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(names_and_shapes)
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon: got {epsilon!r}; allowed: a float in (0, 1)")
        self.dim = sum(int(math.prod(s)) for s in self.param_shapes)
        if self.dim > max_dim:
            raise ValueError(
                f"DenseBregman: the parameters have {self.dim} elements in all, more than max_dim={max_dim}; "
                "it would hold a dim x dim matrix. Use KroneckerBregman or DiagonalBregman, or raise max_dim"
            )
        self.epsilon = float(epsilon)
        self.raw_factor = nn.Parameter(math.sqrt(1.0 - self.epsilon) * torch.eye(self.dim, dtype=dtype, device=device))

    def matrix(self) -> Tensor:
        """M = L L^T + eps I with L = tril(raw_factor)."""
        L = torch.tril(self.raw_factor)
        return L @ L.T + self.epsilon * torch.eye(self.dim, dtype=L.dtype, device=L.device)

    def _split(self, flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        sizes = [t.numel() for t in like]
        return [piece.reshape(t.shape) for piece, t in zip(flat.split(sizes), like)]

    def precondition(self, grads: Sequence[Tensor]) -> list[Tensor]:
        grads = self._tensor_list(grads, "grads")
        flat = torch.cat([g.reshape(-1) for g in grads])
        M = self.matrix().to(device=flat.device, dtype=flat.dtype)
        chol = torch.linalg.cholesky(M)
        return self._split(torch.cholesky_solve(flat.unsqueeze(1), chol).squeeze(1), grads)

    def metric_product(self, deltas: Sequence[Tensor]) -> list[Tensor]:
        deltas = self._tensor_list(deltas, "deltas")
        flat = torch.cat([d.reshape(-1) for d in deltas])
        M = self.matrix().to(device=flat.device, dtype=flat.dtype)
        return self._split(M @ flat, deltas)

    def frobenius_reg(self) -> Tensor:
        M = self.matrix()
        return ((M - torch.eye(self.dim, dtype=M.dtype, device=M.device)) ** 2).sum()

    def strong_convexity(self) -> Tensor:
        return torch.linalg.eigvalsh(self.matrix())[0]

    def to_dense(self) -> Tensor:
        return self.matrix()

    def description(self) -> dict[str, Any]:
        return {
            "options": {"epsilon": self.epsilon},
            "blocks": [{"parameters": list(self.param_names), "dim": self.dim, "factor": "raw_factor"}],
        }

    @classmethod
    def from_description(cls, names_and_shapes: NamesAndShapes, description: Mapping[str, Any]) -> DenseBregman:
        options = description.get("options") if isinstance(description, Mapping) else None
        if not isinstance(options, Mapping) or "epsilon" not in options:
            raise ValueError(f"options: got {options!r}; allowed: an object with 'epsilon'")
        div = cls(names_and_shapes, epsilon=options["epsilon"], max_dim=max(4096, _count(names_and_shapes)))
        _require_same_description(div, description)
        return div


# ====================================================================================== description checks


def _count(names_and_shapes: NamesAndShapes) -> int:
    _, shapes = _normalise_names_and_shapes(names_and_shapes)
    return sum(int(math.prod(s)) for s in shapes)


def _require_list(description: Mapping[str, Any], key: str) -> list[Any]:
    value = description.get(key) if isinstance(description, Mapping) else None
    if not isinstance(value, list):
        raise ValueError(f"{key}: got {value!r}; allowed: a list")
    return value


def _require_same_description(div: Divergence, description: Mapping[str, Any]) -> None:
    expected = div.description()
    for key in ("options", "blocks"):
        got = description.get(key)
        if got != expected[key]:
            # name the first differing block to make a hand-edited manifest easy to fix
            if key == "blocks" and isinstance(got, list):
                for k, (e, g) in enumerate(zip(expected[key], got)):
                    if e != g:
                        raise ValueError(f"blocks[{k}]: got {g!r}; for these parameter shapes expected {e!r}")
                raise ValueError(f"blocks: got {len(got)} blocks; for these parameter shapes expected {len(expected[key])}")
            raise ValueError(f"{key}: got {got!r}; for these parameter shapes expected {expected[key]!r}")
