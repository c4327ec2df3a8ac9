"""Forward + backward cost of TaylorLoss against F.cross_entropy, measured in the same run.

For each device (CPU; CUDA when present) and shape (batch 256 x 10 classes, 256 x 1000) it times
``loss(logits, target).backward()`` on a leaf ``logits`` tensor (the network is left out: this is
the loss's own cost) and reports the median over many repeats, interleaving the candidates so that
load from other processes hits them alike. Variants:

- ``ce``: ``F.cross_entropy`` (the baseline of every ratio);
- ``taylor``: ``TaylorLoss.from_preset("itl")`` as built (its parameters are an ``nn.Parameter``,
  so backward also computes d loss / d params, as when the loss itself is being learned);
- ``taylor_frozen``: the same with ``requires_grad_(False)`` (training a model with a fixed loss);
- ``taylor_normalised``: frozen, with the A.3 scale normalisation recomputed on every call;
- ``taylor_soft``: frozen, one-hot float targets (the bivariate path soft labels take);
- ``floor_softmax_horner``: not a loss, a floor: softmax, centring and a degree-4 Horner evaluation
  with constant coefficients, summed (what any exact eager evaluation of a polynomial in the
  softmax must at least do, without the label handling and coefficient maps);
- ``taylor_previous``: frozen, the first implementation (coefficient grid by one-hot scatter on
  every call, nested Horner loops in d and e over the bivariate polynomial), kept here as
  ``previous_taylor_loss`` to show what the rewrite bought.

- ``taylor_compiled`` (``--compile`` only): the frozen loss through ``torch.compile`` (inductor;
  compiled once per shape before timing, the compile time is printed).

Usage: ``python bench/loss_cost.py [--repeats 400] [--threads 1] [--device auto|cpu|cuda] [--compile]``.
Last line: ``RESULT taylor_over_ce_<device>_b256_c10=<ratio>`` (the frozen loss, the common use; the
device is CPU unless ``--device cuda``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metaopt_core.losses.taylor import TaylorLoss, exponents, term_factors


def previous_taylor_loss(params: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, order: int = 4,
                         form: str = "taylor") -> torch.Tensor:  # fmt: skip
    """The first implementation of ``taylor_loss`` (mean over the batch, sum over classes)."""
    factors = torch.tensor(term_factors(order, form), dtype=params.dtype)
    index = torch.tensor([i * (order + 1) + j for i, j in exponents(order)])
    scatter = F.one_hot(index, (order + 1) ** 2).to(params.dtype)
    grid = ((params[2:] * factors) @ scatter).reshape(order + 1, order + 1)
    y = F.one_hot(target, logits.shape[-1]).to(logits.dtype) if not target.is_floating_point() else target
    d, e = torch.softmax(logits, -1) - params[0], y - params[1]
    result = torch.zeros_like(d)
    for i in range(order, 0, -1):
        inner = torch.zeros_like(e)
        for j in range(order - i, -1, -1):
            inner = inner * e + grid[i, j]
        result = (result + inner) * d
    return -result.sum(-1).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(candidates: dict, device: torch.device, repeats: int, clock: str, warmup: int = 30) -> dict[str, tuple[float, float]]:
    """(median, minimum) seconds per call of each zero-argument callable, calls interleaved
    round-robin.

    ``clock="cpu"`` reads this thread's CPU time (valid with one torch thread on CPU, where the
    autograd engine runs backward in the calling thread): on a shared machine it leaves out the
    time the process waits for a core, which wall time does not.
    """
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = timer()
            fn()
            _sync(device)
            samples[name].append(timer() - start)
    return {name: (statistics.median(values), min(values)) for name, values in samples.items()}


_FLOOR_COEFFICIENTS = tuple(torch.tensor(v) for v in (0.1, -0.2, 0.3, -0.4))


def _floor(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    a = [c.to(logits.device) for c in _FLOOR_COEFFICIENTS]
    p = torch.softmax(logits, -1) if logits.shape[-1] > 64 or logits.is_cuda else None
    if p is None:
        shifted = (logits - logits.detach().amax(-1, keepdim=True)).exp()
        d = torch.addcdiv(a[0], shifted, shifted.sum(-1, keepdim=True))
    else:
        d = p - a[0]
    r = torch.addcmul(a[2], d, a[3])
    r = torch.addcmul(a[1], r, d)
    r = torch.addcmul(a[0], r, d)
    return torch.dot(r.flatten(), d.flatten())


def build_candidates(batch: int, classes: int, device: torch.device, compile_loss: bool = False) -> dict:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(batch, classes, generator=generator)).to(device).requires_grad_(True)
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    one_hot = F.one_hot(target, classes).float()
    learnable = TaylorLoss.from_preset("itl").to(device)
    frozen = TaylorLoss.from_preset("itl").to(device).requires_grad_(False)
    normalised = TaylorLoss.from_preset("itl", normalise=True).to(device).requires_grad_(False)

    def run(loss_fn, y):
        def call():
            logits.grad = None
            loss_fn(logits, y).backward()

        return call

    candidates = {
        "ce": run(F.cross_entropy, target),
        "taylor": run(learnable, target),
        "taylor_frozen": run(frozen, target),
        "taylor_normalised": run(normalised, target),
        "taylor_soft": run(frozen, one_hot),
        "floor_softmax_horner": run(_floor, target),
        "taylor_previous": run(lambda x, y: previous_taylor_loss(frozen.params, x, y, 4, "monomial"), target),
    }
    if compile_loss:
        compiled = torch.compile(frozen)
        start = time.perf_counter()
        run(compiled, target)()
        print(f"  (torch.compile of the frozen loss, {classes} classes: {time.perf_counter() - start:.1f} s)")
        candidates["taylor_compiled"] = run(compiled, target)
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="CPU runs: thread CPU time (default; needs --threads 1) or wall time. CUDA always uses wall time.",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, and CUDA too when present")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd frozen loss (slow to build)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    headline_device = devices[0].type
    headline = None
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --threads 1 or --clock wall")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, repeats {args.repeats}, CPU clock {args.clock}")
    for device in devices:
        for batch, classes in ((256, 10), (256, 1000)):
            clock = args.clock if device.type == "cpu" else "wall"
            candidates = build_candidates(batch, classes, device, args.compile)
            times = time_candidates(candidates, device, args.repeats, clock)
            base, base_min = times["ce"]
            print(f"{device.type} batch {batch} classes {classes} ({clock} time; median, then min, per call):")
            for name, (median, fastest) in times.items():
                print(f"  {name:18s} {median * 1e6:9.1f} us  {median / base:5.2f}x   min {fastest * 1e6:9.1f} us  {fastest / base_min:5.2f}x")
            if device.type == headline_device and classes == 10:
                headline = times["taylor_frozen"][0] / base
    print(f"RESULT taylor_over_ce_{headline_device}_b256_c10={headline:.3f}")


if __name__ == "__main__":
    main()
