"""gan/many_runs.py: the plan of a set of runs, each run's state on disk, and the table over them
(no engine, no notebook: run directories are written by hand here; test_run_many.py runs notebooks)."""

from __future__ import annotations

import json
import math

import pytest

from gan import many_runs, runs
from gan.errors import ParameterError


def test_a_grid_times_seeds_plans_one_directory_per_run(tmp_path):
    grid = many_runs.parse_grid(["lr_g=2e-4,4e-4", "batch_size=64"], many_runs.settings.PARAMETER_RULES)
    assert grid == {"lr_g": [0.0002, 0.0004], "batch_size": [64]}
    planned = many_runs.plan("Vanilla_GAN.ipynb", [0, 1, 2], grid, {"epochs": 7}, tmp_path)
    assert len(planned) == 6 and {r.epochs for r in planned} == {7}
    assert planned[0].run_dir == tmp_path / "lr_g-0.0002_batch_size-64" / "seed_0"
    assert planned[0].parameters == {"epochs": 7, "lr_g": 0.0002, "batch_size": 64, "seed": 0}
    assert planned[0].setting == "lr_g=0.0002 batch_size=64" and planned[5].name == "lr_g=0.0004 batch_size=64, seed 2"
    plain = many_runs.plan("DCGAN.ipynb", [3], {}, {}, tmp_path)
    assert plain[0].run_dir == tmp_path / "defaults" / "seed_3" and plain[0].epochs == 25  # DCGAN's default
    # Seeds compared with each other train the same epochs, wherever they run: no stop by train_minutes.
    assert plain[0].parameters["train_minutes"] == 0
    assert many_runs.plan("DCGAN.ipynb", [3], {}, {"train_minutes": 9}, tmp_path)[0].parameters["train_minutes"] == 9


def test_list_values_and_paths_are_typed_by_the_notebooks_rules():
    grid = many_runs.parse_grid(["g_hidden=[256,512];[512,1024]", "data_dir=2024"], many_runs.settings.PARAMETER_RULES)
    assert grid == {"g_hidden": [[256, 512], [512, 1024]], "data_dir": ["2024"]}


@pytest.mark.parametrize("grid, params, message", [
    ({"lr_gg": [1e-4]}, {}, "lr_gg"),  # a misspelt name fails before any run, with its suggestion
    ({"lr_g": [-1.0]}, {}, "lr_g"),
    ({}, {"seed": 3}, "--seeds"),
    ({"run_dir": ["x"]}, {}, "run_dir"),
])
def test_a_bad_setting_is_refused_before_any_run(tmp_path, grid, params, message):
    with pytest.raises(ParameterError, match=message):
        many_runs.plan("Vanilla_GAN.ipynb", [0, 1], grid, params, tmp_path)


def fake_run(run_dir, epochs_saved: int | None, evaluated_epochs: int | None = None, notebook="Vanilla_GAN.ipynb"):
    """A run directory as a run leaves it: a checkpoint of `epochs_saved` epochs, metrics.csv, and
    (when evaluated) metrics.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"notebook": notebook}))
    if epochs_saved is not None:
        runs.save_checkpoint(run_dir / "checkpoint.pt", {"epoch": epochs_saved, "config": {}})
        history = [{"epoch": e, "score": 8.0 + e, "fd": 10.0 / e, "train_seconds": 10.0 * e}
                   for e in range(1, epochs_saved + 1)]
        runs.write_metrics_csv(run_dir / "metrics.csv", history)
    if evaluated_epochs is not None:
        row = {"fd": 0.5, "score": 9.2, "precision": 0.8, "recall": 0.81, "parzen_ll": 239.0,
               **{f"frac_{d}": 0.1 for d in range(10)}, "inception_fid": None}
        runs.write_json(run_dir / "metrics.json", {"epochs": evaluated_epochs,
                                                   "results": {many_runs.ROW_NAMES[notebook]: row}})


def test_each_state_and_the_parameters_that_continue_it(tmp_path):
    run = many_runs.plan("Vanilla_GAN.ipynb", [0], {}, {"epochs": 3}, tmp_path)[0]
    assert many_runs.state_of(run).state == "new"
    assert "resume" not in many_runs.runner_parameters(run, many_runs.state_of(run))
    fake_run(run.run_dir, None)
    state = many_runs.state_of(run)
    assert state.state == "unstarted" and many_runs.runner_parameters(run, state)["overwrite"] is True
    runs.save_checkpoint(run.run_dir / "checkpoint.pt", {"epoch": 2, "config": {}})
    state = many_runs.state_of(run)
    assert (state.state, state.epochs_done) == ("stopped", 2)
    params = many_runs.runner_parameters(run, state)
    assert params["resume"] == str(run.run_dir / "checkpoint.pt") and params["run_dir"] == str(run.run_dir)
    runs.save_checkpoint(run.run_dir / "checkpoint.pt", {"epoch": 3, "config": {}})
    assert many_runs.state_of(run).state == "stopped"  # trained, but the final evaluation never ran
    runs.write_json(run.run_dir / "metrics.json", {"epochs": 3, "results": {}})
    assert many_runs.state_of(run).state == "finished"


def test_without_a_final_evaluation_the_checkpoint_says_finished(tmp_path):
    run = many_runs.plan("Vanilla_GAN.ipynb", [0], {}, {"epochs": 2, "eval_samples": 0}, tmp_path)[0]
    fake_run(run.run_dir, 2)
    assert many_runs.state_of(run).state == "finished"


def test_mean_and_sd_over_seeds():
    mean, sd, n = many_runs.mean_sd([1.0, 2.0, 3.0, None, math.nan])
    assert (mean, n) == (2.0, 3) and sd == pytest.approx(1.0)
    assert math.isnan(many_runs.mean_sd([4.0])[1]) and many_runs.mean_sd([])[2] == 0


def test_the_summary_has_mean_sd_per_setting_and_a_row_per_seed(tmp_path):
    planned = many_runs.plan("Vanilla_GAN.ipynb", [0, 1], {"lr_g": [2e-4, 4e-4]}, {"epochs": 2}, tmp_path)
    for r in planned:
        fake_run(r.run_dir, 2, 2)
    (planned[3].run_dir / "metrics.json").unlink()  # a run that never got its final evaluation
    summary = many_runs.summarize(planned)
    first = summary.settings["lr_g=0.0002"]
    assert first["score"] == (9.2, 0.0, 2) and first["seconds_to_score_9"] == (10.0, 0.0, 2)
    assert first["epoch_to_score_9"][0] == 1 and first["min_share"][0] == pytest.approx(0.1)
    assert summary.settings["lr_g=0.0004"]["score"][2] == 1  # n counts the runs that have the number
    assert "inception_fid" not in summary.columns  # null in every run: no column of dashes
    paths = many_runs.write_summary(summary, tmp_path)
    text = paths["markdown"].read_text()
    assert "| lr_g=0.0002 | 2/2 | 239.0 ± 0.0 |" in text and "| lr_g=0.0004 | 1/2 | 239.0 |" in text
    assert "| 10 ± 0 (n=2) |" in text  # a number from another count of runs than the setting's n says so
    assert text.count("\n| lr_g=") == 2 + 4  # two settings, then four seeds
    assert paths["runs"].read_text().splitlines()[0].startswith("setting,seed,parzen_ll,fd,")
    assert "lr_g=0.0002,score,9.2,0.0,2" in paths["summary"].read_text()
    assert many_runs.plot_bands(planned, tmp_path / "bands.png")
    from PIL import Image
    with Image.open(tmp_path / "bands.png") as img:
        assert img.format == "PNG" and img.size[0] > 600  # score and FD side by side


def test_the_progress_count_is_the_epochs_saved(tmp_path):
    fake_run(tmp_path / "r", 3)
    assert many_runs.epochs_done(tmp_path / "r") == 3 and many_runs.epochs_done(tmp_path / "none") == 0

