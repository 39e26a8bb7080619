"""Vanilla_GAN.ipynb end to end with papermill, on tiny settings: every cell runs, the run directory
holds what the README promises, a seed repeats a run exactly, and resuming equals training straight."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import papermill
import pytest
import torch
from PIL import Image

import gan_utils as gu
from gan import runs
from gan import settings
from gan import vanilla_gan as method
from conftest import (NOTEBOOK, REPO_ROOT, TINY_PARAMS, cell_text, execute_cached, is_machine_column, kernel_env,
                      metrics_rows, notebook_text, names_used_before_defined)

LOSS_COLUMNS = ("d_loss", "g_loss", "d_x", "d_g_z")


@pytest.fixture(scope="module")
def run(tiny_run):
    """The tiny run, for tests of what training writes: they fail with the notebook's traceback when
    the notebook failed before or during training (a failure in a later cell fails only its own tests)."""
    cell = training_cell(tiny_run.nb)
    if tiny_run.error is not None and (cell.execution_count is None
                                       or any(o.get("output_type") == "error" for o in cell.outputs)):
        tiny_run.check()
    return tiny_run


def training_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and "train_one_epoch(epoch, bar, step_fn)" in c.source
                and "for epoch in range(epochs_done, epochs)" in c.source)


# ------------------------------------------------------------------------------------------------
# The default tiny run
# ------------------------------------------------------------------------------------------------

def test_every_code_cell_ran(tiny_run):
    tiny_run.check()  # papermill raised if any cell failed: show its traceback
    code = [c for c in tiny_run.nb.cells if c.cell_type == "code"]
    assert code
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [c for c in code if any(o.get("output_type") == "error" for o in c.get("outputs", []))]


def test_parameters_were_injected(run):
    injected = [c for c in run.nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "train_subset = 512" in injected[0].source


def test_config_json(run):
    config = json.loads((run.run_dir / "config.json").read_text())
    assert set(settings.PARAMETER_RULES) <= set(config)
    assert config["latent_dim"] == 100
    for name, value in TINY_PARAMS.items():
        assert config[name] == value, name
    assert config["run_dir"] == str(run.run_dir)
    assert config["device_resolved"] == "cpu"
    assert config["versions"]["torch"] == torch.__version__


def test_metrics_csv_one_row_per_epoch(run):
    rows = runs.read_metrics_csv(run.run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    for row in rows:
        for key in LOSS_COLUMNS:
            assert math.isfinite(row[key]), (key, row)
        assert row["d_loss"] > 0 and row["g_loss"] > 0
        assert 0 < row["d_x"] < 1 and 0 < row["d_g_z"] < 1
        assert row["lr_g"] == json.loads((run.run_dir / "config.json").read_text())["lr_g"]
        # metrics_every = 1: the quick scores are there every epoch
        assert math.isfinite(row["fd"]) and row["fd"] > 0
        assert 1 <= row["score"] <= 10
    assert 0 < rows[0]["train_seconds"] < rows[1]["train_seconds"]


def test_epoch_grids(run):
    grids = sorted(p.name for p in (run.run_dir / "grids").iterdir())
    assert grids == ["epoch_001.png", "epoch_002.png"]
    for name in grids:
        with Image.open(run.run_dir / "grids" / name) as img:
            assert img.format == "PNG" and img.size == (484, 484)


def test_progress_gif_one_frame_per_epoch(run):
    with Image.open(run.run_dir / "progress.gif") as gif:
        assert gif.n_frames == 2
        for k in range(gif.n_frames):
            gif.seek(k)
            frame = np.asarray(gif.convert("L"))[14:]  # below the "epoch k" label strip
            with Image.open(run.run_dir / "grids" / f"epoch_{k + 1:03d}.png") as grid:
                assert np.array_equal(frame, np.asarray(grid.convert("L"))), f"frame {k} is not epoch {k + 1}'s grid"


def test_other_pictures(run):
    for name in ("losses.png", "quality.png", "interpolation.png", "real_vs_generated.png", "latent_directions.png"):
        with Image.open(run.run_dir / name) as img:
            assert img.format == "PNG" and img.size[0] > 100, name


def test_checkpoint(run):
    ck = runs.load_checkpoint(run.run_dir / "checkpoint.pt")
    assert ck["epoch"] == 2
    assert {"G", "D", "G_ema", "opt_G", "opt_D", "fixed_noise", "rng", "history", "config"} <= set(ck)
    assert ck["config"]["latent_dim"] == 100 and ck["config"]["g_batchnorm"] is True
    assert ck["fixed_noise"].shape == (64, 100)
    rows = runs.read_metrics_csv(run.run_dir / "metrics.csv")
    assert [{k: float(v) for k, v in r.items()} for r in ck["history"]] == rows
    for key in ("G", "D", "G_ema"):
        assert all(torch.isfinite(t).all() for t in ck[key].values() if t.is_floating_point()), key


def test_checkpoint_loads_into_the_notebooks_networks(run):
    ck = runs.load_checkpoint(run.run_dir / "checkpoint.pt")
    G = method.Generator(100, batchnorm=True)
    G.load_state_dict(ck["G_ema"])
    D = method.Discriminator(ck["config"]["d_hidden"], dropout=0.3)
    D.load_state_dict(ck["D"])
    with torch.no_grad():
        assert D.eval()(G.eval()(ck["fixed_noise"])).shape == (64,)


def test_exported_generator(run):
    exported = torch.export.load(str(run.run_dir / "generator.pt2")).module()
    ck = runs.load_checkpoint(run.run_dir / "checkpoint.pt")
    G_ema = method.Generator(100, batchnorm=True)
    G_ema.load_state_dict(ck["G_ema"])
    G_ema.eval()
    for n in (1, 7):
        z = torch.randn(n, 100)
        out = exported(z)
        assert out.shape == (n, 1, 28, 28)
        assert out.min() >= -1 and out.max() <= 1
        with torch.no_grad():  # it is the EMA generator (ema_decay > 0), in eval mode
            assert torch.allclose(out.reshape(n, 784), G_ema(z), atol=1e-5)


def test_metrics_json(run):
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["eval_samples"] == 500
    gan = metrics["results"]["GAN (this run)"]
    assert gan["n_samples"] == 500
    assert math.isfinite(gan["parzen_ll"]) and math.isfinite(gan["fd"])
    assert "real training images" in metrics["results"]


def test_training_printed_progress(run):
    text = cell_text(training_cell(run.nb))
    assert "epoch   1" in text and "epoch   2" in text
    assert "2 epochs" in text


# ------------------------------------------------------------------------------------------------
# Reproducibility and resuming
# ------------------------------------------------------------------------------------------------

def comparable(rows):
    assert rows and not any(is_machine_column(k) for k in rows[0])
    assert set(LOSS_COLUMNS) <= set(rows[0]) and "fd" in rows[0] and "score" in rows[0]
    return rows


def same_weights(path_a: Path, path_b: Path, keys=("G", "D", "G_ema")):
    a, b = runs.load_checkpoint(path_a), runs.load_checkpoint(path_b)
    for key in keys:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def test_same_seed_same_run(run, notebook_runs):
    again = notebook_runs(eval_samples=0).check()  # the final evaluation runs after training: no effect
    assert comparable(metrics_rows(again.run_dir)) == comparable(metrics_rows(run.run_dir))
    same_weights(again.run_dir / "checkpoint.pt", run.run_dir / "checkpoint.pt")


def test_resume_equals_straight_run(run, notebook_runs, tmp_path, data_dir):
    straight = notebook_runs(epochs=4, eval_samples=0).check()
    # continue a copy of the 2-epoch run; run_dir '' -> the checkpoint's own directory
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run.run_dir, resumed_dir)
    second = execute_cached(tmp_path / "nb", data_dir, resume=str(resumed_dir / "checkpoint.pt"),
                            run_dir="", epochs=4, eval_samples=0)
    second.check()
    assert "after epoch 2" in notebook_text(second.nb)
    assert comparable(metrics_rows(resumed_dir)) == comparable(metrics_rows(straight.run_dir))
    assert [r["epoch"] for r in metrics_rows(resumed_dir)] == [1.0, 2.0, 3.0, 4.0]
    same_weights(resumed_dir / "checkpoint.pt", straight.run_dir / "checkpoint.pt")
    assert runs.load_checkpoint(resumed_dir / "checkpoint.pt")["epoch"] == 4
    with Image.open(resumed_dir / "progress.gif") as gif:
        assert gif.n_frames == 4


def test_a_finished_run_resumed_says_there_is_nothing_to_train_with_no_empty_bar(run, tmp_path, data_dir):
    finished = tmp_path / "finished"
    shutil.copytree(run.run_dir, finished)
    again = execute_cached(tmp_path / "nb", data_dir, resume=str(finished / "checkpoint.pt"), run_dir="",
                           eval_samples=0)
    again.check()
    cell = training_cell(again.nb)
    assert "nothing to train: epochs (2) <= epochs done (2)" in cell_text(cell)
    assert not [o for o in cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], \
        "an empty 0/0 progress bar under 'nothing to train'"
    assert "eval_samples = 0: no samples to set beside the training set" in notebook_text(again.nb)


def test_a_resume_keeps_its_own_widths_and_settings(run, tmp_path, data_dir):
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["d_hidden"] == [768, 384, 192]  # the default, on every machine
    # A run made with other widths and its own learning rate continues with both, when the resume
    # passes neither (the command a stop prints).
    first = execute_cached(tmp_path / "first", data_dir, d_hidden=[64, 32], lr_g=1e-4, epochs=1, eval_samples=0)
    first.check()
    second = execute_cached(tmp_path / "second", data_dir, resume=str(first.run_dir / "checkpoint.pt"), run_dir="",
                            epochs=2, eval_samples=0)
    second.check()
    text = notebook_text(second.nb)
    assert "after epoch 1, with the run's own settings, except those set for this run: epochs 1 -> 2" in text
    resumed = runs.load_checkpoint(first.run_dir / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["config"]["d_hidden"] == [64, 32] and resumed["config"]["lr_g"] == 1e-4
    assert json.loads((first.run_dir / "config.json").read_text())["lr_g"] == 1e-4


def test_sweep_trains_the_same_weights_as_the_notebook(run, tmp_path, data_dir):
    # One definition of the step: sweep.py, with the notebook's seed and settings, ends where the
    # notebook's training ended, bit for bit (same threads as the notebook's kernel).
    weights = tmp_path / "sweep_weights.pt"
    subprocess.run([sys.executable, "scripts/sweep.py", "--data-dir", str(data_dir), "--epochs", "2", "--final-samples", "0",
                    "--train-subset", str(TINY_PARAMS["train_subset"]), "--batch-size", str(TINY_PARAMS["batch_size"]),
                    "--seed", str(TINY_PARAMS["seed"]), "--save-weights", str(weights), "--out", str(tmp_path / "s.json")],
                   cwd=REPO_ROOT, env={**os.environ, **kernel_env()}, check=True, capture_output=True)
    swept = torch.load(weights, weights_only=True)
    notebook = runs.load_checkpoint(run.run_dir / "checkpoint.pt")
    for key in ("G", "D", "G_ema"):
        for name, tensor in notebook[key].items():
            assert torch.equal(tensor, swept[key][name]), f"{key}.{name} differs between the notebook and sweep.py"


def notebook_that_continues(path: Path, new_settings: str) -> Path:
    """A copy of the notebook cut after its training cell, then a new cell with `new_settings` and the
    training cell once more: what a Jupyter user does to continue a run with other settings."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cut = nb.cells.index(training_cell(nb)) + 1
    nb.cells = nb.cells[:cut] + [nbformat.v4.new_code_cell(new_settings), nbformat.v4.new_code_cell(nb.cells[cut - 1].source)]
    nbformat.write(nb, path)
    return path


def test_running_the_training_cell_again_continues_with_new_settings(tmp_path, data_dir):
    variant = notebook_that_continues(tmp_path / "continue.ipynb", "epochs += 1\nlr_g = 1e-4")
    result = execute_cached(tmp_path, data_dir, notebook=variant, epochs=2).check()
    rows = runs.read_metrics_csv(result.run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1.0, 2.0, 3.0]  # one more row, not a restart
    assert [row["lr_g"] for row in rows] == [TINY_PARAMS.get("lr_g", 8e-4)] * 2 + [1e-4]
    ck = runs.load_checkpoint(result.run_dir / "checkpoint.pt")
    assert ck["epoch"] == 3 and ck["config"]["epochs"] == 3 and ck["config"]["lr_g"] == 1e-4
    assert [group["lr"] for group in ck["opt_G"]["param_groups"]] == [1e-4]  # the optimizer's rate changed
    assert [group["lr"] for group in ck["opt_D"]["param_groups"]] == [ck["config"]["lr_d"]]
    assert "epoch   3" in cell_text(result.nb.cells[-1])


# ------------------------------------------------------------------------------------------------
# Bad settings fail fast, before any training
# ------------------------------------------------------------------------------------------------

def test_bad_parameter_fails_fast(tmp_path, data_dir):
    bad = execute_cached(tmp_path, data_dir, lr_g=-1.0)
    assert isinstance(bad.error, papermill.PapermillExecutionError)
    assert bad.error.ename == "ParameterError"
    text = str(bad.error)
    assert "lr_g = -1.0" in text and "a number > 0" in text
    assert not (bad.run_dir / "checkpoint.pt").exists()
    assert training_cell(bad.nb).execution_count is None  # training never started


def test_misspelt_parameter_fails_with_suggestion(tmp_path, data_dir):
    # `papermill -p epoch 3` (for epochs) must not silently train with the default
    bad = execute_cached(tmp_path, data_dir, epoch=1, eval_samples=0)
    assert isinstance(bad.error, papermill.PapermillExecutionError), \
        "a misspelt papermill parameter ('epoch') was silently ignored"
    assert "epoch" in str(bad.error) and "did you mean 'epochs'" in str(bad.error)
    assert training_cell(bad.nb).execution_count is None


@pytest.fixture(scope="module")
def wrong_architecture_resume(run, tmp_path_factory, data_dir):
    """A copy of the tiny run, resumed with latent_dim=64 into its own directory (run_dir '')."""
    tmp = tmp_path_factory.mktemp("wrongarch")
    copy_dir = tmp / "run_copy"
    shutil.copytree(run.run_dir, copy_dir)
    before = {p.name: p.read_bytes() for p in copy_dir.iterdir() if p.is_file()}
    result = execute_cached(tmp / "nb", data_dir, resume=str(copy_dir / "checkpoint.pt"), run_dir="",
                            latent_dim=64, eval_samples=0)
    return result, copy_dir, before


def test_resume_with_other_architecture_names_it(wrong_architecture_resume):
    result, _, _ = wrong_architecture_resume
    assert isinstance(result.error, papermill.PapermillExecutionError)
    assert result.error.ename == "CheckpointError"
    assert "latent_dim: checkpoint has 100, notebook has 64" in str(result.error)
    assert training_cell(result.nb).execution_count is None


def test_failed_resume_leaves_the_run_untouched(wrong_architecture_resume):
    # the checkpoint's settings are checked before anything is written into its run directory
    _, copy_dir, before = wrong_architecture_resume
    after = {p.name: p.read_bytes() for p in copy_dir.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], f"a resume that failed its checks rewrote {changed}"


def test_papermill_reads_every_parameter_of_the_parameters_cell():
    # papermill infers the parameters from the tagged cell; a line it cannot parse makes it warn
    # "Passed unknown parameter" for a real parameter on every headless run.
    inferred = papermill.inspect_notebook(str(gu.Path(__file__).resolve().parents[1] / "Vanilla_GAN.ipynb"))
    assert set(inferred) == set(settings.PARAMETER_RULES)


def test_the_notebook_reads_straight_down():
    # No cell uses a name that only a later cell defines (a reader meets each piece before its use).
    assert names_used_before_defined(NOTEBOOK) == []
