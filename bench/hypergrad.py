"""Benchmark: implicit (IFT, Neumann) vs unrolled (reverse-mode) hypergradient cost as T grows.

Problem: an MLP (32-64-10, tanh) trained full-batch by SGD for T steps on 512 synthetic examples
with a learnable per-example loss-weight vector ω (512 meta-parameters); outer objective =
validation cross-entropy. Both hypergradients start from the same initial weights:

* implicit: T plain SGD steps (no graph), then one Neumann hypergradient (J = 15, α = lr);
* unrolled: the same T steps recorded with create_graph=True, then one backward pass.

Every (method, T) runs in its own subprocess so that its peak memory is its own: peak RSS
increase over the process's level just before the measured section (CPU, via
resource.getrusage), or torch.cuda.max_memory_allocated (CUDA). Times are the best of
``--repeats`` runs in that subprocess.

Reported ratios (unrolled ÷ implicit, measured in this run):
* end-to-end: unrolled total ÷ (plain training + implicit hypergradient) — what a meta-step costs;
* hypergradient-only: unrolled total ÷ the implicit hypergradient alone (training excluded) —
  the implicit part is flat in T, the unrolled one grows with T.

The final line is ``RESULT hypergrad_unrolled_over_implicit_time_T1000=<end-to-end ratio at the
largest T>`` (T = 1000 unless --quick). ``main(argv)`` is the entry point; further benchmark
sections (e.g. ITL vs CMA-ES) can be added as functions called from it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metaopt_core.hypergrad import implicit_hypergradient, unrolled_hypergradient  # noqa: E402

N_TRAIN, N_VAL, D_IN, HIDDEN, CLASSES = 512, 512, 32, 64, 10
LR, WEIGHT_DECAY, NEUMANN_TERMS = 0.1, 1e-3, 15


class WeightedLossMLP:
    """Synthetic classification task with per-example loss weights 2σ(ω_i) as meta-parameters."""

    def __init__(self, device: torch.device, seed: int = 0, n_train: int = N_TRAIN, hidden: int = HIDDEN):
        g = torch.Generator().manual_seed(seed)
        teacher = torch.randn(D_IN, CLASSES, generator=g)
        x = torch.randn(n_train + N_VAL, D_IN, generator=g)
        y = (x @ teacher).argmax(1)
        noisy = torch.rand(n_train, generator=g) < 0.3
        y_train = torch.where(noisy, (y[:n_train] + 1) % CLASSES, y[:n_train])
        self.x_train, self.y_train = x[:n_train].to(device), y_train.to(device)
        self.x_val, self.y_val = x[n_train:].to(device), y[n_train:].to(device)
        self.omega = torch.zeros(n_train, device=device, requires_grad=True)
        self.init = [
            (torch.randn(D_IN, hidden, generator=g) / D_IN**0.5).to(device),
            torch.zeros(hidden, device=device),
            (torch.randn(hidden, CLASSES, generator=g) / hidden**0.5).to(device),
            torch.zeros(CLASSES, device=device),
        ]

    @staticmethod
    def logits(p: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ p[0] + p[1]) @ p[2] + p[3]

    def inner(self, p: Sequence[torch.Tensor], step: int = 0) -> torch.Tensor:
        ce = F.cross_entropy(self.logits(p, self.x_train), self.y_train, reduction="none")
        return (2 * torch.sigmoid(self.omega) * ce).mean() + 0.5 * WEIGHT_DECAY * sum((q**2).sum() for q in p)

    def outer(self, p: Sequence[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(p, self.x_val), self.y_val)

    def train(self, steps: int) -> list[torch.Tensor]:
        params = [q.clone().requires_grad_(True) for q in self.init]
        for t in range(steps):
            grads = torch.autograd.grad(self.inner(params, t), params)
            with torch.no_grad():
                for q, g in zip(params, grads):
                    q.sub_(LR * g)
        return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _setup(device_name: str, threads: int) -> tuple[torch.device, WeightedLossMLP]:
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    problem = WeightedLossMLP(device)
    _warm_up(device)
    _sync(device)
    return device, problem


def _warm_up(device: torch.device) -> None:
    """Run both hypergradients on a tiny copy of the problem (same code paths, lazy initialisation
    done) so that it neither raises the memory high-water mark nor pre-allocates the measured footprint."""
    tiny = WeightedLossMLP(device, n_train=8, hidden=4)
    warm = tiny.train(2)
    implicit_hypergradient(lambda: tiny.inner(warm), lambda: tiny.outer(warm), warm, [tiny.omega], terms=2, alpha=LR)
    unrolled_hypergradient(tiny.init, tiny.inner, tiny.outer, [tiny.omega], steps=2, lr=LR)


def _run_implicit(problem: WeightedLossMLP, steps: int, device: torch.device):
    """Plain training, then one Neumann hypergradient; returns (train s, hypergrad s, result)."""
    start = time.perf_counter()
    params = problem.train(steps)
    _sync(device)
    mid = time.perf_counter()
    result = implicit_hypergradient(
        lambda: problem.inner(params),
        lambda: problem.outer(params),
        params,
        [problem.omega],
        method="neumann",
        terms=NEUMANN_TERMS,
        alpha=LR,
    )
    _sync(device)
    return mid - start, time.perf_counter() - mid, result


def _run_unrolled(problem: WeightedLossMLP, steps: int, device: torch.device):
    """Training recorded with create_graph, then one backward; returns (seconds, dM/dω)."""
    start = time.perf_counter()
    (hypergrad,) = unrolled_hypergradient(problem.init, problem.inner, problem.outer, [problem.omega], steps=steps, lr=LR)
    _sync(device)
    return time.perf_counter() - start, hypergrad


def memory_worker(method: str, steps: int, device_name: str, threads: int, save_to: str | None) -> dict:
    """One run of one method in this (fresh) process: peak memory above the level before it."""
    device, problem = _setup(device_name, threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_bytes(device)
    inner_grad_norm = float("nan")
    if method == "implicit":
        _, _, result = _run_implicit(problem, steps, device)
        hypergrad, inner_grad_norm = result.grads[0], result.inner_grad_norm
    elif method == "unrolled":
        _, hypergrad = _run_unrolled(problem, steps, device)
    else:
        raise ValueError(f"method must be 'implicit' or 'unrolled', got {method!r}")
    peak_delta = max(0, _peak_bytes(device) - base)
    if save_to:
        torch.save(hypergrad.detach().cpu(), save_to)
    return {"method": method, "steps": steps, "peak_mem_mb": peak_delta / 2**20, "inner_grad_norm": inner_grad_norm}


def timing_worker(steps: int, repeats: int, device_name: str, threads: int) -> dict:
    """Both methods alternately, ``repeats`` times, in one process: paired timings see the same
    machine load, so their ratios are steadier than separately measured times."""
    device, problem = _setup(device_name, threads)
    train_s, implicit_s, unrolled_s = [], [], []
    for _ in range(repeats):
        t_train, t_hyper, _ = _run_implicit(problem, steps, device)
        t_unrolled, _ = _run_unrolled(problem, steps, device)
        train_s.append(t_train)
        implicit_s.append(t_hyper)
        unrolled_s.append(t_unrolled)
    return {"steps": steps, "train_s": train_s, "implicit_s": implicit_s, "unrolled_s": unrolled_s}


def _subprocess(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {args} printed no result:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def bench_implicit_vs_unrolled(steps_list: Sequence[int], repeats: int, device: str, threads: int) -> dict[int, dict]:
    """Time and peak memory of both hypergradients for each T; prints a table, returns rows.

    Per T: one timing subprocess (methods alternated, ``repeats`` pairs; times are the minimum,
    ratios the median of the per-pair ratios) and one memory subprocess per method.
    """
    common = ["--device", device, "--threads", str(threads)]
    rows: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in steps_list:
            paths = {m: os.path.join(tmp, f"{m}_{steps}.pt") for m in ("implicit", "unrolled")}
            mem = {
                m: _subprocess(["--worker", "memory", "--method", m, "--steps", str(steps), "--save-to", paths[m], *common]) for m in ("implicit", "unrolled")
            }
            timing = _subprocess(["--worker", "timing", "--steps", str(steps), "--repeats", str(repeats), *common])
            g_imp, g_unr = torch.load(paths["implicit"]), torch.load(paths["unrolled"])
            tr, hg, un = timing["train_s"], timing["implicit_s"], timing["unrolled_s"]
            rows[steps] = {
                "train_s": min(tr),
                "implicit_s": min(hg),
                "implicit_total_s": min(a + b for a, b in zip(tr, hg)),
                "unrolled_s": min(un),
                "ratio_e2e": statistics.median(u / (a + b) for a, b, u in zip(tr, hg, un)),
                "ratio_hg_only": statistics.median(u / b for b, u in zip(hg, un)),
                "implicit_mem_mb": mem["implicit"]["peak_mem_mb"],
                "unrolled_mem_mb": mem["unrolled"]["peak_mem_mb"],
                "cosine": float(F.cosine_similarity(g_imp, g_unr, dim=0)),
                "inner_grad_norm": mem["implicit"]["inner_grad_norm"],
            }
    mem_label = "peak GPU MiB" if device.startswith("cuda") else "peak ΔRSS MiB"
    print(
        f"\nImplicit (Neumann J={NEUMANN_TERMS}, α=lr) vs unrolled hypergradient: MLP {D_IN}-{HIDDEN}-{CLASSES} tanh, "
        f"{N_TRAIN} examples full-batch, |ω|={N_TRAIN} loss weights, SGD lr {LR}, device={device}, "
        f"threads={threads or torch.get_num_threads()}, {repeats} paired repeats"
    )
    header = (
        f"{'T':>6} | {'train s':>8} | {'IFT hg s':>8} | {'train+IFT s':>11} | {'unrolled s':>10} | "
        f"{'ratio e2e':>9} | {'ratio hg-only':>13} | {'IFT ' + mem_label:>18} | {'unr ' + mem_label:>18} | "
        f"{'mem ratio':>9} | {'cos(IFT,unr)':>12} | {'‖∂L/∂θ‖':>9}"
    )
    print(header)
    print("-" * len(header))
    for steps, r in rows.items():
        mem_ratio = r["unrolled_mem_mb"] / max(r["implicit_mem_mb"], 1e-3)
        print(
            f"{steps:>6} | {r['train_s']:>8.3f} | {r['implicit_s']:>8.3f} | {r['implicit_total_s']:>11.3f} | "
            f"{r['unrolled_s']:>10.3f} | {r['ratio_e2e']:>9.2f} | {r['ratio_hg_only']:>13.1f} | "
            f"{r['implicit_mem_mb']:>18.1f} | {r['unrolled_mem_mb']:>18.1f} | {mem_ratio:>9.1f} | "
            f"{r['cosine']:>12.3f} | {r['inner_grad_norm']:>9.2e}"
        )
    first, last = rows[steps_list[0]], rows[steps_list[-1]]
    print(
        f"T {steps_list[0]} -> {steps_list[-1]}: implicit hypergradient time x{last['implicit_s'] / first['implicit_s']:.2f}, "
        f"unrolled time x{last['unrolled_s'] / first['unrolled_s']:.2f}; implicit peak memory "
        f"{first['implicit_mem_mb']:.1f} -> {last['implicit_mem_mb']:.1f} MiB, unrolled "
        f"{first['unrolled_mem_mb']:.1f} -> {last['unrolled_mem_mb']:.1f} MiB"
    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python bench/hypergrad.py [--quick]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small T (20, 100) and two repeats")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="inner step counts T (default 100 1000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (0 = torch default)")
    parser.add_argument("--worker", choices=["memory", "timing"], help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["implicit", "unrolled"], help=argparse.SUPPRESS)
    parser.add_argument("--save-to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        steps = args.steps[0] if args.steps else 100
        if args.worker == "memory":
            result = memory_worker(args.method, steps, args.device, args.threads, args.save_to)
        else:
            result = timing_worker(steps, args.repeats or 1, args.device, args.threads)
        print(json.dumps(result))
        return 0

    steps_list = args.steps or ([20, 100] if args.quick else [100, 1000])
    repeats = args.repeats or (2 if args.quick else 5)
    rows = bench_implicit_vs_unrolled(steps_list, repeats, args.device, args.threads)
    last = rows[steps_list[-1]]
    print(
        f"ratios at T={steps_list[-1]} (unrolled / implicit): end-to-end {last['ratio_e2e']:.2f}x, "
        f"hypergradient-only {last['ratio_hg_only']:.1f}x, "
        f"peak memory {last['unrolled_mem_mb'] / max(last['implicit_mem_mb'], 1e-3):.1f}x"
    )
    print(f"RESULT hypergrad_unrolled_over_implicit_time_T{steps_list[-1]}={last['ratio_e2e']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
