"""Agreement of implicit hypergradients (Neumann, CG) with exact ones, for docs/details/hypergrad.md.

Uses the very problems of tests/test_hypergrad.py (loaded from that file, so the numbers here
are for the tested problems), all in float64 on CPU:

1. Ridge regression with per-feature penalties e^{ω_k} (20 features): exact hypergradient by
   autograd through the closed-form θ*(ω); Neumann with α = 1/λ_max(H), and CG, at J terms.
2. Logistic regression with per-example loss weights 2σ(ω_i) (30 examples), Newton-converged:
   reference = dense-Hessian IFT.
3. A tanh MLP 5-16-3 with per-example loss weights: implicit at θ_T vs the exact unrolled
   hypergradient through the same T SGD steps (lr 0.5).

Prints tables; the last line is ``RESULT hypergrad_neumann_cosine_J15=<ridge cosine at J=15>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from metaopt_core.hypergrad import implicit_hypergradient, unrolled_hypergradient  # noqa: E402


def _load_test_problems():
    spec = importlib.util.spec_from_file_location("_hypergrad_test_problems", REPO_ROOT / "tests" / "test_hypergrad.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def convex_tables(problems, terms_list: Sequence[int]) -> dict[tuple[str, str, int], tuple[float, float]]:
    """Cosine and relative error vs exact for both convex problems, both methods, each J."""
    out: dict[tuple[str, str, int], tuple[float, float]] = {}
    ridge = problems.Ridge()
    logistic = problems.WeightedLogistic()
    H_log = torch.autograd.functional.hessian(lambda t: logistic.inner_of(t, logistic.omega.detach()), logistic.theta.detach())
    cases = [
        ("ridge (20 features)", ridge, ridge.exact(), 1.0 / ridge.hessian_max_eig(), float(ridge.hessian_max_eig() / _min_eig_ridge(ridge))),
        (
            "logistic (30 weights)",
            logistic,
            logistic.dense_ift(),
            1.0 / float(torch.linalg.eigvalsh(H_log).max()),
            float(torch.linalg.eigvalsh(H_log).max() / torch.linalg.eigvalsh(H_log).min()),
        ),
    ]
    for name, prob, exact, alpha, kappa in cases:
        print(f"\n{name}: condition number of H = {kappa:.1f}, Neumann alpha = 1/lambda_max = {alpha:.4g}")
        print(f"{'J':>5} | {'Neumann cos':>11} | {'Neumann rel err':>15} | {'CG cos':>10} | {'CG rel err':>10} | {'CG iters':>8}")
        for terms in terms_list:
            neumann = prob.hypergrad(method="neumann", terms=terms, alpha=alpha)
            cg = prob.hypergrad(method="cg", terms=terms)
            row = []
            for method, res in (("neumann", neumann), ("cg", cg)):
                cos, rel = problems.cosine(res.grads[0], exact), problems.rel_err(res.grads[0], exact)
                out[(name, method, terms)] = (cos, rel)
                row.append((cos, rel))
            print(f"{terms:>5} | {row[0][0]:>11.6f} | {row[0][1]:>15.2e} | {row[1][0]:>10.6f} | {row[1][1]:>10.2e} | {cg.iterations:>8}")
    return out


def _min_eig_ridge(ridge) -> float:
    n = ridge.X.shape[0]
    H = 2 * (ridge.X.T @ ridge.X / n + torch.diag(ridge.omega.detach().exp()))
    return float(torch.linalg.eigvalsh(H).min())


def mlp_table(problems, steps_list: Sequence[int], lr: float = 0.5) -> None:
    """Cosine of implicit hypergradients (at θ_T) with the exact unrolled one through T steps."""
    print(f"\nMLP 5-16-3 (tanh), 40 per-example weights, SGD lr {lr}: cosine with the unrolled hypergradient")
    print(f"{'T':>5} | {'||dL/dθ||':>9} | {'λ_min(H)':>9} | {'Neumann J=15':>12} | {'Neumann J=100':>13} | {'CG J=100':>9} | {'CG J=100 δ=0.01':>15}")
    for steps in steps_list:
        prob = problems.WeightedMLP()
        unrolled = unrolled_hypergradient(prob.init, prob.inner, prob.outer, [prob.omega], steps=steps, lr=lr)[0]
        p = prob.train(steps, lr)
        flat = torch.cat([q.detach().reshape(-1) for q in p])
        shapes = [q.shape for q in p]

        def unflatten(v: torch.Tensor) -> list[torch.Tensor]:
            pieces, offset = [], 0
            for s in shapes:
                k = int(torch.Size(s).numel())
                pieces.append(v[offset : offset + k].reshape(s))
                offset += k
            return pieces

        lam_min = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda v: prob.inner(unflatten(v)), flat)).min())
        cosines, inner_norm = [], 0.0
        for kw in (dict(terms=15, alpha=lr), dict(terms=100, alpha=lr), dict(method="cg", terms=100), dict(method="cg", terms=100, damping=0.01)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # CG meets negative curvature here
                res = implicit_hypergradient(lambda: prob.inner(p), lambda: prob.outer(p), p, [prob.omega], **kw)
            cosines.append(problems.cosine(res.grads[0], unrolled))
            inner_norm = res.inner_grad_norm
        print(f"{steps:>5} | {inner_norm:>9.2e} | {lam_min:>9.2e} | {cosines[0]:>12.4f} | {cosines[1]:>13.4f} | {cosines[2]:>9.4f} | {cosines[3]:>15.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python bench/hypergrad_agreement.py [--quick] [--device cpu|cuda]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MLP only at T = 300")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="accepted like every bench's; these float64 agreement checks always run on the CPU "
        "(they measure correctness, which does not depend on the device)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.device != "cpu":
        print(f"--device {args.device}: agreement is checked in float64 on the CPU (a correctness table, not a timing)")
    torch.set_num_threads(1)  # tiny float64 problems: threads only add overhead on a shared CPU
    problems = _load_test_problems()
    results = convex_tables(problems, (5, 15, 50, 200))
    mlp_table(problems, (300,) if args.quick else (100, 300, 1000))
    cos_j15 = results[("ridge (20 features)", "neumann", 15)][0]
    print(f"RESULT hypergrad_neumann_cosine_J15={cos_j15:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
