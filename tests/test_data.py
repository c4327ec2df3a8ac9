"""Data: offline sources, label noise (rates, maps, transition matrices), rotated and coloured
domains, fingerprints, save/load, missing-data errors and the image-folder source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from metaopt_core.config import DataSpec, NoiseSpec
from metaopt_core.data import (
    DatasetNotFoundError,
    ImageData,
    PreparedData,
    add_label_noise,
    colored_domains,
    load_image_folder,
    load_source,
    pair_flip_map,
    prepare,
    rotate,
    rotated_domains,
)
from metaopt_core.data.noise import realised_transition


@pytest.fixture(scope="module")
def mnist5k() -> ImageData:
    return load_source("mnist5k")


# ----------------------------------------------------------------------------- offline sources


def test_mnist5k_shapes_and_ranges(mnist5k):
    assert mnist5k.x.shape == (5000, 1, 28, 28) and mnist5k.x.dtype == torch.float32
    assert mnist5k.y.shape == (5000,) and mnist5k.y.dtype == torch.int64
    assert float(mnist5k.x.min()) == 0.0 and float(mnist5k.x.max()) == 1.0
    assert sorted(mnist5k.y.unique().tolist()) == list(range(10)) and mnist5k.num_classes == 10
    assert mnist5k.shape == (1, 28, 28)


def test_digits_shapes_and_ranges():
    digits = load_source("digits")
    assert digits.x.shape == (1797, 1, 28, 28) and digits.y.shape == (1797,)
    assert float(digits.x.min()) >= 0.0 and float(digits.x.max()) <= 1.0 and float(digits.x.max()) > 0.9
    assert sorted(digits.y.unique().tolist()) == list(range(10))


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"source: got 'imagenet'.*mnist5k"):
        load_source("imagenet")


# ----------------------------------------------------------------------------- label noise

CLEAN = torch.arange(20000) % 10  # 2,000 examples per class


@pytest.mark.parametrize("rate", [0.2, 0.8])
def test_symmetric_noise_realises_the_rate_and_never_keeps_a_flipped_label(rate):
    noisy = add_label_noise(CLEAN, "symmetric", rate, 10, seed=3)
    sigma = (rate * (1 - rate) / len(CLEAN)) ** 0.5
    # every flip changes the label, so the realised rate is the asked one (not rate * 9/10)
    assert abs(noisy.realised_rate - rate) < 4 * sigma
    assert torch.equal(noisy.flipped, noisy.labels != CLEAN)
    # flipped labels are uniform over the other 9 classes: each off-diagonal entry ~ rate / 9
    off_diagonal = noisy.transition[~torch.eye(10, dtype=torch.bool)]
    expected = rate / 9
    assert (off_diagonal - expected).abs().max() < 5 * (expected * (1 - expected) / 2000) ** 0.5
    assert torch.allclose(noisy.transition.diagonal(), torch.full((10,), 1 - rate, dtype=torch.float64), atol=0.05)


def test_asymmetric_noise_follows_the_mnist_pair_flips_exactly():
    assert pair_flip_map("mnist", 10) == {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    assert pair_flip_map("mnist5k", 10) == pair_flip_map("mnist", 10)
    rate = 0.4
    noisy = add_label_noise(CLEAN, "asymmetric", rate, 10, seed=5, dataset="mnist5k")
    mapping = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    for clean_class in range(10):
        members = CLEAN == clean_class
        labels = noisy.labels[members]
        if clean_class in mapping:
            assert set(labels.unique().tolist()) == {clean_class, mapping[clean_class]}
            flipped_fraction = float((labels == mapping[clean_class]).float().mean())
            assert abs(flipped_fraction - rate) < 4 * (rate * (1 - rate) / 2000) ** 0.5
        else:  # classes without a pair keep their label
            assert torch.equal(labels, torch.full_like(labels, clean_class))
    assert noisy.realised_rate == pytest.approx(float(noisy.flipped.float().mean()))
    assert abs(noisy.realised_rate - rate * 5 / 10) < 0.02


def test_cifar_pair_flips():
    # truck->automobile, bird->airplane, deer->horse, cat<->dog
    assert pair_flip_map("cifar10", 10) == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    cifar100 = pair_flip_map("cifar100", 100)
    assert cifar100[0] == 1 and cifar100[4] == 0 and cifar100[99] == 95
    with pytest.raises(KeyError, match="no pair-flip map for dataset 'svhn2'"):
        pair_flip_map("svhn2", 10)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_realised_transition_matrix_rows_sum_to_one_and_match_counts(kind):
    noisy = add_label_noise(CLEAN[:3000], kind, 0.45, 10, seed=1)
    counts = np.zeros((10, 10))
    for clean, label in zip(CLEAN[:3000].tolist(), noisy.labels.tolist()):
        counts[clean, label] += 1
    assert np.allclose(noisy.transition.sum(1).numpy(), 1.0)
    assert np.allclose(noisy.transition.numpy(), counts / counts.sum(1, keepdims=True))
    # classes absent from the clean labels give an all-zero row rather than NaN
    assert torch.equal(realised_transition(torch.tensor([0, 0]), torch.tensor([0, 1]), 3)[2], torch.zeros(3, dtype=torch.float64))


def test_noise_is_seeded():
    a = add_label_noise(CLEAN, "symmetric", 0.5, 10, seed=7)
    b = add_label_noise(CLEAN, "symmetric", 0.5, 10, seed=7)
    c = add_label_noise(CLEAN, "symmetric", 0.5, 10, seed=8)
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)
    assert torch.equal(add_label_noise(CLEAN, "none", 0.0, 10).labels, CLEAN)


def test_bad_noise_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"noise.kind: got 'gaussian'; allowed: \['none', 'symmetric', 'asymmetric'\]"):
        add_label_noise(CLEAN, "gaussian", 0.2, 10)
    with pytest.raises(ValueError, match=r"noise.rate: got 1.5"):
        add_label_noise(CLEAN, "symmetric", 1.5, 10)


# ----------------------------------------------------------------------------- domains


def test_rotation_by_90_degrees_by_hand():
    # an asymmetric 3x3 "L": rotated counter-clockwise, the foot moves from the bottom row to the
    # right-hand column and the stem from the left column to the bottom row
    image = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.5, 0.25]])
    expected = torch.tensor([[0.0, 0.0, 0.25], [0.0, 0.0, 0.5], [1.0, 1.0, 1.0]])
    rotated = rotate(image.reshape(1, 1, 3, 3), 90)[0, 0]
    assert torch.allclose(rotated, expected, atol=1e-5)
    assert torch.allclose(rotate(image.reshape(1, 1, 3, 3), 0)[0, 0], image)


def test_rotated_domains_are_rotations_of_their_source_images(mnist5k):
    import torchvision.transforms.functional as TF  # here: not at collection (torchvision costs seconds to import)

    source = mnist5k.subset(torch.arange(600))
    angles = (0, 15, 30, 45, 60, 75)
    domains = rotated_domains(source, angles, seed=4)
    assert [d.name for d in domains] == [f"mnist5k-rot{a}" for a in angles]
    indices = torch.cat([d.meta["source_index"] for d in domains])
    assert sorted(indices.tolist()) == list(range(600))  # disjoint, covering slices
    for angle, domain in zip(angles, domains):
        index = domain.meta["source_index"]
        assert domain.meta["angle"] == float(angle)
        assert torch.equal(domain.y, source.y[index])
        expected = TF.rotate(source.x[index], float(angle), interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(domain.x, expected, atol=1e-5)  # TF.rotate by 0 deg interpolates: ~1e-6 off
        if angle == 0:
            assert torch.equal(domain.x, source.x[index])
        else:  # really rotated: not the source image
            assert (domain.x - source.x[index]).abs().mean() > 0.05


def test_rotated_domains_through_prepare():
    prepared = prepare(DataSpec(source="digits", domains="rotated", angles=[0, 45], max_examples=200, seed=1))
    assert prepared.domains == ["digits-rot0", "digits-rot45"]
    train, val = prepared.domain("digits-rot45")
    assert len(train) + len(val) == 100 and len(val) == 20
    with pytest.raises(KeyError, match="domain: got 'digits-rot90'"):
        prepared.domain("digits-rot90")


def test_colored_domains_follow_the_domainbed_recipe(mnist5k):
    domains = colored_domains(mnist5k, seed=0)
    assert [d.meta["environment"] for d in domains] == [0.1, 0.2, 0.9]
    for domain in domains:
        e, index = domain.meta["environment"], domain.meta["source_index"]
        n = len(domain)
        digit_label = (mnist5k.y[index] < 5).long()
        assert domain.x.shape == (n, 2, 28, 28) and domain.num_classes == 2
        # label = (digit < 5) flipped with probability 0.25
        label_flip = float((domain.y != digit_label).float().mean())
        assert abs(label_flip - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
        # exactly one channel carries the digit; colour 1 = green (channel 1), 0 = red (channel 0)
        red, green = domain.x[:, 0].flatten(1).sum(1), domain.x[:, 1].flatten(1).sum(1)
        assert bool(((red == 0) ^ (green == 0)).all())
        colour = (green > 0).long()
        grey = mnist5k.x[index, 0]
        assert torch.allclose(domain.x[torch.arange(n), colour], grey)
        # colour = label XOR Bernoulli(e)
        colour_flip = float((colour != domain.y).float().mean())
        assert abs(colour_flip - e) < 4 * (e * (1 - e) / n) ** 0.5


# ----------------------------------------------------------------------------- prepared data


@pytest.fixture(scope="module")
def noisy_digits() -> PreparedData:
    return prepare(DataSpec(source="digits", noise=NoiseSpec(kind="symmetric", rate=0.6), max_examples=400, seed=2))


def test_prepare_label_noise_splits(noisy_digits):
    train, val = noisy_digits.splits["train"], noisy_digits.splits["val"]
    assert len(train) == 320 and len(val) == 80
    assert noisy_digits.clean_labels is not None and noisy_digits.transition.shape == (10, 10)
    realised = float((train.y != noisy_digits.clean_labels).float().mean())
    assert abs(realised - 0.6) < 0.1
    assert torch.allclose(noisy_digits.transition.double(), realised_transition(noisy_digits.clean_labels, train.y, 10), atol=1e-6)


def test_fingerprint_is_stable_and_changes_with_the_data(noisy_digits):
    again = prepare(DataSpec(source="digits", noise=NoiseSpec(kind="symmetric", rate=0.6), max_examples=400, seed=2))
    assert again.fingerprint == noisy_digits.fingerprint and len(again.fingerprint) == 64
    other_rate = prepare(DataSpec(source="digits", noise=NoiseSpec(kind="symmetric", rate=0.5), max_examples=400, seed=2))
    other_seed = prepare(DataSpec(source="digits", noise=NoiseSpec(kind="symmetric", rate=0.6), max_examples=400, seed=3))
    assert len({noisy_digits.fingerprint, other_rate.fingerprint, other_seed.fingerprint}) == 3
    again.splits["train"].x[0, 0, 0, 0] += 0.5  # one pixel
    assert again.compute_fingerprint() != noisy_digits.fingerprint
    # where the raw files were staged is not part of the data's identity
    elsewhere = prepare(DataSpec(source="digits", root="/elsewhere", noise=NoiseSpec(kind="symmetric", rate=0.6), max_examples=400, seed=2))
    assert elsewhere.fingerprint == noisy_digits.fingerprint


def test_save_load_round_trip_and_corruption(noisy_digits, tmp_path):
    directory = noisy_digits.save(tmp_path / "prepared")
    loaded = PreparedData.load(directory)
    assert loaded.fingerprint == noisy_digits.fingerprint
    assert set(loaded.splits) == set(noisy_digits.splits)
    for name, split in noisy_digits.splits.items():
        assert torch.equal(loaded.splits[name].x, split.x) and torch.equal(loaded.splits[name].y, split.y)
        assert loaded.splits[name].num_classes == split.num_classes
    assert torch.equal(loaded.clean_labels, noisy_digits.clean_labels)
    assert json.loads((directory / "manifest.json").read_text())["spec"]["noise"] == {"kind": "symmetric", "rate": 0.6}
    # flip one label in the tensor file: the recorded fingerprint no longer matches
    tensors = load_file(str(directory / "data.safetensors"))
    tensors["train::y"][0] = (tensors["train::y"][0] + 1) % 10
    save_file(tensors, str(directory / "data.safetensors"))
    with pytest.raises(ValueError, match="does not match its recorded fingerprint"):
        PreparedData.load(directory)
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        PreparedData.load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- missing data, folders


def test_missing_torchvision_dataset_says_how_to_stage_it(tmp_path):
    root = tmp_path / "empty-root"
    with pytest.raises(DatasetNotFoundError) as error:
        load_source("fashionmnist", root=root)
    message = str(error.value)
    assert "'fashionmnist'" in message and str(root) in message
    assert "download=True" in message and "METAOPT_DATA_ROOT" in message
    with pytest.raises(DatasetNotFoundError):
        prepare(DataSpec(source="cifar10", root=str(root)))


def _write_png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), colour, dtype=np.uint8)).save(path)


def test_image_folder_source(tmp_path):
    root = tmp_path / "tree"
    _write_png(root / "photo" / "cat" / "a.png", (255, 0, 0))
    _write_png(root / "photo" / "cat" / "b.png", (255, 0, 0))
    _write_png(root / "photo" / "dog" / "a.png", (0, 0, 255))
    _write_png(root / "sketch" / "dog" / "a.png", (0, 255, 0))  # sketch has no 'cat' folder
    (root / "photo" / "cat" / ".DS_Store").write_bytes(b"\x00\x01 not an image")  # skipped, not a crash
    domains = load_image_folder(root, image_size=4)
    assert sorted(domains) == ["photo", "sketch"]
    photo, sketch = domains["photo"], domains["sketch"]
    assert photo.x.shape == (3, 3, 4, 4) and photo.y.tolist() == [0, 0, 1] and photo.num_classes == 2
    assert sketch.y.tolist() == [1]  # 'dog' keeps index 1 although 'cat' is missing here
    assert torch.allclose(photo.x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(sketch.x[0, :, 2, 3], torch.tensor([0.0, 1.0, 0.0]))
    prepared = prepare(DataSpec(source=f"folder:{root}", val_fraction=0.34))
    assert prepared.domains == ["photo", "sketch"] and prepared.num_classes == 2
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
