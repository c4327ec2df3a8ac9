"""Benchmark: one ITL outer step vs one CMA-ES (ARL) generation of population K on the same inner problem.

The thesis's claim (Fig 4.4): the implicit gradient is about K times cheaper than evolution, K the
population size, because an ITL outer step trains one model per leave-one-domain-out split while a
CMA-ES generation trains one per (candidate, split).

Inner problem (shared): RotatedMNIST from mnist5k, 6 domains, leave-one-domain-out (6 splits),
``mlp2``, SGD lr 0.01 momentum 0.9, batch 32, ``--epochs`` epochs (ITL's gradient-norm early stop
is off, so both train exactly the same number of epochs), the 4th-order monomial Taylor loss
started at the ITL preset.

* ITL outer step = ``itl.inner_hypergrads`` (6 inner trainings, batched with vmap, + 6 Neumann
  hypergradients, J = 15) + ``itl.outer_update`` (PCGrad + Adam).
* CMA-ES generation = ``arl.ask`` + ``arl.evaluate`` (K x 6 inner trainings, batched with vmap by
  ``metaopt_core.population``; fitness = mean held-out accuracy) + ``arl.tell``.
* For context, the K x 6 trainings through ITL's own batched trainer: the ratio of that to the ITL
  step counts trainings only (the two trainers' per-training speed differs).

Both are timed in this process, one after the other, best of ``--repeats``; the ratio
``CMA-ES generation time / ITL step time`` is printed with its parts, and the last line is
``RESULT itl_speedup_vs_cmaes_K8=<ratio>`` (K = ``--population``, 8 by default).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from metaopt_core.config import DataSpec  # noqa: E402
from metaopt_core.data.prepare import prepare  # noqa: E402
from metaopt_core.data.sources import ImageData  # noqa: E402
from metaopt_core.meta import arl, itl  # noqa: E402


def build_problem(max_examples: int | None):
    spec = DataSpec(source="mnist5k", domains="rotated", angles=[0, 15, 30, 45, 60, 75], max_examples=max_examples)
    return spec, prepare(spec)


def itl_config(spec: DataSpec, epochs: int, device: str) -> itl.ITLConfig:
    return itl.ITLConfig(
        data=spec, init="itl",
        inner={"model": "mlp2", "lr": 0.01, "momentum": 0.9, "batch_size": 32, "max_epochs": epochs, "grad_tol": 0.0},
        hypergrad={"method": "neumann", "terms": 15, "alpha": 0.01, "inner_examples": 512, "outer_examples": 512},
        outer={"aggregation": "pcgrad", "optimizer": "adam", "lr": 0.01, "steps": 10}, device=device,
    )  # fmt: skip


def cmaes_config(population: int, epochs: int, device: str) -> arl.ARLConfig:
    return arl.ARLConfig(
        pool={"kind": "ar", "models": [{"name": "mlp2"}], "datasets": [{"source": "mnist5k"}]},  # replaced by the DG pool below
        noise={"kind": "none", "rate": 0.0}, train={"lr": 0.01, "momentum": 0.9, "epochs": epochs, "batch_size": 32},
        population_size=population, init="itl", form="monomial", sigma0=0.3, generations=10, device=device,
    )  # fmt: skip


def leave_one_domain_out_pool(prepared) -> arl.Pool:
    """The ITL inner problem as an ARL pool: entry d trains on every domain but d, scores on d."""
    entries = []
    for held_out in prepared.domains:
        sources = [prepared.domain(name)[0] for name in prepared.domains if name != held_out]
        train = ImageData(torch.cat([s.x for s in sources]), torch.cat([s.y for s in sources]), prepared.num_classes, f"without-{held_out}")
        entries.append(arl.PoolEntry(f"mlp2@without-{held_out}", "mlp2", {}, train, prepared.domain(held_out)[1], prepared.fingerprint))
    return arl.Pool(entries)


def time_itl(config: itl.ITLConfig, prepared) -> tuple[float, float, float]:
    """(total, inner trainings, hypergradients + update) seconds of one outer step."""
    domains = itl.domain_set(config, prepared)
    state = itl.with_domains(itl.ITLState.initial(config), domains)
    jobs = [itl.make_job(config, domains, state.step, d) for d in range(len(domains.names))]
    started = time.perf_counter()
    trained = itl.train_inner(config, domains, jobs, state.omega)
    trained_at = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grads = [itl.hypergradient_of(config, domains, j, t, state.omega, state.step) for j, t in zip(jobs, trained)]
    itl.outer_update(state, grads)
    finished = time.perf_counter()
    return finished - started, trained_at - started, finished - trained_at


def time_k_trainings_itl_trainer(config: itl.ITLConfig, prepared, population: int) -> float:
    """K x m inner trainings through ITL's own batched trainer (what a generation would cost with
    the same training code; the K copies of each split get distinct seeds)."""
    domains = itl.domain_set(config, prepared)
    state = itl.ITLState.initial(config)
    jobs = [itl.make_job(config, domains, step, d) for step in range(population) for d in range(len(domains.names))]
    started = time.perf_counter()
    itl.train_inner(config, domains, jobs, state.omega)
    return time.perf_counter() - started


def time_cmaes(config: arl.ARLConfig, pool: arl.Pool) -> float:
    state = arl.ARLState.initial(config)
    started = time.perf_counter()
    candidates = arl.ask(state)
    fitness = arl.evaluate(candidates, pool)
    arl.tell(state, fitness)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=8, help="CMA-ES population K")
    parser.add_argument("--epochs", type=int, default=3, help="inner epochs (itl-demo.yaml: 3)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-examples", type=int, default=None, help="subsample mnist5k (quick runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both (same for both)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1,200 images, K as given")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.max_examples = 1, 1200
    torch.set_num_threads(args.threads)
    spec, prepared = build_problem(args.max_examples)
    pool = leave_one_domain_out_pool(prepared)
    m = len(prepared.domains)
    print(f"inner problem: RotatedMNIST (mnist5k{'' if args.max_examples is None else f', {args.max_examples} images'}), "
          f"{m} domains, leave-one-domain-out, mlp2, {args.epochs} epoch(s), batch 32; device {args.device}, "
          f"{args.threads} thread(s)")  # fmt: skip
    icfg, ccfg = itl_config(spec, args.epochs, args.device), cmaes_config(args.population, args.epochs, args.device)
    itl_times, cma_times, same_trainer_times = [], [], []
    for repeat in range(args.repeats):
        itl_times.append(time_itl(icfg, prepared))
        cma_times.append(time_cmaes(ccfg, pool))
        same_trainer_times.append(time_k_trainings_itl_trainer(icfg, prepared, args.population))
        print(f"repeat {repeat + 1}: ITL step {itl_times[-1][0]:.2f} s, CMA-ES generation {cma_times[-1]:.2f} s, "
              f"{args.population * m} trainings with ITL's trainer {same_trainer_times[-1]:.2f} s", flush=True)  # fmt: skip
    itl_total, itl_train, itl_hyper = min(itl_times, key=lambda t: t[0])
    cma, same_trainer = min(cma_times), min(same_trainer_times)
    ratio = cma / itl_total
    print(f"ITL outer step        : {itl_total:7.2f} s  ({m} inner trainings {itl_train:.2f} s + {m} hypergradients & update {itl_hyper:.2f} s)")
    print(f"CMA-ES generation K={args.population}: {cma:7.2f} s  ({args.population * m} inner trainings)")
    print(
        f"per inner training    : ITL {itl_train / m:.3f} s, CMA-ES (arl.evaluate, metaopt_core.population) {cma / (args.population * m):.3f} s, "
        f"ITL's trainer at {args.population * m} jobs {same_trainer / (args.population * m):.3f} s"
    )
    print(
        f"same-trainer ratio    : {same_trainer / itl_total:.2f}x ({args.population * m} trainings with ITL's trainer / one ITL step: "
        "the count of trainings alone, without the two trainers' speed difference)"
    )
    print(
        f"ratio CMA-ES / ITL    : {ratio:.2f}x (the thesis's claim: about K = {args.population}x; "
        f"the hypergradients cost {itl_hyper / itl_total * 100:.0f}% of the ITL step)"
    )
    print(f"RESULT itl_speedup_vs_cmaes_K{args.population}={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
