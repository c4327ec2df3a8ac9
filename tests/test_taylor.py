"""TaylorLoss: formula against hand-written polynomials, parameter ordering, targets, reductions, sign,
numerical safety, population/vmap form, gradients, A.3 normalisation, errors, serialisation, and
(slow) the documented preset convention on noisy mnist5k."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metaopt_core.losses.presets import PRESETS, Preset
from metaopt_core.losses.taylor import (
    DEFAULT_CLASS_REDUCTION,
    ORDERS,
    TaylorLoss,
    exponents,
    label_coefficients,
    normalisation_range,
    normalisation_scale,
    num_params,
    polynomial,
    taylor_loss,
)

DOUBLE = torch.float64


# A parameter vector with distinct, non-round values so that a swapped coefficient shows.
HAND_PARAMS = [0.3, -0.7, 1.1, -0.9, 0.5, 2.3, -1.7, 0.8, 1.3, -0.4, 0.6, -2.1]


def hand_f(p: list[float], y_hat: float, y: float, form: str) -> float:
    """THESIS-NOTES's 10 monomials in their published order, written out term by term."""
    c0, c1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11 = p
    d, e = y_hat - c0, y - c1
    if form == "taylor":  # eq 3.5: factors 1, 1/2, 1/6, 1/24, 1, 1/2, 1/2, 1/6, 1/6, 1/4
        return (t2 * d + t3 * d**2 / 2 + t4 * d**3 / 6 + t5 * d**4 / 24 + t6 * d * e + t7 * d * e**2 / 2
                + t8 * d**2 * e / 2 + t9 * d**3 * e / 6 + t10 * d * e**3 / 6 + t11 * d**2 * e**2 / 4)  # fmt: skip
    return (t2 * d + t3 * d**2 + t4 * d**3 + t5 * d**4 + t6 * d * e + t7 * d * e**2
            + t8 * d**2 * e + t9 * d**3 * e + t10 * d * e**3 + t11 * d**2 * e**2)  # fmt: skip


def reference_f(params: torch.Tensor, y_hat: torch.Tensor, y: torch.Tensor, order: int, form: str) -> torch.Tensor:
    """Naive term-by-term sum over ``exponents(order)`` (no Horner, no label trick)."""
    d, e = y_hat - params[0], y - params[1]
    out = torch.zeros_like(d)
    for k, (i, j) in enumerate(exponents(order)):
        weight = 1.0 / (math.factorial(i) * math.factorial(j)) if form == "taylor" else 1.0
        out = out + weight * params[2 + k] * d**i * e**j
    return out


def reference_loss(params, logits, target, order=4, form="taylor"):
    y = F.one_hot(target, logits.shape[-1]).to(logits.dtype) if not target.is_floating_point() else target
    return -reference_f(params, torch.softmax(logits, -1), y, order, form).sum(-1).mean()


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize("form", ["taylor", "monomial"])
@pytest.mark.parametrize("y_hat, y", [(0.2, 1.0), (0.85, 0.0), (0.0, 1.0), (1.0, 0.0), (0.4, 0.3)])
def test_polynomial_matches_hand_written_terms(form, y_hat, y):
    params = torch.tensor(HAND_PARAMS, dtype=DOUBLE)
    value = polynomial(params, torch.tensor([y_hat], dtype=DOUBLE), torch.tensor([y], dtype=DOUBLE), 4, form)
    assert value.item() == pytest.approx(hand_f(HAND_PARAMS, y_hat, y, form), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("form", ["taylor", "monomial"])
def test_loss_of_one_example_by_hand(form):
    logits = [0.5, -1.0, 2.0]
    label = 2
    exps = [math.exp(v) for v in logits]
    probs = [v / sum(exps) for v in exps]
    expected = -sum(hand_f(HAND_PARAMS, p, 1.0 if c == label else 0.0, form) for c, p in enumerate(probs))
    params = torch.tensor(HAND_PARAMS, dtype=DOUBLE)
    logits_t = torch.tensor([logits], dtype=DOUBLE)
    assert taylor_loss(params, logits_t, torch.tensor([label]), 4, form).item() == pytest.approx(expected, rel=1e-12)
    loss = TaylorLoss(HAND_PARAMS, form=form)  # module parameters are float32
    assert loss(logits_t.float(), torch.tensor([label])).item() == pytest.approx(expected, rel=1e-5)


def test_parameter_ordering_is_the_thesis_one():
    assert exponents(4) == [(1, 0), (2, 0), (3, 0), (4, 0), (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2)]
    # each coefficient multiplies its own monomial: switching on theta_k alone gives d^i e^j
    for k, (i, j) in enumerate(exponents(4)):
        params = [0.0] * 12
        params[2 + k] = 1.0
        y_hat, y = torch.tensor([0.7], dtype=DOUBLE), torch.tensor([0.4], dtype=DOUBLE)
        value = polynomial(torch.tensor(params, dtype=DOUBLE), y_hat, y, 4, "monomial").item()
        assert value == pytest.approx(0.7**i * 0.4**j), (k, i, j)


@pytest.mark.parametrize("order", ORDERS)
def test_orders_have_all_monomials_and_the_right_parameter_count(order):
    expected_count = order * (order + 1) // 2 + 2
    assert num_params(order) == expected_count == len(exponents(order)) + 2
    assert sorted(exponents(order)) == sorted((i, j) for i in range(1, order + 1) for j in range(0, order + 1 - i))
    assert len(TaylorLoss(order=order).params) == expected_count


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("form", ["taylor", "monomial"])
@pytest.mark.parametrize("classes", [7, 100])  # both hard-label layouts (few / many classes)
def test_loss_matches_term_by_term_reference(order, form, classes):
    generator = torch.Generator().manual_seed(order * 10 + classes)
    params = torch.randn(num_params(order), generator=generator, dtype=DOUBLE)
    logits = 3 * torch.randn(16, classes, generator=generator, dtype=DOUBLE)
    target = torch.randint(0, classes, (16,), generator=generator)
    soft = torch.softmax(torch.randn(16, classes, generator=generator, dtype=DOUBLE), -1)
    for t in (target, soft):
        expected = reference_loss(params, logits, t, order, form)
        assert torch.allclose(taylor_loss(params, logits, t, order, form), expected, rtol=1e-10, atol=1e-12)


def test_label_coefficients_are_the_polynomials_at_y_0_and_1():
    params = torch.tensor(HAND_PARAMS, dtype=DOUBLE)
    at_zero, increment = label_coefficients(params, 4, "taylor")
    for y_hat in (0.0, 0.3, 1.0):
        d = y_hat - HAND_PARAMS[0]
        powers = torch.tensor([d, d**2, d**3, d**4], dtype=DOUBLE)
        assert float(at_zero @ powers) == pytest.approx(hand_f(HAND_PARAMS, y_hat, 0.0, "taylor"), rel=1e-12)
        assert float((at_zero + increment) @ powers) == pytest.approx(hand_f(HAND_PARAMS, y_hat, 1.0, "taylor"), rel=1e-12)


# ----------------------------------------------------------------------------- targets, reductions, sign


@pytest.mark.parametrize("classes", [10, 100])
def test_index_and_one_hot_targets_agree(classes):
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(32, classes, generator=generator)
    target = torch.randint(0, classes, (32,), generator=generator)
    loss = TaylorLoss.from_preset("arl-ar-s80")
    one_hot = F.one_hot(target, classes).float()
    assert torch.allclose(loss(logits, target), loss(logits, one_hot), rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss(logits, target.int()), loss(logits, target))


def test_reductions_and_class_mean():
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(1), dtype=DOUBLE)
    target = torch.arange(12) % 10
    params = torch.tensor(PRESETS["itl"].params, dtype=DOUBLE)
    per_example = taylor_loss(params, logits, target, 4, "monomial", reduction="none")
    assert per_example.shape == (12,)
    assert torch.allclose(taylor_loss(params, logits, target, 4, "monomial", reduction="sum"), per_example.sum())
    assert torch.allclose(taylor_loss(params, logits, target, 4, "monomial", reduction="mean"), per_example.mean())
    class_mean = taylor_loss(params, logits, target, 4, "monomial", reduction="none", class_reduction="mean")
    assert torch.allclose(class_mean, per_example / 10)


def test_sign_convention_is_minus_sum_over_classes_mean_over_batch():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=DOUBLE)
    target = torch.tensor([0, 3, 1, 1, 2])
    params = torch.tensor(HAND_PARAMS, dtype=DOUBLE)
    f = polynomial(params, torch.softmax(logits, -1), F.one_hot(target, 4).to(DOUBLE), 4, "taylor")
    assert torch.allclose(taylor_loss(params, logits, target), -f.sum(-1).mean())
    assert TaylorLoss(HAND_PARAMS).to_dict()["sign"] == "negative-sum-over-classes"


def test_class_reduction_default_is_the_sum_by_hand():
    """The package sums over classes (not the thesis's 1/C of eqs 3.4 / 4.8; the measured reason is at
    ``DEFAULT_CLASS_REDUCTION``): one 4-class example by hand, summed and averaged."""
    assert DEFAULT_CLASS_REDUCTION == "sum"
    logits = [0.5, -1.0, 2.0, 0.1]
    exps = [math.exp(v) for v in logits]
    probs = [v / sum(exps) for v in exps]
    summed = -sum(hand_f(HAND_PARAMS, p, 1.0 if c == 1 else 0.0, "taylor") for c, p in enumerate(probs))
    x, target = torch.tensor([logits], dtype=DOUBLE), torch.tensor([1])
    assert TaylorLoss(HAND_PARAMS).double()(x, target).item() == pytest.approx(summed, rel=1e-6)  # params stored in float32
    assert TaylorLoss(HAND_PARAMS, class_reduction="mean").double()(x, target).item() == pytest.approx(summed / 4, rel=1e-6)
    assert TaylorLoss(HAND_PARAMS).to_dict()["class_reduction"] == "sum"


@pytest.mark.parametrize("classes", [5, 100])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_saturated_probabilities_give_finite_values_and_gradients(classes, preset):
    # logits +-1e3: softmax is exactly 0 or 1 in float32
    logits = torch.full((6, classes), -1e3)
    logits[:, 0] = 1e3
    logits[3:, :] *= -1
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    for t in (target, F.one_hot(target, classes).float()):
        loss = TaylorLoss.from_preset(preset, normalise=True)
        x = logits.clone().requires_grad_(True)
        value = loss(x, t)
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(x.grad).all() and torch.isfinite(loss.params.grad).all()
        expected = reference_loss(loss.params.detach().double(), logits.double(), t if not t.is_floating_point() else t.double(),
                                  4, PRESETS[preset].form) * normalisation_scale(loss.params.detach().double(), 4, PRESETS[preset].form, classes=classes)  # fmt: skip
        assert value.item() == pytest.approx(expected.item(), rel=1e-4)


# ----------------------------------------------------------------------------- population form and vmap


def _population(seed=0, members=3, batch=8, classes=6):
    generator = torch.Generator().manual_seed(seed)
    params = torch.randn(members, 12, generator=generator, dtype=DOUBLE)
    logits = torch.randn(members, batch, classes, generator=generator, dtype=DOUBLE)
    target = torch.randint(0, classes, (batch,), generator=generator)
    return params, logits, target


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("classes", [6, 80])
def test_population_block_equals_separate_calls(reduction, classes):
    params, logits, target = _population(classes=classes)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=DOUBLE)
    separate = torch.stack([taylor_loss(params[i], logits[i], target, scale=scale[i], reduction=reduction) for i in range(3)])
    assert torch.allclose(taylor_loss(params, logits, target, scale=scale, reduction=reduction), separate)
    per_member_targets = target.expand(3, -1)
    assert torch.allclose(taylor_loss(params, logits, per_member_targets, scale=scale, reduction=reduction), separate)
    one_hot = F.one_hot(target, classes).to(DOUBLE)
    assert torch.allclose(taylor_loss(params, logits, one_hot, scale=scale, reduction=reduction), separate)


@pytest.mark.parametrize("classes", [6, 80])
def test_vmap_over_parameters_and_logits(classes):
    params, logits, target = _population(classes=classes)
    one_hot = F.one_hot(target, classes).to(DOUBLE)
    separate = torch.stack([taylor_loss(params[i], logits[i], target) for i in range(3)])
    for t in (target, one_hot):
        batched = vmap(lambda p, x: taylor_loss(p, x, t, 4, "taylor"))(params, logits)
        assert torch.allclose(batched, separate)
    # per-member gradients with respect to the loss parameters, under vmap
    grads = vmap(grad(lambda p, x: taylor_loss(p, x, target)))(params, logits)
    for i in range(3):
        p = params[i].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(taylor_loss(p, logits[i], target), p)
        assert torch.allclose(grads[i], expected)


# ----------------------------------------------------------------------------- gradients


def test_gradients_flow_to_loss_params():
    loss = TaylorLoss.from_preset("itl")
    assert isinstance(loss.params, torch.nn.Parameter) and loss.params.requires_grad
    logits = torch.randn(8, 10, requires_grad=True)
    loss(logits, torch.arange(8)).backward()
    assert loss.params.grad is not None and loss.params.grad.abs().sum() > 0
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("classes", [5, 70])
@pytest.mark.parametrize("at_zero", [False, True])
def test_first_and_second_derivatives_are_exact(classes, at_zero):
    # second order matters: ITL differentiates the inner gradient d loss / d logits with respect to
    # the loss parameters; at params = 0 (the default start) a pow-based c1^0 gives NaN there
    generator = torch.Generator().manual_seed(classes)
    params = torch.zeros(12, dtype=DOUBLE) if at_zero else torch.randn(12, generator=generator, dtype=DOUBLE)
    params.requires_grad_(True)
    logits = torch.randn(3, classes, generator=generator, dtype=DOUBLE, requires_grad=True)
    target = torch.randint(0, classes, (3,), generator=generator)
    soft = torch.softmax(torch.randn(3, classes, generator=generator, dtype=DOUBLE), -1)
    for t in (target, soft):
        assert torch.autograd.gradcheck(lambda p, x: taylor_loss(p, x, t), (params, logits))

        def logit_gradient(p):
            return torch.autograd.grad(taylor_loss(p, logits, t), logits, create_graph=True)[0]

        assert torch.autograd.gradcheck(logit_gradient, (params,))  # mixed second derivative
        assert torch.autograd.gradgradcheck(lambda p: taylor_loss(p, logits.detach(), t), (params,))
        assert torch.isfinite(torch.autograd.functional.hessian(lambda p: taylor_loss(p, logits.detach(), t), params)).all()


def _one_hot_reference(params, logits, target, order, form, reduction, class_reduction, scale=1.0):
    """The eager bivariate path (soft targets) on one-hot labels: the implementation before the fused
    hard-label node, built from autograd-recorded elementwise ops."""
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return taylor_loss(params, logits, one_hot, order, form, scale, reduction, class_reduction)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("form", ["taylor", "monomial"])
@pytest.mark.parametrize("class_reduction", ["sum", "mean"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_hard_label_loss_gradcheck_and_gradgradcheck(order, form, class_reduction, reduction):
    generator = torch.Generator().manual_seed(order * 7 + len(form) + len(reduction))
    params = torch.randn(num_params(order), generator=generator, dtype=DOUBLE, requires_grad=True)
    logits = torch.randn(3, 5, generator=generator, dtype=DOUBLE, requires_grad=True)
    target = torch.randint(0, 5, (3,), generator=generator)

    def fused(p, x):
        return taylor_loss(p, x, target, order, form, 1.0, reduction, class_reduction)

    def reference(p, x):
        return _one_hot_reference(p, x, target, order, form, reduction, class_reduction)

    assert torch.autograd.gradcheck(fused, (params, logits))
    assert torch.autograd.gradgradcheck(fused, (params, logits))  # HVPs and mixed derivatives in omega
    # value, gradient and second derivatives equal the eager implementation's
    assert torch.allclose(fused(params, logits), reference(params, logits), atol=1e-12)
    weight = torch.randn_like(fused(params, logits))
    got = torch.autograd.grad((fused(params, logits) * weight).sum(), (params, logits), create_graph=True)
    want = torch.autograd.grad((reference(params, logits) * weight).sum(), (params, logits), create_graph=True)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)
    probe = torch.randn_like(logits)
    got_mixed = torch.autograd.grad((got[1] * probe).sum(), (params, logits))
    want_mixed = torch.autograd.grad((want[1] * probe).sum(), (params, logits))
    for g, w in zip(got_mixed, want_mixed):
        assert torch.allclose(g, w, atol=1e-10)


def test_fused_loss_second_derivatives_under_torch_func():
    # ITL's shape of use: grad over the loss parameters of a function of the logits gradient, vmapped
    params, logits, target = _population(classes=6)
    one_hot = F.one_hot(target, 6).to(DOUBLE)

    def inner_gradient_norm(p, x, t):
        return grad(lambda z: taylor_loss(p, z, t))(x).square().sum()

    fused = vmap(grad(inner_gradient_norm), in_dims=(0, 0, None))(params, logits, target)
    reference = vmap(grad(inner_gradient_norm), in_dims=(0, 0, None))(params, logits, one_hot)
    assert torch.allclose(fused, reference, atol=1e-10)


def test_fixed_loss_cache_follows_in_place_changes():
    loss = TaylorLoss.from_preset("itl", normalise=True).double().requires_grad_(False)
    logits = torch.randn(4, 10, dtype=DOUBLE)
    target = torch.arange(4)
    before = loss(logits, target)
    loss.params.data[0] += 0.3  # no version bump: a cache keyed on the tensor would go stale
    after = loss(logits, target)
    fresh = TaylorLoss(loss.params.detach().clone(), order=4, form="monomial", normalise=True).double()
    assert torch.allclose(after, fresh(logits, target), atol=1e-12)
    assert not torch.allclose(before, after)


# ----------------------------------------------------------------------------- A.3 normalisation


def brute_force_range(p: list[float], form: str, classes: int, steps: int, mean: bool = False) -> tuple[float, float]:
    """Extremes of the per-example loss -sum_c f(y_hat_c, y_c) (or its class mean) over every point
    of the simplex grid with spacing 1/steps and every one-hot label, by ``hand_f``."""
    values = []

    def compositions(remaining: int, parts: int):
        if parts == 1:
            yield (remaining,)
            return
        for first in range(remaining + 1):
            for rest in compositions(remaining - first, parts - 1):
                yield (first, *rest)

    for counts in compositions(steps, classes):
        y_hat = [k / steps for k in counts]
        for label in range(classes):
            loss = -sum(hand_f(p, v, 1.0 if c == label else 0.0, form) for c, v in enumerate(y_hat))
            values.append(loss / classes if mean else loss)
    return min(values), max(values)


@pytest.mark.parametrize("preset", ["arl-ar-s80", "arl-ar-a40", "itl"])
def test_normalisation_range_is_the_whole_loss_over_the_simplex(preset):
    """A.3: f_min / f_max of the loss of an example (classes summed), y_hat on the simplex, y one-hot;
    against a brute-force grid of the 3-class simplex (spacing 1/120, 7,381 points x 3 labels).
    The grid's extremes are a lower bound on the span; the sampled ones must match them closely."""
    p = list(PRESETS[preset].loss_params())
    form = PRESETS[preset].form
    low, high = brute_force_range(p, form, classes=3, steps=120)
    f_min, f_max = normalisation_range(torch.tensor(p, dtype=DOUBLE), 4, form, classes=3)
    span = high - low
    assert f_min.item() == pytest.approx(low, abs=2e-3 * span)
    assert f_max.item() == pytest.approx(high, abs=2e-3 * span)
    scale = normalisation_scale(torch.tensor(p, dtype=DOUBLE), 4, form, eta=2.0, classes=3)
    assert scale.item() == pytest.approx(2.0 / span, rel=5e-3)
    # the class mean has 1/C of the range, so the normalised loss is the same either way
    mean_low, mean_high = brute_force_range(p, form, classes=3, steps=120, mean=True)
    f_min, f_max = normalisation_range(torch.tensor(p, dtype=DOUBLE), 4, form, classes=3, class_reduction="mean")
    assert (f_min.item(), f_max.item()) == pytest.approx((mean_low, mean_high), abs=2e-3 * span / 3)


def test_normalisation_at_two_classes_by_hand():
    """C = 2: the simplex is the segment (t, 1 - t), label class 0: -f(t, 1) - f(1 - t, 0); its
    extremes on a fine grid in t, written out with ``hand_f``."""
    p = list(PRESETS["arl-ar-s80"].params)
    values = [-hand_f(p, t, 1.0, "taylor") - hand_f(p, 1.0 - t, 0.0, "taylor") for t in (i / 20000 for i in range(20001))]
    f_min, f_max = normalisation_range(torch.tensor(p, dtype=DOUBLE), 4, "taylor", classes=2)
    span = max(values) - min(values)
    assert (f_min.item(), f_max.item()) == pytest.approx((min(values), max(values)), abs=1e-6 * span)


def test_normalisation_is_deterministic_batched_and_not_learned_through():
    params = torch.stack([torch.tensor(PRESETS[name].loss_params(), dtype=DOUBLE) for name in ("arl-ar-s80", "arl-dr-s80")])
    first = normalisation_scale(params, 4, "taylor", classes=10)
    again = normalisation_scale(params.clone(), 4, "taylor", classes=10)
    assert torch.equal(first, again) and first.shape == (2,)
    for row, value in zip(params, first):
        assert normalisation_scale(row, 4, "taylor", classes=10).item() == pytest.approx(value.item(), rel=1e-12)
    assert not normalisation_scale(params.requires_grad_(True), 4, "taylor", classes=10).requires_grad
    with pytest.raises(ValueError, match="classes"):
        normalisation_scale(params, 4, "taylor", classes=1)


def per_class_span(p: list[float], form: str) -> float:
    """The factor's old domain: the per-class term -f(y_hat, y) over y_hat in [0, 1], y in {0, 1}."""
    values = [-hand_f(p, i / 4000, y, form) for i in range(4001) for y in (0.0, 1.0)]
    return max(values) - min(values)


def test_whole_loss_factor_differs_from_the_per_class_one_as_the_issue_says():
    """Issue 11: at C = 10 the per-class factor is 0.30-0.76x the whole-loss one for arl-dr-s80 and
    arl-ar-s80 (measured here: 0.304, 0.765; itl 0.472, arl-dr-a40 0.101, arl-ar-a40 1.57)."""
    ratios = {}
    for name, preset in PRESETS.items():
        p = list(preset.loss_params())
        new = normalisation_scale(torch.tensor(p, dtype=DOUBLE), 4, preset.form, classes=10).item()
        ratios[name] = (1.0 / per_class_span(p, preset.form)) / new
    assert ratios["arl-dr-s80"] == pytest.approx(0.304, abs=0.01)
    assert ratios["arl-ar-s80"] == pytest.approx(0.765, abs=0.01)
    assert ratios["itl"] == pytest.approx(0.472, abs=0.01)
    assert all(abs(r - 1.0) > 0.2 for r in ratios.values())


def test_preset_lrs_keep_the_measured_effective_step():
    """docs/presets.md measured the normalised presets with the per-class factor; their ``lr`` is the
    measured lr rescaled so lr x factor (the SGD step) is unchanged, within 0.5 %."""
    measured_lr = {"itl": 0.1, "arl-dr-a40": 0.1, "arl-ar-s80": 0.03, "arl-dr-s80": 0.03}
    for name, lr in measured_lr.items():
        preset = PRESETS[name]
        assert preset.normalise
        p = list(preset.loss_params())
        new = normalisation_scale(torch.tensor(p, dtype=DOUBLE), 4, preset.form, classes=10).item()
        assert preset.lr * new == pytest.approx(lr / per_class_span(p, preset.form), rel=5e-3), name


def test_normalisation_changes_only_the_scale():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 10, generator=generator, dtype=DOUBLE)
    target = torch.randint(0, 10, (16,), generator=generator)
    # float64: DR-S80's raw loss is ~1e5 with gradients from cancelling terms, float32 would blur the identity
    raw = TaylorLoss.from_preset("arl-dr-s80").double()
    normalised = TaylorLoss.from_preset("arl-dr-s80", normalise=True, eta=3.0).double()
    f_min, f_max = normalisation_range(raw.params.detach(), 4, "taylor", classes=10)
    factor = 3.0 / (f_max - f_min).item()
    x_raw, x_norm = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    value_raw, value_norm = raw(x_raw, target), normalised(x_norm, target)
    value_raw.backward()
    value_norm.backward()
    assert value_norm.item() == pytest.approx(value_raw.item() * factor, rel=1e-10)
    assert torch.allclose(x_norm.grad, x_raw.grad * factor, rtol=1e-9, atol=1e-12)
    # the scale is a constant of the loss (not learned through): parameter gradients scale alike
    assert torch.allclose(normalised.params.grad, raw.params.grad * factor, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- errors, presets, serialisation


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"order": 6}, ["order", "6", "[2, 3, 4, 5]"]),
        ({"form": "chebyshev"}, ["form", "chebyshev", "taylor", "monomial"]),
        ({"reduction": "max"}, ["reduction", "max", "mean", "sum", "none"]),
        ({"class_reduction": "max"}, ["class_reduction", "max", "sum", "mean"]),
        ({"params": [0.0] * 5}, ["params", "(5,)", "(12,)"]),
    ],
)
def test_bad_arguments_name_the_argument_and_the_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as error:
        TaylorLoss(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_functional_errors_name_the_argument():
    params, logits = torch.zeros(12), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"reduction: got 'avg'.*'mean', 'sum', 'none'"):
        taylor_loss(params, logits, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"order: got 7"):
        taylor_loss(params, logits, torch.zeros(4, dtype=torch.long), order=7)
    with pytest.raises(ValueError, match=r"target: got a float tensor of shape \(4, 2\)"):
        taylor_loss(params, logits, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"target: got integer class indices of shape \(5,\)"):
        taylor_loss(params, logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"params: got shape \(11,\)"):
        taylor_loss(torch.zeros(11), logits, torch.zeros(4, dtype=torch.long))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError) as error:
        TaylorLoss.from_preset("arl-xx")
    assert "preset" in str(error.value) and "arl-xx" in str(error.value)
    for name in PRESETS:
        assert name in str(error.value)


def test_presets_are_the_published_numbers():
    assert PRESETS["itl"].params[:3] == (-2.0193, -1.2234, 0.1363) and PRESETS["itl"].form == "monomial"
    assert PRESETS["arl-dr-s80"].params[-1] == -17.5286 and PRESETS["arl-dr-s80"].form == "taylor"
    assert all(len(p.params) == 12 for p in PRESETS.values())
    # Preset stays constructible positionally (params, form, source); new fields have defaults
    plain = Preset((0.0,) * 12, "taylor", "test")
    assert plain.params == (0.0,) * 12 and plain.sign == -1 and plain.lr is None and not plain.normalise
    # arl-ar-a40 trains only with theta negated (docs/presets.md): from_preset applies it
    a40 = PRESETS["arl-ar-a40"]
    assert a40.sign == 1 and a40.params[2] == -0.4554
    assert TaylorLoss.from_preset("arl-ar-a40").params.tolist() == pytest.approx(list(a40.params[:2]) + [-v for v in a40.params[2:]])
    assert TaylorLoss.from_preset("itl").params.tolist() == pytest.approx(list(PRESETS["itl"].params))


def test_to_dict_from_dict_round_trip():
    loss = TaylorLoss(HAND_PARAMS, order=4, form="monomial", normalise=True, eta=2.5, class_reduction="mean")
    document = json.loads(json.dumps(loss.to_dict()))  # white-box: plain JSON
    rebuilt = TaylorLoss.from_dict(document)
    assert (rebuilt.order, rebuilt.form, rebuilt.normalise, rebuilt.eta, rebuilt.class_reduction) == (
        4, "monomial", True, 2.5, "mean",
    )  # fmt: skip
    assert torch.equal(rebuilt.params.detach(), loss.params.detach())
    logits, target = torch.randn(6, 10), torch.arange(6)
    assert torch.equal(rebuilt(logits, target), loss(logits, target))
    with pytest.raises(ValueError, match="family"):
        TaylorLoss.from_dict({**document, "family": "mlp"})


# ----------------------------------------------------------------------------- preset convention (slow)


@pytest.mark.slow
def test_itl_and_arl_s80_presets_beat_ce_at_convergence_under_80pc_symmetric_noise():
    """The documented convention (docs/presets.md, ``PRESETS``): minus sign, A.3 normalisation,
    each preset at its recommended lr and batch size; SGD momentum 0.9, 30 epochs, mlp2, mnist5k
    with 80 % symmetric noise, accuracy on the clean split at the last epoch. CE at lr 0.01 (the
    thesis's inner-loop setting and CE's best of lr 0.01 / 0.03 / 0.1), same batch size and epochs.
    Two seeds (data split, noise draw, init and batch order follow the seed). Observed margins were
    0.13-0.16; CE tuned lower (lr 0.003) catches up, as docs/presets.md records."""
    from metaopt_core.config import DataSpec, NoiseSpec
    from metaopt_core.data.prepare import prepare
    from metaopt_core.models import build_model
    from metaopt_core.train import fit

    def final_accuracy(loss_fn, lr, batch_size, data, seed):
        model = build_model("mlp2", 1, 28, 10, seed=seed)
        result = fit(model, loss_fn, data.splits["train"], val=data.splits["val"], lr=lr, momentum=0.9,
                     epochs=30, batch_size=batch_size, seed=seed)  # fmt: skip
        assert not result.diverged
        return result.history[-1]["val_acc"]

    for seed in (0, 1):
        data = prepare(DataSpec(source="mnist5k", noise=NoiseSpec(kind="symmetric", rate=0.8), seed=seed))
        ce_by_batch: dict[int, float] = {}
        for name in ("itl", "arl-ar-s80"):
            preset = PRESETS[name]
            assert preset.sign == -1 and preset.normalise
            if preset.batch_size not in ce_by_batch:
                ce_by_batch[preset.batch_size] = final_accuracy(F.cross_entropy, 0.01, preset.batch_size, data, seed)
            ce = ce_by_batch[preset.batch_size]
            loss = TaylorLoss.from_preset(name, normalise=True).requires_grad_(False)
            accuracy = final_accuracy(loss, preset.lr, preset.batch_size, data, seed)
            assert accuracy > ce + 0.08, (name, seed, accuracy, ce)


def test_compiled_loss_equals_the_eager_loss():
    """``compile=`` routes the loss through torch.compile; the "eager" backend checks the wiring
    quickly (inductor is measured by ``bench/loss_cost.py --compile``)."""
    logits, target = torch.randn(16, 10, requires_grad=True), torch.randint(0, 10, (16,))
    eager, compiled = TaylorLoss.from_preset("itl"), TaylorLoss.from_preset("itl", compile="eager")
    value, grad = eager(logits, target), torch.autograd.grad(eager(logits, target), logits)[0]
    torch.testing.assert_close(compiled(logits, target), value)
    torch.testing.assert_close(torch.autograd.grad(compiled(logits, target), logits)[0], grad)
    assert compiled.to_dict() == eager.to_dict()  # a runtime option, not part of the loss
