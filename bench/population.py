"""Batched vs sequential population training: P candidate losses, one epoch each, same run.

Each mode runs in its own subprocesses (``--worker``), alternating round by round (``--rounds``;
the reported speed-up is the median of the per-round ratios), so its peak memory is its own: on the CPU the
worker's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` inside it — for a
finished child the same number the parent's ``RUSAGE_CHILDREN`` would give if it were the only
child) and the RSS after set-up (imports + data), so "training adds" is the difference; on CUDA
``torch.cuda.max_memory_allocated``. A worker's time is the minimum over ``--repeats`` trainings
(fresh models each time) to damp the noise of a shared machine.
Both modes train the same members (ARL's setting: perturbed ARL presets, common random numbers),
so their accuracies must agree, which the bench checks.

    python bench/population.py                 # P = 16, mlp2 on mnist5k, batch 64, CPU, 2 threads
    python bench/population.py --P 64 --device cuda --model cnn4_gn

Ends with ``RESULT population_speedup_P<P>=<sequential seconds / batched seconds>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_now_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from metaopt_core.config import DataSpec
    from metaopt_core.data import prepare
    from metaopt_core.losses.parametric import TaylorFamily
    from metaopt_core.losses.taylor import PRESETS
    from metaopt_core.population import Member, Schedule, train_population

    data = prepare(DataSpec(source=args.source, noise={"kind": "symmetric", "rate": 0.8}, max_examples=args.max_examples))
    train, val = data.splits["train"], data.splits["val"]
    preset = torch.tensor(PRESETS["arl-ar-s80"].params)
    members = [
        Member(args.model, train, val, preset + 0.3 * torch.randn(12, generator=torch.Generator().manual_seed(i)),
               init_seed=0, data_seed=1, model_options=json.loads(args.model_options))
        for i in range(args.P)
    ]  # fmt: skip
    schedule = Schedule(lr=0.01, momentum=0.9, epochs=1, batch_size=args.batch_size, eval_batch_size=1000)
    family = TaylorFamily(normalise=True)
    cuda = args.device.startswith("cuda")
    baseline = rss_now_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, results = [], None
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = train_population(members, family, schedule, batched=args.worker == "batched", device=args.device,
                                   max_batch=args.max_batch)  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "mode": args.worker,
        "seconds": min(times),
        "all_seconds": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "setup_rss_mib": baseline,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "accuracy": [r.val_accuracy for r in results],
        "diverged": sum(r.diverged for r in results),
        "train_examples": len(train),
    }


def run_worker(mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode] + [
        f"--{name}={value}" for name, value in (
            ("P", args.P), ("model", args.model), ("model-options", args.model_options), ("source", args.source),
            ("max-examples", args.max_examples), ("batch-size", args.batch_size), ("device", args.device),
            ("threads", args.threads), ("repeats", args.repeats), ("max-batch", args.max_batch),
        ) if value is not None
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--P", type=int, default=16, help="population size (candidates trained together)")
    parser.add_argument("--model", default="mlp2", help="a VMAP_FRIENDLY model name (mlp2, mlp3, cnn4_gn, small_cnn, ...)")
    parser.add_argument("--model-options", default="{}", help="JSON kwargs for build_model, e.g. '{\"width\": 0.25}'")
    parser.add_argument("--source", default="mnist5k")
    parser.add_argument("--max-examples", type=int, default=None, help="subset of the source (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="the ARL demo's inner batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each worker")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (sequential worker, batched worker); the median ratio counts")
    parser.add_argument("--repeats", type=int, default=2, help="trainings per worker; the minimum time counts")
    parser.add_argument("--max-batch", type=int, default=None, help="members per vmapped group (default: all P at once)")
    parser.add_argument("--worker", choices=["batched", "sequential"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.P, args.repeats, args.threads, args.rounds) < 1:
        parser.error(f"--P, --rounds, --repeats and --threads must be >= 1; got {args.P}, {args.rounds}, {args.repeats}, {args.threads}")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    # alternate the modes round by round: on a shared machine the load drifts, and a ratio taken
    # within one round compares the modes under similar load
    rounds = [(run_worker("sequential", args), run_worker("batched", args)) for _ in range(args.rounds)]
    ratios = sorted(seq["seconds"] / bat["seconds"] for seq, bat in rounds)
    speedup = ratios[len(ratios) // 2]  # median over rounds
    sequential = min((seq for seq, _ in rounds), key=lambda row: row["seconds"])
    batched = min((bat for _, bat in rounds), key=lambda row: row["seconds"])
    accuracy_gap = max(abs(a - b) for seq, bat in rounds for a, b in zip(seq["accuracy"], bat["accuracy"]))
    print(f"population bench: P={args.P} x {args.model}{'' if args.model_options == '{}' else ' ' + args.model_options} on "
          f"{args.source} ({sequential['train_examples']} noisy training examples), 1 epoch, batch {args.batch_size}, "
          f"device {args.device}, {args.threads} thread(s), {args.rounds} rounds x min of {args.repeats}"
          + (f", groups of {args.max_batch}" if args.max_batch else ""))  # fmt: skip
    memory = "cuda peak MiB" if args.device.startswith("cuda") else "peak RSS MiB (training adds)"
    print(f"{'mode':<11} {'best s':>8} {'per member':>11}  {memory}   seconds per round")
    for mode, row in (("sequential", sequential), ("batched", batched)):
        if row["cuda_peak_mib"] is not None:
            mem = f"{row['cuda_peak_mib']:.0f}"
        else:
            mem = f"{row['peak_rss_mib']:.0f} ({row['peak_rss_mib'] - row['setup_rss_mib']:+.0f})"
        per_round = ", ".join(f"{(seq if mode == 'sequential' else bat)['seconds']:.2f}" for seq, bat in rounds)
        print(f"{mode:<11} {row['seconds']:>8.2f} {row['seconds'] / args.P:>11.3f}  {mem}   {per_round}")
    print(f"speed-up batched vs sequential: {speedup:.2f}x (median of per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"best vs best {sequential['seconds'] / batched['seconds']:.2f}x)")  # fmt: skip
    print(f"max |accuracy difference| between the modes: {accuracy_gap:.4f} (diverged: seq {sequential['diverged']}, batched {batched['diverged']})")
    if sequential["cuda_peak_mib"] is None:
        print(f"peak RSS ratio batched / sequential: {batched['peak_rss_mib'] / sequential['peak_rss_mib']:.2f}")
    else:
        print(f"cuda peak ratio batched / sequential: {batched['cuda_peak_mib'] / max(sequential['cuda_peak_mib'], 1e-9):.2f}")
    print(f"RESULT population_speedup_P{args.P}={speedup:.3f}")


if __name__ == "__main__":
    main()
