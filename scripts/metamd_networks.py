"""MetaMD on networks (thesis section 5.6.2, Table 5.1 in miniature): RotatedMNIST from the 5,000-image
MNIST subset, an MLP, leave-one-domain-out.

    # 1. meta-train a divergence on the meta-train domains (checkpointed; rerun to resume)
    python scripts/metamd_networks.py train --config configs/metamd-demo.yaml --out runs/metamd-demo

    # 2. held-out domains: MetaMD vs SGD, SGD-M, Adam, RMSprop (lrs tuned on the meta-train domains), 3 seeds
    python scripts/metamd_networks.py evaluate --config configs/metamd-demo.yaml \\
        --divergence runs/metamd-demo/result/divergence --out runs/metamd-demo/eval --plot docs/img/metamd-networks.png

    # 3. implicit (eq 5.28) vs exact (unrolled) hypergradients on the same network tasks
    python scripts/metamd_networks.py agreement --config configs/metamd-demo.yaml --out runs/metamd-demo/agreement.json

Protocol of ``evaluate``. Every optimiser trains a fresh base model (same initial weights and the same
minibatch order per seed) for ``--steps`` steps on a domain's training split; the loss on the whole
training split is recorded every ``--every`` steps and the accuracy on the domain's validation split
(never trained on) at the end. Baseline learning rates are tuned on the *meta-train* domains (one seed
each, lowest mean final training loss; a run that diverges counts as infinitely bad), i.e. on the same
data MetaMD was meta-trained on; MetaMD uses the lr it was meta-trained with. The headline figure is
the number of steps MetaMD needs to reach SGD's final training loss (per seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metaopt_core.meta import metamd, registry, runner  # noqa: E402
from metaopt_core.meta.metamd import analysis  # noqa: E402
from metaopt_core.meta.run_config import load_config  # noqa: E402
from metaopt_core.optim import MirrorDescent, attach, load_divergence  # noqa: E402

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 2.0)
BASELINES = ("sgd", "sgd-m", "adam", "rmsprop")


def make_optimizer(name: str, params, lr: float, divergence=None) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd-m":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "metamd":
        return MirrorDescent(params, divergence, lr=lr)
    raise ValueError(f"optimizer: got {name!r}")


def train_curve(config, tasks, domain: str, optimizer: str, lr: float, seed: int, steps: int, every: int, divergence=None) -> dict:
    """Train a fresh base model on ``domain``; return the full-training-split loss every ``every``
    steps (step 0 included), the final validation accuracy and whether the run diverged."""
    train, val = tasks.data.domain(domain)
    model = metamd.base_model(config, tasks, seed=10_000 + seed)
    if divergence is not None:
        divergence = attach(divergence, model)
    opt = make_optimizer(optimizer, model.parameters(), lr, divergence)
    batches = metamd.minibatch_stream(len(train), config.tasks.network.batch_size, steps, 20_000 + seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(train.x), train.y))

    curve = [full_loss()]
    diverged = False
    for t, index in enumerate(batches, start=1):
        loss = F.cross_entropy(model(train.x[index]), train.y[index])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % every == 0:
            curve.append(full_loss())
    if diverged or not all(math.isfinite(v) for v in curve):
        curve += [float("inf")] * (steps // every + 1 - len(curve))
        diverged = True
    with torch.no_grad():
        accuracy = float((model(val.x).argmax(-1) == val.y).float().mean())
    return {"curve": curve, "val_acc": accuracy, "diverged": diverged}


def tune(config, tasks, optimizer: str, steps: int, every: int, grid=LR_GRID) -> tuple[float, dict]:
    table = {}
    for lr in grid:
        finals = [train_curve(config, tasks, d, optimizer, lr, 100 + i, steps, every)["curve"][-1] for i, d in enumerate(tasks.meta_train)]
        table[lr] = float(np.mean(finals)) if all(math.isfinite(v) for v in finals) else float("inf")
    best = min(table, key=lambda lr: table[lr])
    return best, table


def steps_to_reach(curve: list[float], target: float, every: int) -> int | None:
    for k, value in enumerate(curve):
        if value <= target:
            return k * every
    return None


def _config(args):
    """The YAML config, with ``--held-out`` replacing tasks.network.held_out_domains (another fold)."""
    config = load_config(args.config)
    if getattr(args, "held_out", None):
        network = config.tasks.network.model_copy(update={"held_out_domains": list(args.held_out)})
        config = metamd.MetaMDConfig.model_validate(config.model_copy(update={"tasks": config.tasks.model_copy(update={"network": network})}).model_dump())
    return config


def cmd_train(args) -> None:
    # one thread: on a shared 2-core machine two OpenMP threads per process slow the small
    # per-step kernels down 10x or more when the other core is busy
    torch.set_num_threads(args.threads)
    config = _config(args)
    out = Path(args.out)
    started = time.time()
    learner = registry.get("metamd")
    state, inputs = runner.train(learner, config, out / "checkpoint", on_event=lambda event: print(event.line()))
    result = metamd.result_of(state, learner.dataset(inputs))
    folder = result.save(out / "result")
    print(f"saved {folder} ({time.time() - started:.0f}s)")


def cmd_evaluate(args) -> None:
    torch.set_num_threads(args.threads)
    config = _config(args)
    tasks = metamd.task_set(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, every = args.steps, args.every
    tuned_path = out / "tuned.json"
    tuned = json.loads(tuned_path.read_text()) if tuned_path.exists() else {}
    key = f"{config.tasks.network.model}-{config.tasks.network.batch_size}-{steps}"
    for name in BASELINES:
        if f"{key}/{name}" not in tuned:
            started = time.time()
            lr, table = tune(config, tasks, name, steps, every)
            tuned[f"{key}/{name}"] = {"lr": lr, "table": {str(k): v for k, v in table.items()}}
            tuned_path.write_text(json.dumps(tuned, indent=2))
            print(f"tuned {name}: lr {lr} (mean final meta-train loss {table[lr]:.4g}; {time.time() - started:.0f}s)")
    runs = {name: (tuned[f"{key}/{name}"]["lr"], None) for name in BASELINES}
    for directory in args.divergence:
        divergence, manifest = load_divergence(directory)
        label = "metamd" if len(args.divergence) == 1 else f"metamd:{Path(directory).parent.parent.name}"
        runs[label] = (manifest["lr"] if args.metamd_lr is None else args.metamd_lr, divergence)
    results: dict = {"steps": steps, "every": every, "held_out": tasks.held_out, "lrs": {k: v[0] for k, v in runs.items()}, "runs": {}}
    for domain in tasks.held_out:
        for name, (lr, divergence) in runs.items():
            name_runs = []
            for seed in range(args.seeds):
                div = None if divergence is None else copy.deepcopy(divergence)
                name_runs.append(train_curve(config, tasks, domain, "metamd" if div is not None else name, lr, seed, steps, every, div))
            results["runs"].setdefault(domain, {})[name] = name_runs
    summary = summarise(results)
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    if args.plot:
        plot(results, args.plot)


def summarise(results: dict) -> dict:
    every = results["every"]
    out = {}
    for domain, by_name in results["runs"].items():
        sgd = by_name["sgd"]
        rows = {}
        for name, seeds in by_name.items():
            finals = [r["curve"][-1] for r in seeds]
            half = [r["curve"][len(r["curve"]) // 2] for r in seeds]
            reach = [steps_to_reach(r["curve"], s["curve"][-1], every) for r, s in zip(seeds, sgd)]
            rows[name] = {
                "final_loss_mean": float(np.mean(finals)),
                "final_loss_std": float(np.std(finals)),
                "half_loss_mean": float(np.mean(half)),
                "val_acc_mean": float(np.mean([r["val_acc"] for r in seeds])),
                "val_acc_std": float(np.std([r["val_acc"] for r in seeds])),
                "steps_to_sgd_final": reach,
                "diverged": sum(r["diverged"] for r in seeds),
            }
        out[domain] = rows
    return out


def markdown(results: dict) -> str:
    steps = results["steps"]
    lines = []
    for domain, rows in results["summary"].items():
        lines.append(f"\nheld-out domain {domain}: {steps} steps, {len(next(iter(results['runs'][domain].values())))} seeds")
        lines.append(f"| optimiser | lr | train loss @{steps // 2} | train loss @{steps} | val acc | steps to SGD's final loss (per seed) |")
        lines.append("|---|---|---|---|---|---|")
        for name, row in rows.items():
            reach = ", ".join("—" if r is None else str(r) for r in row["steps_to_sgd_final"])
            lines.append(
                f"| {name} | {results['lrs'][name]:g} | {row['half_loss_mean']:.4f} | {row['final_loss_mean']:.4f} ± {row['final_loss_std']:.4f} | "
                f"{row['val_acc_mean']:.3f} ± {row['val_acc_std']:.3f} | {reach} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["runs"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 3.6), squeeze=False)
    every = results["every"]
    for ax, domain in zip(axes[0], domains):
        for name, seeds in results["runs"][domain].items():
            curves = np.array([r["curve"] for r in seeds], dtype=float)
            x = np.arange(curves.shape[1]) * every
            ax.plot(x, np.exp(np.log(curves).mean(0)), label=f"{name} (lr {results['lrs'][name]:g})", lw=1.6 if name.startswith("metamd") else 1.0)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (whole split)")
        ax.set_title(f"held-out {domain}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def cmd_agreement(args) -> None:
    torch.set_num_threads(args.threads)
    base = load_config(args.config)
    rows = []
    for kind in args.kinds:
        for steps in args.horizons:
            config = base.model_copy(
                update={
                    "divergence": base.divergence.model_copy(update={"kind": kind}),
                    "inner": base.inner.model_copy(update={"steps": steps, "lr": args.lr}),
                    "objective": base.objective.model_copy(update={"kind": "bound"}),
                }
            )
            tasks = metamd.task_set(config)
            state = metamd.MetaMDState.initial(config, tasks)
            task = metamd.tasks_for_step(state, tasks)[0]
            grads = analysis.hypergradients_by_method(config, state.omega, task, ("unrolled", "implicit"), data=tasks, constraint_weights=args.mu)
            reference = grads["unrolled"]
            for name, value in grads.items():
                if name == "unrolled":
                    continue
                row = {"divergence": kind, "T": steps, "method": name, **analysis.agreement(value, reference),
                       "norm_ratio": float(value.norm() / reference.norm())}  # fmt: skip
                rows.append(row)
                print(f"{kind:9s} T={steps:4d} {name:28s} cosine {row['cosine']:+.4f} rel_error {row['rel_error']:.3g} norm ratio {row['norm_ratio']:.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


def cmd_bound(args) -> None:
    """Prop 2's terms for a learned network divergence, measured on the meta-train domains: T-step runs
    with the learned optimiser from fresh inits give r (largest ‖θ_T − θ_1‖, θ_T standing in for θ*),
    L (largest minibatch gradient norm met) and the mean B_φ(θ_T‖θ_1); n = outer steps x tasks per step."""
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    tasks = metamd.task_set(config)
    divergence, manifest = load_divergence(args.divergence)
    lr = manifest["lr"]
    norms, bregmans, lipschitz = [], [], 0.0
    for position, domain in enumerate(tasks.meta_train):
        train, _ = tasks.data.domain(domain)
        model = metamd.base_model(config, tasks, seed=30_000 + position)
        init = [p.detach().clone() for p in model.parameters()]
        opt = MirrorDescent(model.parameters(), attach(copy.deepcopy(divergence), model), lr=lr)
        for index in metamd.minibatch_stream(len(train), config.tasks.network.batch_size, config.inner.steps, 40_000 + position):
            loss = F.cross_entropy(model(train.x[index]), train.y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lipschitz = max(lipschitz, float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))))
            opt.step()
        final = [p.detach() for p in model.parameters()]
        norms.append(float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(final, init)))))
        with torch.no_grad():
            bregmans.append(float(divergence.bregman(final, init)))
    n = config.outer.steps * config.outer.tasks_per_step
    distance = float(divergence.frobenius_reg().detach().clamp_min(0).sqrt())
    terms = analysis.generalisation_bound_terms(divergence, n, 0.05, max(norms), math.ceil(distance), lr=lr, steps=config.inner.steps,
                                              lipschitz=lipschitz, mean_bregman=float(np.mean(bregmans)))  # fmt: skip
    terms["L"] = lipschitz
    identity = analysis.generalisation_bound_terms(metamd.build_divergence(config, tasks), n, 0.05, max(norms), 0.0, lr=lr,
                                                 steps=config.inner.steps, lipschitz=lipschitz)  # fmt: skip
    out = {"learned": terms, "M = I (same r, L; no empirical term)": identity}
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--config", required=True)
    p.add_argument("--held-out", nargs="+", default=None, help="override tasks.network.held_out_domains")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate")
    p.add_argument("--config", required=True)
    p.add_argument("--held-out", nargs="+", default=None, help="override tasks.network.held_out_domains")
    p.add_argument("--divergence", action="append", default=[], help="a saved divergence directory (repeatable)")
    p.add_argument("--metamd-lr", type=float, default=None, help="override the lr recorded in the manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default=None)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("agreement")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", nargs="+", default=["kronecker", "diagonal"])
    p.add_argument("--horizons", nargs="+", type=int, default=[20, 200])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--mu", nargs="*", type=float, default=[1.0, 100.0])
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_agreement)
    p = sub.add_parser("bound")
    p.add_argument("--config", required=True)
    p.add_argument("--divergence", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_bound)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
