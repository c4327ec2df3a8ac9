"""The batched population trainer against the sequential reference (plain ``fit`` per member)."""

import pytest
import torch

from metaopt_core.data.sources import ImageData
from metaopt_core.losses.parametric import TaylorFamily
from metaopt_core.losses.taylor import PRESETS, normalisation_scale, taylor_loss
from metaopt_core.population import Member, Schedule, can_batch, train_population
from metaopt_core.train import fit

PRESET = torch.tensor(PRESETS["arl-ar-s80"].params)


def blobs(n: int, seed: int, noise_rate: float = 0.5, size: int = 8, classes: int = 10, channels: int = 1):
    """Class prototypes plus pixel noise; labels flipped symmetrically with ``noise_rate``.
    Returns (noisy-label set, clean-label set) over the same images."""
    prototypes = torch.rand(classes, channels, size, size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (prototypes[y] + 0.3 * torch.randn(n, channels, size, size, generator=g)).clamp(0, 1)
    flip = torch.rand(n, generator=g) < noise_rate
    noisy = torch.where(flip, (y + torch.randint(1, classes, (n,), generator=g)) % classes, y)
    return ImageData(x, noisy, classes, f"blobs{seed}"), ImageData(x, y, classes, f"blobs{seed}")


@pytest.fixture(scope="module")
def data():
    train, _ = blobs(150, 1)
    _, val = blobs(90, 2, 0.0)
    return train, val


def perturbed(seed: int, spread: float = 0.3) -> torch.Tensor:
    return PRESET + spread * torch.randn(12, generator=torch.Generator().manual_seed(seed))


SCHEDULE = Schedule(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=2, batch_size=32, eval_batch_size=40)


def assert_same_results(batched, sequential, weights=True):
    for b, s in zip(batched, sequential):
        assert b.batched and not s.batched
        assert b.diverged == s.diverged
        assert b.steps == s.steps
        assert b.val_accuracy == pytest.approx(s.val_accuracy, abs=1.5 / 90)  # at most one example flips
        if weights and not s.diverged:  # a diverged member's weights are ~1e23: only its stop step matters
            for name in s.weights:
                torch.testing.assert_close(b.weights[name], s.weights[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model, options, epochs", [("mlp2", {}, 2), ("small_cnn", {"width": 8}, 1)])
def test_batched_equals_sequential(data, model, options, epochs):
    """Same seeds -> same minibatches, initial weights and SGD arithmetic; only float
    reassociation differs (bmm / grouped conv vs mm / conv). The CNN runs one epoch: on 8x8 images
    with 1-channel GroupNorm groups, a ReLU flipped by a 1e-7 difference grows to 1e-4 within the
    second epoch (measured: 1e-7 after epoch 1, 4e-4 after 2, 7e-2 after 4) — chaos, not a bug."""
    train, val = data
    schedule = Schedule(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=epochs, batch_size=32, eval_batch_size=40)
    members = [Member(model, train, val, perturbed(i), init_seed=i, data_seed=100 + i, model_options=options) for i in range(3)]
    batched = train_population(members, TaylorFamily(), schedule, batched=True, keep_weights=True)
    sequential = train_population(members, TaylorFamily(), schedule, batched=False, keep_weights=True)
    assert_same_results(batched, sequential)
    # members really differ (own loss, own init, own batches): the comparison is not vacuous
    assert len({round(r.train_loss, 6) for r in batched}) == 3


def test_sequential_path_is_plain_fit(data):
    """The reference is exactly fit() with the functional Taylor loss and torch.optim.SGD."""
    train, val = data
    member = Member("mlp2", train, val, PRESET, init_seed=3, data_seed=4)
    (result,) = train_population([member], TaylorFamily(), SCHEDULE, batched=False, keep_weights=True)
    model = member.build()
    fit(model, lambda logits, y: taylor_loss(PRESET, logits, y, reduction="mean"), train, lr=0.05, momentum=0.9,
        weight_decay=1e-3, epochs=2, batch_size=32, seed=4)  # fmt: skip
    for name, value in model.state_dict().items():
        torch.testing.assert_close(result.weights[name], value)


def test_datasets_of_different_sizes_batch_together(data):
    """A DR-style group: two datasets of the same shape but different lengths in one vmapped
    group (the shorter one is padded with zero-weight slots and skips the extra step)."""
    train, val = data
    other_train, _ = blobs(100, 5)
    _, other_val = blobs(70, 6, 0.0)
    members = [
        Member("mlp2", train, val, perturbed(0), init_seed=0, data_seed=1),
        Member("mlp2", other_train, other_val, perturbed(1), init_seed=0, data_seed=2),
        Member("mlp2", other_train, other_val, perturbed(2), init_seed=1, data_seed=3),
    ]
    schedule = Schedule(lr=0.05, epochs=2, batch_size=64, eval_batch_size=50)
    batched = train_population(members, TaylorFamily(), schedule, keep_weights=True)
    sequential = train_population(members, TaylorFamily(), schedule, batched=False, keep_weights=True)
    assert [r.steps for r in batched] == [2 * 3, 2 * 2, 2 * 2]  # ceil(150/64) vs ceil(100/64) per epoch
    assert_same_results(batched, sequential)


def test_normalised_family_uses_each_members_scale(data):
    """A.3: each member's loss is scaled by eta / (f_max - f_min) of its own parameters."""
    train, val = data
    params = [perturbed(0), 10 * perturbed(1)]
    family = TaylorFamily(normalise=True, eta=2.0)
    scales = family.scales(torch.stack(params), train.num_classes)
    for p, s in zip(params, scales):
        torch.testing.assert_close(s, normalisation_scale(p, 4, "taylor", 2.0, classes=train.num_classes))
    members = [Member("mlp2", train, val, p, init_seed=0, data_seed=0) for p in params]
    batched = train_population(members, family, SCHEDULE, keep_weights=True)
    sequential = train_population(members, family, SCHEDULE, batched=False, keep_weights=True)
    assert_same_results(batched, sequential)


def test_divergence_freezes_only_that_member(data):
    """Coefficients of 1e34 give a finite first loss whose step blows the weights up, so the
    second loss is non-finite; 1e38 overflows at once. Both stop where fit() stops; the healthy
    member trains bit for bit as it does beside finite neighbours (no NaN leaks across members)."""
    train, val = data
    blow_up_later = torch.full((12,), 1e34)
    blow_up_now = torch.full((12,), 1e38)
    for p in (blow_up_later, blow_up_now):
        p[:2] = 0.0
    healthy = Member("mlp2", train, val, perturbed(0), init_seed=0, data_seed=0)
    members = [
        Member("mlp2", train, val, blow_up_later, init_seed=0, data_seed=0),
        healthy,
        Member("mlp2", train, val, blow_up_now, init_seed=0, data_seed=0),
    ]
    batched = train_population(members, TaylorFamily(), SCHEDULE, keep_weights=True)
    sequential = train_population(members, TaylorFamily(), SCHEDULE, batched=False, keep_weights=True)
    neighbours = [Member("mlp2", train, val, perturbed(5 + i), init_seed=0, data_seed=0) for i in range(2)]
    beside_finite = train_population([neighbours[0], healthy, neighbours[1]], TaylorFamily(), SCHEDULE, keep_weights=True)
    assert [r.diverged for r in batched] == [True, False, True]
    assert [r.steps for r in batched] == [1, 10, 0]  # 150 examples / 32 -> 5 steps per epoch, 2 epochs
    assert_same_results(batched, sequential)
    for name, value in beside_finite[1].weights.items():
        torch.testing.assert_close(batched[1].weights[name], value, rtol=0, atol=0)


def test_batchnorm_models_take_the_sequential_path(data):
    train, val = data
    assert not can_batch("cnn4") and can_batch("cnn4_gn") and can_batch("small_cnn")
    members = [Member("cnn4", train, val, PRESET, model_options={"width": 0.125}), Member("mlp2", train, val, PRESET)]
    results = train_population(members, TaylorFamily(), Schedule(epochs=1, batch_size=64))
    assert [r.batched for r in results] == [False, True]


def test_max_batch_splits_groups_without_changing_results(data):
    train, val = data
    members = [Member("mlp2", train, val, perturbed(i), init_seed=i, data_seed=i) for i in range(3)]
    whole = train_population(members, TaylorFamily(), SCHEDULE, keep_weights=True)
    split = train_population(members, TaylorFamily(), SCHEDULE, max_batch=2, keep_weights=True)
    for a, b in zip(whole, split):
        assert a.steps == b.steps and a.val_accuracy == pytest.approx(b.val_accuracy, abs=1.5 / 90)
        for name in a.weights:
            torch.testing.assert_close(a.weights[name], b.weights[name], rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(data):
    train, val = data
    with pytest.raises(ValueError, match=r"members\[0\]\.loss_params.*\(12,\)"):
        train_population([Member("mlp2", train, val, torch.zeros(5))], TaylorFamily(), SCHEDULE)
    with pytest.raises(ValueError, match="lr: got -1"):
        Schedule(lr=-1)
    with pytest.raises(ValueError, match="max_batch"):
        train_population([], TaylorFamily(), SCHEDULE, max_batch=0)
