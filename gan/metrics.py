"""How good are the GAN's samples? The paper's Parzen-window estimate plus today's usual metrics.

* Parzen window log-likelihood (Goodfellow et al. 2014, Table 1), computed as in the paper's code,
  goodfeli/adversarial `parzen_ll.py` (after Breuleux et al. 2011).
* Metrics on a reference MNIST classifier (`gan/mnist_classifier.py`) in place of ImageNet's
  Inception-v3: Frechet distance (Heusel et al. 2017), KID (Binkowski et al. 2018), an
  Inception-style score (Salimans et al. 2016), the predicted-digit histogram, and precision /
  recall with k-nearest-neighbour manifolds (Kynkaanniemi et al. 2019).
* Memorisation: distances from samples to their nearest training images.

All images come in the model range [-1, 1], shaped (N, 784) (or anything that reshapes to it).

Scales: the classifier's features are centred and scaled to unit RMS on the training set, so FD and
KID are in those units, not comparable with Inception-based FID/KID figures elsewhere. Compare
models at equal sample counts: FD is biased upward by few samples, and k-NN precision/recall shift
with the count. Real data give the floor: see `reference_row`.

Why not torchmetrics' FrechetInceptionDistance / KernelInceptionDistance / InceptionScore: each is a
stateful object that runs its own feature network over images, while here one classifier pass per
image set feeds five metrics and the test set's statistics are computed once for a whole training
run; KID and InceptionScore also draw their subsets from PyTorch's global random generator, which
would shift the random stream of a training run that calls them every epoch. Given features, each
formula is a few lines; tests/test_metrics.py checks them against torchmetrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gan.mnist_data import MnistSplits
from gan_utils import to_unit_range

# Goodfellow et al. 2014, Table 1, MNIST column: Parzen window log-likelihood (nats) +- standard error.
# A constant (read, never written): plain dict so that it goes into JSON as it is.
PAPER_TABLE1 = {
    "DBN": (138.0, 2.0),
    "Stacked CAE": (121.0, 1.6),
    "Deep GSN": (214.0, 1.1),
    "Adversarial nets": (225.0, 2.0),
}

# parzen_ll.py's default sweep: 10 widths from 0.1 to 1 (pixels in [0, 1]), log-spaced.
PARZEN_SIGMAS = tuple(float(s) for s in np.logspace(-1, 0, 10))


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def flat(images: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D) float32, detached."""
    return images.detach().reshape(len(images), -1).float()


def squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (P, C) between rows of `points` (P, D) and `centres` (C, D).

    |x|^2 + |mu|^2 - 2 x.mu: one matrix product instead of a (P, C, D) difference tensor.
    """
    # addmm fuses "|mu|^2 - 2 x.mu" into the product's output buffer: no extra (P, C) temporary.
    d2 = torch.addmm(centres.square().sum(1)[None, :], points, centres.T, alpha=-2.0)
    d2 += points.square().sum(1)[:, None]
    return d2.clamp_min_(0.0)  # rounding can dip just below zero for (near-)identical rows


def nearest_training_images(samples: torch.Tensor, train_x: torch.Tensor, k: int = 1,
                            batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, its k nearest training images: (distances (N, k), indices (N, k)).

    Images in the model range; distances in [0, 1]-pixel units (half the model-range distance),
    nearest first. Used for the memorisation check and its picture.
    """
    samples, train_x = flat(samples), flat(train_x).to(samples.device)
    dists, indices = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        nearest = squared_distances(batch, train_x).topk(k, dim=1, largest=False).indices
        # The fast form finds the neighbours; their distances are recomputed directly, because its
        # float32 cancellation leaves ~1e-3 where an exact copy should read 0.
        exact = (batch[:, None, :] - train_x[nearest]).norm(dim=2)
        dists.append(exact / 2.0)  # [-1, 1] -> [0, 1] halves every distance
        indices.append(nearest)
    return torch.cat(dists), torch.cat(indices)


# --------------------------------------------------------------------------------------------
# Parzen window log-likelihood (the paper's Table 1)
# --------------------------------------------------------------------------------------------

def parzen_log_densities(centres: torch.Tensor, points: torch.Tensor, sigmas,
                         batch_size: int = 1000) -> torch.Tensor:
    """log p(x) for each point under a Gaussian Parzen window on `centres`, for each sigma: (S, P).

    p(x) = 1/N sum_i N(x; mu_i, sigma^2 I), so
    log p(x) = logsumexp_i(-|x - mu_i|^2 / (2 sigma^2)) - log N - d log(sigma sqrt(2 pi)),
    as parzen_ll.py computes it (its log_mean_exp folds in the -log N). Any dimension d. The
    squared distances of a batch are computed once and shared by all sigmas. The distance matrix
    product runs in float32, the rest in float64: on MNIST (10,000 training images as centres)
    that is within 0.005 nats of an all-float64 computation for any test point, 2e-4 on the mean.
    """
    centres = flat(centres)
    if centres.device.type == "mps":  # MPS has no float64
        centres = centres.cpu()
    points = flat(points).to(centres.device)
    n, d = centres.shape
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=centres.device).reshape(-1)
    log_norm = math.log(n) + d * torch.log(sigmas * math.sqrt(2 * math.pi))  # (S,)
    out = []
    for start in range(0, len(points), batch_size):
        # float64 from here on: exponents reach -d2 / (2 * 0.01) ~ -1e4 and the normaliser d*log(...)
        # is hundreds of nats, so the sum must not lose the few nats that separate models.
        d2 = squared_distances(points[start:start + batch_size], centres).double()
        per_sigma = [torch.logsumexp(d2 / (-2.0 * s * s), dim=1) for s in sigmas.tolist()]
        out.append(torch.stack(per_sigma) - log_norm[:, None])
    return torch.cat(out, dim=1)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error std / sqrt(n), with numpy's default (population) std as in parzen_ll.py."""
    values = values.double()
    return values.mean().item(), (values.std(unbiased=False) / math.sqrt(len(values))).item()


def parzen_log_likelihood(centres01: torch.Tensor, points01: torch.Tensor,
                          sigma: float) -> tuple[float, float]:
    """Mean Parzen log-likelihood (nats) of `points01` under a window of width sigma on `centres01`,
    and its standard error. Both sets as given (the paper: pixels in [0, 1]); any dimension."""
    return mean_and_stderr(parzen_log_densities(centres01, points01, [sigma])[0])


def parzen_evaluation(samples: torch.Tensor, val_x: torch.Tensor, test_x: torch.Tensor,
                      sigmas=None, n_val: int = 1000) -> dict:
    """The paper's Table 1 protocol (parzen_ll.py): model-range images mapped to [0, 1] pixels;
    the samples are the centres; sigma is the value of `sigmas` (default logspace(-1, 0, 10)) with
    the highest mean log-likelihood of the first `n_val` validation images; the result is the mean
    log-likelihood of all test images in nats, with its standard error.

    Returns dict(sigma, ll, se, val_ll_by_sigma=[(sigma, mean val ll), ...]).
    """
    sigmas = PARZEN_SIGMAS if sigmas is None else tuple(float(s) for s in sigmas)
    centres = to_unit_range(flat(samples))
    val01 = to_unit_range(flat(val_x[:n_val]))
    val_ll = parzen_log_densities(centres, val01, sigmas).mean(1).tolist()
    sigma = sigmas[int(np.argmax(val_ll))]
    ll, se = parzen_log_likelihood(centres, to_unit_range(flat(test_x)), sigma)
    return {"sigma": sigma, "ll": ll, "se": se, "val_ll_by_sigma": list(zip(sigmas, val_ll))}


# --------------------------------------------------------------------------------------------
# Classifier outputs and the metrics on them
# --------------------------------------------------------------------------------------------

@torch.inference_mode()
def classifier_outputs(classifier, images: torch.Tensor, batch_size: int = 1000,
                       progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, 128) and class probabilities p(y|x) (N, 10), float32 on the CPU.

    `classifier` is a mnist_classifier.MnistClassifier (anything with `features_and_logits`).
    `progress`: the label of a progress bar over the batches (for a pass that takes a minute on a
    CPU), which goes away when done."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    feats, probs = [], []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for start in starts:
        # One pass through the network gives both outputs.
        f, logits = classifier.features_and_logits(flat(images[start:start + batch_size]).to(device))
        feats.append(f.float().cpu())
        probs.append(logits.float().softmax(1).cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(probs)


def class_fractions(probs: torch.Tensor) -> torch.Tensor:
    """Share of the images predicted as each digit 0..9 (argmax of p(y|x)); sums to 1."""
    return torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)


def classifier_score(probs: torch.Tensor) -> float:
    """Inception-style score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) on the MNIST classifier.

    p(y) is the mean of p(y|x) over the set. About 1 when every image gets the same prediction (or
    none is confident); 10 at most, reached by confident predictions spread evenly over the digits.
    One split over the whole set (Salimans et al. average 10 splits; one is less noisy and simpler).
    """
    p = probs.double()
    p_y = p.mean(0, keepdim=True)
    # xlogy treats 0 * log 0 as 0: classes with zero probability add nothing to the KL.
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y)).sum(1)
    return kl.mean().exp().item()


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of `features`, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigen-decomposition."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    # Tiny negative eigenvalues are rounding noise of a PSD matrix (a covariance of nearly dependent features).
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor,
                     cov2_sqrt: torch.Tensor | None = None) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017, the "F" of FID):

        |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2)).

    tr((cov1 cov2)^(1/2)) is taken as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix cov2^(1/2) cov1 cov2^(1/2), which has the same eigenvalues as cov1 cov2:
    a symmetric eigen-solver in float64, no complex parts or failed sqrtm to mop up. Pass
    `cov2_sqrt` when cov2 is fixed (the test set) to skip one decomposition.
    """
    mu1, cov1, mu2, cov2 = (t.double().cpu() for t in (mu1, cov1, mu2, cov2))
    root = psd_sqrt(cov2) if cov2_sqrt is None else cov2_sqrt.double().cpu()
    middle = root @ cov1 @ root
    eigvals = torch.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrise away rounding asymmetry
    trace_sqrt = eigvals.clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt).item()


def frechet_distance_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between feature sets x and y with KID's kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    # Unbiased: within-set sums leave out the diagonal k(a, a) (Binkowski et al. 2018, eq. 2).
    within = ((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
              + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1)))
    return (within - 2 * k_xy.mean()).item()


def kernel_distance(fake_features: torch.Tensor, real_features: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std over `subsets` random subsets of unbiased
    polynomial-kernel MMD^2. Subsets come from their own seeded generator, never the global one."""
    rng = torch.Generator().manual_seed(seed)
    fake, real = fake_features.double().cpu(), real_features.double().cpu()
    size = min(subset_size, len(fake), len(real))
    values = torch.tensor([
        polynomial_mmd2(fake[torch.randperm(len(fake), generator=rng)[:size]],
                        real[torch.randperm(len(real), generator=rng)[:size]])
        for _ in range(subsets)])
    return values.mean().item(), values.std(unbiased=False).item() if subsets > 1 else 0.0


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """Distance from each feature vector to its k-th nearest neighbour in the same set (itself excluded):
    the radius of its hypersphere in the k-NN manifold estimate of Kynkaanniemi et al. 2019."""
    features = features.float()
    radii = []
    for start in range(0, len(features), batch_size):
        d2 = squared_distances(features[start:start + batch_size], features)
        # k + 1 smallest: the nearest is the point itself at distance 0.
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, k].sqrt())
    return torch.cat(radii)


def manifold_coverage(query: torch.Tensor, support: torch.Tensor, support_radii: torch.Tensor,
                      batch_size: int = 1000) -> float:
    """Share of `query` points inside at least one hypersphere (centre support[j], radius support_radii[j])."""
    query, support = query.float(), support.float()
    r2 = support_radii.float().square()[None, :]
    inside = [(squared_distances(query[s:s + batch_size], support) <= r2).any(1)
              for s in range(0, len(query), batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(fake_features: torch.Tensor, real_features: torch.Tensor,
                     k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3).

    Precision: share of samples inside the real manifold (union of k-NN spheres around real
    features) -- are samples realistic? Recall: share of real images inside the samples' manifold
    -- is the variety of the data covered?
    """
    precision = manifold_coverage(fake_features, real_features, knn_radii(real_features, k))
    recall = manifold_coverage(real_features, fake_features, knn_radii(fake_features, k))
    return precision, recall


# --------------------------------------------------------------------------------------------
# Per-epoch and final evaluation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceStats:
    """The test set as the classifier sees it, computed once per run."""

    features: torch.Tensor  # (N, 128) float32
    probs: torch.Tensor  # (N, 10) float32
    mu: torch.Tensor  # (128,) float64
    cov: torch.Tensor  # (128, 128) float64
    cov_sqrt: torch.Tensor  # (128, 128) float64, for frechet_distance


def reference_stats(classifier, test_x: torch.Tensor, progress: str | None = None) -> ReferenceStats:
    """Classifier features, their mean, covariance and its square root for the test images
    (`progress`: a bar's label, see classifier_outputs)."""
    features, probs = classifier_outputs(classifier, test_x, progress=progress)
    mu, cov = feature_stats(features)
    return ReferenceStats(features, probs, mu, cov, psd_sqrt(cov))


def fraction_columns(probs: torch.Tensor) -> dict:
    """{'frac_0': share predicted as 0, ..., 'frac_9': ...}."""
    return {f"frac_{digit}": share for digit, share in enumerate(class_fractions(probs).tolist())}


def fd_to_reference(features: torch.Tensor, ref: ReferenceStats) -> float:
    """Frechet distance between classifier features and the test set's (its square root precomputed)."""
    return frechet_distance(*feature_stats(features), ref.mu, ref.cov, cov2_sqrt=ref.cov_sqrt)


def quick_scores(classifier, fake_images: torch.Tensor, ref: ReferenceStats) -> dict:
    """Cheap per-epoch scores of a few thousand samples: Frechet distance to the test set ('fd'),
    the Inception-style score ('score') and the predicted-digit shares ('frac_0'..'frac_9').

    With 2,000 samples FD is biased upward: 2,000 real validation images score about 0.7 here,
    10,000 about 0.4."""
    features, probs = classifier_outputs(classifier, fake_images)
    return {"fd": fd_to_reference(features, ref), "score": classifier_score(probs), **fraction_columns(probs)}


def memorisation(samples: torch.Tensor, test_x: torch.Tensor, train_x: torch.Tensor) -> dict:
    """Median distance ([0, 1]-pixel units) from each sample to its nearest training image, the same
    for test images, and their ratio: well below 1 means samples sit closer to training images than
    unseen real digits do -- a sign of copying. NaN where the test images are themselves training
    images (a test/ folder that copies train/): there is then no unseen yardstick."""
    sample_nn = nearest_training_images(samples, train_x)[0].median().item()
    test_nn = nearest_training_images(test_x, train_x)[0].median().item()
    return {"nn_median_samples": sample_nn, "nn_median_test": test_nn,
            "nn_ratio": sample_nn / test_nn if test_nn > 0 else math.nan}


def _evaluate(samples: torch.Tensor, splits: MnistSplits, classifier, nn_train: torch.Tensor) -> dict:
    """All final metrics of `samples`, with memorisation measured against `nn_train`."""
    # The big matrix products run on a CUDA GPU if the samples are there; otherwise on the CPU
    # (MPS lacks the float64 the Parzen estimate needs).
    device = samples.device if samples.device.type == "cuda" else torch.device("cpu")
    samples = samples.to(device)
    parzen = parzen_evaluation(samples, splits.val_x.to(device), splits.test_x.to(device))
    ref = reference_stats(classifier, splits.test_x)
    features, probs = classifier_outputs(classifier, samples)
    fd = fd_to_reference(features, ref)
    kid_mean, kid_std = kernel_distance(features, ref.features)
    precision, recall = precision_recall(features, ref.features)
    return {"n_samples": len(samples), "parzen_ll": parzen["ll"], "parzen_se": parzen["se"],
            "parzen_sigma": parzen["sigma"], "fd": fd, "kid_mean": kid_mean, "kid_std": kid_std,
            "score": classifier_score(probs), **fraction_columns(probs),
            "precision": precision, "recall": recall,
            **memorisation(samples, splits.test_x.to(device), nn_train.to(device))}


def full_evaluation(samples: torch.Tensor, splits: MnistSplits, classifier,
                    train_subset_for_nn: int | None = None) -> dict:
    """Every metric for the final samples (10,000 as in the paper), as one flat dict of numbers:
    parzen_ll, parzen_se, parzen_sigma, fd, kid_mean, kid_std, score, frac_0..frac_9, precision,
    recall, nn_median_samples, nn_median_test, nn_ratio, n_samples. All against the test set.

    The nearest-neighbour search covers all 50,000 training images unless `train_subset_for_nn`
    limits it to the first that many (it is the slowest part).
    """
    samples = flat(samples)
    nn_train = splits.train_x if train_subset_for_nn is None else splits.train_x[:train_subset_for_nn]
    return _evaluate(samples, splits, classifier, nn_train)


def reference_row(splits: MnistSplits, classifier, n: int = 10000) -> dict:
    """full_evaluation's metrics for real data: the first `n` training images treated as samples.

    Memorisation is measured against the other training images (train_x[n:]): against all of them
    every "sample" would find itself at distance 0. With a cut training set (train_subset) `n` is
    at most half of it, so that the other half remains.
    """
    n = min(n, len(splits.train_x) // 2)
    return _evaluate(flat(splits.train_x[:n]), splits, classifier, splits.train_x[n:])


def image_evaluation(samples: torch.Tensor, reference: torch.Tensor, nn_images: torch.Tensor | None, classifier,
                     prepare=lambda images: images, with_classes: bool = True) -> dict:
    """DCGAN.ipynb's final metrics of `samples` (model range, any channels and size), as one flat dict:
    fd, kid_mean, kid_std, precision, recall on the classifier's features against the `reference`
    images; with `with_classes` (images of the classes the classifier knows) also score and
    frac_0..frac_9; and memorisation (nn_median_samples, nn_median_test, nn_ratio: nearest of
    `nn_images` in pixel space, for the samples and for the reference images; None skips it).
    `prepare` turns images into what the classifier was trained on (e.g. 64 px down to 32 px)."""
    ref = reference_stats(classifier, prepare(reference))
    features, probs = classifier_outputs(classifier, prepare(samples))
    kid_mean, kid_std = kernel_distance(features, ref.features)
    precision, recall = precision_recall(features, ref.features)
    out = {"n_samples": len(samples), "fd": fd_to_reference(features, ref), "kid_mean": kid_mean,
           "kid_std": kid_std, "precision": precision, "recall": recall}
    if with_classes:
        out.update(score=classifier_score(probs), **fraction_columns(probs))
    return {**out, **(memorisation(samples, reference, nn_images) if nn_images is not None else {})}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-range images [-1, 1] to 0..255, rounded to the nearest level, as Inception metrics read
    images (torchmetrics' normalize=True truncates instead: every pixel half a level low on average)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------------

def time_to_quality(history: list[dict], levels=(7.0, 8.0, 9.0), key: str = "score") -> list[str]:
    """One line per level: the epoch and training time at which the run first reached it (a score
    at or above the level; for "fd", where lower is better, at or below)."""
    lower_is_better = key == "fd"
    lines = []
    for level in levels:
        first = next((row for row in history
                      if key in row and (row[key] <= level if lower_is_better else row[key] >= level)), None)
        lines.append(f"{key} {'<=' if lower_is_better else '>='} {level}: "
                     + (f"epoch {first['epoch']}, after {first['train_seconds'] / 60:.1f} min of training"
                        if first else "not reached"))
    return lines


def _pm(value, error, digits: int) -> str:
    return f"{value:.{digits}f} ± {error:.{digits}f}"


def _table_cells(metrics: dict, inception: bool = False) -> list[str]:
    """One row's cells after the model name (with `inception`, the Inception FID and KID last); '-' for
    metrics the dict does not have or that are null."""
    def get(*keys):
        return None if any(metrics.get(k) is None for k in keys) else [metrics[k] for k in keys]

    fracs = get(*(f"frac_{d}" for d in range(10)))
    cells = [
        f"{metrics['n_samples']:,}" if get("n_samples") else "-",
        _pm(*get("parzen_ll", "parzen_se"), 1) if get("parzen_ll", "parzen_se") else "-",
        f"{metrics['fd']:.2f}" if get("fd") else "-",
        f"{metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f}" if get("kid_mean", "kid_std") else "-",
        f"{metrics['score']:.2f}" if get("score") else "-",
        f"{metrics['precision']:.3f}" if get("precision") else "-",
        f"{metrics['recall']:.3f}" if get("recall") else "-",
        f"{min(fracs):.3f} / {max(fracs):.3f}" if fracs else "-",
    ]
    if inception:
        cells += [" / ".join(f"{metrics[k]:.2f}" if get(k) else "-" for k in ("inception_fid", "inception_fid_train")),
                  f"{metrics['inception_kid_mean']:.4f} ± {metrics['inception_kid_std']:.4f}"
                  if get("inception_kid_mean", "inception_kid_std") else "-"]
    return cells


def results_table(rows: dict, paper: bool = True, share: str = "digit", inception: bool = False) -> str:
    """Markdown table: the paper's Table 1 (Parzen only; `paper`) followed by `rows` ({name: metrics
    dict}, e.g. from full_evaluation and reference_row). Without `paper` (colour images) there is no
    Parzen column; `share` names what the share column counts; `inception` adds the Inception FID
    (against the test and the training images) and KID (gan/inception.py: published units). The
    Samples column: Parzen and FD depend on how many images a row scores (a real row cut by
    train_subset scores fewer)."""
    def without_parzen(cells):
        return cells if paper else cells[:2] + cells[3:]

    header = without_parzen(["Model", "Samples", "Parzen LL (nats, ± s.e.)", "FD", "KID (mean ± sd of 100 subsets)",
                             "Score", "Precision", "Recall", f"min/max {share} share"])
    header += ["Inception FID (test / train)", "Inception KID (mean ± sd)"] if inception else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    if paper:
        for name, (ll, se) in PAPER_TABLE1.items():
            lines.append("| " + " | ".join([f"{name} (paper)", "-", _pm(ll, se, 1)] + ["-"] * (len(header) - 3)) + " |")
    for name, metrics in rows.items():
        lines.append("| " + " | ".join(without_parzen([name] + _table_cells(metrics, inception))) + " |")
    return "\n".join(lines)
