"""DCGAN.ipynb end to end with papermill, on a few hundred real CIFAR-10 images (a copy of part of
the shared JPEG folder): every cell runs, the run directory holds the files the headless contract
names, the exported generator draws colour images in [-1, 1], and resuming equals training straight.
MNIST at 32 px (one channel) runs too."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from gan import runs
from conftest import REPO_ROOT, execute_cached, metrics_rows, names_used_before_defined, notebook_text

DCGAN = REPO_ROOT / "DCGAN.ipynb"
# 8 steps an epoch on 256 images in batches of 32; 100 reference images: seconds per run on 2 cores.
TINY = dict(batch_size=32, epochs=2, metrics_samples=128, eval_samples=200, log_every=4, device="cpu", seed=0)


@pytest.fixture(scope="session")
def dcgan_runs(tmp_path_factory, data_dir, tiny_cifar):
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            tmp = tmp_path_factory.mktemp("dcgan")
            full = {**TINY, "dataset": str(tiny_cifar), "run_dir": str(tmp / "run"), **params}
            cache[key] = execute_cached(tmp, data_dir, notebook=DCGAN, **full)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def run(dcgan_runs):
    return dcgan_runs().check()


def test_the_run_directory_holds_what_the_contract_names(run):
    for name in ("config.json", "metrics.csv", "progress.gif", "checkpoint.pt", "metrics.json", "generator.pt2",
                 "losses.png", "quality.png", "real_vs_generated.png", "interpolation.png", "latent_directions.png"):
        assert (run.run_dir / name).is_file(), name
    assert sorted(p.name for p in (run.run_dir / "grids").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    config = json.loads((run.run_dir / "config.json").read_text())
    assert (config["latent_dim"], config["image_size"], config["channels"], config["notebook"]) == (100, 32, 3, "DCGAN.ipynb")


def test_scores_every_epoch_and_a_final_evaluation(run):
    rows = runs.read_metrics_csv(run.run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    for row in rows:
        assert math.isfinite(row["fd"]) and row["fd"] > 0 and 1 <= row["score"] <= 10
        assert sum(row[f"frac_{c}"] for c in range(10)) == pytest.approx(1.0)
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    ours, real = saved["results"]["DCGAN (this run)"], saved["results"]["real training images"]
    assert ours["n_samples"] == 200 and 0 <= ours["precision"] <= 1 and 0 <= ours["recall"] <= 1
    assert real["fd"] < ours["fd"]  # two epochs on 256 images are far from real images
    # Off on a CPU by default: null, with the reason recorded apart (never an error text in a numeric field).
    assert ours["inception_fid"] is None and real["inception_fid"] is None
    assert "inception_metrics = True" in saved["not_computed"]["inception_fid"] and ours["inception_fid_train"] is None
    assert "pool features" in saved["not_computed"]["inception_score"]


def test_exported_generator_draws_colour_images_in_range(run):
    G = torch.export.load(str(run.run_dir / "generator.pt2")).module()
    for n in (1, 9):
        images = G(torch.randn(n, 100))
        assert images.shape == (n, 3, 32, 32)
        assert images.min() >= -1 and images.max() <= 1


def test_resume_equals_training_straight(run, dcgan_runs, tmp_path, data_dir, tiny_cifar):
    straight = dcgan_runs(epochs=3, eval_samples=0).check()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run.run_dir, resumed_dir)
    execute_cached(tmp_path / "nb", data_dir, notebook=DCGAN, **dict(
        TINY, dataset=str(tiny_cifar), run_dir="", resume=str(resumed_dir / "checkpoint.pt"), epochs=3,
        eval_samples=0)).check()
    assert metrics_rows(resumed_dir) == metrics_rows(straight.run_dir)
    a, b = runs.load_checkpoint(resumed_dir / "checkpoint.pt"), runs.load_checkpoint(straight.run_dir / "checkpoint.pt")
    for key in ("G", "D", "G_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


def test_a_run_too_slow_for_train_minutes_trains_the_epochs_that_fit_and_says_so(dcgan_runs):
    straight = dcgan_runs(epochs=3, eval_samples=0).check()
    cut = dcgan_runs(epochs=3, eval_samples=0, train_minutes=1e-6).check()  # less than any epoch takes
    assert "training 1 of the 3 epochs" in notebook_text(cut.nb) and "train_minutes = 0" in notebook_text(cut.nb)
    assert metrics_rows(cut.run_dir) == metrics_rows(straight.run_dir)[:1]  # the full run's first epoch
    saved = runs.load_checkpoint(cut.run_dir / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["config"]["epochs"] == 1  # finished: a resume trains on only when asked


@pytest.mark.parametrize("loss", ["hinge", "least_squares"])
def test_the_other_games_train_with_their_own_losses_and_are_kept_in_the_checkpoint(dcgan_runs, loss):
    bce = metrics_rows(dcgan_runs(epochs=3, eval_samples=0).check().run_dir)[0]
    other = dcgan_runs(epochs=1, eval_samples=0, loss=loss).check()
    row = metrics_rows(other.run_dir)[0]
    assert all(math.isfinite(value) for value in row.values())
    assert row["d_loss"] >= 0 and row["d_loss"] != bce["d_loss"] and row["g_loss"] != bce["g_loss"]  # another game
    assert runs.load_checkpoint(other.run_dir / "checkpoint.pt")["config"]["loss"] == loss
    assert (other.run_dir / "losses.png").is_file()


def test_mnist_at_32_pixels_trains_with_one_channel(dcgan_runs):
    run = dcgan_runs(dataset="mnist", train_subset=256, epochs=1, eval_samples=0).check()
    assert json.loads((run.run_dir / "config.json").read_text())["channels"] == 1
    assert torch.export.load(str(run.run_dir / "generator.pt2")).module()(torch.randn(2, 100)).shape == (2, 1, 32, 32)


def test_an_mnist_checkpoint_resumed_on_colour_images_is_refused_naming_its_data(dcgan_runs, tiny_cifar, tmp_path):
    mnist = dcgan_runs(dataset="mnist", train_subset=256, epochs=1, eval_samples=0).check()
    before = sorted(p.name for p in mnist.run_dir.iterdir())
    resumed = dcgan_runs(resume=str(mnist.run_dir / "checkpoint.pt"), run_dir="", epochs=2)  # on tiny_cifar
    assert resumed.error is not None
    assert "images of 1 channel(s)" in str(resumed.error) and "has 3" in str(resumed.error)
    assert "dataset = 'mnist'" in str(resumed.error)
    assert sorted(p.name for p in mnist.run_dir.iterdir()) == before  # nothing written into the run


def test_a_folder_too_small_for_a_batch_is_refused_before_anything_is_written(dcgan_runs):
    run = dcgan_runs(train_subset=16)  # 16 images, batches of 32
    assert run.error is not None and "batch_size" in str(run.error)
    assert not run.run_dir.exists()


def test_a_folder_too_small_for_the_final_scores_is_refused_before_training(dcgan_runs, tiny_cifar, tmp_path_factory):
    """11 images, no test/ split: the last third (3) would be the reference, one short of what precision
    and recall need. Refused with the way out before anything is written, not after training."""
    folder = tmp_path_factory.mktemp("eleven")
    for i, f in enumerate(sorted((tiny_cifar / "train").rglob("*.jpg"))[:11]):
        shutil.copyfile(f, folder / f"{i:02d}.jpg")
    run = dcgan_runs(dataset=str(folder), batch_size=2, epochs=1)
    assert run.error is not None and "too few real images" in str(run.error) and "eval_samples = 0" in str(run.error)
    assert not run.run_dir.exists()


def test_a_flat_folder_without_classes_trains_and_is_scored_without_class_metrics(dcgan_runs, tiny_cifar,
                                                                                  tmp_path_factory):
    """The folder-of-faces case (anime faces): 64x64 images straight in the folder, no classes, trained at
    64 px. FD, KID, precision and recall every epoch and at the end; no classifier score or class shares
    (they would mean nothing)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("faces")
    for i, f in enumerate(sorted((tiny_cifar / "train").rglob("*.jpg"))[:64]):
        Image.open(f).resize((64, 64), Image.BICUBIC).save(folder / f"{i:02d}.png")  # class folders may repeat a name
    run = dcgan_runs(dataset=str(folder), image_size=64, batch_size=16, epochs=2, metrics_samples=32,
                     eval_samples=32).check()
    assert json.loads((run.run_dir / "config.json").read_text())["image_size"] == 64
    assert torch.export.load(str(run.run_dir / "generator.pt2")).module()(torch.randn(2, 100)).shape == (2, 3, 64, 64)
    rows = metrics_rows(run.run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["fd"])) for r in rows)
    assert all("score" not in r for r in rows)
    ours = json.loads((run.run_dir / "metrics.json").read_text())["results"]["DCGAN (this run)"]
    assert ours["n_samples"] == 32 and math.isfinite(ours["fd"]) and 0 <= ours["recall"] <= 1
    assert "score" not in ours and "min_share" not in ours


def test_benchmark_times_the_notebooks_step_against_pytorch_examples(tiny_cifar, tmp_path):
    import benchmark

    result = benchmark.main(["--dcgan", "--data-dir", str(tiny_cifar.parent), "--seconds", "2", "--out", str(tmp_path / "b.json")])
    assert result["notebook_step"]["images_per_s"] > 0 and result["examples_pipeline"]["images_per_s"] > 0
    assert result["speedup_vs_examples"] == pytest.approx(
        result["notebook_step"]["images_per_s"] / result["examples_pipeline"]["images_per_s"])
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["image_size"] == 32


def test_benchmark_without_the_cifar_folders_says_where_they_must_be(tmp_path):
    import benchmark

    with pytest.raises(SystemExit, match=r"cifar10/train/<class>/\*\.jpg, and there is no such folder\. Point --data-dir"):
        benchmark.main(["--dcgan", "--data-dir", str(tmp_path), "--seconds", "1", "--out", str(tmp_path / "b.json")])


def test_the_baseline_recipe_trains_and_is_scored_like_the_notebook(tiny_cifar, tmp_path):
    import dcgan_baseline

    out = tmp_path / "baseline.json"
    result = dcgan_baseline.main(["--train-folder", str(tiny_cifar / "train"), "--test-folder", str(tiny_cifar / "test"),
                                  "--seconds", "3", "--score-every", "2", "--eval-samples", "200", "--workers", "0",
                                  "--out", str(out)])
    assert result["images_seen"] > 0 and result["train_seconds"] >= 3
    assert result["curve"] and all(point["train_seconds"] >= 2 for point in result["curve"])
    final = result["final"]
    assert final["n_samples"] == 200 and final["fd"] > 0 and 0 <= final["recall"] <= 1
    assert sum(final[f"frac_{c}"] for c in range(10)) == pytest.approx(1.0)
    assert out.with_suffix(".png").is_file() and json.loads(out.read_text())["final"] == final
    assert final["inception_fid"] is None and "pass --inception on" in result["not_computed"]["inception_fid"]


def test_the_notebook_reads_straight_down():
    # No cell uses a name that only a later cell defines (a reader meets each piece before its use).
    assert names_used_before_defined(REPO_ROOT / "DCGAN.ipynb") == []
