"""scripts/benchmark.py: its figures (the notebook's step, the naive pipeline, the matmul peak, the
timed training run) and its refusals of bad options before timing anything."""

from __future__ import annotations

import json
import pytest
import torch

from gan import vanilla_gan as method


def step_matmul_flops(s):
    """(FLOPs per image of a D step and a G step, FLOPs of D's forward pass for one image). With L_G, L_D
    the multiply-adds of one forward pass: G's forward L_G; D's step runs D forward on a real and a fake
    image (2 L_D) and back (2 L_D for the weights, 2 (L_D - first layer) for the inputs: none reach the
    images); G's step runs D forward on the fake (L_D), back to its input (L_D), then G back (L_G for the
    weights, L_G - first layer for the inputs)."""
    g = [s["latent_dim"], *s["g_hidden"], 784]
    d = [784, *s["d_hidden"], 1]
    L_G = sum(a * b for a, b in zip(g, g[1:]))
    L_D = sum(a * b for a, b in zip(d, d[1:]))
    macs = 3 * L_G - g[0] * g[1] + 8 * L_D - 2 * d[0] * d[1]
    return 2 * macs, 2 * L_D


def test_benchmark_writes_its_figures(tmp_path, data_dir):
    import benchmark

    out = tmp_path / "bench.json"
    result = benchmark.main(["--data-dir", str(data_dir), "--seconds", "1", "--batch-size", "64",
                             "--score-epochs", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["batch_size"] == 64
    for key in ("matmul_peak_gflops", "medium_precision_speedup", "speedup_vs_naive", "share_of_matmul_peak", "peak_rss_mb"):
        assert saved[key] > 0
    assert saved["notebook_step"]["images_per_s"] > 0 and saved["naive_pipeline"]["images_per_s"] > 0
    # The FLOP count matches the networks' matmuls, counted by hand from the layer shapes, plus a
    # quarter of an R1 step (every 4th step; a forward and a double backward through D).
    plain, d_forward = step_matmul_flops({**method.notebook_parameters(), "d_hidden": saved["d_hidden"]})
    assert saved["d_hidden"] == method.notebook_parameters()["d_hidden"]
    assert plain + 3.4 * d_forward / 4 < saved["notebook_step"]["flops_per_image"] < plain + 8.6 * d_forward / 4
    assert result["speedup_vs_naive"] == pytest.approx(
        result["notebook_step"]["images_per_s"] / result["naive_pipeline"]["images_per_s"])


def test_naive_pipeline_reads_a_directory_with_only_the_downloaded_gz_files(make_mnist_copy):
    # mnist_data downloads only the .gz files; torchvision's MNIST(download=False) would call that
    # directory empty, so benchmark.py failed after `make run` on a fresh machine.
    import benchmark

    root = make_mnist_copy(plain=False, gz=True)
    cfg = {**method.notebook_parameters(), "batch_size": 32, "d_hidden": [64, 32], "g_hidden": [32, 64]}
    result = benchmark.time_naive_pipeline(cfg, str(root), torch.device("cpu"), seconds=0.1, num_workers=0)
    assert result["images"] >= 32 and result["images_per_s"] > 0
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # unpacked beside, as torchvision does


def test_benchmark_without_r1_counts_the_plain_step_and_profiles_it(tmp_path, data_dir):
    import benchmark

    result = benchmark.main(["--data-dir", str(data_dir), "--seconds", "1", "--batch-size", "64", "--d-hidden", "1024", "512",
                             "256", "--r1-gamma", "0", "--profile", "5", "--score-epochs", "0", "--out", str(tmp_path / "bench.json")])
    # By hand from the layer shapes (step_matmul_flops): the FLOPs per image of a D and a G step, here
    # with D's widths of before the fifth pass (28.98 MFLOP, the count of the first benchmark).
    assert result["r1_gamma"] == 0 and result["d_hidden"] == [1024, 512, 256]
    assert result["notebook_step"]["flops_per_image"] == pytest.approx(28_975_104, rel=1e-3)
    shares = result["notebook_step"]["profile"]
    assert set(shares) == {"matmul", "adam", "ema", "rest"}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["matmul"] > shares["ema"] > 0
    # The matmuls on their own run faster than the whole step: the step's ceiling at this batch size.
    assert result["matmul_only_share_of_peak"] == pytest.approx(result["share_of_matmul_peak"] / shares["matmul"])


def test_benchmark_at_reduced_matmul_precision_reports_both_peaks(tmp_path, data_dir):
    import benchmark

    result = benchmark.main(["--data-dir", str(data_dir), "--seconds", "1", "--batch-size", "64",
                             "--matmul-precision", "medium", "--score-epochs", "0", "--out", str(tmp_path / "bench.json")])
    assert result["matmul_precision"] == "medium"
    assert result["matmul_peak_gflops_at_precision"] > 0
    assert result["share_of_matmul_peak_at_precision"] == pytest.approx(
        result["notebook_step"]["gflops"] / result["matmul_peak_gflops_at_precision"])
    assert torch.get_float32_matmul_precision() == "highest"  # set for (a) only


@pytest.mark.parametrize("target, reached", [(1.0, True), (10.5, False)])
def test_benchmark_times_a_short_training_run_to_the_target_score(tmp_path, data_dir, target, reached):
    # The default target is 9 after minutes of training; here a tiny subset, 2 epochs at most, and a
    # target that every run reaches at once (a score is at least 1) or that none can (10 is the maximum).
    import benchmark

    out = tmp_path / "bench.json"
    result = benchmark.main(["--data-dir", str(data_dir), "--seconds", "0.5", "--batch-size", "64",
                             "--score-epochs", "2", "--score-target", str(target), "--train-subset", "512",
                             "--out", str(out)])
    timed = json.loads(out.read_text())["time_to_score"]
    assert timed == result["time_to_score"] and timed["target"] == target and timed["reached"] is reached
    if reached:
        assert timed["epoch"] == 1 and timed["epochs_run"] == 1 and 0 < timed["train_seconds"] < 60
    else:
        assert timed["epoch"] is None and timed["epochs_run"] == 2 and 1 <= timed["best_score"] <= 10
    assert [row["epoch"] for row in timed["curve"]] == list(range(1, timed["epochs_run"] + 1))


@pytest.mark.parametrize("argv, message", [(["--batch-size", "0"], "batch_size = 0"), (["--r1-every", "0"], "r1_every = 0"),
                                           (["--score-epochs", "-1"], "--score-epochs (-1)")])
def test_benchmark_refuses_bad_options_before_timing_anything(argv, message, capsys):
    import benchmark
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert message in capsys.readouterr().err


def test_step_flop_count_of_the_old_widths():
    # The count above against the figure counted for the first benchmark (D 1024-512-256): 28.97 MFLOP.
    plain, _ = step_matmul_flops({"latent_dim": 100, "g_hidden": [256, 512, 1024], "d_hidden": [1024, 512, 256]})
    assert plain == 28_975_104


def test_quick_estimate_adds_up_the_timed_parts_of_a_run(data_dir):
    import benchmark
    from gan import mnist_data

    data = mnist_data.load_mnist(data_dir, train_subset=640)
    cfg = {**method.notebook_parameters(), "batch_size": 64, "d_hidden": [64, 32], "g_hidden": [32, 64],
           "epochs": 7, "metrics_samples": 200, "eval_samples": 100, "matmul_precision": "highest"}
    q = benchmark.quick_estimate(cfg, data, torch.device("cpu"), seconds=0.2)
    parts = q["parts_seconds"]
    assert all(seconds > 0 for seconds in parts.values())
    assert parts["training"] == pytest.approx(7 * q["epoch_seconds"])
    assert q["epoch_seconds"] == pytest.approx(640 / q["notebook_step"]["images_per_s"])  # ten steps of 64
    assert parts["per-epoch scores"] == pytest.approx(7 * q["score_seconds"])
    assert q["total_seconds"] == pytest.approx(sum(parts.values()))
    text = benchmark.quick_lines(q)
    assert f"about {q['total_seconds'] / 60:.0f} min" in text and "7 epochs" in text
    no_scores = benchmark.quick_estimate({**cfg, "metrics_every": 0, "eval_samples": 0}, data, torch.device("cpu"), 0.2)
    assert no_scores["parts_seconds"]["per-epoch scores"] == 0 and no_scores["parts_seconds"]["final evaluation (two rows)"] < 0.1
