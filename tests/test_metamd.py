"""MetaMD's meta-learner: hypergradients (exact vs finite differences, implicit vs exact), the outer
step, checkpoints and resume, the bound of Prop 2, configs; and the quadratic task family."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from metaopt_core import exports
from metaopt_core.config import ConfigError
from metaopt_core.meta import metamd
from metaopt_core.meta.metamd import (
    Hypergradient,
    MetaMDConfig,
    MetaMDState,
    Task,
    inner_hypergrad,
    inner_hypergrads,
    outer_update,
    quadratics,
    result_of,
    task_set,
    tasks_for_step,
)
from metaopt_core.meta.metamd.analysis import agreement, generalisation_bound_terms, hypergradients_by_method
from metaopt_core.meta.run_config import load_config
from metaopt_core.optim import DenseBregman, DiagonalBregman, KroneckerBregman, MirrorDescent, load_divergence


def meta_train(config: MetaMDConfig) -> metamd.MetaMDResult:
    """The outer steps of ``config`` through the pure steps (the driver's loop without checkpoints)."""
    state = MetaMDState.initial(config)
    while not state.finished:
        state = outer_update(state, inner_hypergrads(state))
    return result_of(state)


def quad_config(**changes) -> MetaMDConfig:
    doc = {
        "tasks": {"family": "quadratic", "quadratic": {"meta_train": 12, "held_out": 8, "max_iters": 3000}},
        "divergence": {"kind": "diagonal"},
        "inner": {"steps": 30, "lr": 0.05},
        "objective": {"kind": "trajectory"},
        "hypergrad": {"method": "forward"},
        "outer": {"lr": 0.05, "steps": 3, "tasks_per_step": 4, "clip_norm": 100.0},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            doc.setdefault(section, {})[name] = value
        else:
            doc[section] = value
    return MetaMDConfig.model_validate(doc)


def net_config(**changes) -> MetaMDConfig:
    doc = {
        "tasks": {
            "family": "rotated-domains",
            "network": {
                "data": {"source": "mnist5k", "domains": "rotated", "angles": [0, 45, 90], "max_examples": 300},
                "held_out_domains": ["rot90"],
                "model": "mlp2",
                "batch_size": 16,
                "hypergrad_examples": 32,
            },
        },
        "divergence": {"kind": "kronecker", "init_scale": 0.3},
        "inner": {"steps": 5, "lr": 0.1},
        "objective": {"kind": "trajectory"},
        "hypergrad": {"method": "unrolled"},
        "outer": {"lr": 0.05, "steps": 2, "tasks_per_step": 2},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        doc.setdefault(section, {})[name] = value
    return MetaMDConfig.model_validate(doc)


def perturbed_omega(config: MetaMDConfig, scale: float = 0.2, seed: int = 1) -> torch.Tensor:
    omega = metamd.initial_omega(config)
    generator = torch.Generator().manual_seed(seed)
    return omega + scale * torch.randn(omega.shape, generator=generator, dtype=omega.dtype)


def task_value(config: MetaMDConfig, omega: torch.Tensor, index: int) -> float:
    """The task term of the meta-objective by plain (no-graph) mirror descent: for finite differences."""
    tasks = task_set(config)
    problem = tasks.meta_train.subset([index])
    div = metamd.divergence_at(config, omega, tasks)
    theta_T, trajectory_value = metamd.quadratic_mirror_descent(config, div, problem)
    if config.objective.kind == "trajectory":
        return trajectory_value
    with torch.no_grad():
        return float(div.bregman([theta_T[0]], [problem.start]))


# ============================================================================= quadratic family


def test_quadratic_problem_formulas():
    family = quadratics.QuadraticFamily(meta_train=5, held_out=5)
    problems = quadratics.sample_problems(family, 5, seed=3)
    theta_star = problems.optimum()
    assert torch.allclose(problems.grad(theta_star), torch.zeros(5, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(problems.loss(theta_star), problems.optimal_value(), atol=1e-12)
    # Q = C C^T with C lower triangular: Q is SPD and Q_00 = C_00^2 ~ 9
    assert (problems.hessian_eigenvalues() > 0).all()
    assert ((problems.Q[:, 0, 0] - 9).abs() < 5).all()
    train, held_out = quadratics.split(family)
    assert not any(torch.equal(a, b) for a in train.Q for b in held_out.Q)


def test_iterations_to_threshold_matches_a_plain_loop():
    family = quadratics.QuadraticFamily()
    problems = quadratics.sample_problems(family, 4, seed=0)
    lr, tol = 0.05, 1e-3
    expected = []
    for i in range(4):
        Q, b = problems.Q[i].numpy(), problems.b[i].numpy()
        theta, t = np.zeros(2), 0
        while np.linalg.norm(2 * Q @ theta - b) >= tol:
            theta = theta - lr * (2 * Q @ theta - b)
            t += 1
        expected.append(t)
    assert quadratics.iterations_to_threshold(problems, "sgd", lr, tol=tol).tolist() == expected
    # mirror descent with M = I is SGD; a diverging lr is reported as not converged
    assert quadratics.iterations_to_threshold(problems, "metamd", lr, tol=tol, metric=np.eye(2)).tolist() == expected
    assert (quadratics.iterations_to_threshold(problems, "sgd", 1.0, max_iters=500) == quadratics.NOT_CONVERGED).all()


def test_tuned_lr_is_the_grid_minimum():
    family = quadratics.QuadraticFamily()
    problems = quadratics.sample_problems(family, 6, seed=1)
    best, table = quadratics.tune_lr(problems, "sgd-m", [0.005, 0.02, 0.04, 0.5], max_iters=4000)
    assert best == min(table, key=lambda lr: table[lr]["mean"])
    assert table[0.5]["converged"] == 0.0  # heavy ball is unstable when lr * 18 > 2 (1 + momentum)
    assert best in (0.02, 0.04)


# ============================================================================= hypergradients


@pytest.mark.parametrize("kind", ["diagonal", "dense", "kronecker"])
@pytest.mark.parametrize("objective", ["trajectory", "bound"])
def test_forward_mode_hypergradient_matches_finite_differences(kind, objective):
    config = quad_config(divergence={"kind": kind}, objective={"kind": objective, "k": 0.0})
    omega = perturbed_omega(config)
    grads = hypergradients_by_method(config, omega, Task("quadratic", 2), ("forward", "forward_generic", "unrolled"))
    h = 1e-6
    fd = torch.zeros_like(omega)
    for k in range(omega.numel()):
        step = torch.zeros_like(omega)
        step[k] = h
        fd[k] = (task_value(config, omega + step, 2) - task_value(config, omega - step, 2)) / (2 * h)
    assert torch.allclose(grads["forward"], fd, rtol=1e-5, atol=1e-7), (grads["forward"], fd)
    # the closed-form recursion (eqs C.14-C.17), the library's forward mode and reverse mode agree
    assert torch.allclose(grads["forward_generic"], grads["forward"], rtol=1e-10, atol=1e-12)
    assert torch.allclose(grads["unrolled"], grads["forward"], rtol=1e-10, atol=1e-12)


def test_implicit_hypergradient_is_minus_the_direct_bregman_gradient():
    """Eq 5.28 on the rephrased problem with mu = 0: the inner Hessian is M and the mixed derivative
    d(M d)/d omega, so the indirect term is -2 x the direct one whatever the task (docstring)."""
    config = quad_config(objective={"kind": "bound", "k": 0.0}, hypergrad={"method": "implicit", "solver": "cg", "terms": 10})
    omega = perturbed_omega(config)
    grads = hypergradients_by_method(config, omega, Task("quadratic", 0), ("implicit",))
    assert torch.allclose(grads["implicit_indirect"], -2 * grads["implicit_direct"], rtol=1e-8, atol=1e-12)
    assert torch.allclose(grads["implicit"], -grads["implicit_direct"], rtol=1e-8, atol=1e-12)
    assert torch.allclose(grads["implicit_thesis_literal"], 2 * grads["implicit_direct"], rtol=1e-8, atol=1e-12)


def test_implicit_with_constraint_weight_agrees_with_exact_at_convergence():
    """With the inner run converged the exact hypergradient of B(theta_T||theta_1) is its direct term
    (theta* does not depend on M); the constraint-weighted IFT gets there, mu = 0 gets the opposite."""
    config = quad_config(
        objective={"kind": "bound", "k": 0.0}, inner={"steps": 3000, "lr": 0.05},
        hypergrad={"method": "implicit", "solver": "cg", "terms": 10},
    )  # fmt: skip
    omega = perturbed_omega(config, scale=0.1)
    grads = hypergradients_by_method(config, omega, Task("quadratic", 1), ("forward", "implicit"), constraint_weights=(1e6,))
    exact = grads["forward"]
    assert agreement(grads["implicit_mu=1e+06"], exact)["rel_error"] < 1e-3
    assert agreement(grads["implicit_direct"], exact)["rel_error"] < 1e-3
    assert agreement(grads["implicit"], exact)["cosine"] < -0.999


def test_network_hypergradient_matches_finite_differences_and_mirror_descent_training():
    config = net_config(divergence__kind="kronecker", inner__steps=4, inner__lr=0.5, inner__weight_decay=0.01)
    tasks = task_set(config)
    state = MetaMDState.initial(config, tasks)
    task = tasks_for_step(state, tasks)[0]
    div = metamd.divergence_at(config, state.omega, tasks)
    concrete = metamd.network_task(config, tasks, task)
    reverse, value, _ = metamd.network_hypergradient(config, div, concrete, "unrolled")

    def objective(omega):
        return metamd.network_hypergradient(config, metamd.divergence_at(config, omega, tasks), concrete, "unrolled")[1]

    # float32 network: central differences along the gradient's own direction (largest signal)
    direction = reverse / reverse.norm()
    h = 0.005
    fd = (objective(state.omega + h * direction) - objective(state.omega - h * direction)) / (2 * h)
    assert fd == pytest.approx(float(reverse.norm()), rel=0.01)
    # the functional inner loop of the hypergradient is MirrorDescent itself
    _, losses = metamd.train_with_mirror_descent(config, div, concrete)
    assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_network_implicit_hypergradient_end_to_end():
    """The implicit method through inner_hypergrad on a network: with mu = 0 it is -dB/domega at theta_T
    plus the k/lambda term (zero gradient for Kronecker: lambda = 1), as on quadratics."""
    config = net_config(objective__kind="bound", objective__k=0.01, hypergrad__method="implicit", inner__steps=3)
    state = MetaMDState.initial(config)
    task = tasks_for_step(state)[0]
    item = inner_hypergrad(state, task)
    assert not item.diverged and item.metrics["solve_rel_residual"] < 1e-6
    parts = hypergradients_by_method(config, state.omega, task, ("implicit",))
    assert torch.allclose(item.grad, -parts["implicit_direct"], rtol=1e-4, atol=1e-7)
    assert item.value == pytest.approx(item.metrics["task_value"] + 0.01)  # k / lambda with lambda = 1


def test_forward_mode_refuses_a_large_meta_model():
    config = net_config(hypergrad__method="forward")
    state = MetaMDState.initial(config)
    with pytest.raises(ConfigError, match="hypergrad.method"):
        inner_hypergrad(state, tasks_for_step(state)[0])


# ============================================================================= outer step


def test_tasks_for_step_are_deterministic_distinct_and_never_held_out():
    config = quad_config()
    state = MetaMDState.initial(config)
    first = tasks_for_step(state)
    assert first == tasks_for_step(MetaMDState.initial(config))
    assert len({t.key for t in first}) == config.outer.tasks_per_step
    net = net_config(outer__tasks_per_step=5)
    net_state = MetaMDState.initial(net)
    domains = [t.domain for t in tasks_for_step(net_state)]
    assert "mnist5k-rot90" not in domains and set(domains) == {"mnist5k-rot0", "mnist5k-rot45"}
    with pytest.raises(ValueError, match="held out"):
        inner_hypergrad(net_state, Task("domain", 0, "mnist5k-rot90", 1, 2))


def test_batched_and_single_task_hypergradients_agree():
    config = quad_config()
    state = MetaMDState.initial(config)
    batched = inner_hypergrads(state)
    for item in batched:
        single = inner_hypergrad(state, item.task)
        assert torch.allclose(single.grad, item.grad, rtol=1e-12, atol=1e-14)
        assert single.value == pytest.approx(item.value, rel=1e-12)
    # the per-task path through the library's forward mode gives the same numbers
    config_u = quad_config(hypergrad={"method": "unrolled"})
    for item, other in zip(batched, inner_hypergrads(MetaMDState.initial(config_u))):
        assert torch.allclose(item.grad, other.grad, rtol=1e-9, atol=1e-12)


def test_outer_update_checks_its_inputs_and_is_order_invariant(tmp_path):
    config = quad_config()
    state = MetaMDState.initial(config)
    grads = inner_hypergrads(state)
    a = outer_update(state, grads)
    b = outer_update(state, list(reversed(grads)))
    assert torch.equal(a.omega, b.omega) and a.step == 1 and state.step == 0
    assert not torch.equal(a.omega, state.omega)
    with pytest.raises(ValueError, match="needs exactly"):
        outer_update(state, grads[:-1])
    with pytest.raises(ValueError, match="from step 0"):
        outer_update(a, inner_hypergrads(a)[:1] + grads[1:])
    # a hypergradient travels through JSON (a part.json of the pipeline's fan-in) unchanged
    loaded = Hypergradient.from_dict(json.loads(json.dumps(grads[0].to_dict())))
    assert torch.equal(loaded.grad, grads[0].grad) and loaded.task == grads[0].task
    assert torch.equal(outer_update(state, [loaded, *grads[1:]]).omega, a.omega)


def test_outer_adam_step_is_torch_adam():
    config = quad_config(divergence={"kind": "dense"})
    state = MetaMDState.initial(config)
    reference = torch.nn.Parameter(state.omega.clone())
    adam = torch.optim.Adam([reference], lr=config.outer.lr)
    for _ in range(config.outer.steps):
        grads = inner_hypergrads(state)
        reference.grad = torch.stack([torch.clamp_max(g.grad.norm(), 100.0) / g.grad.norm() * g.grad for g in grads]).mean(0)
        adam.step()
        state = outer_update(state, grads)
        assert torch.allclose(state.omega, reference.detach(), rtol=1e-12, atol=1e-14)


def test_tiny_meta_training_lowers_the_meta_objective():
    config = quad_config(outer={"lr": 0.05, "steps": 40, "tasks_per_step": 6, "clip_norm": 100.0})
    before = float(np.mean([task_value(config, metamd.initial_omega(config), i) for i in range(12)]))
    result = meta_train(config)
    after = float(np.mean([task_value(config, result.state.omega, i) for i in range(12)]))
    assert after < 0.5 * before
    # faster on held-out problems too
    tasks = task_set(config)
    sgd = quadratics.iterations_to_threshold(tasks.held_out, "sgd", config.inner.lr, max_iters=3000)
    learned = quadratics.iterations_to_threshold(tasks.held_out, "metamd", config.inner.lr, max_iters=3000,
                                                 metric=result.divergence.to_dense().detach())  # fmt: skip
    assert np.median(np.where(learned < 0, 3000, learned)) < np.median(np.where(sgd < 0, 3000, sgd))


# ============================================================================= checkpoints, result


def test_checkpoint_corruption_is_detected(tmp_path):
    state = MetaMDState.initial(quad_config())
    state.save(tmp_path)
    doc = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / doc["tensors"]).write_bytes((tmp_path / doc["tensors"]).read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="sha256"):
        MetaMDState.load(tmp_path)


def test_result_saves_a_loadable_optimiser(tmp_path):
    config = net_config(outer__steps=1)
    result = meta_train(config)
    folder = result.save(tmp_path)
    assert exports.kind_of(folder).name == "mirror-descent"
    div, manifest = exports.read(folder)
    assert manifest["lr"] == config.inner.lr and manifest["metadata"]["algorithm"] == "metamd"
    assert torch.equal(torch.cat([p.flatten() for p in div.parameters()]), result.state.omega)
    model = metamd.base_model(config, task_set(config), seed=5)
    optimizer = exports.get("mirror-descent").build(folder, model=model)
    assert optimizer.param_groups[0]["lr"] == config.inner.lr
    assert json.loads((folder / "history.json").read_text())[0]["step"] == 1


def test_monitoring_of_quadratics_uses_the_learned_metric_on_meta_train_problems_only():
    config = quad_config(evaluation={"every": 1})
    state = MetaMDState.initial(config)
    state = outer_update(state, inner_hypergrads(state))
    row = state.history[-1]
    tasks = task_set(config)
    counts = quadratics.iterations_to_threshold(tasks.meta_train, "metamd", config.inner.lr, max_iters=3000,
                                                metric=state.divergence().to_dense().detach())  # fmt: skip
    assert row["monitor_iterations_median"] == quadratics.summarise(counts, 3000)["median"]
    assert not any(key.startswith("heldout") for key in row)  # the meta-test's problems are not looked at


# ============================================================================= the bound of Prop 2


def test_generalisation_bound_terms_against_a_hand_computation():
    div = DiagonalBregman.for_shapes([("theta", (2,))], dtype=torch.float64)
    with torch.no_grad():
        div.log_scale[0].copy_(torch.tensor([math.log(0.5), math.log(2.0)]))
    # M = diag(0.5, 2): lambda = 0.5, ||M - I||_F = sqrt(0.25 + 1)
    terms = generalisation_bound_terms(div, n_tasks=100, delta=0.05, r=3.0, C=1.2, lr=0.1, steps=50, lipschitz=2.0, mean_bregman=0.8)
    assert terms["lambda"] == pytest.approx(0.5)
    assert terms["frobenius_distance"] == pytest.approx(math.sqrt(1.25))
    assert terms["constraint_holds"] is True  # 1.118 <= 1.2
    assert terms["empirical_term"] == pytest.approx(8.0)  # 0.8 / 0.1
    assert terms["optimisation_term"] == pytest.approx(0.1 * 50 * 4 / (2 * 0.5))  # 20
    assert terms["rademacher_term"] == pytest.approx(1.2 * 9 / (2 * 10))  # 0.54
    assert terms["confidence_term"] == pytest.approx(3 * 1.2 * 9 * math.sqrt(math.log(40) / 800))
    assert terms["total"] == pytest.approx(8.0 + 20.0 + 0.54 + 3 * 1.2 * 9 * math.sqrt(math.log(40) / 800))
    assert terms["rademacher_term_rederived"] == pytest.approx(1.2 * 9 / (0.1 * 10))
    assert terms["confidence_term_rederived"] == pytest.approx(3 * 2.2 * 9 / 0.2 * math.sqrt(math.log(40) / 200))
    assert generalisation_bound_terms(div, 100, 0.05, 3.0, 1.0)["constraint_holds"] is False
    assert generalisation_bound_terms(div, 100, 0.05, 3.0, 1.2)["total"] is None  # no lr/T/L/Bregman given
    kron = KroneckerBregman.for_shapes([("w", (3, 4))])
    assert generalisation_bound_terms(kron, 10, 0.1, 1.0, 0.0)["lambda"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="delta"):
        generalisation_bound_terms(div, 100, 1.5, 3.0, 1.2)
    with pytest.raises(ValueError, match="n_tasks"):
        generalisation_bound_terms(div, 0, 0.05, 3.0, 1.2)


# ============================================================================= configs


@pytest.mark.parametrize("name", ["metamd-quadratic", "metamd-demo", "metamd-paper"])
def test_shipped_configs_validate(name):
    config = load_config(f"configs/{name}.yaml")
    assert isinstance(config, MetaMDConfig) and config.name == name


@pytest.mark.parametrize(
    "change, field",
    [
        ({"tasks": {"family": "cubic"}}, "tasks.family"),
        ({"divergence": {"kind": "full"}}, "divergence.kind"),
        ({"inner": {"lr": -0.1}}, "inner.lr"),
        ({"objective": {"kind": "trajectory"}, "hypergrad": {"method": "implicit"}}, "hypergrad.method"),
        ({"tasks": {"family": "rotated-domains"}, "divergence": {"kind": "dense"}}, "divergence.kind"),
        ({"outer": {"tasks_per_step": 500}}, "outer.tasks_per_step"),
        ({"outer": {"stepz": 3}}, "outer.stepz"),
    ],
)
def test_bad_config_names_the_field(change, field, tmp_path):
    doc = {"algorithm": "metamd", **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert field in str(error.value) or field.split(".")[-1] in str(error.value)


def test_unknown_held_out_domain_is_named():
    config = net_config()
    bad = config.model_copy(
        update={"tasks": config.tasks.model_copy(update={"network": config.tasks.network.model_copy(update={"held_out_domains": ["rot33"]})})}
    )
    with pytest.raises(ConfigError, match="held_out_domains.*rot33"):
        task_set(bad)


def test_divergence_kinds_build_for_the_task_family():
    assert isinstance(metamd.build_divergence(quad_config(divergence={"kind": "dense"})), DenseBregman)
    div = metamd.build_divergence(net_config())
    assert isinstance(div, KroneckerBregman) and div.param_shapes[0] == torch.Size([256, 784])
    # the Kronecker factors start off zero (a = b = 0 is stationary), with norm ~ init_scale
    omega = metamd.initial_omega(net_config())
    assert 0 < float(omega.abs().max()) < 1.0
