"""gan/mnist_classifier.py and scripts/train_mnist_classifier.py: the committed reference classifier
is accurate, its features normalised, and a retrained one below the bar is never written over it."""

from __future__ import annotations

import pytest
import torch

from gan.mnist_classifier import DEFAULT_WEIGHTS, accuracy, train_classifier


def test_committed_classifier_is_accurate(classifier, splits):
    assert DEFAULT_WEIGHTS.stat().st_size <= 2_000_000
    assert not classifier.training
    assert accuracy(classifier, splits.test_x, splits.test_y) >= 0.992
    flat_logits = classifier(splits.test_x[:8])
    assert torch.equal(flat_logits, classifier(splits.test_x[:8].reshape(8, 1, 28, 28)))


def test_committed_classifier_features_are_normalised(classifier, splits):
    """Centred and of unit RMS on training images: the scale KID's kernel expects."""
    features = classifier.features(splits.train_x[:5000])
    assert features.mean().abs() < 0.05
    assert features.square().mean().sqrt().item() == pytest.approx(1.0, abs=0.05)


def test_train_classifier_runs_and_fits_the_normalisation(splits):
    model = train_classifier(splits.train_x[:512], splits.train_y[:512], epochs=1, seed=0, log=lambda _: None)
    assert not model.training and model.feature_scale.item() != 1.0
    assert model.features(splits.train_x[:512]).mean(0).abs().max() < 1e-3


def test_a_classifier_below_the_accuracy_bar_is_not_written_over_the_reference(tmp_path, monkeypatch, data_dir):
    import train_mnist_classifier
    from gan import mnist_classifier
    reference = tmp_path / "mnist_classifier.pt"  # stands in for the committed weights
    reference.write_bytes(b"committed")
    monkeypatch.setattr(mnist_classifier, "DEFAULT_WEIGHTS", reference)
    untrained = lambda *a, **k: mnist_classifier.MnistClassifier().eval()  # noqa: E731  ~10% accuracy
    monkeypatch.setattr(mnist_classifier, "train_classifier", untrained)
    threads = torch.get_num_threads()  # main() sets its own (--threads): the tests after this keep theirs
    try:
        with pytest.raises(SystemExit, match=r"below the 99.2% .*not written over the reference weights"):
            train_mnist_classifier.main(["--data-dir", str(data_dir)])
        assert reference.read_bytes() == b"committed"
        train_mnist_classifier.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "mine.pt")])  # elsewhere: kept
        assert (tmp_path / "mine.pt").stat().st_size > 0
    finally:
        torch.set_num_threads(threads)
