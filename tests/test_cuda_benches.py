"""The CUDA path of every bench in bench/ (what bench/gpu.sh runs), at the smallest sizes.

Each test runs a bench script with ``--device cuda`` in a subprocess and checks that it ends with
its ``RESULT name=value`` line. They run only where torch sees a CUDA device and skip otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BENCHES = {
    "loss_cost": (["bench/loss_cost.py", "--device", "cuda", "--repeats", "5"], "taylor_over_ce_cuda_b256_c10"),
    "optim_step": (["bench/optim_step.py", "--device", "cuda", "--quick"], "optim_step_metamd_over_sgd_resnet18"),
    "population": (
        ["bench/population.py", "--device", "cuda", "--P", "4", "--max-examples", "256", "--rounds", "1", "--repeats", "1"],
        "population_speedup_P4",
    ),
    "hypergrad": (["bench/hypergrad.py", "--device", "cuda", "--steps", "5", "10", "--repeats", "1"], "hypergrad_unrolled_over_implicit_time_T10"),  # fmt: skip
    "itl_vs_cmaes": (
        ["bench/itl_vs_cmaes.py", "--device", "cuda", "--quick", "--population", "2", "--max-examples", "240"],
        "itl_speedup_vs_cmaes_K2",
    ),
    "hypergrad_agreement": (["bench/hypergrad_agreement.py", "--device", "cuda", "--quick"], "hypergrad_neumann_cosine_J15"),
}


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_runs_on_cuda(name):
    arguments, result_name = BENCHES[name]
    completed = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    last = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")][-1]
    name_value = last.removeprefix("RESULT ")
    assert name_value.split("=")[0] == result_name
    assert float(name_value.split("=")[1]) == float(name_value.split("=")[1])  # a number, not NaN


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")]).returncode == 0
