"""MetaMD on the 2-D quadratics (thesis section 5.6.1, Fig 5.1/5.2): iterations to the gradient-norm
threshold on held-out problems, MetaMD vs SGD, SGD-M, Adam (each lr tuned on the meta-train problems);
the two meta-objectives at a short and a long horizon; implicit vs exact hypergradients; the terms of
the generalisation bound (Prop 2).

    python scripts/metamd_quadratics.py --config configs/metamd-quadratic.yaml --out runs/metamd-quadratics \\
        --plot docs/img/metamd-quadratics.png
    python scripts/metamd_quadratics.py --config configs/metamd-quadratic.yaml --out runs/metamd-quadratics-flat \\
        --family flat      # the flatter family of Fig 5.2 (C11 ~ N(0.1, 0.01)), max_iters 200000

Prints markdown tables; writes ``results.json`` (and the learned divergences) under ``--out``.
"""

from __future__ import annotations

import argparse
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

from metaopt_core.meta import metamd, registry, runner  # noqa: E402
from metaopt_core.meta.metamd import analysis, quadratics  # noqa: E402
from metaopt_core.meta.run_config import load_config  # noqa: E402

FAMILIES = {
    "default": {},
    "flat": {"c11": (0.1, 0.01), "max_iters": 200000},
}
VARIANTS = [  # (label, objective, T, divergence)
    ("trajectory T=50", "trajectory", 50, "diagonal"),
    ("trajectory T=300", "trajectory", 300, "diagonal"),
    ("bound T=50", "bound", 50, "diagonal"),
    ("bound T=300", "bound", 300, "diagonal"),
    ("trajectory T=50, dense M", "trajectory", 50, "dense"),
]


def meta_train(config) -> metamd.MetaMDResult:
    """MetaMD on the config's quadratics, in this process (the driver, no checkpoint kept)."""
    state, _ = runner.train(registry.get("metamd"), config)
    return metamd.result_of(state)


def variant_config(base, objective: str, steps: int, kind: str):
    return base.model_copy(
        update={
            "objective": base.objective.model_copy(update={"kind": objective}),
            "inner": base.inner.model_copy(update={"steps": steps}),
            "divergence": base.divergence.model_copy(update={"kind": kind}),
            "evaluation": base.evaluation.model_copy(update={"every": 0}),
        }
    )


def held_out_iterations(config, divergence) -> np.ndarray:
    family = config.tasks.quadratic
    tasks = metamd.task_set(config)
    with torch.no_grad():
        M = divergence.to_dense()
    return quadratics.iterations_to_threshold(tasks.held_out, "metamd", config.inner.lr, tol=family.tol, max_iters=family.max_iters, metric=M)


def agreement_rows(config, omega, label: str, tasks_checked: int = 10) -> list[dict]:
    """Implicit (eq 5.28) vs exact (forward) hypergradients of the bound's Bregman term, per task."""
    bound = config.model_copy(update={"objective": config.objective.model_copy(update={"kind": "bound", "k": 0.0, "rho": 0.0}),
                                      "hypergrad": config.hypergrad.model_copy(update={"solver": "cg", "terms": 10})})  # fmt: skip
    per_method: dict[str, list[dict]] = {}
    for index in range(tasks_checked):
        grads = analysis.hypergradients_by_method(bound, omega, metamd.Task("quadratic", index), ("forward", "unrolled", "implicit"),
                                                constraint_weights=(1.0, 1e4))  # fmt: skip
        for name, value in grads.items():
            if name != "forward":
                per_method.setdefault(name, []).append(analysis.agreement(value, grads["forward"]))
    rows = []
    for name, values in per_method.items():
        rows.append({
            "at": label, "T": config.inner.steps, "method": name,
            "cosine_mean": float(np.mean([v["cosine"] for v in values])),
            "cosine_min": float(np.min([v["cosine"] for v in values])),
            "rel_error_median": float(np.median([v["rel_error"] for v in values])),
        })  # fmt: skip
    return rows


def bound_terms(config, divergence_or_result) -> dict:
    """Prop 2's terms for the learned optimiser on the meta-train problems: r = max ‖θ_1 − θ*‖,
    C = ‖M − I‖_F (rounded up), L = the largest gradient norm met along the T-step runs,
    mean Bregman = (1/n) Σ B_φ(θ_T‖θ_1), δ = 0.05."""
    divergence = getattr(divergence_or_result, "divergence", divergence_or_result)
    tasks = metamd.task_set(config)
    problems = tasks.meta_train
    r = float((problems.optimum() - problems.start).norm(dim=-1).max())
    with torch.no_grad():
        P = torch.linalg.inv(divergence.to_dense())
        M = divergence.to_dense()
        theta = problems.start.expand(len(problems), 2).clone()
        lipschitz = float(problems.grad(theta).norm(dim=-1).max())
        for _ in range(config.inner.steps):
            g = problems.grad(theta)
            theta = theta - config.inner.lr * g @ P.T
            lipschitz = max(lipschitz, float(problems.grad(theta).norm(dim=-1).max()))
        d = theta - problems.start
        mean_bregman = float(0.5 * torch.einsum("ni,ij,nj->n", d, M, d).mean())
    distance = float(divergence.frobenius_reg().detach().clamp_min(0).sqrt())
    C = math.ceil(distance * 100) / 100
    return analysis.generalisation_bound_terms(divergence, len(problems), 0.05, r, C, lr=config.inner.lr, steps=config.inner.steps,
                                             lipschitz=lipschitz, mean_bregman=mean_bregman) | {"L": lipschitz}  # fmt: skip


def plot(config, divergence, lrs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metamd.task_set(config)
    problems = tasks.held_out
    with torch.no_grad():
        M = divergence.to_dense().numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    index = 0
    one = problems.subset([index])
    star = one.optimum()[0].numpy()
    runs = {"MetaMD": ("metamd", config.inner.lr), **{name: (key, lrs[key]) for name, key in (("SGD", "sgd"), ("SGD-M", "sgd-m"), ("Adam", "adam"))}}
    family = config.tasks.quadratic
    for name, (key, lr) in runs.items():
        count = int(quadratics.iterations_to_threshold(one, key, lr, tol=family.tol, max_iters=family.max_iters, metric=M if key == "metamd" else None)[0])
        steps = count if count >= 0 else family.max_iters
        points = quadratics.trajectory(problems, index, key, lr, steps=min(steps, 3000), metric=M if key == "metamd" else None)
        left.plot(points[:, 0], points[:, 1], ".-", ms=2, lw=0.8, label=f"{name}: {count if count >= 0 else '>' + str(family.max_iters)} it.")
        # gradient norm along the run, for the median curve on the right
    xs = np.linspace(min(-0.5, star[0] - 1), star[0] + 1, 120)
    ys = np.linspace(min(-0.5, star[1] - 1), star[1] + 1, 120)
    X, Y = np.meshgrid(xs, ys)
    Q, b = one.Q[0].numpy(), one.b[0].numpy()
    F = Q[0, 0] * X**2 + 2 * Q[0, 1] * X * Y + Q[1, 1] * Y**2 - b[0] * X - b[1] * Y
    left.contour(X, Y, F, levels=25, linewidths=0.4, colors="grey")
    left.plot(*one.start.numpy(), "o", color="green")
    left.plot(*star, "o", color="orange")
    left.set_title("held-out problem 0 (start green, minimum orange)", fontsize=8)
    left.legend(fontsize=7)
    for name, (key, lr) in runs.items():
        norms = []
        for i in range(min(20, len(problems))):
            points = quadratics.trajectory(problems, i, key, lr, steps=1000, metric=M if key == "metamd" else None)
            Qi, bi = problems.Q[i].numpy(), problems.b[i].numpy()
            norms.append(np.linalg.norm(2 * points @ Qi.T - bi, axis=1))
        right.semilogy(np.median(np.array(norms), 0), label=name, lw=1.2)
    right.axhline(family.tol, color="k", lw=0.6, ls="--")
    right.set_ylim(1e-8, None)
    right.set_xlabel("iteration")
    right.set_ylabel("median ||grad f|| (20 held-out problems)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/metamd-quadratic.yaml")
    parser.add_argument("--out", default="runs/metamd-quadratics")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="default")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--variants", nargs="*", default=None, help="labels of VARIANTS to run (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="meta-training seeds for the config's own variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_config(args.config)
    if FAMILIES[args.family]:
        base = base.model_copy(update={"tasks": base.tasks.model_copy(update={"quadratic": base.tasks.quadratic.model_copy(update=FAMILIES[args.family])})})
    family = base.tasks.quadratic
    tasks = metamd.task_set(base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"family": family.model_dump(mode="json"), "baselines": {}, "metamd": {}, "agreement": []}

    eig = tasks.meta_train.hessian_eigenvalues()
    print(
        f"meta-train Hessian eigenvalues: median {eig[:, 0].median():.3g} / {eig[:, 1].median():.3g} (condition {float((eig[:, 1] / eig[:, 0]).median()):.0f})"
    )
    lrs = {}
    for name in ("sgd", "sgd-m", "adam"):
        started = time.time()
        lr, table = quadratics.tune_lr(tasks.meta_train, name, tol=family.tol, max_iters=family.max_iters)
        counts = quadratics.iterations_to_threshold(tasks.held_out, name, lr, tol=family.tol, max_iters=family.max_iters)
        lrs[name] = lr
        results["baselines"][name] = {"lr": lr, "meta_train": table[lr], "held_out": quadratics.summarise(counts, family.max_iters)}
        print(f"{name}: lr {lr:.4g} held-out {results['baselines'][name]['held_out']} ({time.time() - started:.0f}s)")

    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    learned = {}
    for label, objective, steps, kind in variants:
        config = variant_config(base, objective, steps, kind)
        started = time.time()
        result = meta_train(config)
        result.save(out / label.replace(" ", "_").replace(",", "").replace("=", ""))
        counts = held_out_iterations(config, result.divergence)
        summary = quadratics.summarise(counts, family.max_iters)
        with torch.no_grad():
            M = result.divergence.to_dense().tolist()
        results["metamd"][label] = {"held_out": summary, "M": M, "seconds": time.time() - started,
                                    "objective_first": result.history[0]["objective"], "objective_last": result.history[-1]["objective"]}  # fmt: skip
        learned[label] = (config, result)
        print(f"MetaMD {label}: held-out {summary} M {np.round(M, 4).tolist()} ({time.time() - started:.0f}s)")

    # implicit vs exact, at the start (M = I) and at the learned M of the bound variants
    for label in ("bound T=50", "bound T=300"):
        if label in learned:
            config, result = learned[label]
            results["agreement"] += agreement_rows(config, metamd.initial_omega(config), "M = I")
            results["agreement"] += agreement_rows(config, result.state.omega, "learned M")

    default_label = next((v[0] for v in variants if v[1] == base.objective.kind and v[2] == base.inner.steps and v[3] == base.divergence.kind), None)
    if default_label is not None:
        config, result = learned[default_label]
        results["seeds"] = {}
        for seed in range(args.seeds):
            seeded = config.model_copy(update={"seed": seed})
            divergence = result.divergence if seed == config.seed else meta_train(seeded).divergence
            results["seeds"][seed] = quadratics.summarise(held_out_iterations(seeded, divergence), family.max_iters)
            print(f"MetaMD {default_label}, meta-training seed {seed}: held-out {results['seeds'][seed]}")
        results["bound_terms"] = {default_label: bound_terms(config, result.divergence),
                                  "M = I (SGD at the same lr)": bound_terms(config, metamd.build_divergence(config))}  # fmt: skip
        if "bound T=300" in learned:
            results["bound_terms"]["bound T=300"] = bound_terms(*learned["bound T=300"])
        if args.plot:
            plot(config, result.divergence, lrs, args.plot)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print("\n| optimiser | lr | held-out iterations median | mean | converged |")
    print("|---|---|---|---|---|")
    for name, row in results["baselines"].items():
        h = row["held_out"]
        print(f"| {name} | {row['lr']:.3g} | {h['median']:.0f} | {h['mean']:.1f} | {h['converged']:.0%} |")
    for label, row in results["metamd"].items():
        h = row["held_out"]
        print(f"| MetaMD, {label} | {base.inner.lr:g} | {h['median']:.0f} | {h['mean']:.1f} | {h['converged']:.0%} |")
    if results["agreement"]:
        print("\n| at | T | method | cosine to exact (mean, min over tasks) | rel. error (median) |")
        print("|---|---|---|---|---|")
        for row in results["agreement"]:
            print(f"| {row['at']} | {row['T']} | {row['method']} | {row['cosine_mean']:+.4f}, {row['cosine_min']:+.4f} | {row['rel_error_median']:.3g} |")
    if "bound_terms" in results:
        keys = ["lambda", "frobenius_distance", "C", "r", "L", "empirical_term", "optimisation_term", "rademacher_term",
                "confidence_term", "total", "rademacher_term_rederived", "confidence_term_rederived", "total_rederived"]  # fmt: skip
        names = list(results["bound_terms"])
        print(f"\n| term (n = {family.meta_train}, δ = 0.05) | {' | '.join(names)} |")
        print("|---|" + "---|" * len(names))
        for key in keys:
            print(f"| {key} | " + " | ".join(f"{results['bound_terms'][n][key]:.4g}" for n in names) + " |")


if __name__ == "__main__":
    main()
