"""A small CNN that classifies MNIST digits: the reference network behind the sample-quality metrics.

GAN metrics such as FID, KID, the Inception Score and precision/recall need a network that has
learnt what digits look like. ImageNet's Inception-v3 is the usual choice for natural images but
knows nothing particular about handwritten digits, is large, and would have to be downloaded; the
customary substitute on MNIST is a small classifier trained on MNIST itself. Its class
probabilities give the "Inception-style" score and the digit histogram; its penultimate layer (128
features, normalised) is the feature space for the Frechet distance, KID and precision/recall
(`gan.metrics`).

It is trained only on the paper's 50,000 training images (validation and test images are never
seen), with small random shifts as augmentation, and it is deliberately cheap to run: two strided
convolutions instead of convolutions followed by pooling, because the per-epoch metrics run it on
2,000 images on a CPU.

Train (writes weights/mnist_classifier.pt, prints validation and test accuracy):

    python scripts/train_mnist_classifier.py --data-dir /path/to/data --threads 1
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mnist_classifier.pt"
WEIGHTS_FORMAT = "mnist-classifier/1"
FEATURE_DIM = 128
RETRAIN_COMMAND = "python scripts/train_mnist_classifier.py --data-dir <dir holding MNIST/raw> --threads 1"


class FeatureClassifier(nn.Module):
    """What gan.metrics needs of a reference classifier, shared by MnistClassifier and
    cifar_classifier.CifarClassifier: a subclass defines `hidden(x)` (the penultimate layer),
    `logits_from_hidden(hidden)` and the buffers `feature_mean` and `feature_scale`."""

    def normalise(self, hidden: torch.Tensor) -> torch.Tensor:
        """Penultimate activations -> metric features (centred, one common scale)."""
        return (hidden - self.feature_mean) / self.feature_scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer as metric features (N, feature dim)."""
        return self.normalise(self.hidden(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one pass through the network."""
        hidden = self.hidden(x)
        return self.normalise(hidden), self.logits_from_hidden(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.logits_from_hidden(self.hidden(x))


class MnistClassifier(FeatureClassifier):
    """conv 5x5/2 (32) -> conv 5x5/2 (64) -> FC 128 (the feature layer) -> ReLU -> FC 10 (logits).

    Input: images in the model range [-1, 1], shaped (N, 784) or (N, 1, 28, 28).

    The metric features are the 128 pre-activations of the FC layer, centred with their training-set
    mean and divided by one scalar, their training-set RMS deviation (buffers, set by
    `fit_feature_normalisation`). Pre-activations rather than ReLU outputs: the negative side says
    how firmly a unit is off, which keeps inputs that are no digit at all (noise) apart from real
    digits, and they are nearer to Gaussian (Frechet distance assumes Gaussians). The centring and
    single scale leave Frechet distance (up to the constant factor) and k-NN precision/recall
    unchanged but give KID's kernel (x.y/d + 1)^3 the O(1) entries it was designed for.
    """

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        # Stride-2 convolutions downsample as they go (28 -> 14 -> 7): about three times cheaper on a
        # CPU than the same convolutions at full resolution followed by max-pooling.
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, stride=2, padding=2)
        self.fc = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, 10)
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_scale", torch.ones(()))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of the 128-unit FC layer."""
        x = x.reshape(-1, 1, 28, 28)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classification head: ReLU, dropout (training only), FC 10."""
        return self.head(self.dropout(F.relu(hidden)))


@torch.inference_mode()
def fit_feature_normalisation(model: MnistClassifier, train_x: torch.Tensor,
                              batch_size: int = 2000) -> None:
    """Set the feature buffers from the (unaugmented) training images: per-unit mean, one RMS scale."""
    was_training = model.training
    model.eval()
    hidden = torch.cat([model.hidden(train_x[i:i + batch_size])
                        for i in range(0, len(train_x), batch_size)])
    mean = hidden.double().mean(0)
    model.feature_mean.copy_(mean)
    model.feature_scale.copy_((hidden.double() - mean).square().mean().sqrt())
    model.train(was_training)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image (N, 784) by its own random whole-pixel offset in [-max_shift, max_shift]^2.

    Pixels moved in from outside are background (-1). Returns (N, 1, 28, 28).
    """
    n = len(x)
    padded = F.pad(x.reshape(n, 1, 28, 28), [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = offsets[0] + torch.arange(28)  # (n, 28): the padded rows each output row reads
    cols = offsets[1] + torch.arange(28)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Predicted digit for each image of `x` (model in eval mode)."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of images of `x` whose predicted digit equals the label in `y`."""
    was_training = model.training
    model.eval()
    acc = (predict(model, x) == y).float().mean().item()
    model.train(was_training)
    return acc


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int = 8,
                     batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4,
                     max_shift: int = 2, seed: int = 0, log=print) -> MnistClassifier:
    """Train a MnistClassifier on (train_x, train_y) with AdamW, a one-cycle learning rate and random
    shifts, then fit its feature normalisation on train_x; deterministic for a given seed and thread
    count. Returns the model in eval mode."""
    torch.manual_seed(seed)  # initial weights and dropout masks
    data_rng = torch.Generator().manual_seed(seed + 1)  # shuffling and shifts, apart from the above
    model = MnistClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(train_x) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=data_rng)
        total, started = 0.0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = random_shift(train_x[idx], max_shift, data_rng) if max_shift else train_x[idx]
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    fit_feature_normalisation(model, train_x)
    return model.eval()


def save_classifier(model: MnistClassifier, path: str | os.PathLike, meta: dict) -> Path:
    """Save the state_dict and a small metadata dict (plain types only, so weights_only loading works)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": WEIGHTS_FORMAT, "state_dict": state, "meta": meta}, path)
    return path


def write_classifier(save, model: nn.Module, out: str | os.PathLike, meta: dict, test_acc: float, bar: float,
                     reference: str | os.PathLike) -> Path:
    """save(model, out, meta) for a freshly trained classifier, unless its test accuracy is below the
    `bar` the metrics assume and `out` is the committed `reference` weights: those are kept (SystemExit).
    Elsewhere a model below the bar is written with a warning."""
    if test_acc < bar and Path(out).resolve() == Path(reference).resolve():
        raise SystemExit(f"test accuracy {100 * test_acc:.2f}% is below the {100 * bar:g}% the metrics assume: not "
                         f"written over the reference weights {reference}. Pass --out elsewhere to keep it.")
    path = save(model, out, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if test_acc < bar:
        print(f"WARNING: test accuracy below the {100 * bar:g}% the metrics assume")
    return path


def load_classifier(path: str | os.PathLike = DEFAULT_WEIGHTS,
                    device: str | torch.device = "cpu") -> MnistClassifier:
    """Load the reference classifier (weights_only, so loading never runs code from the file).

    Returns it in eval mode with gradients switched off: it is a fixed measuring instrument.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MNIST reference classifier weights not found. They are "
                                f"committed to the repository; to rebuild them run `{RETRAIN_COMMAND}`.")
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a {WEIGHTS_FORMAT} weights file; rebuild it with `{RETRAIN_COMMAND}`.")
    model = MnistClassifier()
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval().requires_grad_(False)


def classifier_metadata(path: str | os.PathLike = DEFAULT_WEIGHTS) -> dict:
    """The metadata stored with the weights (accuracies, seed, epochs, training time)."""
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]
