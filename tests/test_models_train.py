"""Model zoo (every model, two input shapes, seeded init, errors) and the inner-loop trainer
(determinism, divergence handling, steps vs epochs, validation sets, optimiser errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt_core.data.sources import ImageData
from metaopt_core.models import MODEL_NAMES, VMAP_FRIENDLY, build_model
from metaopt_core.train import accuracy, fit, make_optimizer

# ----------------------------------------------------------------------------- model zoo

HEAVY = {"resnet50", "vgg11"}  # one forward of one shape each: building them is the slow part


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in HEAVY])
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 10)])
def test_every_model_builds_and_gives_logits(name, channels, size, classes):
    model = build_model(name, channels, size, classes, seed=0).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, channels, size, size))
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name, channels, size", [("resnet50", 3, 32), ("vgg11", 1, 28)])
def test_heavy_models_build_and_give_logits(name, channels, size):
    model = build_model(name, channels, size, 7, seed=0).eval()
    with torch.no_grad():
        assert model(torch.rand(1, channels, size, size)).shape == (1, 7)


def test_other_class_counts_and_seeded_initialisation():
    a = build_model("cnn4_gn", 3, 32, 4, seed=11, width=0.25)
    b = build_model("cnn4_gn", 3, 32, 4, seed=11, width=0.25)
    c = build_model("cnn4_gn", 3, 32, 4, seed=12, width=0.25)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    assert a(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_seeded_build_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model("mlp2", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(KeyError) as error:
        build_model("resnet9")
    message = str(error.value)
    assert "model: got 'resnet9'" in message
    for name in MODEL_NAMES:
        assert name in message


def test_vmap_friendly_models_have_no_running_statistics():
    assert set(VMAP_FRIENDLY) <= set(MODEL_NAMES)
    for name in VMAP_FRIENDLY:
        model = build_model(name, 1, 28, 10, seed=0)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), name
        assert not list(model.buffers()), name


# ----------------------------------------------------------------------------- trainer


def _blobs(n: int, seed: int, classes: int = 3) -> ImageData:
    """Linearly separable class blobs as 1x4x4 images (same centres for every seed, the seed draws
    the points): a model can learn them in a few steps."""
    centres = torch.randn(classes, 16, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (centres[y] + 0.3 * torch.randn(n, 16, generator=generator)).reshape(n, 1, 4, 4)
    return ImageData(x, y, classes, f"blobs{seed}")


def _mlp(seed=0):
    return build_model("mlp2", 1, 4, 3, seed=seed)


def test_training_is_deterministic_for_a_seed():
    train, val = _blobs(96, 0), _blobs(30, 1)
    runs = []
    for _ in range(2):
        model = _mlp()
        result = fit(model, F.cross_entropy, train, val=val, lr=0.1, epochs=3, batch_size=16, seed=4)
        runs.append((result.history, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))
    other = fit(_mlp(), F.cross_entropy, train, val=val, lr=0.1, epochs=3, batch_size=16, seed=5)
    assert other.history != runs[0][0]  # the seed drives the batch order
    assert runs[0][0][-1]["val_acc"] > 0.9  # and it does learn


def test_a_non_finite_loss_stops_training_as_diverged():
    calls = {"n": 0}

    def exploding(logits, target):
        calls["n"] += 1
        loss = F.cross_entropy(logits, target)
        return loss * float("inf") if calls["n"] == 4 else loss

    model = _mlp()
    result = fit(model, exploding, _blobs(64, 0), val=_blobs(20, 1), lr=0.1, epochs=5, batch_size=16)
    assert result.diverged and result.steps == 3
    assert len(result.history) == 1 and result.history[-1]["diverged"] is True
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not taken


def test_steps_versus_epochs():
    train = _blobs(50, 0)  # ceil(50 / 16) = 4 steps per epoch
    assert fit(_mlp(), F.cross_entropy, train, epochs=2, batch_size=16).steps == 8
    by_steps = fit(_mlp(), F.cross_entropy, train, steps=6, batch_size=16)
    assert by_steps.steps == 6 and [row["step"] for row in by_steps.history] == [4, 6]
    assert fit(_mlp(), F.cross_entropy, train, epochs=1, steps=100, batch_size=16).steps == 4  # whichever ends first
    assert fit(_mlp(), F.cross_entropy, train, epochs=5, steps=3, batch_size=16).steps == 3
    with pytest.raises(ValueError, match="give epochs or steps"):
        fit(_mlp(), F.cross_entropy, train)


def test_validation_dict_and_accuracy():
    train, a, b = _blobs(60, 0), _blobs(20, 1), _blobs(25, 2)
    model = _mlp()
    result = fit(model, F.cross_entropy, train, val={"a": a, "b": b}, lr=0.1, epochs=2, batch_size=16)
    row = result.history[-1]
    assert {"val_acc/a", "val_acc/b", "train_loss", "train_acc", "epoch", "step"} <= set(row)
    with torch.no_grad():
        expected = float((model(b.x).argmax(-1) == b.y).float().mean())
    assert row["val_acc/b"] == pytest.approx(expected)
    assert accuracy(model, b, batch_size=7) == pytest.approx(expected)  # batching does not matter
    assert result.last("val_acc/a") == row["val_acc/a"] and math.isnan(result.last("missing"))


def test_optimisers_and_their_errors():
    model = _mlp()
    for name, cls in [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                      ("rmsprop", torch.optim.RMSprop)]:  # fmt: skip
        assert isinstance(make_optimizer(name, model.parameters(), 0.01), cls)
    with pytest.raises(ValueError, match=r"optimizer: got 'lion'; allowed: \['sgd', 'adam', 'adamw', 'rmsprop'\]"):
        make_optimizer("lion", model.parameters(), 0.01)
    # an optimiser factory is accepted too
    result = fit(model, F.cross_entropy, _blobs(32, 0), optimizer=lambda p: torch.optim.Adam(p, 1e-2), epochs=1)
    assert result.steps == 1
