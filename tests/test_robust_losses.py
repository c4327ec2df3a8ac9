"""Hand-designed robust losses and the loss registry.

Expected values are computed here in plain Python (``math``) from the papers' formulas on a
2-example x 3-class problem, independently of the torch code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaopt_core.losses import robust, robust_corrected
from metaopt_core.losses.registry import UnknownLossError, get_loss, hand_designed_losses, list_losses, loss_parameters
from metaopt_core.losses.robust_corrected import estimate_transition_matrix, tempered_softmax
from metaopt_core.losses.taylor import PRESETS, TaylorLoss

LOGITS = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.2]]
HARD = [1, 0]  # example 0 correctly classified, example 1 not
SOFT = [[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]
NOISE_T = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.0, 0.3, 0.7]]


# ---------------------------------------------------------------------------------------------
# plain-Python reference formulas (one example: logits row a, label distribution y)


def softmax(a):
    m = max(a)
    e = [math.exp(v - m) for v in a]
    s = sum(e)
    return [v / s for v in e]


def one_hot(k, c=3):
    return [1.0 if j == k else 0.0 for j in range(c)]


def ce(a, y):
    p = softmax(a)
    return -sum(yc * math.log(pc) for yc, pc in zip(y, p))


def label_smoothing(a, y, eps=0.1):
    c = len(a)
    return ce(a, [(1 - eps) * yc + eps / c for yc in y])


def gce(a, y, q=0.7):
    return sum(yc * (1 - pc**q) / q for yc, pc in zip(y, softmax(a)))


def sce(a, y, alpha=0.1, beta=1.0, big_a=-4.0):
    rce = -sum(pc * (max(math.log(yc), big_a) if yc > 0 else big_a) for yc, pc in zip(y, softmax(a)))
    return alpha * ce(a, y) + beta * rce


def mae(a, y):
    return sum(abs(pc - yc) for yc, pc in zip(y, softmax(a)))


def nce_mae(a, y, alpha=1.0, beta=1.0):
    p = softmax(a)
    nce = sum(yc * -math.log(pc) for yc, pc in zip(y, p)) / sum(-math.log(pc) for pc in p)
    return alpha * nce + beta * (1 - sum(yc * pc for yc, pc in zip(y, p)))


def nfl_mae(a, y, alpha=1.0, beta=1.0, gamma=0.5):
    p = softmax(a)
    fl = [-((1 - pc) ** gamma) * math.log(pc) for pc in p]
    nfl = sum(yc * f for yc, f in zip(y, fl)) / sum(fl)
    return alpha * nfl + beta * (1 - sum(yc * pc for yc, pc in zip(y, p)))


def bootstrap_soft(a, y, beta=0.95):
    p = softmax(a)
    return -sum((beta * yc + (1 - beta) * pc) * math.log(pc) for yc, pc in zip(y, p))


def bootstrap_hard(a, y, beta=0.8):
    p = softmax(a)
    z = one_hot(p.index(max(p)), len(a))
    return -sum((beta * yc + (1 - beta) * zc) * math.log(pc) for yc, zc, pc in zip(y, z, p))


def focal(a, y, gamma=2.0, alpha=None):
    p = softmax(a)
    w = alpha or [1.0] * len(a)
    return -sum(wc * yc * (1 - pc) ** gamma * math.log(pc) for wc, yc, pc in zip(w, y, p))


def exp_t(u, t):
    return math.exp(u) if t == 1 else max(0.0, 1 + (1 - t) * u) ** (1 / (1 - t))


def log_t(x, t):
    return math.log(x) if t == 1 else (x ** (1 - t) - 1) / (1 - t)


def tempered_probs(a, t):
    """exp_t(a - lam) with lam found by bisection on sum_c exp_t(a_c - lam) = 1 (decreasing in lam)."""
    lo, hi = max(a), max(a) + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(exp_t(v - mid, t) for v in a) > 1:
            lo = mid
        else:
            hi = mid
    return [exp_t(v - lo, t) for v in a]


def bitempered(a, y, t1=0.8, t2=1.2):
    q = tempered_probs(a, t2)
    return sum(yc * log_t(yc + 1e-10, t1) - yc * log_t(qc, t1) - yc ** (2 - t1) / (2 - t1) + qc ** (2 - t1) / (2 - t1) for yc, qc in zip(y, q))


def baikal(a, y, mean=False):
    p = softmax(a)
    total = -sum(math.log(pc) - yc / pc for yc, pc in zip(y, p))
    return total / len(a) if mean else total


def huber(a, y, delta=1.0):
    def h(r):
        return 0.5 * r * r if abs(r) <= delta else delta * (abs(r) - 0.5 * delta)

    return sum(h(pc - yc) for yc, pc in zip(y, softmax(a)))


def forward_corrected(a, y, t=NOISE_T):
    p = softmax(a)
    noisy = [sum(p[i] * t[i][j] for i in range(len(p))) for j in range(len(p))]
    return -sum(yc * math.log(qc) for yc, qc in zip(y, noisy))


# (registry name, constructor kwargs, reference formula)
CASES = [
    ("ce", {}, ce),
    ("label_smoothing", {}, label_smoothing),
    ("label_smoothing", {"smoothing": 0.3}, lambda a, y: label_smoothing(a, y, 0.3)),
    ("gce", {}, gce),
    ("gce", {"q": 0.4}, lambda a, y: gce(a, y, 0.4)),
    ("sce", {}, sce),
    ("sce", {"alpha": 0.5, "beta": 2.0, "log_zero": -9.0}, lambda a, y: sce(a, y, 0.5, 2.0, -9.0)),
    ("mae", {}, mae),
    ("nce+mae", {}, nce_mae),
    ("nce+mae", {"alpha": 10.0, "beta": 0.1}, lambda a, y: nce_mae(a, y, 10.0, 0.1)),
    ("nfl+mae", {}, nfl_mae),
    ("nfl+mae", {"gamma": 2.0, "detach_focal_weight": False}, lambda a, y: nfl_mae(a, y, gamma=2.0)),
    ("bootstrap_soft", {}, bootstrap_soft),
    ("bootstrap_hard", {}, bootstrap_hard),
    ("bootstrap_hard", {"beta": 0.95}, lambda a, y: bootstrap_hard(a, y, 0.95)),
    ("focal", {}, focal),
    ("focal", {"gamma": 0.5, "alpha": [0.25, 0.5, 1.0]}, lambda a, y: focal(a, y, 0.5, [0.25, 0.5, 1.0])),
    ("bitempered", {"num_iters": 30}, bitempered),
    ("bitempered", {"t1": 0.5, "t2": 2.0, "num_iters": 60}, lambda a, y: bitempered(a, y, 0.5, 2.0)),
    ("baikal", {}, baikal),
    ("baikal", {"class_reduction": "mean"}, lambda a, y: baikal(a, y, mean=True)),
    ("huber", {}, huber),
    ("huber", {"delta": 0.3}, lambda a, y: huber(a, y, 0.3)),
    ("forward", {"transition_matrix": NOISE_T}, forward_corrected),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def _expected(formula, targets):
    rows = [formula(a, y) for a, y in zip(LOGITS, targets)]
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("name,kwargs,formula", CASES, ids=CASE_IDS)
def test_hard_targets_match_hand_computation_for_every_reduction(name, kwargs, formula):
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    target = torch.tensor(HARD)
    expected = _expected(formula, [one_hot(k) for k in HARD])
    for reduction, want in (("none", expected), ("sum", expected.sum()), ("mean", expected.mean())):
        got = get_loss(name, reduction=reduction, **kwargs)(logits, target)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{name} {kwargs} {reduction}")


@pytest.mark.parametrize("name,kwargs,formula", CASES, ids=CASE_IDS)
def test_soft_targets_match_hand_computation(name, kwargs, formula):
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    expected = _expected(formula, SOFT)
    got = get_loss(name, reduction="none", **kwargs)(logits, torch.tensor(SOFT, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # a one-hot float matrix is the same as class indices
    loss = get_loss(name, **kwargs)
    one_hot_target = F.one_hot(torch.tensor(HARD), 3).double()
    torch.testing.assert_close(loss(logits, one_hot_target), loss(logits, torch.tensor(HARD)))


def test_worked_numbers_spot_check():
    """A few values written out, guarding the reference formulas themselves."""
    p = softmax([1.0, 2.0, 0.5])  # = (0.23122, 0.62853, 0.14024)
    assert p[1] == pytest.approx(0.6285317192117624, rel=1e-12)
    assert ce([1.0, 2.0, 0.5], one_hot(1)) == pytest.approx(0.4643688, abs=1e-7)
    assert mae([1.0, 2.0, 0.5], one_hot(1)) == pytest.approx(2 - 2 * p[1])  # Ghosh's L1 scale
    # SCE with a one-hot label: RCE = -A (1 - p_y) = 4 (1 - p_y)
    assert sce([1.0, 2.0, 0.5], one_hot(1), alpha=0.0) == pytest.approx(4 * (1 - p[1]))
    # Baikal with a one-hot label: -sum log p + 1 / p_y
    assert baikal([1.0, 2.0, 0.5], one_hot(1)) == pytest.approx(-sum(map(math.log, p)) + 1 / p[1])


# ---------------------------------------------------------------------------------------------
# agreement with exact / torch computations


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_equals_torch(reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=gen) * 3
    target = torch.randint(0, 7, (16,), generator=gen)
    soft = torch.softmax(torch.randn(16, 7, generator=gen), -1)
    loss = robust.CrossEntropy(reduction=reduction)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, reduction=reduction))
    torch.testing.assert_close(loss(logits, soft), F.cross_entropy(logits, soft, reduction=reduction))
    smoothed = robust.LabelSmoothingCrossEntropy(0.1, reduction=reduction)
    torch.testing.assert_close(smoothed(logits, target), F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1))


def test_forward_correction_with_identity_is_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 5, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, 5, (32,), generator=gen)
    corrected = robust_corrected.ForwardCorrectedCrossEntropy(torch.eye(5))
    torch.testing.assert_close(corrected(logits, target), F.cross_entropy(logits, target))


def test_bitempered_at_unit_temperatures_is_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (8,), generator=gen)
    loss = robust_corrected.BiTemperedLogisticLoss(t1=1.0, t2=1.0)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))


def test_tempered_softmax_fixed_point_converges_and_is_normalised():
    logits = torch.tensor(LOGITS + [[50.0, -50.0, -50.0]], dtype=torch.float64)
    for row, probs in zip(logits.tolist(), tempered_softmax(logits, 1.2, num_iters=30)):
        torch.testing.assert_close(probs, torch.tensor(tempered_probs(row, 1.2), dtype=torch.float64))
    # the reference's 5 iterations are already accurate to ~1e-7 on these rows
    five = tempered_softmax(logits, 1.2, num_iters=5)
    assert (five.sum(-1) - 1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="t: got 0.5"):
        tempered_softmax(logits, 0.5)


def test_gce_tends_to_cross_entropy_as_q_goes_to_zero():
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    target = torch.tensor(HARD)
    near_ce = robust.GeneralizedCrossEntropy(q=1e-6)(logits, target)
    torch.testing.assert_close(near_ce, F.cross_entropy(logits, target), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# gradients


def _gradcheck_cases():
    for name, kwargs, _ in CASES:
        if kwargs.get("detach_focal_weight", name == "nfl+mae"):
            kwargs = {**kwargs, "detach_focal_weight": False}  # detached weights: not the value's gradient
        yield name, kwargs


@pytest.mark.parametrize("name,kwargs", list(_gradcheck_cases()), ids=CASE_IDS)
def test_autograd_gradient_matches_finite_differences(name, kwargs):
    """Includes the implicit (IFT) gradient of the tempered normalisation."""
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    loss = get_loss(name, **({**kwargs, "num_iters": 40} if name == "bitempered" else kwargs))
    for target in (torch.tensor(HARD), torch.tensor(SOFT, dtype=torch.float64)):
        assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,), eps=1e-6, atol=1e-6)


def test_nfl_detached_focal_weight_changes_gradient_not_value():
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    target = torch.tensor(HARD)
    reference = robust.NFLandMAE(detach_focal_weight=True)(logits, target)
    literal = robust.NFLandMAE(detach_focal_weight=False)(logits, target)
    torch.testing.assert_close(reference, literal)
    (g_ref,) = torch.autograd.grad(reference, logits)
    (g_lit,) = torch.autograd.grad(literal, logits)
    assert (g_ref - g_lit).abs().max() > 1e-3


SATURATED = [[50.0, -50.0, -50.0], [-50.0, 50.0, -50.0], [1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]]
SATURATED_TARGET = [0, 0, 1, 2]  # confident-right, confident-wrong, extreme-wrong, uniform


def _all_configs():
    for name, kwargs, _ in CASES:
        yield name, kwargs
    yield "nfl+mae", {"detach_focal_weight": False}
    yield "focal", {"detach_focal_weight": True, "gamma": 0.5}
    yield "bitempered", {"t1": 1.0, "t2": 1.0}
    yield "forward", {"transition_matrix": torch.eye(3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kwargs", list(_all_configs()))
def test_value_and_gradient_finite_at_saturated_probabilities(name, kwargs, dtype):
    logits = torch.tensor(SATURATED, dtype=dtype, requires_grad=True)
    for target in (torch.tensor(SATURATED_TARGET), F.one_hot(torch.tensor(SATURATED_TARGET), 3).to(dtype)):
        value = get_loss(name, **kwargs)(logits, target)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value), f"{name} value {value}"
        assert torch.isfinite(grad).all(), f"{name} grad {grad}"


def test_losses_work_under_vmap():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 3, generator=gen)
    target = torch.randint(0, 3, (4, 6), generator=gen)
    for name, kwargs in _all_configs():
        loss = get_loss(name, **kwargs)
        batched = torch.func.vmap(loss)(logits, target)
        looped = torch.stack([loss(z, t) for z, t in zip(logits, target)])
        torch.testing.assert_close(batched, looped, msg=name)


# ---------------------------------------------------------------------------------------------
# transition-matrix estimation (Patrini et al. 2017)


def _synthetic_noisy_posteriors(seed: int, outliers: int):
    gen = torch.Generator().manual_seed(seed)
    true_t = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    mixed = torch.distributions.Dirichlet(torch.ones(3)).sample((600,))  # generator-free: seed globally
    mixed = 0.9 * mixed + 0.1 / 3  # no clean posterior above 0.9 + 0.1/3
    anchors = []
    for i in range(3):
        delta = torch.rand(40, 1, generator=gen, dtype=torch.float64) * 0.02
        anchors.append((1 - delta) * F.one_hot(torch.tensor(i), 3).double() + delta / 3)
    clean = torch.cat([mixed.double(), *anchors])
    noisy = clean @ true_t
    # overconfident outliers: predicted noisy class i with probability 1 (impossible under true_t)
    fake = torch.eye(3, dtype=torch.float64).repeat_interleave(outliers, 0)
    return torch.cat([noisy, fake]), true_t


def test_estimate_transition_matrix_recovers_known_t_from_exact_anchors():
    torch.manual_seed(0)
    probs, true_t = _synthetic_noisy_posteriors(0, outliers=0)
    exact = torch.cat([probs, torch.eye(3, dtype=torch.float64) @ true_t])  # perfect anchors present
    torch.testing.assert_close(estimate_transition_matrix(exact, quantile=None), true_t)


def test_estimate_transition_matrix_quantile_filter_discards_outliers():
    torch.manual_seed(1)
    probs, true_t = _synthetic_noisy_posteriors(1, outliers=5)
    naive = estimate_transition_matrix(probs, quantile=None)
    torch.testing.assert_close(naive, torch.eye(3, dtype=torch.float64))  # fooled by the outliers
    robust_t = estimate_transition_matrix(probs, quantile=0.97)
    assert (robust_t - true_t).abs().max() < 0.02
    torch.testing.assert_close(robust_t.sum(-1), torch.ones(3, dtype=torch.float64))


def test_estimate_transition_matrix_worked_example():
    # column 0 = [0.9, 0.8, 0.7, 0.6, 0.1]; 'higher' 0.5-quantile = sorted[ceil(0.5 * 4)] = 0.7;
    # entries >= 0.7 dropped, anchor of class 0 = example 3 (0.6). Column 1 = 1 - column 0:
    # sorted [0.1, 0.2, 0.3, 0.4, 0.9], threshold 0.3, anchor = example 1 (0.2).
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    expected = torch.tensor([[0.6, 0.4], [0.8, 0.2]])
    torch.testing.assert_close(estimate_transition_matrix(probs, quantile=0.5), expected)
    torch.testing.assert_close(estimate_transition_matrix(probs, quantile=None), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    # non-integer position: 0.6 * 4 = 2.4 -> the 'higher' value sorted[3] = 0.8 (not sorted[2] = 0.7),
    # so 0.7 survives and example 2 is the anchor of class 0
    torch.testing.assert_close(estimate_transition_matrix(probs, quantile=0.6)[0], torch.tensor([0.7, 0.3]))


def test_estimate_transition_matrix_threshold_is_the_higher_quantile():
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(101, 4, generator=gen, dtype=torch.float64) * 3, -1)
    estimated = estimate_transition_matrix(probs, quantile=0.97)
    for i in range(4):
        # Patrini's reference: np.percentile(eta[:, i], 97, interpolation="higher") (now ``method=``)
        threshold = torch.tensor(np.percentile(probs[:, i].numpy(), 97, method="higher"))
        below = probs[:, i] < threshold
        anchor = torch.where(below, probs[:, i], torch.zeros(())).argmax()
        torch.testing.assert_close(estimated[i], probs[anchor])


def test_two_stage_forward_correction_recipe_runs_end_to_end():
    """Stage 1 probabilities -> T -> stage 2 loss: the estimated T is a valid transition matrix."""
    torch.manual_seed(2)
    probs, true_t = _synthetic_noisy_posteriors(2, outliers=0)
    estimated = estimate_transition_matrix(probs.float())
    loss = get_loss("forward", transition_matrix=estimated)
    logits = torch.randn(10, 3, requires_grad=True)
    value = loss(logits, torch.randint(0, 3, (10,)))
    value.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "probs,quantile,match",
    [
        (torch.rand(5), 0.97, "probs"),
        (torch.randn(5, 3) * 5, 0.97, "probs"),
        (torch.randint(0, 2, (5, 3)), 0.97, "probs"),
        (torch.full((5, 3), 1 / 3), 0.0, "quantile"),
        (torch.full((5, 3), 1 / 3), 1.5, "quantile"),
    ],
)
def test_estimate_transition_matrix_rejects_bad_input(probs, quantile, match):
    with pytest.raises(ValueError, match=match):
        estimate_transition_matrix(probs, quantile=quantile)


# ---------------------------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize("name", [n for n in list_losses() if not n.startswith("taylor")])
def test_bad_reduction_names_reduction_and_allowed_values(name):
    extra = {"transition_matrix": torch.eye(3)} if name == "forward" else {}
    with pytest.raises(ValueError, match=r"reduction: got 'avg'; allowed: \['mean', 'sum', 'none'\]"):
        get_loss(name, reduction="avg", **extra)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("gce", {"q": 0.0}, "q: got 0.0"),
        ("gce", {"q": 1.5}, "q: got 1.5"),
        ("label_smoothing", {"smoothing": -0.1}, "smoothing"),
        ("sce", {"log_zero": 1.0}, "log_zero"),
        ("bootstrap_soft", {"beta": 1.2}, "beta"),
        ("bitempered", {"t2": 0.9}, "t2"),
        ("bitempered", {"num_iters": 0}, "num_iters"),
        ("focal", {"alpha": [1.0, -1.0]}, "alpha"),
        ("huber", {"delta": 0.0}, "delta"),
        ("baikal", {"class_reduction": "max"}, "class_reduction"),
        ("forward", {"transition_matrix": [[0.5, 0.6], [0.0, 1.0]]}, "rows must sum to 1"),
        ("forward", {"transition_matrix": [[1.0, 0.0, 0.0]]}, "square"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_loss(name, **kwargs)


def test_bad_targets_and_logits_raise_clear_errors():
    logits = torch.tensor(LOGITS)
    loss = robust.GeneralizedCrossEntropy()
    with pytest.raises(ValueError, match=r"target: class indices must lie in \[0, 2\]"):
        loss(logits, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="target: got class indices of shape"):
        loss(logits, torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="target: got a float tensor of shape"):
        loss(logits, torch.rand(2, 4))
    with pytest.raises(ValueError, match="logits: got shape"):
        loss(logits.unsqueeze(0), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"target: got class indices|target: class indices"):
        robust.CrossEntropy()(logits, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="transition_matrix is"):
        robust_corrected.ForwardCorrectedCrossEntropy(torch.eye(4))(logits, torch.tensor(HARD))
    with pytest.raises(ValueError, match="alpha: got 2 class weights"):
        robust_corrected.FocalLoss(alpha=[1.0, 2.0])(logits, torch.tensor(HARD))
    with pytest.raises(ValueError, match="needs at least 2"):
        robust.NCEandMAE()(torch.zeros(2, 1), torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# registry


# the ARL chapter's competitors and ITL's ERM baselines (the specification, not a copy of the table)
COMPETITORS = {"ce", "label_smoothing", "gce", "sce", "mae", "nce+mae", "nfl+mae", "bootstrap_soft", "bootstrap_hard", "focal", "bitempered",
               "baikal", "huber", "forward"}  # fmt: skip


def test_registry_lists_and_builds_every_loss_with_paper_defaults():
    names = list_losses()
    assert COMPETITORS | {"taylor"} | {f"taylor:{p}" for p in PRESETS} == set(names)
    for name, cls in hand_designed_losses().items():
        extra = {"transition_matrix": torch.eye(3)} if name == "forward" else {}
        built = get_loss(name, **extra)
        assert type(built) is cls and isinstance(built, robust.RobustLoss)
    assert get_loss("gce").q == 0.7
    assert (get_loss("sce").alpha, get_loss("sce").beta, get_loss("sce").log_zero) == (0.1, 1.0, -4.0)
    assert (get_loss("nfl+mae").alpha, get_loss("nfl+mae").beta, get_loss("nfl+mae").gamma) == (1.0, 1.0, 0.5)
    assert get_loss("bootstrap_soft").beta == 0.95
    assert get_loss("bootstrap_hard").beta == 0.8
    assert (get_loss("focal").gamma, get_loss("focal").alpha) == (2.0, None)
    assert (get_loss("bitempered").t1, get_loss("bitempered").t2) == (0.8, 1.2)
    assert get_loss("label_smoothing").smoothing == 0.1
    assert type(get_loss("  GCE ")) is robust.GeneralizedCrossEntropy


def test_registry_taylor_presets_and_plain_taylor():
    logits = torch.tensor(LOGITS)
    target = torch.tensor(HARD)
    for preset in PRESETS:
        built = get_loss(f"taylor:{preset}", reduction="sum")
        direct = TaylorLoss.from_preset(preset, reduction="sum")
        torch.testing.assert_close(built(logits, target), direct(logits, target))
    params = list(PRESETS["itl"].params)
    plain = get_loss("taylor", params=params, form="monomial")
    torch.testing.assert_close(plain(logits, target), TaylorLoss.from_preset("itl")(logits, target))
    with pytest.raises(TypeError, match=r"missing required parameter\(s\) \['params'\]"):
        get_loss("taylor")


def test_registry_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as info:
        get_loss("cross-entropy-ish")
    message = str(info.value)
    assert "cross-entropy-ish" in message
    for name in ("ce", "gce", "nfl+mae", "bitempered", "forward", "taylor:itl"):
        assert repr(name) in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnknownLossError)


def test_registry_unknown_preset_lists_presets():
    with pytest.raises(KeyError) as info:
        get_loss("taylor:arl-xx")
    for preset in PRESETS:
        assert preset in str(info.value)


def test_registry_unknown_kwarg_names_loss_and_accepted_parameters():
    expected = r"get_loss\('gce'\): unknown parameter\(s\) \['gamma'\]; accepted: \['q', 'reduction'\]"
    with pytest.raises(TypeError, match=expected):
        get_loss("gce", gamma=2.0)
    expected = r"get_loss\('taylor:itl'\): unknown parameter\(s\) \['order'\].*set by the preset"
    with pytest.raises(TypeError, match=expected):
        get_loss("taylor:itl", order=3)
    with pytest.raises(TypeError, match=r"missing required parameter\(s\) \['transition_matrix'\]"):
        get_loss("forward")
    assert loss_parameters("sce") == {"alpha": 0.1, "beta": 1.0, "log_zero": -4.0, "reduction": "mean"}
