"""The CIFAR-10 reference classifier: the committed weights, known answers on real test images (from
GAN_DATA_DIR; skipped with a message when it is not set), shapes and input range, the metrics path,
and a tiny seeded training run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from gan import cifar_classifier as cc
from gan import metrics as gm
from gan.image_data import decode_image
from gan_utils import to_model_range

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def classifier():
    return cc.load_classifier()


@pytest.fixture(scope="module")
def real_sample():
    """500 CIFAR-10 test images (50 per class, a fixed random choice) as uint8, with their labels."""
    value = os.environ.get("GAN_DATA_DIR")
    root = Path(value).expanduser() if value else None
    if root is not None and not root.is_absolute():
        root = REPO_ROOT / root
    test_dir = root / "cifar10" / "test" if root else None
    if test_dir is None or not test_dir.is_dir():
        pytest.skip("needs GAN_DATA_DIR pointing at a directory with cifar10/test/<class>/ image folders "
                    f"(GAN_DATA_DIR={value!r})")
    images, labels = [], []
    for label, cls in enumerate(CIFAR10_CLASSES):
        names = sorted(os.listdir(test_dir / cls))
        for name in random.Random(label).sample(names, 50):
            images.append(torch.from_numpy(decode_image(test_dir / cls / name, 32)).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def test_committed_weights_load_with_their_metadata(classifier):
    assert cc.DEFAULT_WEIGHTS.is_file() and cc.DEFAULT_WEIGHTS.stat().st_size < 5e6
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    assert all(p.dtype == torch.float32 for p in classifier.parameters())
    meta = cc.classifier_metadata()
    assert meta["test_acc"] >= 0.85
    assert list(meta["per_class_acc"]) == CIFAR10_CLASSES == meta["class_names"]
    assert meta["train_seconds"] > 0 and meta["cpu"] and meta["threads"] >= 1


def test_known_answers_on_real_test_images(classifier, real_sample):
    images, labels = real_sample
    feats, probs = gm.classifier_outputs(classifier, to_model_range(images))  # the metrics' path
    assert feats.shape == (500, cc.FEATURE_DIM) and probs.shape == (500, 10)
    accuracy = (probs.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.8, f"accuracy {accuracy:.3f} on 500 real test images"
    # Normalised features: near-zero mean and unit RMS on real images (fitted on training images).
    assert feats.mean(0).abs().mean() < 0.5 and 0.6 < (feats - feats.mean(0)).square().mean().sqrt() < 1.5


def test_shapes_and_input_range(classifier):
    x = torch.rand(6, 3, 32, 32) * 2 - 1  # the GAN's range
    x[0], x[1] = -1.0, 1.0  # the extremes
    logits = classifier(x)
    feats, logits2 = classifier.features_and_logits(x)
    assert logits.shape == (6, 10) and feats.shape == (6, cc.FEATURE_DIM)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(classifier.features(x), feats)
    torch.testing.assert_close(classifier(x.reshape(6, -1)), logits)  # flat (N, 3072) as gan_metrics passes


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar_classifier.py"):
        cc.load_classifier(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=cc.WEIGHTS_FORMAT):
        cc.load_classifier(tmp_path / "other.pt")


def test_augment_crops_and_flips_within_the_image():
    g = torch.Generator().manual_seed(0)
    constant = torch.full((4, 3, 8, 8), 0.5)
    assert torch.equal(cc.augment(constant, g), constant)  # reflection padding adds no new values
    ramp = torch.arange(8.0).repeat(2, 3, 8, 1)  # column index as the value
    out = cc.augment(ramp, torch.Generator().manual_seed(1), pad=0)
    for img in out:  # no padding: each image is the ramp or its mirror image
        assert torch.equal(img, ramp[0]) or torch.equal(img, ramp[0].flip(2))
    a = cc.augment(ramp, torch.Generator().manual_seed(3))
    b = cc.augment(ramp, torch.Generator().manual_seed(3))
    assert a.shape == ramp.shape and torch.equal(a, b)


def test_tiny_seeded_training_is_deterministic():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)

    def train(seed):
        return cc.train_classifier(images, labels, epochs=2, batch_size=16, width=8, seed=seed,
                                   max_steps=3, log=lambda *_: None).state_dict()

    first, second, other = train(0), train(0), train(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = cc.CifarClassifier(width=8).eval()
    model.feature_mean.normal_()
    path = cc.save_classifier(model, tmp_path / "w.pt", {"test_acc": 0.5})
    loaded = cc.load_classifier(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=2e-2)  # float16 storage
    assert cc.classifier_metadata(path) == {"test_acc": 0.5}
