"""The distributed outer loop (metaopt_core.meta.distributed): wall time of an outer step with 1
vs 2 processes (gloo, one thread each), for an ARL generation (P = 16 candidates, mlp2) and an ITL
outer step (two leave-one-out domains, mlp2).

Each run is the real entry point (``python -m metaopt_core.meta.distributed``, under ``torchrun
--standalone`` for 2) on inputs prepared once; rank 0's ``LoopTimings`` give the time per outer
step (averaged over 3 outer steps) and the share spent in collectives (the broadcast of work + state and the gather of parts, including waiting
for the slower rank).

    python bench/distributed.py            # ARL P = 16 and ITL, 1 vs 2 processes
    python bench/distributed.py --quick    # smaller data (make bench)

Ends with ``RESULT distributed_speedup_2proc=<ratio>`` (the geometric mean of the ARL and ITL
per-step speed-ups).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


META_TEST = {"itl": {"held_out": ["rot90"]}}  # configs/itl-tiny.yaml's meta-test domain: meta-training never sees it


def configs(quick: bool) -> dict[str, dict]:
    arl = yaml.safe_load((ROOT / "configs" / "arl-tiny.yaml").read_text())
    arl.update(population_size=16, generations=3, name="arl-bench")
    arl["pool"]["datasets"][0]["max_examples"] = 600 if quick else 1500
    arl["train"]["epochs"] = 1 if quick else 2
    itl = yaml.safe_load((ROOT / "configs" / "itl-tiny.yaml").read_text())
    itl["name"] = "itl-bench"
    itl["data"]["max_examples"] = 600 if quick else 1500
    itl["inner"]["max_epochs"] = 1 if quick else 2
    itl["hypergrad"].update(terms=5, inner_examples=256, outer_examples=256)
    itl["outer"]["steps"] = 3
    return {"arl": arl, "itl": itl}


def run(name: str, workers: int, config: Path, data: Path, work: Path) -> dict:
    checkpoint, timings = work / f"{name}-{workers}-ckpt", work / f"{name}-{workers}-timings"
    args = ["-m", "metaopt_core.meta.distributed", "--learner", name, "--config", str(config), "--data", str(data),
            "--checkpoint", str(checkpoint), "--threads", "1", "--timings", str(timings)]  # fmt: skip
    command = [sys.executable, *args] if workers == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                            f"--nproc-per-node={workers}", *args]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} x{workers} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return {"rank0": json.loads(Path(f"{timings}.rank0").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from metaopt_core.meta import registry

    print(f"load before: {os.getloadavg()}", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="metaopt-bench-") as scratch:
        work = Path(scratch)
        for name, doc in configs(args.quick).items():
            learner = registry.get(name)
            config = work / f"{name}.yaml"
            config.write_text(yaml.safe_dump(doc))
            data = learner.prepare(learner.resolve_config(doc), META_TEST.get(name)).save(work / f"{name}-data")
            per_step = {}
            for workers in (1, 2):
                result = run(name, workers, config, data, work)
                t = result["rank0"]
                seconds = (t["evaluate"] + t["communication"] + t["tell"]) / t["steps"]
                per_step[workers] = seconds
                share = t["communication"] / max(t["evaluate"] + t["communication"] + t["tell"], 1e-9)
                print(f"{name} x{workers}: {t['steps']} outer steps, {seconds:.3f} s/step (evaluate {t['evaluate'] / t['steps']:.3f}, "
                      f"collectives incl. waiting {t['communication'] / t['steps']:.3f} = {100 * share:.1f}%, "
                      f"tell+checkpoint {t['tell'] / t['steps']:.3f})", flush=True)  # fmt: skip
            ratio = per_step[1] / per_step[2]
            ratios.append(ratio)
            print(f"{name}: speed-up with 2 processes {ratio:.2f}x", flush=True)
    print(f"load after: {os.getloadavg()}", flush=True)
    print(f"RESULT distributed_speedup_2proc={math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")


if __name__ == "__main__":
    main()
