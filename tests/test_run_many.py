"""scripts/run_many.py: sets of runs of the notebook through Dask, on tiny settings: the local engine's runs
equal `make run`'s, finished runs are not run again, a stopped set resumes, a failed run is reported
without stopping the others, and the same command drives a cluster (a scheduler and a worker process
on this machine, as on two)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_many
from gan import many_runs, runs
from conftest import REPO_ROOT, TINY_PARAMS, metrics_rows, free_port

# 8 steps an epoch on 512 images; the seed comes from --seeds.
TINY = {k: v for k, v in TINY_PARAMS.items() if k != "seed"}


def p_args(params: dict) -> list[str]:
    return [x for name, value in params.items() for x in ("-p", name, str(value))]


def many(out: Path, seeds: str = "2", params: dict | None = None, *extra) -> list[str]:
    return ["Vanilla_GAN.ipynb", "--seeds", seeds, *p_args({**TINY, **(params or {})}), "--out", str(out),
            "--no-progress-bar", *extra]


@pytest.fixture
def data_env(data_dir, monkeypatch):
    monkeypatch.setenv("GAN_DATA_DIR", str(data_dir))
    return {**os.environ, "GAN_DATA_DIR": str(data_dir)}


def final_numbers(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["results"]


def test_the_local_engines_runs_equal_make_runs_and_finished_runs_are_not_run_again(tmp_path, data_env, capfd):
    out = tmp_path / "many"
    assert run_many.main(many(out)) == 0
    err = capfd.readouterr().err
    assert "2 runs of Vanilla_GAN.ipynb" in err and "at once, 1 thread(s) each" in err
    # The same two runs as `make run` runs them (scripts/run_notebook.py), with the same one thread each
    # (both at once, as the engine ran them).
    singles = {seed: tmp_path / "single" / f"seed_{seed}" for seed in (0, 1)}
    started = [subprocess.Popen([sys.executable, "scripts/run_notebook.py", "Vanilla_GAN.ipynb", "--no-progress-bar",
                                 *p_args({**TINY, "seed": seed, "run_dir": single})], cwd=REPO_ROOT,
                                env={**data_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for seed, single in singles.items()]
    assert [p.wait(timeout=300) for p in started] == [0, 0]
    for seed, single in singles.items():
        engine = out / "defaults" / f"seed_{seed}"
        assert final_numbers(engine) == final_numbers(single)
        assert metrics_rows(engine) == metrics_rows(single)
        assert (engine / "Vanilla_GAN.ipynb").is_file() and (engine / "config.json").is_file()
    assert final_numbers(out / "defaults" / "seed_0") != final_numbers(out / "defaults" / "seed_1")
    summary = (out / "summary.md").read_text()
    assert "| defaults | 2/2 |" in summary and (out / "bands.png").is_file() and (out / "runs.csv").is_file()
    # Again: both are finished, so nothing runs (their logs do not grow) and the table is the same.
    logs = {p: p.stat().st_size for p in (out / "logs").iterdir()}
    assert run_many.main(many(out)) == 0
    assert "defaults, seed 0: finished before" in capfd.readouterr().err
    assert {p: p.stat().st_size for p in (out / "logs").iterdir()} == logs
    assert (out / "summary.md").read_text() == summary


def test_ctrl_c_saves_every_run_and_the_same_command_resumes_the_set(tmp_path, data_env):
    out = tmp_path / "many"
    command = [sys.executable, "scripts/run_many.py", *many(out, "1", {"epochs": 5, "eval_samples": 0})]
    # Its own process group with SIGINT handled, as a terminal's foreground job has it (a test suite
    # started in the background by a non-interactive shell would pass SIGINT down ignored).
    driver = subprocess.Popen(command, cwd=REPO_ROOT, env=data_env, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = out / "defaults" / "seed_0"
    deadline = time.monotonic() + 240
    while many_runs.epochs_done(run_dir) < 1 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # Ctrl-C at a terminal: SIGINT to the whole group (the driver and Dask's worker processes alike).
    os.killpg(driver.pid, signal.SIGINT)
    _, err = driver.communicate(timeout=240)
    assert driver.returncode == 130, err[-3000:]
    assert "stopping: each run saves its last completed epoch" in err and "To continue" in err
    saved = runs.saved_epoch(run_dir / "checkpoint.pt")
    assert 1 <= saved < 5 and many_runs.epochs_done(run_dir) == saved  # no epoch beyond the checkpoint
    again = subprocess.run(command, cwd=REPO_ROOT, env=data_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"stopped ({saved} epochs): resuming" in again.stderr
    assert runs.saved_epoch(run_dir / "checkpoint.pt") == 5 and many_runs.epochs_done(run_dir) == 5



@pytest.fixture
def cluster(tmp_path):
    """A Dask scheduler and a worker process with two 1-thread workers, started in the repository's root
    as `dask scheduler` and `dask worker` would be on two machines (they import gan.many_runs)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    started = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL, cwd=REPO_ROOT,
                                stderr=open(tmp_path / "scheduler.log", "w"))]
    started.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
                                     "--nthreads", "1", "--no-dashboard", "--memory-limit", "0"], cwd=REPO_ROOT,
                                    stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w")))
    yield address
    for process in reversed(started):
        process.terminate()
        process.wait(timeout=30)


def test_on_a_cluster_a_failed_run_is_reported_and_the_others_finish(tmp_path, data_env, capfd, cluster):
    out = tmp_path / "many"
    # 10 images cannot fill a batch of 64: that run fails in the notebook's data check, the other trains.
    assert run_many.main(many(out, "1", {"eval_samples": 0}, "--grid", "train_subset=10,512",
                              "--scheduler", cluster)) == 1
    err = capfd.readouterr().err
    assert f"into {out} ({cluster})" in err
    assert "train_subset=10, seed 0: failed" in err and "ParameterError" in err
    assert "train_subset=512, seed 0: finished" in err
    assert runs.saved_epoch(out / "train_subset-512" / "seed_0" / "checkpoint.pt") == TINY["epochs"]
    assert "| train_subset=10 | 0 |" in (out / "summary.md").read_text()  # the seeds' rows: nothing for it


@pytest.mark.parametrize("threads", [None, 2])
def test_a_run_on_the_local_engine_has_make_runs_environment_not_dasks(tmp_path, threads, monkeypatch):
    # Dask (on import, and its nanny for each worker) sets one thread per library and
    # MALLOC_TRIM_THRESHOLD_=65536 (glibc then returns memory after every step: DCGAN's step 1.4-2x
    # slower). A run must not inherit them: it gets what `make run` gets from a shell without them.
    names = ("MALLOC_TRIM_THRESHOLD_", *many_runs.THREAD_VARIABLES)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    probe = [sys.executable, "-c", f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))"]
    client = run_many.connect(None, 1)
    try:
        log = tmp_path / "run.log"
        assert client.submit(many_runs.run_one, probe, str(log), threads, "stop-probe").result()["returncode"] == 0
    finally:
        client.close()
        client.cluster.close()
    seen = json.loads(log.read_text().strip().splitlines()[-1])
    assert seen == {"MALLOC_TRIM_THRESHOLD_": None, **{n: threads and str(threads) for n in many_runs.THREAD_VARIABLES}}


def test_by_default_one_run_per_core_with_the_cores_split_between_them(monkeypatch):
    monkeypatch.setattr(run_many, "cores", lambda: 8)
    assert run_many.split_cores(None, None, n_runs=10) == (8, 1)
    assert run_many.split_cores(None, None, n_runs=2) == (2, 4)  # never more at once than there are runs
    assert run_many.split_cores(2, None, n_runs=5) == (2, 4)
    assert run_many.split_cores(3, 1, n_runs=5) == (3, 1)


def test_a_wrong_notebook_or_setting_is_refused_before_any_run_starts(tmp_path, capfd):
    assert run_many.main(["Vanila_GAN.ipynb", "--out", str(tmp_path / "a")]) == 2
    assert "is not one of this repository's notebooks" in capfd.readouterr().err
    assert run_many.main(many(tmp_path / "b", "2", {}, "--grid", "lr_gg=1e-4")) == 2
    assert "Not started" in capfd.readouterr().err and not (tmp_path / "b").exists()
