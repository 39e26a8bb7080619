"""Known-answer tests for gan/metrics.py (the MNIST reference classifier: test_mnist_classifier.py).

MNIST is found through $GAN_DATA_DIR (default data/; conftest.py downloads it at session start or
stops the run saying how). Whole file: well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import gan_utils as gu
from gan import metrics as gm
from gan.mnist_classifier import load_classifier


@pytest.fixture(scope="module")
def ref(classifier, splits):
    return gm.reference_stats(classifier, splits.test_x)


def gaussian_features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_paper_table1_numbers():
    assert dict(gm.PAPER_TABLE1) == {"DBN": (138, 2), "Stacked CAE": (121, 1.6),
                                     "Deep GSN": (214, 1.1), "Adversarial nets": (225, 2)}
    assert np.allclose(gm.PARZEN_SIGMAS, np.logspace(-1, 0, 10))


def test_parzen_single_centre_is_the_gaussian_density():
    """One centre: the Parzen density is exactly N(mu, sigma^2 I), in any dimension."""
    for d in (1, 4, 784):
        g = torch.Generator().manual_seed(d)
        centre, points, sigma = torch.rand(1, d, generator=g), torch.rand(50, d, generator=g), 0.3
        got = gm.parzen_log_densities(centre, points, [sigma])[0].numpy()
        want = multivariate_normal(centre[0].double().numpy(), sigma ** 2 * np.eye(d)).logpdf(points.double().numpy())
        assert np.allclose(got, want, rtol=1e-6, atol=1e-4 * d)


def test_parzen_matches_direct_formula_on_mnist_sized_data():
    """The batched |x|^2 + |mu|^2 - 2 x.mu route equals parzen_ll.py's difference-of-every-pair route."""
    g = torch.Generator().manual_seed(0)
    centres, points = torch.rand(300, 784, generator=g), torch.rand(40, 784, generator=g)
    for sigma in (0.1, 0.2, 1.0):
        a = (points.double()[:, None, :] - centres.double()[None, :, :]) / sigma
        direct = (torch.logsumexp(-0.5 * a.square().sum(2), 1) - math.log(len(centres))
                  - 784 * math.log(sigma * math.sqrt(2 * math.pi)))
        mean, se = gm.parzen_log_likelihood(centres, points, sigma)
        assert mean == pytest.approx(direct.mean().item(), abs=1e-3)
        assert se == pytest.approx(direct.std(unbiased=False).item() / math.sqrt(40), rel=1e-4)


def test_parzen_approaches_the_smoothed_gaussian():
    """Centres ~ N(0, s^2 I): with many centres the window density tends to N(0, (s^2 + sigma^2) I)."""
    d, s, sigma = 3, 1.0, 0.5
    g = torch.Generator().manual_seed(1)
    centres = s * torch.randn(50000, d, generator=g)
    points = math.sqrt(s * s + sigma * sigma) * torch.randn(2000, d, generator=g)
    mean, se = gm.parzen_log_likelihood(centres, points, sigma)
    # Expected log-density of N(0, v I) under itself: -d/2 (log(2 pi v) + 1).
    analytic = -d / 2 * (math.log(2 * math.pi * (s * s + sigma * sigma)) + 1)
    exact_here = multivariate_normal(np.zeros(d), (s * s + sigma * sigma) * np.eye(d)).logpdf(points.numpy()).mean()
    assert mean == pytest.approx(exact_here, abs=0.02)  # the window estimate vs the true density, same points
    assert mean == pytest.approx(analytic, abs=4 * se + 0.02)


def test_parzen_evaluation_picks_the_best_sigma_on_validation():
    g = torch.Generator().manual_seed(2)
    samples = torch.rand(500, 784, generator=g) * 2 - 1
    val, test = torch.rand(100, 784, generator=g) * 2 - 1, torch.rand(80, 784, generator=g) * 2 - 1
    out = gm.parzen_evaluation(samples, val, test, n_val=100)
    sweep = dict(out["val_ll_by_sigma"])
    assert out["sigma"] == max(sweep, key=sweep.get) and len(sweep) == 10
    ll, se = gm.parzen_log_likelihood(gu.to_unit_range(samples), gu.to_unit_range(test), out["sigma"])
    assert (out["ll"], out["se"]) == pytest.approx((ll, se))


def test_frechet_distance_of_gaussians_with_diagonal_covariances():
    """FD(N(m1, diag a), N(m2, diag b)) = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2."""
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    a = torch.rand(16, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(16, generator=g, dtype=torch.float64) + 0.1
    want = ((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()).item()
    assert gm.frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Identity):  # torchmetrics' custom-extractor hook: images are already features
        num_features = 32

    x = gaussian_features(3000, 32, 4)
    y = gaussian_features(2500, 32, 5, shift=0.3) * 1.5
    fid = FrechetInceptionDistance(feature=Features())
    fid.update(x, real=True)
    fid.update(y, real=False)
    assert gm.frechet_distance_features(y, x) == pytest.approx(fid.compute().item(), rel=1e-4)


def test_frechet_distance_self_is_zero_and_grows_with_noise(classifier, splits, ref):
    own = gm.frechet_distance(ref.mu, ref.cov, ref.mu, ref.cov, cov2_sqrt=ref.cov_sqrt)
    assert abs(own) < 1e-6 * ref.cov.trace().item()
    g = torch.Generator().manual_seed(6)
    images = splits.test_x[:3000]
    fds = [gm.quick_scores(classifier, (images + level * torch.randn(images.shape, generator=g)).clamp(-1, 1),
                           ref)["fd"] for level in (0.0, 0.2, 0.4, 0.8, 1.6)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_kid_matches_torchmetrics_and_is_near_zero_for_one_distribution():
    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = gaussian_features(400, 16, 7).float(), gaussian_features(400, 16, 8, shift=0.5).float()
    kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=400)
    kid.update(x, real=True)
    kid.update(y, real=False)
    mean, std = gm.kernel_distance(y, x, subsets=1, subset_size=400)
    assert mean == pytest.approx(kid.compute()[0].item(), rel=1e-4) and std == 0.0
    same, _ = gm.kernel_distance(gaussian_features(2000, 16, 9), gaussian_features(2000, 16, 10),
                                 subsets=20, subset_size=500)
    assert abs(same) < 0.05 * mean


def test_score_matches_torchmetrics_inception_score():
    from torchmetrics.image.inception import InceptionScore

    logits = 3 * gaussian_features(1000, 10, 11).float()
    score = InceptionScore(feature=torch.nn.Identity(), splits=1)
    score.update(logits)
    assert gm.classifier_score(logits.softmax(1)) == pytest.approx(score.compute()[0].item(), rel=1e-5)


def test_one_digit_scores_about_one_and_fills_one_histogram_bin(classifier, splits):
    ones = splits.test_x[splits.test_y == 1][:1000]
    scores = gm.quick_scores(classifier, ones, gm.reference_stats(classifier, splits.test_x[:500]))
    assert set(scores) == {"fd", "score", *(f"frac_{d}" for d in range(10))}
    assert scores["score"] < 1.1
    assert scores["frac_1"] > 0.98
    assert sum(scores[f"frac_{d}"] for d in range(10)) == pytest.approx(1.0)


def test_real_test_images_score_high(ref):
    assert gm.classifier_score(ref.probs) > 9
    assert gm.class_fractions(ref.probs).min() > 0.08


def test_precision_recall_real_vs_real_high_and_noise_near_zero(classifier, splits, ref):
    real_features, _ = gm.classifier_outputs(classifier, splits.val_x[:5000])
    precision, recall = gm.precision_recall(real_features, ref.features[:5000])
    assert precision > 0.8 and recall > 0.8
    # 10,000 a side as in full_evaluation: k-NN spheres shrink with more points, and with few a
    # handful of outlying real digits have spheres wide enough to reach the noise's features.
    noise = torch.rand(10000, 784, generator=torch.Generator().manual_seed(12)) * 2 - 1
    noise_features, _ = gm.classifier_outputs(classifier, noise)
    precision, recall = gm.precision_recall(noise_features, ref.features)
    assert precision < 0.1 and recall < 0.01


def test_classifier_outputs_with_a_progress_bar_are_the_same_and_the_bar_goes_away(classifier, splits, capsys):
    images = splits.val_x[:2500]
    plain = gm.classifier_outputs(classifier, images)
    shown = gm.classifier_outputs(classifier, images, progress="classifying")
    assert all(torch.equal(a, b) for a, b in zip(plain, shown))
    err = capsys.readouterr().err  # tqdm's text bar outside Jupyter (a widget there)
    assert "classifying" in err and "batch" in err and err.endswith("\r")  # leave=False: wiped at the end


def test_knn_radii_on_a_line():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert gm.knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert gm.knn_radii(points, k=2).tolist() == [3.0, 2.0, 3.0, 4.0, 7.0]


def test_nearest_training_images_matches_brute_force():
    g = torch.Generator().manual_seed(13)
    train, samples = torch.rand(700, 784, generator=g) * 2 - 1, torch.rand(30, 784, generator=g) * 2 - 1
    samples[:5] = train[[3, 10, 200, 699, 0]]
    dists, idx = gm.nearest_training_images(samples, train, k=2, batch_size=7)
    brute = (samples.double()[:, None, :] - train.double()[None]).norm(dim=2) / 2
    want = brute.topk(2, dim=1, largest=False)
    assert torch.equal(idx, want.indices)
    assert torch.allclose(dists.double(), want.values, atol=1e-5)
    assert idx[:5, 0].tolist() == [3, 10, 200, 699, 0] and dists[:5, 0].max() == 0


def test_results_table_lists_the_paper_and_our_rows():
    row = {"n_samples": 10000, "parzen_ll": 230.0, "parzen_se": 2.0, "fd": 3.2, "kid_mean": 0.1, "kid_std": 0.05,
           "score": 9.1, "precision": 0.7, "recall": 0.6, **{f"frac_{d}": 0.1 for d in range(10)}}
    table = gm.results_table({"Ours": row, "Partial": {"fd": 5.0}})
    lines = table.splitlines()
    assert lines[0] == ("| Model | Samples | Parzen LL (nats, ± s.e.) | FD | KID (mean ± sd of 100 subsets) | Score | "
                        "Precision | Recall | min/max digit share |")
    assert "| Adversarial nets (paper) | - | 225.0 ± 2.0 | - |" in table
    assert "| Ours | 10,000 | 230.0 ± 2.0 | 3.20 | 0.1000 ± 0.0500 | 9.10 | 0.700 | 0.600 | 0.100 / 0.100 |" in table
    assert "| Partial | - | - | 5.00 | - |" in table and len(lines) == 2 + 4 + 2
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    colour = gm.results_table({"Ours": row}, paper=False, share="class").splitlines()
    assert colour[0].startswith("| Model | Samples | FD | KID") and "Parzen" not in colour[0]
    assert colour[2] == "| Ours | 10,000 | 3.20 | 0.1000 ± 0.0500 | 9.10 | 0.700 | 0.600 | 0.100 / 0.100 |"
    assert all(line.count("|") == colour[0].count("|") for line in colour)


def test_uint8_images_for_inception_round_to_the_nearest_level():
    levels = torch.arange(256, dtype=torch.uint8)
    model_range = levels.float() / 127.5 - 1  # what a real image is after the notebooks' preprocessing
    assert torch.equal(gm.to_uint8(model_range), levels)  # truncating would give 63 levels one lower
    assert gm.to_uint8(torch.tensor([-1.5, 1.5])).tolist() == [0, 255]


def test_the_colour_table_can_end_with_the_inception_columns():
    row = {"n_samples": 10000, "fd": 3.2, "inception_fid": 41.234, "inception_fid_train": 39.0,
           "inception_kid_mean": 0.03, "inception_kid_std": 0.001}
    lines = gm.results_table({"Ours": row, "Off": {"fd": 5.0, "inception_fid": None}}, paper=False,
                             share="class", inception=True).splitlines()
    assert lines[0].endswith("| min/max class share | Inception FID (test / train) | Inception KID (mean ± sd) |")
    assert lines[2].endswith("| 41.23 / 39.00 | 0.0300 ± 0.0010 |") and lines[3].endswith("| - / - | - |")  # null: a dash
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_time_to_quality_names_the_first_epoch_at_each_level():
    history = [{"epoch": 1, "train_seconds": 30.0, "score": 7.5},
               {"epoch": 2, "train_seconds": 60.0},  # an epoch without scores (metrics_every > 1)
               {"epoch": 3, "train_seconds": 90.0, "score": 9.0},
               {"epoch": 4, "train_seconds": 120.0, "score": 8.9}]
    assert gm.time_to_quality(history, levels=(7.0, 9.0, 9.5)) == [
        "score >= 7.0: epoch 1, after 0.5 min of training",
        "score >= 9.0: epoch 3, after 1.5 min of training",  # reached exactly counts; the dip after does not matter
        "score >= 9.5: not reached"]
    fd = [{"epoch": 1, "train_seconds": 60.0, "fd": 4.0}, {"epoch": 2, "train_seconds": 120.0, "fd": 2.5}]
    assert gm.time_to_quality(fd, levels=(3.0, 1.0), key="fd") == [  # lower is better
        "fd <= 3.0: epoch 2, after 2.0 min of training", "fd <= 1.0: not reached"]


def test_memorisation_ratio_and_a_test_set_that_copies_the_training_set():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 784, generator=g)
    copies = gm.memorisation(train[:10], torch.rand(10, 784, generator=g), train)
    assert copies["nn_median_samples"] == 0.0 and copies["nn_ratio"] == 0.0  # samples that are training images
    fresh = gm.memorisation(torch.rand(10, 784, generator=g), torch.rand(10, 784, generator=g), train)
    assert 0.8 < fresh["nn_ratio"] < 1.25  # both as far from the training images as new draws are
    no_yardstick = gm.memorisation(torch.rand(10, 784, generator=g), train[10:20], train)  # test/ copies train/
    assert no_yardstick["nn_median_test"] == 0.0 and math.isnan(no_yardstick["nn_ratio"])


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*python scripts/train_mnist_classifier\.py"):
        load_classifier(tmp_path / "nope.pt")
