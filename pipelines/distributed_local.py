"""``metaopt run LEARNER --local --workers N``: the distributed outer loop on this machine.

It runs outside ``kfp.local`` (which starts each step as one subprocess): prepare the inputs,
then ``torchrun --standalone --nproc-per-node N -m metaopt_core.meta.distributed`` (gloo, one
thread per worker), then the export. Meta-training only: no MLflow run, meta-test or registry
(the full local pipeline is ``metaopt run`` without ``--workers``). The checkpoint folder is keyed
by the configuration and data fingerprint, so running the same command again resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

WORKDIR = Path(".metaopt") / "distributed"


def torchrun_command(workers: int, *entry_args: str, max_restarts: int = 0) -> list[str]:
    """The torchrun line for ``workers`` processes on this machine (one plain process for 1)."""
    if workers == 1:
        return [sys.executable, "-m", "metaopt_core.meta.distributed", *entry_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}", f"--max-restarts={max_restarts}",
            "-m", "metaopt_core.meta.distributed", *entry_args]  # fmt: skip


def run_workers(args: argparse.Namespace, algorithms: list[str], overrides: dict[str, dict], settings: dict[str, dict | None] | None = None) -> int:
    """Meta-train each learner with ``args.workers`` torch.distributed workers; ``settings``: its
    ``--meta-test`` settings (they choose what the meta-test holds out, which meta-training then
    never reads), else the learner's defaults, as in the pipeline."""
    from metaopt_core.meta.run_config import load_config
    from pipelines.builder import default_config, learner_of

    if isinstance(args.workers, bool) or not isinstance(args.workers, int) or args.workers < 1:
        raise ValueError(f"--workers: got {args.workers!r}; allowed: an integer >= 1 (0 runs the pipeline without workers)")
    for algorithm in algorithms:
        learner = learner_of(algorithm)
        config = load_config(args.config or default_config(algorithm), overrides.get(algorithm), algorithm=algorithm)
        meta_test = (settings or {}).get(algorithm) or dict(learner.default_meta_test)
        inputs = learner.prepare(config, meta_test, progress=lambda line: print(f"[metaopt] {line}", flush=True))
        text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        key = hashlib.sha256(f"{text}\n{inputs.fingerprint}".encode()).hexdigest()[:12]
        run_dir = WORKDIR / f"{learner.name}-{key}"
        inputs.save(run_dir / "data")
        (run_dir / "config.json").write_text(text)
        entry = ["--learner", algorithm, "--config", str(run_dir / "config.json"), "--data", str(run_dir / "data"),
                 "--checkpoint", str(run_dir / "checkpoint"), "--export", str(run_dir / "learned"), "--threads", "1"]  # fmt: skip
        command = torchrun_command(args.workers, *entry)
        print(f"[metaopt] {learner.name}: {args.workers} workers: {' '.join(command)}", flush=True)
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            print(f"metaopt: error: {learner.name}: the distributed run failed (exit {done.returncode}); run the command again to resume",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"{learner.name}: learned {run_dir / 'learned'} (checkpoint {run_dir / 'checkpoint'})", flush=True)
    return 0


__all__ = ["WORKDIR", "run_workers", "torchrun_command"]
