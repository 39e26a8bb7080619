"""Nothing lost, with the real notebook: a finished run directory is never overwritten, two runs
cannot share one directory, settings that are wrong only for this data fail before anything is
written, and SIGTERM to `make run`'s runner saves the last completed epoch and prints how to resume.

The library pieces have fast unit tests in test_runs.py (on a toy notebook for the signals);
these check that Vanilla_GAN.ipynb wires them in. GAN_SIGTERM_TRIALS (default 3) sets the number of
SIGTERM trials; the closing note's 10-trial figure comes from GAN_SIGTERM_TRIALS=10.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import papermill

from gan import runs
from conftest import NOTEBOOK, REPO_ROOT, TINY_PARAMS, execute_cached, kernel_env, listing

RUNNER = REPO_ROOT / "scripts" / "run_notebook.py"


def training_started(nb) -> bool:
    return any(c.cell_type == "code" and "for epoch in range(epochs_done, epochs)" in c.source
               and c.execution_count is not None for c in nb.cells)


def test_a_finished_run_is_refused_and_left_as_it_was(tiny_run, tmp_path, data_dir):
    tiny_run.check()
    before = listing(tiny_run.run_dir)
    again = execute_cached(tmp_path, data_dir, run_dir=str(tiny_run.run_dir))
    assert isinstance(again.error, papermill.PapermillExecutionError) and again.error.ename == "ParameterError"
    assert str(tiny_run.run_dir) in str(again.error) and "resume" in str(again.error)
    assert not training_started(again.nb)
    assert listing(tiny_run.run_dir) == before


def test_settings_wrong_for_this_data_fail_before_anything_is_written(tmp_path, data_dir):
    # 512 images in batches of 64: 8 steps an epoch, so G would never take a step with d_steps 9.
    run_dir = tmp_path / "never"
    bad = execute_cached(tmp_path, data_dir, run_dir=str(run_dir), d_steps=9)
    assert isinstance(bad.error, papermill.PapermillExecutionError) and bad.error.ename == "ParameterError"
    assert "d_steps" in str(bad.error)
    assert not training_started(bad.nb)
    assert not run_dir.exists(), "a refused run created its run directory"


def runner(run_dir: Path, data_dir: Path, **params) -> subprocess.Popen:
    """run_notebook.py (what `make run` calls) on the tiny settings, as a terminal's job."""
    args = [sys.executable, str(RUNNER), str(NOTEBOOK), "--no-progress-bar", "-p", "run_dir", str(run_dir),
            "-p", "data_dir", str(data_dir)]
    for name, value in {**TINY_PARAMS, "eval_samples": 0, **params}.items():
        args += ["-p", name, str(value)]
    return subprocess.Popen(args, cwd=REPO_ROOT, env={**os.environ, **kernel_env()}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def test_sigterm_saves_the_last_completed_epoch_and_prints_the_resume_command(tmp_path, data_dir):
    rng = random.Random(0)
    report = []
    for trial in range(int(os.environ.get("GAN_SIGTERM_TRIALS", "3"))):
        run_dir = tmp_path / f"run {trial}"  # a space: the printed command must quote it
        proc = runner(run_dir, data_dir, epochs=40)
        assert wait_for(run_dir / "metrics.csv", proc), "no epoch completed"
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere in a later epoch, its scores or its checkpoint
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, output
        for bad in ("Traceback", "zmq", "Aborted!"):
            assert bad not in output, f"{bad!r} on the terminal:\n{output}"
        ck = runs.load_checkpoint(run_dir / "checkpoint.pt")
        rows = runs.read_metrics_csv(run_dir / "metrics.csv")
        assert 1 <= ck["epoch"] < 40 and [row["epoch"] for row in rows] == list(range(1, ck["epoch"] + 1))
        assert [{k: float(v) for k, v in row.items()} for row in ck["history"]] == rows  # file and checkpoint agree
        assert len(runs.epoch_grid_paths(run_dir)) == ck["epoch"]  # no grid of the rolled-back epoch
        assert not list(run_dir.glob("*.tmp"))
        assert f"after epoch {ck['epoch']}" in output and runs.resume_command(run_dir / "checkpoint.pt") in output
        report.append(f"trial {trial}: checkpoint at epoch {ck['epoch']}, metrics.csv agrees")
    print("\n".join(report))


def test_two_runs_racing_for_one_directory(tmp_path, data_dir):
    run_dir = tmp_path / "shared"
    first, second = runner(run_dir, data_dir, epochs=3), runner(run_dir, data_dir, epochs=3)
    outputs = [proc.communicate(timeout=300)[0] for proc in (first, second)]
    codes = sorted(proc.returncode for proc in (first, second))
    assert codes[0] == 0 and codes[1] in (1, 2), outputs  # one trains; the other is refused
    refused = outputs[[first.returncode, second.returncode].index(codes[1])]
    assert str(run_dir) in refused and ("is in use" in refused or "already holds a run" in refused), refused
    ck = runs.load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["epoch"] == 3 and [row["epoch"] for row in runs.read_metrics_csv(run_dir / "metrics.csv")] == [1, 2, 3]
