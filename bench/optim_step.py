"""Time of one optimiser step: MirrorDescent + KroneckerBregman vs SGD, Adam and the thesis's SVD route.

Models: MLP 784-1024-256-10 and torchvision ResNet-18 (10 classes, weights=None). Every optimiser
gets the same fixed random gradients; MetaMD and the SVD route share the same non-zero random
factors a, b. The SVD route is the thesis's way (section 5.4.2): SVD of A = a a^T + I and
B = b b^T + I every step, invert through the singular values, apply B^{-1} G A^{-1}.

Timings are medians over interleaved rounds (optimisers alternate within each round, so load from
other processes hits all of them alike). On CPU (one thread by default) the measure is process CPU
time per step, which leaves out time spent preempted on a shared host; wall time is printed beside
it. On CUDA it is synchronised wall time. Ratios are against SGD measured in the same run.

    python bench/optim_step.py            # full: CPU (and CUDA when available)
    python bench/optim_step.py --quick    # fewer rounds; the ResNet-18 SVD route (minutes on CPU) skipped

Ends with ``RESULT optim_step_metamd_over_sgd_resnet18=<ratio>`` (the CPU-time figure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metaopt_core.optim import KroneckerBregman, MirrorDescent  # noqa: E402

WEIGHT_DECAY = 5e-4
LR = 1e-3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


class SVDRoute:
    """theta <- theta - lr * B^{-1} G A^{-1} with A^{-1}, B^{-1} from SVDs of the dense factors, every step."""

    def __init__(self, params: list[torch.Tensor], div: KroneckerBregman, lr: float, weight_decay: float) -> None:
        self.params, self.div, self.lr, self.weight_decay = params, div, lr, weight_decay

    @staticmethod
    def _inverse(v: torch.Tensor) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(torch.outer(v, v) + torch.eye(v.numel(), dtype=v.dtype, device=v.device))
        return Vh.T @ torch.diag(1.0 / S) @ U.T

    @torch.no_grad()
    def step(self) -> None:
        inverses: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, p in enumerate(self.params):
            block, is_bias, rows, cols = self.div._plan[i]
            if block not in inverses:
                inverses[block] = (self._inverse(self.div.a[block].detach()), self._inverse(self.div.b[block].detach()))
            A_inv, B_inv = inverses[block]
            g = p.grad + self.weight_decay * p
            if is_bias:
                step = B_inv @ g
            else:
                step = B_inv @ g.reshape(rows, cols) @ A_inv
            p.sub_(self.lr * step.reshape(p.shape))


def make_optimisers(build: Callable[[], nn.Module], device: str, with_svd: bool, compile_step: bool = False):
    """Each optimiser gets its own copy of the model, all with identical weights and gradients."""
    torch.manual_seed(0)
    base = build().to(device)
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    div = KroneckerBregman.for_model(base).to(device)
    with torch.no_grad():
        for f in div.parameters():  # non-zero factors: the full Sherman-Morrison path runs
            f.copy_(0.1 * torch.randn_like(f))

    def copy_with_grads() -> list[torch.Tensor]:
        model = build().to(device)
        model.load_state_dict(base.state_dict())
        params = list(model.parameters())
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params

    optimisers: dict[str, object] = {
        "SGD": torch.optim.SGD(copy_with_grads(), lr=LR, weight_decay=WEIGHT_DECAY),
        "Adam": torch.optim.Adam(copy_with_grads(), lr=LR, weight_decay=WEIGHT_DECAY),
        "MetaMD (Kronecker, Sherman-Morrison)": MirrorDescent(copy_with_grads(), div, lr=LR, weight_decay=WEIGHT_DECAY),
    }
    if compile_step:  # torch.compile'd update (inductor): compiled during the warm-up, not timed
        optimisers["MetaMD compiled"] = MirrorDescent(copy_with_grads(), div, lr=LR, weight_decay=WEIGHT_DECAY, compile=True)
    if with_svd:
        optimisers["SVD route (thesis)"] = SVDRoute(copy_with_grads(), div, LR, WEIGHT_DECAY)
    return optimisers


def time_steps(opt, steps: int, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per step. On CUDA the wall clock (synchronised) is the measure;
    on CPU (one thread) the process CPU time is, since it leaves out time spent preempted by other
    processes on a shared host."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def bench_model(name: str, build, device: str, rounds: int, steps: int, with_svd: bool, compile_step: bool = False) -> dict[str, float]:
    """Median seconds per step of each optimiser (CPU time on CPU, wall time on CUDA); prints a table."""
    optimisers = make_optimisers(build, device, with_svd, compile_step)
    for label, opt in optimisers.items():  # warm-up (allocator, BLAS, autotuning); the SVD route takes
        if not (label.startswith("SVD") and device == "cpu"):  # seconds per step on CPU: no warm-up needed
            time_steps(opt, 1 if label.startswith("SVD") else 2, device)
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in optimisers}
    for r in range(rounds):
        for label, opt in optimisers.items():
            if label.startswith("SVD"):
                if r == 0 or device == "cuda":  # seconds per step on CPU: one round is enough
                    samples[label].append(time_steps(opt, 1, device))
                continue
            samples[label].append(time_steps(opt, steps, device))
    measure = 0 if device == "cuda" else 1
    main_ = {label: statistics.median(s[measure] for s in v) for label, v in samples.items() if v}
    wall = {label: statistics.median(s[0] for s in v) for label, v in samples.items() if v}
    n_params = sum(p.numel() for p in build().parameters())
    kind = "wall" if device == "cuda" else "CPU"
    print(f"\n{name} on {device} ({n_params / 1e6:.2f} M parameters; medians of {rounds} interleaved rounds x {steps} steps)")
    print(f"  {'optimiser':<38}{kind + ' ms':>13}{'vs SGD':>11}{'wall ms':>13}{'vs SGD':>11}")
    for label, t in main_.items():
        print(f"  {label:<38}{t * 1e3:>13.3f}{t / main_['SGD']:>10.2f}x{wall[label] * 1e3:>13.3f}{wall[label] / wall['SGD']:>10.2f}x")
    metamd = main_["MetaMD (Kronecker, Sherman-Morrison)"]
    if "SVD route (thesis)" in main_:
        print(f"  SVD route / MetaMD: {main_['SVD route (thesis)'] / metamd:.0f}x")
    return main_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; skip the ResNet-18 SVD route on CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on shared hosts)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--compile", action="store_true", help="add MirrorDescent(compile=True) (torch.compile, inductor; slow to build)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    rounds, steps = (5, 3) if args.quick else (15, 5)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, lr {LR}, weight_decay {WEIGHT_DECAY}")

    results: dict[tuple[str, str], dict[str, float]] = {}
    for device in devices:
        results[(device, "mlp")] = bench_model("MLP 784-1024-256-10", mlp, device, rounds, steps, with_svd=True, compile_step=args.compile)
        svd_resnet = not (args.quick and device == "cpu")
        results[(device, "resnet18")] = bench_model("ResNet-18", resnet18, device, rounds, steps, with_svd=svd_resnet, compile_step=args.compile)

    device = "cpu" if "cpu" in devices else devices[0]
    r18 = results[(device, "resnet18")]
    ratio = r18["MetaMD (Kronecker, Sherman-Morrison)"] / r18["SGD"]
    print(f"\nRESULT optim_step_metamd_over_sgd_resnet18={ratio:.3f}")


if __name__ == "__main__":
    main()
