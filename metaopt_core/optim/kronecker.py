"""The thesis's parameterisation of a MetaMD divergence (section 5.4.2): M block-diagonal, one
Kronecker-factored block per layer, M_zeta = A_zeta (x) B_zeta with A = a a^T + I and
B = b b^T + I; inverted by Sherman-Morrison. The base class and the simpler families are in
:mod:`metaopt_core.optim.divergence`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .divergence import Divergence, NamesAndShapes, _fmt_shape, _require_list, _require_same_description


@dataclass(frozen=True)
class KroneckerBlock:
    """One block: a parameter (a layer's weight, or an untied 1-D/scalar parameter) seen as a
    (rows, cols) matrix, plus an optional tied bias.

    ``b`` (length ``rows``) is the output-side factor, ``a`` (length ``cols``) the input-side one.
    """

    parameter: str
    rows: int
    cols: int
    bias: str | None = None


def default_bias_ties(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict[str, str]:
    """Tie ``<prefix>.bias`` to ``<prefix>.weight`` when the weight has >= 2 dims and shape[0] == bias length.

    That is the layout of ``nn.Linear`` and ``nn.ConvNd`` (weight (out, in, *kernel), bias (out,)).
    """
    shape_of = {n: tuple(s) for n, s in zip(names, shapes)}
    ties: dict[str, str] = {}
    for name, shape in shape_of.items():
        if name.rsplit(".", 1)[-1] != "bias" or len(shape) != 1:
            continue
        weight = name[: -len("bias")] + "weight"
        weight_shape = shape_of.get(weight)
        if weight_shape is not None and len(weight_shape) >= 2 and weight_shape[0] == shape[0]:
            ties[name] = weight
    return ties


def _matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a parameter seen as a matrix: dim 0 by the product of the others.

    A conv weight (out, in, kh, kw) becomes (out, in*kh*kw); a 1-D parameter (n,) becomes (n, 1);
    a scalar (1, 1).
    """
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), int(math.prod(shape[1:]))


def _sigma_min_factor(dim: int, sq_norm: Tensor) -> Tensor:
    """sigma_min(v v^T + I_dim) for ||v||^2 = sq_norm: 1 when dim > 1 (any vector orthogonal to v), 1 + ||v||^2 when dim == 1."""
    return 1.0 + sq_norm if dim == 1 else torch.ones_like(sq_norm)


class KroneckerBregman(Divergence):
    """Block-diagonal M, one Kronecker-factored block per layer (thesis section 5.4.2).

    For a weight W of shape (rows, cols) after ``_matrix_dims`` (Linear (out, in); conv
    (out, in*kh*kw)), with learnable a (length cols, input side) and b (length rows, output side):

        A = a a^T + I_cols,  B = b b^T + I_rows,  M_zeta = A (x) B  in the thesis's column-major vec,

    which, acting on the row-major ``W.flatten()`` that PyTorch uses, is the dense matrix
    ``torch.kron(B, A)``: (B (x) A) vec_r(D) = vec_r(B D A). So the step is
    M_zeta^{-1} g = vec_r(B^{-1} G A^{-1}) (both factors symmetric), computed by Sherman-Morrison,
    (v v^T + I)^{-1} = I - v v^T / (1 + v^T v): two matrix-vector products and two rank-1 updates,
    O(rows * cols), no decomposition, no dense inverse.

    Biases. A bias tied to a weight (``<p>.bias`` next to a >= 2-D ``<p>.weight`` with matching
    rows; not transposed convolutions) uses the layer's output-side factor only: M_bias = B. Why:
    appending the bias to the weight as an extra input column with constant input 1 gives the
    augmented matrix [W | bias]; using the layer block B (x) blockdiag(A, 1) on it (the constant
    input gets no learned input-side coupling) is exactly the weight block plus B on the bias,
    so the bias shares b and adds no factor of its own.

    Other parameters (norm-layer weights and biases, untied biases, scalars) get their own block
    as an (n, 1) matrix: B = b b^T + I_n and a scalar A = 1 + a^2. That stays inside the same family
    (closed forms, Sherman-Morrison, M = I at initialisation) rather than hard-coding identity.

    All a, b start at zero, so M = I and ``MirrorDescent`` starts as SGD.
    """

    kind: ClassVar[str] = "kronecker"

    def __init__(
        self,
        names_and_shapes: NamesAndShapes,
        *,
        tied_biases: Mapping[str, str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(names_and_shapes)
        if tied_biases is None:
            tied_biases = default_bias_ties(self.param_names, self.param_shapes)
        self.tied_biases: dict[str, str] = self._validate_ties(dict(tied_biases))
        weight_to_bias = {w: b for b, w in self.tied_biases.items()}

        blocks: list[KroneckerBlock] = []
        block_of: dict[str, int] = {}
        for name, shape in zip(self.param_names, self.param_shapes):
            if name in self.tied_biases:
                continue
            rows, cols = _matrix_dims(shape)
            block_of[name] = len(blocks)
            blocks.append(KroneckerBlock(parameter=name, rows=rows, cols=cols, bias=weight_to_bias.get(name)))
        self.blocks: tuple[KroneckerBlock, ...] = tuple(blocks)

        # Per parameter: (block index, is tied bias, rows, cols of the matrix the parameter is seen as).
        plan: list[tuple[int, bool, int, int]] = []
        for name in self.param_names:
            if name in self.tied_biases:
                block = block_of[self.tied_biases[name]]
                plan.append((block, True, blocks[block].rows, 1))
            else:
                block = block_of[name]
                plan.append((block, False, blocks[block].rows, blocks[block].cols))
        self._plan: tuple[tuple[int, bool, int, int], ...] = tuple(plan)

        self.a_sizes: tuple[int, ...] = tuple(blk.cols for blk in blocks)
        self.b_sizes: tuple[int, ...] = tuple(blk.rows for blk in blocks)
        factory = dict(dtype=dtype, device=device)
        self.a = nn.ParameterList([nn.Parameter(torch.zeros(blk.cols, **factory)) for blk in blocks])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(blk.rows, **factory)) for blk in blocks])

    @classmethod
    def for_model(cls, model: nn.Module, **options: Any) -> KroneckerBregman:
        """One block per layer of ``model``; biases of Linear/Conv layers tied to their weights.

        Transposed convolutions keep their bias untied: their weight's dim 0 is the input channels.
        """
        named = list(model.named_parameters())
        if "tied_biases" not in options:
            ties = default_bias_ties([n for n, _ in named], [p.shape for _, p in named])
            transposed = {
                f"{prefix}.bias" if prefix else "bias" for prefix, module in model.named_modules() if isinstance(module, nn.modules.conv._ConvTransposeNd)
            }
            options["tied_biases"] = {b: w for b, w in ties.items() if b not in transposed}
        return cls.for_shapes([(n, p.shape) for n, p in named], **options)

    def _validate_ties(self, ties: dict[str, str]) -> dict[str, str]:
        shape_of = dict(zip(self.param_names, self.param_shapes))
        weights_used: dict[str, str] = {}
        for bias, weight in ties.items():
            if bias not in shape_of:
                raise ValueError(f"tied_biases: bias {bias!r} is not a parameter; allowed: {list(self.param_names)}")
            if weight not in shape_of:
                raise ValueError(f"tied_biases[{bias!r}]: weight {weight!r} is not a parameter")
            if weight in ties:
                raise ValueError(f"tied_biases[{bias!r}]: {weight!r} is itself tied as a bias")
            if len(shape_of[bias]) != 1:
                raise ValueError(f"tied_biases: bias {bias!r} has shape {_fmt_shape(shape_of[bias])}; allowed: 1-D")
            w_shape = shape_of[weight]
            if len(w_shape) < 2 or w_shape[0] != shape_of[bias][0]:
                raise ValueError(
                    f"tied_biases[{bias!r}]: weight {weight!r} has shape {_fmt_shape(w_shape)}; allowed: "
                    f">= 2 dims with dim 0 == {shape_of[bias][0]} (the bias length)"
                )
            if weight in weights_used:
                raise ValueError(f"tied_biases: weight {weight!r} is tied to both {weights_used[weight]!r} and {bias!r}")
            weights_used[weight] = bias
        return ties

    # ------------------------------------------------------------------ factors
    def _factors(self, param_index: int, like: Tensor) -> tuple[Tensor | None, Tensor]:
        """(a or None for a tied bias, b) of a parameter, cast to ``like``'s dtype and device."""
        block, is_bias, _, _ = self._plan[param_index]
        b = self.b[block].to(device=like.device, dtype=like.dtype)
        if is_bias:
            return None, b
        return self.a[block].to(device=like.device, dtype=like.dtype), b

    def factor_matrices(self, block: int) -> tuple[Tensor, Tensor]:
        """Dense (A, B) of a block: A = a a^T + I (cols x cols), B = b b^T + I (rows x rows)."""
        a, b = self.a[block], self.b[block]
        eye_a = torch.eye(a.numel(), dtype=a.dtype, device=a.device)
        eye_b = torch.eye(b.numel(), dtype=b.dtype, device=b.device)
        return torch.outer(a, a) + eye_a, torch.outer(b, b) + eye_b

    # ------------------------------------------------------------------ math
    def precondition(self, grads: Sequence[Tensor]) -> list[Tensor]:
        grads = self._tensor_list(grads, "grads")
        out: list[Tensor] = []
        for i, g in enumerate(grads):
            a, b = self._factors(i, g)
            _, _, rows, cols = self._plan[i]
            G = g.reshape(rows, cols)
            if a is not None:  # right-multiply by A^{-1} = I - a a^T / (1 + a^T a)
                G = G - torch.outer(G @ a, a / (1.0 + a @ a))
            # left-multiply by B^{-1} = I - b b^T / (1 + b^T b)
            G = G - torch.outer(b / (1.0 + b @ b), b @ G)
            out.append(G.reshape(g.shape))
        return out

    def metric_product(self, deltas: Sequence[Tensor]) -> list[Tensor]:
        deltas = self._tensor_list(deltas, "deltas")
        out: list[Tensor] = []
        for i, d in enumerate(deltas):
            a, b = self._factors(i, d)
            _, _, rows, cols = self._plan[i]
            D = d.reshape(rows, cols)
            if a is not None:  # D A = D + (D a) a^T
                D = D + torch.outer(D @ a, a)
            D = D + torch.outer(b, b @ D)  # B D = D + b (b^T D)
            out.append(D.reshape(d.shape))
        return out

    def bregman(self, theta: Sequence[Tensor], theta_ref: Sequence[Tensor]) -> Tensor:
        # <D, B D A> = ||D||^2 + ||D a||^2 + ||b^T D||^2 + (b^T D a)^2: no rows x cols temporaries
        theta = self._tensor_list(theta, "theta")
        theta_ref = self._tensor_list(theta_ref, "theta_ref")
        total = None
        for i, (t, r) in enumerate(zip(theta, theta_ref)):
            _, _, rows, cols = self._plan[i]
            D = (t - r).reshape(rows, cols)
            a, b = self._factors(i, D)
            bD = b @ D
            term = (D * D).sum() + bD @ bD
            if a is not None:
                Da = D @ a
                term = term + Da @ Da + (bD @ a) ** 2
            total = term if total is None else total + term
        return 0.5 * total

    def frobenius_reg(self) -> Tensor:
        # ||A (x) B - I||_F^2 = ||A||^2 ||B||^2 - 2 tr(A) tr(B) + rows*cols with ||A||^2 = p^2 + 2p + cols,
        # tr(A) = p + cols (p = ||a||^2, q = ||b||^2). Expanded, the rows*cols terms cancel exactly:
        # = cols q^2 + rows p^2 + 2pq + 2pq^2 + 2p^2 q + p^2 q^2, which keeps float32 accurate when
        # a, b are small and rows*cols is large. A tied bias (cols 1, a = 0) adds q^2.
        total = None
        for blk, a, b in zip(self.blocks, self.a, self.b):
            p, q = a @ a, b @ b
            term = blk.cols * q**2 + blk.rows * p**2 + 2 * p * q + 2 * p * q**2 + 2 * p**2 * q + p**2 * q**2
            if blk.bias is not None:
                term = term + q**2
            total = term if total is None else total + term
        return total

    def strong_convexity(self) -> Tensor:
        # sigma_min(A (x) B) = sigma_min(A) sigma_min(B); a tied bias block is B alone.
        values = []
        for blk, a, b in zip(self.blocks, self.a, self.b):
            s_b = _sigma_min_factor(blk.rows, b @ b)
            values.append(_sigma_min_factor(blk.cols, a @ a) * s_b)
            if blk.bias is not None:
                values.append(s_b)
        return torch.stack(values).min()

    def to_dense(self) -> Tensor:
        pieces = []
        for i in range(len(self.param_names)):
            block, is_bias, _, _ = self._plan[i]
            A, B = self.factor_matrices(block)
            pieces.append(B if is_bias else torch.kron(B, A))
        return torch.block_diag(*pieces)

    # ------------------------------------------------------------------ optimiser fast path
    def _static(self, key: tuple, build: Callable[[], Any]) -> Any:
        """Per-instance cache of layout-only objects (index tensors, scratch views): never factor values."""
        cache: dict[tuple, Any] = self.__dict__.setdefault("_static_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _prepared_factors(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Factor views for the update, from a fixed number of batched ops (not a handful per block).

        Per block: ``a_col`` (cols, 1), ``a_row_scaled`` = alpha a^T (1, cols), ``b_row`` (1, rows),
        ``b_col_scaled`` = beta b (rows, 1); flat ``b``, ``b_scaled``; ``alpha`` per block;
        alpha = 1/(1 + a^T a), beta = 1/(1 + b^T b).
        """
        prepared: dict[str, Any] = {}
        for name, factor_list in (("a", self.a), ("b", self.b)):
            # ParameterList keeps its entries in _parameters; reading them there skips a slow __getitem__ per block
            factors = list(factor_list._parameters.values())
            sizes = self.a_sizes if name == "a" else self.b_sizes
            flat = torch.cat(factors).to(device=device, dtype=dtype)
            lengths = self._static(("lengths", name, device), lambda: torch.tensor(sizes, device=device))
            coef = 1.0 / (1.0 + torch.segment_reduce(flat * flat, "sum", lengths=lengths))
            scaled = flat * torch.repeat_interleave(coef, lengths, output_size=flat.numel())
            prepared[name], prepared[f"{name}_scaled"], prepared[f"{name}_coef"] = flat, scaled, coef
            if name == "a":
                prepared["a_col"] = flat.unsqueeze(1).split(sizes, 0)
                prepared["a_row_scaled"] = scaled.unsqueeze(0).split(sizes, 1)
            else:
                prepared["b_row"] = flat.unsqueeze(0).split(sizes, 1)
                prepared["b_col_scaled"] = scaled.unsqueeze(1).split(sizes, 0)
        return prepared

    @torch.no_grad()
    def apply_update_(
        self,
        indices: Sequence[int],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lr: float,
        weight_decay: float = 0.0,
    ) -> None:
        """In place: P -= lr * B^{-1} (G + weight_decay P) A^{-1} per parameter.

        Matrix blocks, by Sherman-Morrison: with S = G + wd P, u = S a, w = b^T S and
        alpha = 1/(1 + a^T a), beta = 1/(1 + b^T b),
        B^{-1} S A^{-1} = S - U V,  U = [u - beta (w a) b, beta b] (rows x 2),  V = [alpha a^T; w],
        so the step is P <- (1 - lr wd) P - lr G + lr U V: two matrix-vector products per operand
        (G and, with weight decay, P; S is never formed), one ``addmm_`` (the rank-2 term and the
        decay in one pass over P) and one ``add_`` of G. Vector blocks (tied biases, 1-D and scalar
        parameters) are many small tensors: they are updated together in one flat batch, with a
        fixed number of ops.
        """
        by_device: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, g in enumerate(grads):
            if g.numel() == 0:
                continue
            by_device.setdefault((g.device, g.dtype), []).append(k)
        for (device, dtype), members in by_device.items():
            f = self._prepared_factors(device, dtype)
            a_col, a_row_scaled, b_row, b_col_scaled = f["a_col"], f["a_row_scaled"], f["b_row"], f["b_col_scaled"]
            vector_members: list[int] = []
            for k in members:
                position = indices[k]
                block, is_bias, rows, cols = self._plan[position]
                if is_bias or cols == 1:
                    vector_members.append(k)
                    continue
                p, g = params[k], grads[k]
                G = g.view(rows, cols) if g.is_contiguous() else g.reshape(rows, cols)
                if not p.is_contiguous():  # e.g. channels_last: no (rows, cols) view to update in place
                    self._update_matrix_strided(p, G, a_col[block], a_row_scaled[block], b_row[block], b_col_scaled[block], lr, weight_decay)
                    continue
                P = p.view(rows, cols)
                u = torch.mm(G, a_col[block])  # (rows, 1)
                w = torch.mm(b_row[block], G)  # (1, cols)
                if weight_decay:
                    u = torch.addmm(u, P, a_col[block], alpha=weight_decay)
                    w = torch.addmm(w, b_row[block], P, alpha=weight_decay)
                left = torch.cat((torch.addcmul(u, b_col_scaled[block], torch.mm(w, a_col[block]), value=-1.0),
                                  b_col_scaled[block]), 1)  # fmt: skip
                right = torch.cat((a_row_scaled[block], w), 0)
                P.addmm_(left, right, beta=1.0 - lr * weight_decay, alpha=lr)
                P.add_(G, alpha=-lr)
            if vector_members:
                self._update_vectors(vector_members, indices, params, grads, lr, weight_decay, f)

    def _update_matrix_strided(
        self,
        p: Tensor,
        G: Tensor,
        a_col: Tensor,
        a_row_scaled: Tensor,
        b_row: Tensor,
        b_col_scaled: Tensor,
        lr: float,
        weight_decay: float,
    ) -> None:
        """A parameter with no (rows, cols) view (non-contiguous): form S, precondition, add back."""
        S = G + weight_decay * p.reshape(G.shape) if weight_decay else G.clone()
        S.addcmul_(torch.mm(S, a_col), a_row_scaled, value=-1.0)
        S.addcmul_(b_col_scaled, torch.mm(b_row, S), value=-1.0)
        p.add_(S.view(p.shape), alpha=-lr)  # follows p's strides

    def _update_vectors(
        self,
        members: list[int],
        indices: Sequence[int],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lr: float,
        weight_decay: float,
        f: dict[str, Any],
    ) -> None:
        """y = c (g - (beta b)(b^T g)) for all vector blocks at once; c = 1 for a tied bias, else 1/(1 + a^2)."""
        positions = tuple(indices[k] for k in members)
        device = grads[members[0]].device

        def build() -> dict[str, Any]:
            plans = [self._plan[i] for i in positions]
            starts = [0]
            for rows in self.b_sizes[:-1]:
                starts.append(starts[-1] + rows)
            gather = [starts[block] + r for block, _, rows, _ in plans for r in range(rows)]
            return {
                "sizes": [rows for _, _, rows, _ in plans],
                "lengths": torch.tensor([rows for _, _, rows, _ in plans], device=device),
                "gather": torch.tensor(gather, device=device),
                "blocks": torch.tensor([block for block, _, _, _ in plans], device=device),
                "untied": torch.tensor([not is_bias for _, is_bias, _, _ in plans], device=device),
                "any_untied": any(not is_bias for _, is_bias, _, _ in plans),
            }

        layout = self._static(("vectors", positions, device), build)
        g_flat = torch.cat([grads[k].reshape(-1) for k in members])
        targets = [params[k] for k in members]
        if weight_decay:
            g_flat.add_(torch.cat([t.reshape(-1) for t in targets]), alpha=weight_decay)
        b_sel = f["b"].index_select(0, layout["gather"])
        dots = torch.segment_reduce(b_sel * g_flat, "sum", lengths=layout["lengths"])
        per_element = torch.repeat_interleave(dots, layout["lengths"], output_size=g_flat.numel())
        step = torch.addcmul(g_flat, f["b_scaled"].index_select(0, layout["gather"]), per_element, value=-1.0)
        if layout["any_untied"]:  # an (n, 1) block: A = 1 + a^2 is a scalar, A^{-1} = alpha
            c = torch.where(layout["untied"], f["a_coef"][layout["blocks"]], 1.0)
            step.mul_(torch.repeat_interleave(c, layout["lengths"], output_size=g_flat.numel()))
        pieces = [piece.view(t.shape) for piece, t in zip(step.split(layout["sizes"]), targets)]
        torch._foreach_add_(targets, pieces, alpha=-lr)

    # ------------------------------------------------------------------ layout
    def description(self) -> dict[str, Any]:
        return {
            "options": {},
            "blocks": [
                {
                    "parameter": blk.parameter,
                    "bias": blk.bias,
                    "rows": blk.rows,
                    "cols": blk.cols,
                    "factors": {"a": f"a.{k}", "b": f"b.{k}"},
                }
                for k, blk in enumerate(self.blocks)
            ],
        }

    @classmethod
    def from_description(cls, names_and_shapes: NamesAndShapes, description: Mapping[str, Any]) -> KroneckerBregman:
        blocks = _require_list(description, "blocks")
        ties: dict[str, str] = {}
        for k, blk in enumerate(blocks):
            if not isinstance(blk, Mapping) or not isinstance(blk.get("parameter"), str):
                raise ValueError(f"blocks[{k}]: got {blk!r}; allowed: an object with 'parameter', 'bias', 'rows', 'cols', 'factors'")
            if blk.get("bias") is not None:
                ties[blk["bias"]] = blk["parameter"]
        div = cls(names_and_shapes, tied_biases=ties)
        _require_same_description(div, description)
        return div


__all__ = ["KroneckerBlock", "KroneckerBregman", "default_bias_ties"]
