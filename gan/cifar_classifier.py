"""A small ResNet that classifies CIFAR-10: the reference network for scoring generated colour images.

The colour counterpart of `gan/mnist_classifier.py`, with the same API, so `gan.metrics` uses either:
its class probabilities give the Inception-style score and the class histogram, its penultimate
layer (256 features, normalised) the feature space for the Frechet distance, KID and
precision/recall. Like the MNIST one, it stands in for ImageNet's Inception-v3: small, trained on
the data the GAN learns, nothing to download.

The network is a half-width "ResNet-9" (Page, "How to train your ResNet", 2018; widths 32-64-128-256
instead of 64-128-256-512): conv-BN-ReLU stages with max-pooling, two residual blocks, global max
pool, a linear head scaled by 1/8. Trained with the recipe from the same source: SGD with Nesterov
momentum, a one-cycle (linear up, linear down) learning rate, label smoothing 0.2, weight decay
5e-4, batches of 512, random 32x32 crops of the 4-pixel reflection-padded image and random
horizontal flips, all done on the uint8 tensor in memory (no DataLoader), in bfloat16 autocast
(fast on CPUs with AMX), channels_last. Test predictions average the image and its mirror image.

Input: images in the GAN's range [-1, 1], shaped (N, 3, 32, 32) or (N, 3072).
Trained on CIFAR-10's 50,000 training images only; the test images are never seen in training.

Train (writes weights/cifar10_classifier.pt, prints test accuracy, overall and per class):

    python scripts/train_cifar_classifier.py --data-dir /path/to/data --threads 2

where the data directory holds cifar-10-batches-py/ (torchvision's python format; downloaded when
missing) or cifar10/train/ and cifar10/test/ image folders (see image_data.load_dataset).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gan.mnist_classifier import FeatureClassifier  # normalise, features, features_and_logits, forward
from gan_utils import to_model_range  # uint8 -> [-1, 1], shape kept

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "cifar10_classifier.pt"
WEIGHTS_FORMAT = "cifar10-classifier/1"
WIDTH = 32  # channels of the first stage; the stages have WIDTH x (1, 2, 4, 8)
FEATURE_DIM = 8 * WIDTH  # 256
NUM_CLASSES = 10
RETRAIN_COMMAND = ("python scripts/train_cifar_classifier.py --data-dir <dir holding cifar-10-batches-py/ or "
                   "cifar10/{train,test}/> --threads 2")


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + two conv-BN-ReLU layers of x."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CifarClassifier(FeatureClassifier):
    """prep (w) -> stage 2w + max-pool + residual -> stage 4w + max-pool -> stage 8w + max-pool +
    residual -> global max pool (the 8w = 256 feature layer) -> linear 10, scaled by 1/8 (logits).

    Input: images in the model range [-1, 1], shaped (N, 3, 32, 32) or (N, 3072).

    The metric features are the globally max-pooled activations, centred with their training-set
    mean and divided by one scalar, their training-set RMS deviation (buffers set by
    `fit_feature_normalisation`), as for mnist_classifier.MnistClassifier: the Frechet distance (up
    to the constant factor) and k-NN precision/recall are unchanged by this, and KID's kernel gets
    the O(1) entries it was designed for.
    """

    def __init__(self, width: int = WIDTH, head_scale: float = 0.125):
        super().__init__()
        w = width
        self.prep = conv_bn(3, w)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))  # 16x16
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))  # 8x8
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))  # 4x4
        self.head = nn.Linear(8 * w, NUM_CLASSES)
        self.head_scale = head_scale  # small logits at the start: the head learns without swamping
        self.register_buffer("feature_mean", torch.zeros(8 * w))
        self.register_buffer("feature_scale", torch.ones(()))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The globally max-pooled activations of the last stage (N, 8 * width)."""
        x = x.reshape(-1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return torch.amax(x, dim=(2, 3))

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) * self.head_scale


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the reflection-padded images and random horizontal flips, one per image.

    x: float (N, C, H, W). Each image gets its own offset in [0, 2 * pad]^2 and a coin flip, drawn
    from `generator` (so the data stream is reproducible and apart from the weights' stream)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [pad] * 4, mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator)
    rows = offsets[0] + torch.arange(h)  # (n, h): the padded rows each output row reads
    cols = offsets[1] + torch.arange(w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    # Advanced indices around a slice put their dimensions first: (n, h, w, C) -> (n, C, h, w).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.inference_mode()
def fit_feature_normalisation(model: CifarClassifier, train_images: torch.Tensor,
                              batch_size: int = 1000, max_images: int = 10000) -> None:
    """Set the feature buffers from (unaugmented) uint8 training images: per-unit mean, one RMS scale.
    In float32, as the metrics run the network. At most `max_images`, evenly strided through the set
    (folders come sorted by class): plenty for a mean and one scale, and a fifth of the time."""
    train_images = train_images[::max(1, -(-len(train_images) // max_images))]
    was_training = model.training
    model.eval()
    hidden = torch.cat([model.hidden(to_model_range(train_images[i:i + batch_size]))
                        for i in range(0, len(train_images), batch_size)])
    mean = hidden.double().mean(0)
    model.feature_mean.copy_(mean)
    model.feature_scale.copy_((hidden.double() - mean).square().mean().sqrt())
    model.train(was_training)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1000,
                   flip: bool = True) -> torch.Tensor:
    """Logits (N, 10) for uint8 images (N, 3, 32, 32), model in eval mode, float32; with `flip`,
    averaged with those of the mirror images (test-time augmentation)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size])
        logits = model(x)
        if flip:
            logits = (logits + model(x.flip(3))) / 2
        out.append(logits.float())
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracies on uint8 images, from one pass over the images and one over their mirror images:
    {"acc": with flip averaging, "acc_no_flip": without, "per_class": [with flip averaging, class
    0..9]}."""
    plain = predict_logits(model, images, flip=False)
    mirrored = predict_logits(model, images.flip(3), flip=False)
    correct = (plain + mirrored).argmax(1) == labels
    per_class = [correct[labels == c].float().mean().item() if (labels == c).any() else float("nan")
                 for c in range(NUM_CLASSES)]
    return {"acc": correct.float().mean().item(), "per_class": per_class,
            "acc_no_flip": (plain.argmax(1) == labels).float().mean().item()}


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, epochs: int = 8,
                     batch_size: int = 512, lr: float = 0.4, weight_decay: float = 5e-4,
                     label_smoothing: float = 0.2, width: int = WIDTH, seed: int = 0,
                     bf16: bool = True, max_steps: int | None = None, log=print) -> CifarClassifier:
    """Train a CifarClassifier on uint8 images (N, 3, 32, 32) and int64 labels, then fit its feature
    normalisation on the training images. Deterministic for a given seed and thread count.
    `max_steps` stops early (timing runs, tests); the learning-rate schedule is still the full one.
    Returns the model in eval mode."""
    torch.manual_seed(seed)  # initial weights
    data_rng = torch.Generator().manual_seed(seed + 1)  # shuffling and augmentation, apart from the above
    model = CifarClassifier(width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    steps_per_epoch = len(train_images) // batch_size
    # Page's schedule: linear warm-up over the first ~20% of training, then linearly down to ~0.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2,
        anneal_strategy="linear", div_factor=20.0, final_div_factor=200.0, cycle_momentum=False)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(train_images), generator=data_rng)
        total, correct, started = 0.0, 0, time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = augment(to_model_range(train_images[idx]), data_rng)
            y = train_labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            correct += (logits.argmax(1) == y).sum().item()
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        done = i + 1
        seconds = time.perf_counter() - started
        log(f"epoch {epoch + 1}/{epochs}: loss {total / done:.4f}, train accuracy (augmented) "
            f"{100 * correct / (done * batch_size):.1f}% ({seconds:.0f} s, "
            f"{done * batch_size / seconds:.0f} images/s)")
        if max_steps is not None and step >= max_steps:
            break
    fit_feature_normalisation(model, train_images)
    return model.eval()


def save_classifier(model: CifarClassifier, path: str | os.PathLike, meta: dict) -> Path:
    """Save the state_dict (floating-point tensors as float16: half the size, and the network's
    accuracy is unchanged; load_classifier casts back to float32) with a small metadata dict of plain
    types, so weights_only loading works. Written atomically."""
    import io

    from gan.runs import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": WEIGHTS_FORMAT, "state_dict": state, "width": model.prep[0].out_channels,
                "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_classifier(path: str | os.PathLike = DEFAULT_WEIGHTS,
                    device: str | torch.device = "cpu") -> CifarClassifier:
    """Load the reference classifier (weights_only, so loading never runs code from the file).

    Returns it in float32 and eval mode with gradients switched off: a fixed measuring instrument.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR-10 reference classifier weights not found. They are "
                                f"committed to the repository; to rebuild them run `{RETRAIN_COMMAND}`.")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a {WEIGHTS_FORMAT} weights file; rebuild it with `{RETRAIN_COMMAND}`.")
    model = CifarClassifier(blob.get("width", WIDTH))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def classifier_metadata(path: str | os.PathLike = DEFAULT_WEIGHTS) -> dict:
    """The metadata stored with the weights (accuracies, per-class accuracies, seed, epochs,
    training time, threads, CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]
