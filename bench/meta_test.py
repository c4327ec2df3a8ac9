"""The loss meta-test's engine: every (candidate, lr, unit) training of one meta-test in batched
passes (``metaopt_core.evaluate.units.train_units``) vs one ``fit`` per training, the same
trainings in the same run, plus the time of the demo-size meta-test's trainings.

Both modes train the same members (same initial weights, minibatches and SGD arithmetic: the
curves agree, which the bench checks) on the ARL meta-test's default tasks (digits at 8 px with
mlp2 and mlp3, the meta-test part of mnist5k at 14 px with mlp2). The speed-up is the median over
``--rounds`` of sequential / batched wall time on the same units; ``--full`` also times the demo
meta-test's whole training load (15 units x 4 candidates x 5 lrs x 12 epochs) batched.

    python bench/meta_test.py                 # 3 units per task, 2 candidates, 5 lrs, 3 epochs
    python bench/meta_test.py --full          # and the demo meta-test's trainings, timed

Ends with ``RESULT meta_test_batched_speedup=<sequential seconds / batched seconds>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TASKS = (("digits", 8, "mlp2", "all"), ("digits", 8, "mlp3", "all"), ("mnist5k", 14, "mlp2", "meta-test"))
GRID = [0.003, 0.01, 0.03, 0.1, 0.3]


def units(seeds: int) -> list:
    from metaopt_core import evaluate
    from metaopt_core.evaluate.units import Unit

    out = []
    for t, (source, size, model, part) in enumerate(TASKS):
        for seed in range(seeds):
            split = evaluate.noise_task({"source": source, "image_size": size, "noise": {"kind": "symmetric", "rate": 0.8}, "seed": 100 * t + seed,
                                         "val_fraction": 0.3, "part": part}, 0.3)  # fmt: skip
            out.append(Unit(f"{source}{size}·{model}", seed, split.train, split.select, split.test, model, 1000 + seed, 2000 + seed))
    return out


def sequential(losses: dict, unit_list: list, epochs: int, batch_size: int) -> dict:
    from metaopt_core.evaluate.units import _train_sequential

    return {(label, u, lr): _train_sequential(loss, unit_list[u], lr, epochs, batch_size, 0.9, 0.0, torch.device("cpu"))
            for label, loss in losses.items() for u in range(len(unit_list)) for lr in GRID}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="units per task in the A/B (default 3)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also time the demo meta-test's trainings (15 units, 4 candidates, 12 epochs)")
    parser.add_argument("--quick", action="store_true", help="the smallest A/B (1 unit per task, 1 round)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.epochs = 1, 1, 2
    torch.set_num_threads(args.threads)
    from metaopt_core.evaluate.units import train_units
    from metaopt_core.losses.registry import get_loss

    losses = {"ce": get_loss("ce"), "itl": get_loss("taylor:itl")}
    unit_list = units(args.seeds)
    trainings = len(losses) * len(unit_list) * len(GRID)
    ratios = []
    for round_ in range(args.rounds):
        started = time.perf_counter()
        batched = train_units(losses, unit_list, GRID, epochs=args.epochs, batch_size=64)
        batched_s = time.perf_counter() - started
        started = time.perf_counter()
        alone = sequential(losses, unit_list, args.epochs, 64)
        sequential_s = time.perf_counter() - started
        worst = max(abs(a - b) for key, curve in alone.items() for a, b in zip(curve.test, batched.curves[key].test))
        if worst > 0.01:
            raise SystemExit(f"batched and sequential curves disagree by {worst:.3f} (expected the same trainings)")
        ratios.append(sequential_s / batched_s)
        print(f"round {round_ + 1}: {trainings} trainings x {args.epochs} epochs: batched {batched_s:.1f} s, one fit each {sequential_s:.1f} s, "
              f"ratio {ratios[-1]:.2f} (curves agree within {worst:.4f})", flush=True)  # fmt: skip
    if args.full:
        demo_units = units(5)
        four = {"learned": get_loss("taylor:arl-ar-s80"), "ce": get_loss("ce"), "gce": get_loss("gce"), "sce": get_loss("sce")}
        started = time.perf_counter()
        train_units(four, demo_units, GRID, epochs=12, batch_size=64)
        print(f"demo meta-test trainings ({len(demo_units)} units x {len(four)} candidates x {len(GRID)} lrs x 12 epochs = "
              f"{len(demo_units) * len(four) * len(GRID)} trainings): {time.perf_counter() - started:.0f} s batched", flush=True)  # fmt: skip
    print(f"RESULT meta_test_batched_speedup={statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
