"""Implicit-function-theorem (IFT) hypergradients with Hessian-vector products only.

For a bilevel problem

    ω* = argmin_ω M(θ*(ω), ω),     θ*(ω) = argmin_θ L(θ, ω),

the stationarity condition ∂L/∂θ(θ*(ω), ω) = 0 and the IFT give

    dM/dω = ∂M/∂ω − (∂²L/∂ω∂θ) [∂²L/∂θ∂θ]⁻¹ ∂M/∂θ            (thesis eqs 4.4–4.5)

The inverse-Hessian-vector product x ≈ H⁻¹ ∂M/∂θ is computed without ever forming H, either by
a truncated Neumann series (Lorraine et al. 2020; thesis eq 4.6 / Alg 8) or by conjugate
gradients; both only need products H·v, obtained by differentiating ∂L/∂θ a second time
(double backward).

Sign and scaling, checked against closed-form hypergradients in tests/test_hypergrad.py:
  * Alg 8 accumulates p = Σ_{j=0..J} (I − αH)^j g with g = ∂M/∂θ. Since
    H⁻¹ = α Σ_j (I − αH)^j (valid when 0 < αλ < 2 for every eigenvalue λ of H), the
    inverse-Hessian-vector product is α·p, not p.
  * The indirect term is −(∂²L/∂ω∂θ)·(α p): minus sign, and scaled by α. The thesis writes
    "−p ∂²L/∂θ∂ω", which omits the α; that only rescales the indirect term (by 1/α), so the
    direction is the same when M does not depend on ω directly (ITL's case), but the direct
    and indirect terms would be mixed in the wrong proportion otherwise. We use α·p.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

__all__ = ["HypergradResult", "implicit_hypergradient", "ALLOWED_METHODS"]

ALLOWED_METHODS: tuple[str, ...] = ("neumann", "cg")


@dataclass(frozen=True)
class HypergradResult:
    """Outcome of one implicit hypergradient.

    Attributes:
        grads: dM/dω = direct + indirect, one tensor per meta-parameter (same shapes), detached.
        direct: ∂M/∂ω (zeros for meta-parameters M does not use).
        indirect: −(∂²L/∂ω∂θ) H⁻¹ ∂M/∂θ.
        outer_grad_norm: ‖∂M/∂θ‖ at θ.
        inner_grad_norm: ‖∂L/∂θ‖ at θ — how far θ is from an inner stationary point, i.e. how
            much the IFT assumption is violated.
        method: "neumann" or "cg".
        iterations: Neumann terms / CG iterations actually performed.
        solve_rel_residual: ‖(H + δI)x − ∂M/∂θ‖ / ‖∂M/∂θ‖ for the inverse-HVP x that was used
            (0 when ∂M/∂θ = 0); a direct measure of how well H⁻¹ was approximated.
        unused_params: indices of params that L does not depend on (they are left out of the
            solve: their Hessian rows/columns and mixed derivatives are zero, so they contribute
            nothing to the indirect term).
    """

    grads: tuple[Tensor, ...]
    direct: tuple[Tensor, ...]
    indirect: tuple[Tensor, ...]
    outer_grad_norm: float
    inner_grad_norm: float
    method: str
    iterations: int
    solve_rel_residual: float
    unused_params: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------------
# small helpers on lists of tensors
# ---------------------------------------------------------------------------------------------


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Sum of elementwise products over a list of tensors (a 0-d tensor)."""
    total = xs[0].new_zeros(())
    for x, y in zip(xs, ys):
        total = total + (x * y).sum()
    return total


def _norm(xs: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float((x.detach() ** 2).sum()) for x in xs)) if xs else 0.0


def _zeros_if_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _check_tensor_list(name: str, tensors: Sequence[Tensor], *, need_grad: bool) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        raise TypeError(
            f"{name} must be a sequence of tensors (e.g. list(model.parameters())), got a single Tensor of shape {tuple(tensors.shape)}; wrap it in a list"
        )
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} must contain at least one tensor, got an empty sequence")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}[{i}] must have a floating dtype, got {t.dtype}")
        if need_grad and not t.requires_grad:
            raise ValueError(f"{name}[{i}] (shape {tuple(t.shape)}) must have requires_grad=True")
    return tensors


def _scalar_loss(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}() must return a scalar torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name}() must return a scalar tensor, got shape {tuple(value.shape)}")
    return value.reshape(())


class _HessianVectorProduct:
    """v ↦ (∂²L/∂θ∂θ + δI) v from a gradient ∂L/∂θ built with create_graph=True."""

    def __init__(self, inner_grads: Sequence[Tensor], params: Sequence[Tensor], damping: float):
        # Components of ∂L/∂θ that do not require grad are constant in θ (L linear in that block):
        # their Hessian rows are zero, and autograd cannot differentiate them.
        self._diff_idx = [i for i, g in enumerate(inner_grads) if g.requires_grad]
        self._grads = [inner_grads[i] for i in self._diff_idx]
        self._params = list(params)
        self._damping = damping

    def __call__(self, vs: Sequence[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(v) for v in vs]
        if self._diff_idx:
            hv = torch.autograd.grad(
                self._grads,
                self._params,
                grad_outputs=[vs[i] for i in self._diff_idx],
                retain_graph=True,
                allow_unused=True,
            )
            out = _zeros_if_none(hv, vs)
        if self._damping:
            out = [h + self._damping * v for h, v in zip(out, vs)]
        return [h.detach() for h in out]


def _neumann_inverse_hvp(hvp: _HessianVectorProduct, g: Sequence[Tensor], terms: int, alpha: float) -> tuple[list[Tensor], int]:
    """x = α Σ_{j=0..J} (I − αH)^j g ≈ H⁻¹ g  (thesis Alg 8, with the α made explicit)."""
    v = [t.clone() for t in g]
    p = [t.clone() for t in g]
    for _ in range(terms):
        hv = hvp(v)
        v = [vi - alpha * hi for vi, hi in zip(v, hv)]
        p = [pi + vi for pi, vi in zip(p, v)]
    g_norm, v_norm = _norm(g), _norm(v)
    if terms > 0 and (not math.isfinite(v_norm) or v_norm > g_norm):
        warnings.warn(
            f"Neumann series is not converging (last term norm {v_norm:.3g} > first term norm "
            f"{g_norm:.3g}): alpha={alpha} exceeds 2/λ_max of the inner Hessian, or the Hessian has "
            f"negative curvature at params; lower alpha, add damping, or train the inner problem "
            f"closer to a minimum",
            RuntimeWarning,
            stacklevel=3,
        )
    return [alpha * pi for pi in p], terms


def _cg_inverse_hvp(hvp: _HessianVectorProduct, g: Sequence[Tensor], max_iters: int, rel_tol: float) -> tuple[list[Tensor], int]:
    """Conjugate gradients for H x = g, from x = 0, at most max_iters Hessian-vector products.

    Stops when ‖r‖ ≤ rel_tol·‖g‖, or when a search direction has non-positive curvature (H not
    positive definite at params: CG's assumption fails; the iterate so far is returned).
    """
    x = [torch.zeros_like(t) for t in g]
    r = [t.clone() for t in g]
    d = [t.clone() for t in g]
    rs = float(_dot(r, r))
    stop = (rel_tol * math.sqrt(rs)) ** 2
    iterations = 0
    for _ in range(max_iters):
        if rs <= stop:
            break
        hd = hvp(d)
        curvature = float(_dot(d, hd))
        if not curvature > 0.0:
            warnings.warn(
                f"CG met a direction of non-positive curvature (dᵀHd = {curvature:.3g}) after "
                f"{iterations} iterations: the inner Hessian is not positive definite at params; "
                f"add damping or train the inner problem closer to a minimum",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        step = rs / curvature
        x = [xi + step * di for xi, di in zip(x, d)]
        r = [ri - step * hi for ri, hi in zip(r, hd)]
        rs_new = float(_dot(r, r))
        d = [ri + (rs_new / rs) * di for ri, di in zip(r, d)]
        rs = rs_new
        iterations += 1
    return x, iterations


def implicit_hypergradient(
    inner_loss: Callable[[], Tensor],
    outer_loss: Callable[[], Tensor],
    params: Sequence[Tensor],
    meta_params: Sequence[Tensor],
    *,
    method: Literal["neumann", "cg"] = "neumann",
    terms: int = 15,
    alpha: float = 0.01,
    cg_tol: float = 1e-10,
    damping: float = 0.0,
) -> HypergradResult:
    """Hypergradient dM/dω at an (approximate) inner optimum by the implicit function theorem.

    dM/dω = ∂M/∂ω − (∂²L/∂ω∂θ) [∂²L/∂θ∂θ + δI]⁻¹ ∂M/∂θ, with the inverse-Hessian-vector product
    from Hessian-vector products only.

    Args:
        inner_loss: closure returning the scalar inner loss L(θ, ω) computed from the current
            ``params`` and ``meta_params`` tensors (e.g. the training loss under a learned loss
            function). Called once.
        outer_loss: closure returning the scalar outer objective M(θ) (it may also use ω: that
            gives the direct term). Called once.
        params: the inner parameters θ (requires_grad), at or near argmin_θ L.
        meta_params: the meta-parameters ω (requires_grad).
        method: "neumann" (truncated Neumann series, thesis Alg 8) or "cg" (conjugate gradients).
        terms: Neumann terms J, or the maximum number of CG iterations.
        alpha: Neumann step; the series converges when 0 < alpha·λ < 2 for all eigenvalues λ of
            the (damped) Hessian. Use the inner learning rate or ~1/λ_max. Ignored by "cg".
        cg_tol: CG stops when ‖residual‖ ≤ cg_tol·‖∂M/∂θ‖.
        damping: δ ≥ 0 added to the Hessian's diagonal (regularises near-singular or
            indefinite Hessians, at the price of bias).

    Returns:
        A :class:`HypergradResult`; ``.grads`` holds dM/dω shaped like ``meta_params``.

    Memory is that of one double-backward graph of L, independent of how θ was trained.
    """
    if method not in ALLOWED_METHODS:
        raise ValueError(f"method must be one of {list(ALLOWED_METHODS)}, got {method!r}")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
        raise ValueError(f"terms must be a non-negative int, got {terms!r}")
    if method == "neumann" and not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0 for method='neumann', got {alpha!r}")
    if not (isinstance(cg_tol, (int, float)) and cg_tol >= 0):
        raise ValueError(f"cg_tol must be a number >= 0, got {cg_tol!r}")
    if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    params = _check_tensor_list("params", params, need_grad=True)
    meta_params = _check_tensor_list("meta_params", meta_params, need_grad=True)
    n_params = len(params)

    # ---- outer objective: ∂M/∂θ and the direct term ∂M/∂ω -----------------------------------
    outer = _scalar_loss("outer_loss", outer_loss())
    if outer.requires_grad:
        outer_grads = torch.autograd.grad(outer, [*params, *meta_params], allow_unused=True)
    else:  # M is constant in θ and ω: both gradients are zero
        outer_grads = (None,) * (n_params + len(meta_params))
    outer_grads = [g.detach() for g in _zeros_if_none(outer_grads, [*params, *meta_params])]
    g_theta, direct = outer_grads[:n_params], outer_grads[n_params:]

    # ---- inner objective: ∂L/∂θ with its graph kept for second derivatives ------------------
    inner = _scalar_loss("inner_loss", inner_loss())
    if not inner.requires_grad:
        raise ValueError("inner_loss() does not depend on any of params (its result does not require grad)")
    inner_grads = torch.autograd.grad(inner, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(inner_grads) if g is not None]
    if not used:
        raise ValueError("inner_loss() does not depend on any of params: no inner gradient to differentiate")
    unused = tuple(i for i in range(n_params) if inner_grads[i] is None)
    inner_grad_norm = _norm([inner_grads[i] for i in used])
    dl_dtheta = [inner_grads[i] for i in used]
    used_params = [params[i] for i in used]
    g_used = [g_theta[i] for i in used]

    hvp = _HessianVectorProduct(dl_dtheta, used_params, float(damping))
    g_norm = _norm(g_used)
    if g_norm == 0.0:
        x = [torch.zeros_like(g) for g in g_used]
        iterations, rel_residual = 0, 0.0
    else:
        if method == "neumann":
            x, iterations = _neumann_inverse_hvp(hvp, g_used, terms, float(alpha))
        else:
            x, iterations = _cg_inverse_hvp(hvp, g_used, terms, float(cg_tol))
        hx = hvp(x)
        rel_residual = _norm([h - g for h, g in zip(hx, g_used)]) / g_norm

    # ---- indirect term −(∂²L/∂ω∂θ) x: one more backward through ∂L/∂θ -----------------------
    differentiable = [k for k, g in enumerate(dl_dtheta) if g.requires_grad]
    if differentiable:
        mixed = torch.autograd.grad(
            [dl_dtheta[k] for k in differentiable],
            meta_params,
            grad_outputs=[x[k] for k in differentiable],
            allow_unused=True,
        )
    else:
        mixed = (None,) * len(meta_params)
    indirect = [-m.detach() for m in _zeros_if_none(mixed, meta_params)]
    grads = tuple(d + i for d, i in zip(direct, indirect))
    return HypergradResult(
        grads=grads,
        direct=tuple(direct),
        indirect=tuple(indirect),
        outer_grad_norm=_norm(g_theta),
        inner_grad_norm=inner_grad_norm,
        method=method,
        iterations=iterations,
        solve_rel_residual=rel_residual,
        unused_params=unused,
    )
