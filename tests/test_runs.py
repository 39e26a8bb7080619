"""Run safety: one run per directory and one process per run, settings checked against the data,
MNIST verified by content, downloads that cannot hang, checkpoints that survive a full disk, and a
safe stop on SIGTERM or a second Ctrl-C, headless included (scripts/run_notebook.py, `make run`);
snapshots, rolling back and restoring (Adam's moments in their weights' layout), the run's files.

None of these runs Vanilla_GAN.ipynb: the stop tests run a tiny notebook written here with the
training cell's shape (epochs, a snapshot per epoch, a checkpoint, `except KeyboardInterrupt: roll
back, save, raise`); tests/test_notebook_*.py check that the notebooks wire these pieces in."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import gan_utils as gu
from gan import errors
from gan import metrics as gm
from gan import mnist_data
from gan import runs
from gan import settings
from gan import vanilla_gan as method
from conftest import REPO_ROOT, kernel_env, listing

RUNNER = REPO_ROOT / "scripts" / "run_notebook.py"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def full_checkpoint(epoch: int, value: float | None = None) -> dict:
    """A checkpoint with every key load_checkpoint requires (tiny tensors)."""
    w = torch.full((4,), float(epoch if value is None else value))
    return {"config": {"latent_dim": 2}, "epoch": epoch, "G": {"w": w}, "D": {"w": w}, "G_ema": {"w": w},
            "opt_G": {}, "opt_D": {}, "fixed_noise": torch.zeros(2, 2), "rng": runs.rng_state(),
            "history": [{"epoch": e + 1} for e in range(epoch)]}


def finished_run(path: Path, epochs: int = 2) -> Path:
    """A directory as a finished run leaves it."""
    (path / "grids").mkdir(parents=True)
    runs.save_checkpoint(path / "checkpoint.pt", full_checkpoint(epochs))
    runs.write_json(path / "config.json", {"epochs": epochs, "notebook": "Vanilla_GAN.ipynb"})
    runs.write_metrics_csv(path / "metrics.csv", [{"epoch": e + 1} for e in range(epochs)])
    for e in range(epochs):
        (path / "grids" / f"epoch_{e + 1:03d}.png").write_bytes(b"png")
    (path / "Vanilla_GAN.ipynb").write_text("{}")
    return path


# ------------------------------------------------------------------------------------------------
# 1, 2: a directory holding a run is refused before anything changes; one process per directory
# ------------------------------------------------------------------------------------------------

class _OnTheGpu:
    """Stands in for a state tensor that load_checkpoint(map_location=<GPU>) put on the GPU, which
    torch.set_rng_state refuses: only .cpu() gives the tensor back."""

    def __init__(self, tensor):
        self._tensor = tensor

    def cpu(self):
        return self._tensor


def assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


class RunsCode:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fail(exc):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


def test_finished_run_is_refused_without_resume_and_nothing_changes(tmp_path):
    run = finished_run(tmp_path / "run")
    before = listing(run)
    for attempt in (runs.check_run_dir, runs.claim_run_dir):
        with pytest.raises(errors.ParameterError) as info:
            attempt(run)
        msg = str(info.value)
        assert str(run) in msg and "already holds a run" in msg
        assert f"resume = {str(run / 'checkpoint.pt')!r}" in msg and "make run RUN_DIR=" in msg
        assert "run_dir" in msg and "overwrite = True" in msg
        assert listing(run) == before and not (run / runs.LOCK_FILE).exists()


def test_resuming_a_run_in_its_own_directory_is_allowed(tmp_path):
    run = finished_run(tmp_path / "run")
    before = listing(run)
    with runs.claim_run_dir(run, resume=str(run / "checkpoint.pt")) as lock:
        assert lock.held and lock.run_dir == run
    after = listing(run)
    assert after.pop(runs.LOCK_FILE) > 0 and after == before


def test_resuming_another_run_into_a_directory_holding_a_run_is_refused(tmp_path):
    finished_run(tmp_path / "a")
    b = finished_run(tmp_path / "b")
    with pytest.raises(errors.ParameterError) as info:
        runs.check_run_dir(b, resume=str(tmp_path / "a" / "checkpoint.pt"))
    assert "another run" in str(info.value) and "is not its checkpoint" in str(info.value)


def test_overwrite_deletes_the_old_runs_files_only(tmp_path):
    run = finished_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    dead = spawn_and_reap()
    (run / f"checkpoint.pt.{dead}.abcd1234.tmp").write_bytes(b"torn")
    with runs.claim_run_dir(run, overwrite=True):
        left = sorted(listing(run))
    assert left == [runs.LOCK_FILE, "Vanilla_GAN.ipynb", "notes.txt"]


def test_overwrite_never_deletes_the_run_being_resumed(tmp_path):
    run = finished_run(tmp_path / "run")
    before = sorted(listing(run))
    with runs.claim_run_dir(run, resume=str(run / "checkpoint.pt"), overwrite=True):
        assert sorted(listing(run)) == sorted(before + [runs.LOCK_FILE])


def test_setup_cells_run_again_over_this_kernels_own_run_say_how_to_go_on(tmp_path):
    run = tmp_path / "run"
    with runs.claim_run_dir(run):
        runs.write_json(run / "config.json", {"epochs": 1, "notebook": "Vanilla_GAN.ipynb"})  # the run has started here
        for overwrite in (False, True):  # the advice to overwrite would delete the run open here
            with pytest.raises(errors.ParameterError, match=r"holds the run this kernel is training\. To continue it"):
                runs.check_run_dir(run, overwrite=overwrite)
        assert (run / "config.json").exists()


def test_the_command_to_start_again_is_accepted_where_a_run_stopped_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run dcgan"
    (run / "grids").mkdir(parents=True)
    runs.write_json(run / "config.json", {"notebook": "DCGAN.ipynb"})  # stopped in epoch 1: no checkpoint
    command = runs.restart_command(run)
    assert command == f"make run NOTEBOOK=DCGAN.ipynb RUN_DIR='{run}' PARAMS=\"-p overwrite True\""
    with pytest.raises(errors.ParameterError):
        runs.check_run_dir(run)  # the same command without overwrite is refused
    assert runs.check_run_dir(run, overwrite=True) == run


def test_a_directory_with_the_users_own_config_json_is_never_overwritten(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 0.1}')  # the user's own experiment settings
    (mine / "notes.txt").write_text("mine")
    before = listing(mine)
    for overwrite in (False, True):  # overwrite deletes a run's files, and these are not a run's
        with pytest.raises(errors.ParameterError, match="not a run of this project") as info:
            runs.claim_run_dir(mine, overwrite=overwrite)
        assert "config.json" in str(info.value) and "Choose another run_dir" in str(info.value)
    assert listing(mine) == before and (mine / "config.json").read_text() == '{"lr": 0.1}'


@pytest.mark.parametrize("inside", ["", "gan", "tests/sub", ".git"])
def test_a_run_directory_among_the_sources_is_refused(inside):
    with pytest.raises(errors.ParameterError, match="among the sources"):
        runs.check_run_dir(REPO_ROOT / inside)


def test_a_run_directory_in_the_repositorys_runs_folder_is_fine():
    run = REPO_ROOT / "runs" / "a-run-that-does-not-exist"
    assert runs.check_run_dir(run) == run


@pytest.mark.parametrize("name", [runs.LOCK_FILE, "checkpoint.pt", "metrics.csv", "grids", "grids/epoch_001.png"])
def test_links_planted_where_a_run_writes_are_refused_and_their_targets_untouched(tmp_path, name):
    run = finished_run(tmp_path / "run")
    target = tmp_path / "precious"
    target.mkdir() if name == "grids" else target.write_text("precious")
    link = run / name
    if link.is_dir():
        import shutil
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(target)
    with pytest.raises(errors.ParameterError, match="symbolic links") as info:
        runs.claim_run_dir(run, resume=str(run / "checkpoint.pt") if name != "checkpoint.pt" else "")
    assert name in str(info.value)
    assert target.is_dir() and not any(target.iterdir()) if name == "grids" else target.read_text() == "precious"


def test_resuming_an_older_copy_of_a_runs_checkpoint_is_refused_with_the_choices(tmp_path):
    run = finished_run(tmp_path / "r", epochs=3)
    runs.save_checkpoint(run / "ck_epoch1.pt", full_checkpoint(1))
    before = listing(run)
    with pytest.raises(errors.ParameterError) as info:
        runs.claim_run_dir(run, resume=str(run / "ck_epoch1.pt"))
    msg = str(info.value)
    assert "holds epoch 1" in msg and "holds epoch 3" in msg and "delete epochs 2-3" in msg
    assert f"run_dir = {str(tmp_path / 'r-from-epoch-1')!r}" in msg
    assert f"resume = {str(run / 'checkpoint.pt')!r}" in msg
    assert listing(run) == before
    with runs.claim_run_dir(tmp_path / "r-from-epoch-1", resume=str(run / "ck_epoch1.pt")):  # the branch
        pass
    assert listing(run) == before


def test_a_copy_of_the_latest_checkpoint_resumes_in_place(tmp_path):
    run = finished_run(tmp_path / "r", epochs=3)
    runs.save_checkpoint(run / "backup.pt", full_checkpoint(3))
    with runs.claim_run_dir(run, resume=str(run / "backup.pt")):
        pass


def test_only_grids_the_run_wrote_count_as_its_epochs(tmp_path):
    run = finished_run(tmp_path / "run", epochs=3)
    (run / "grids" / "epoch_002 copy.png").write_bytes(b"a file manager's copy")
    (run / "grids" / "epoch_best.png").write_bytes(b"the user's")
    assert [p.name for p in runs.epoch_grid_paths(run)] == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    assert [p.name for p in runs.remove_grids_after(run, 1)] == ["epoch_002.png", "epoch_003.png"]
    left = sorted(p.name for p in (run / "grids").iterdir())
    assert left == ["epoch_001.png", "epoch_002 copy.png", "epoch_best.png"]


def test_claiming_a_run_directory_removes_what_killed_writers_left(tmp_path):
    run = finished_run(tmp_path / "run")
    dead = spawn_and_reap()
    torn = run / f"checkpoint.pt.{dead}.abcd1234.tmp"
    torn.write_bytes(b"x" * 1000)
    live = run / f"metrics.csv.{os.getppid()}.abcd1234.tmp"  # a live process's: it may be writing now
    live.write_bytes(b"x")
    with runs.claim_run_dir(run, resume=str(run / "checkpoint.pt")):
        assert not torn.exists() and live.exists()


def test_metrics_csv_is_written_after_its_checkpoint(tmp_path, monkeypatch):
    state = full_checkpoint(2)
    runs.save_epoch(tmp_path / "checkpoint.pt", state)
    assert len(runs.read_metrics_csv(tmp_path / "metrics.csv")) == 2
    monkeypatch.setattr(runs, "save_checkpoint", fail(runs.DiskFullError(errno.ENOSPC, "full")))
    with pytest.raises(runs.DiskFullError):
        runs.save_epoch(tmp_path / "checkpoint.pt", full_checkpoint(3))
    assert len(runs.read_metrics_csv(tmp_path / "metrics.csv")) == 2  # never an epoch no checkpoint holds


def test_new_directory_is_created_locked_with_our_pid(tmp_path):
    run = tmp_path / "new" / "run"
    assert runs.check_run_dir(run) == run and not run.exists()  # the check writes nothing
    lock = runs.claim_run_dir(run)
    assert (run / "grids").is_dir()
    assert (run / runs.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert runs.claim_run_dir(run) is lock  # the setup cell run again in the same kernel
    lock.release()
    assert not lock.held
    runs.claim_run_dir(run).release()


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(errors.ParameterError, match="is a file"):
        runs.claim_run_dir(tmp_path / "f")


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from gan import runs
lock = runs.claim_run_dir({run!r})
print("locked", flush=True)
time.sleep(60)
"""


def test_second_process_is_refused_naming_the_pid_until_the_first_dies(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=str(REPO_ROOT), run=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 120)  # a deadline: a stuck holder fails, not hangs CI
        assert ready, "the lock-holding process did not start within 120 s"
        assert holder.stdout.readline().strip() == "locked"
        for attempt in (runs.check_run_dir, runs.claim_run_dir):
            with pytest.raises(errors.ParameterError) as info:
                attempt(run)
            msg = str(info.value)
            assert str(run) in msg and f"process {holder.pid}" in msg and f"kill -INT {holder.pid}" in msg
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs; the OS releases the lock
        holder.wait()
    runs.claim_run_dir(run).release()


def test_a_probe_of_the_lock_at_that_moment_does_not_refuse_a_starting_run(tmp_path):
    # lock_holder (any process checking the directory) takes a shared lock for a moment; a run
    # claiming the directory just then must wait that moment out, not report it as in use.
    import fcntl
    run = tmp_path / "run"
    runs.claim_run_dir(run).release()  # the directory and its lock file, free again
    probe = os.open(run / runs.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    timer = threading.Timer(0.1, lambda: fcntl.flock(probe, fcntl.LOCK_UN))
    timer.start()
    try:
        runs.claim_run_dir(run).release()
    finally:
        timer.join()
        os.close(probe)


def spawn_and_reap() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_cleanup_deletes_temporary_files_of_dead_processes_and_of_an_interrupted_save(tmp_path):
    live = subprocess.Popen(["sleep", "30"])
    try:
        dead = spawn_and_reap()
        names = {"live": f"checkpoint.pt.{live.pid}.abcd1234.tmp", "dead": f"checkpoint.pt.{dead}.efgh5678.tmp",
                 "mine": f"checkpoint.pt.{os.getpid()}.ijkl9012.tmp", "unknown": "checkpoint.pt.mnop3456.tmp"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        assert runs.remove_dead_temp_files(tmp_path / "checkpoint.pt", ".tmp") == [tmp_path / names["dead"]]
        # A save of this process removes what an interrupt left of its own earlier save, too.
        runs.save_checkpoint(tmp_path / "checkpoint.pt", full_checkpoint(1))
        assert sorted(p.name for p in tmp_path.glob("*.tmp")) == sorted(names[k] for k in ("live", "unknown"))
    finally:
        live.kill()
        live.wait()


def test_temporary_file_names_carry_the_writers_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(gu.os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    runs.atomic_write_bytes(tmp_path / "metrics.csv", b"x")
    assert re.fullmatch(rf"metrics\.csv\.{os.getpid()}\.[a-z0-9_]+\.tmp", seen[0])


def test_remove_grids_after(tmp_path):
    run = finished_run(tmp_path / "run", epochs=4)
    assert [p.name for p in runs.remove_grids_after(run, 2)] == ["epoch_003.png", "epoch_004.png"]
    assert [p.name for p in runs.epoch_grid_paths(run)] == ["epoch_001.png", "epoch_002.png"]


def test_resolve_run_dir_is_the_notebooks_rule(tmp_path):
    assert runs.resolve_run_dir("x/y") == Path("x/y")
    assert runs.resolve_run_dir("", str(tmp_path / "r" / "checkpoint.pt")) == tmp_path / "r"
    assert re.fullmatch(r"runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", str(runs.resolve_run_dir("")))


# ------------------------------------------------------------------------------------------------
# 3: settings against the data
# ------------------------------------------------------------------------------------------------

GOOD = dict(batch_size=64, d_steps=1, r1_gamma=0.5, r1_every=4, g_batchnorm=True, metrics_every=1,
            metrics_samples=2000, eval_samples=10000, train_subset=512)


def data_problems(n_train=512, **changes) -> str:
    with pytest.raises(errors.ParameterError) as info:
        settings.validate_against_data({**GOOD, **changes}, n_train)
    return str(info.value)


def test_good_settings_pass():
    settings.validate_against_data(GOOD, 512)
    settings.validate_against_data({**GOOD, "batch_size": 128, "train_subset": 0}, mnist_data.N_TRAIN)
    settings.validate_against_data({**GOOD, "r1_every": 100, "r1_gamma": 0.0}, 512)  # penalty off: any r1_every
    settings.validate_against_data({**GOOD, "metrics_samples": 1, "metrics_every": 0}, 512)  # no per-epoch scores
    settings.validate_against_data({**GOOD, "eval_samples": 0, "batch_size": 2, "r1_every": 3, "train_subset": 7}, 7)


@pytest.mark.parametrize("changes, n_train, expected", [
    (dict(batch_size=1024), 512, "batch_size = 1024 is larger than the training set, 512 training images "
                                 "(train_subset = 512): use a batch_size from 2 to 512"),
    (dict(d_steps=9), 512, "d_steps = 9 but an epoch has only 8 steps (512 images // batch_size 64): G is "
                           "updated every d_steps steps and would never train; use d_steps from 1 to 8"),
    (dict(r1_every=16), 512, "r1_every = 16 but an epoch has only 8 steps: the R1 penalty would never be "
                             "applied; use r1_every from 1 to 8, or r1_gamma = 0"),
    (dict(batch_size=1), 512, "batch_size = 1 with g_batchnorm = True: BatchNorm needs at least 2 images "
                              "per batch; use a batch_size from 2 to 512, or g_batchnorm = False"),
    (dict(metrics_samples=1), 512, "metrics_samples = 1: the Frechet distance needs the covariance of at "
                                   "least 2 samples; use metrics_samples >= 2"),
    (dict(eval_samples=3), 512, "eval_samples = 3: precision and recall (k-nearest neighbours, k = 3) need "
                                "at least 4 samples; use eval_samples >= 4, or 0"),
    (dict(batch_size=2, train_subset=7), 7, "eval_samples = 10000 with only 7 training images (train_subset "
                                            "= 7): the final evaluation scores half of the training images"),
])
def test_each_conflict_names_the_parameter_and_the_range(changes, n_train, expected):
    assert expected in data_problems(n_train, **changes)


def test_a_batch_of_one_in_dcgan_names_no_switch_it_does_not_have():
    dcgan = {k: v for k, v in GOOD.items() if k != "g_batchnorm"}  # DCGAN's G always has BatchNorm
    with pytest.raises(errors.ParameterError) as info:
        settings.validate_against_data({**dcgan, "batch_size": 1}, 512)
    assert "batch_size = 1 with G's BatchNorm: BatchNorm needs at least 2 images per batch; use a " \
           "batch_size from 2 to 512" in str(info.value)
    assert "g_batchnorm" not in str(info.value)


def test_all_conflicts_are_listed_at_once():
    msg = data_problems(d_steps=9, r1_every=16, metrics_samples=1, eval_samples=2)
    assert all(name in msg for name in ("d_steps", "r1_every", "metrics_samples", "eval_samples"))


@pytest.mark.filterwarnings("ignore:cov\\(\\)")  # one sample: torch.cov warns, then eigh fails
def test_the_minimums_are_what_the_metrics_need():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(50, 8, generator=g)
    below = settings.FD_MIN_SAMPLES - 1
    with pytest.raises(Exception):  # torch.cov of one sample is NaN; eigh then fails
        gm.frechet_distance_features(torch.randn(below, 8, generator=g), real)
    assert np.isfinite(gm.frechet_distance_features(torch.randn(settings.FD_MIN_SAMPLES, 8, generator=g), real))
    with pytest.raises(RuntimeError):
        gm.precision_recall(torch.randn(settings.KNN_MIN_SAMPLES - 1, 8, generator=g), real)
    assert all(np.isfinite(gm.precision_recall(torch.randn(settings.KNN_MIN_SAMPLES, 8, generator=g), real)))


def test_seed_range_is_numpys():
    check, allowed = settings.PARAMETER_RULES["seed"]
    assert check(2 ** 32 - 1) and not check(2 ** 32) and not check(-1)
    assert "0 to 2**32-1" in allowed
    runs.seed_everything(2 ** 32 - 1)  # the largest allowed seed really works
    with pytest.raises(ValueError):
        np.random.seed(2 ** 32)  # and the first refused one would not


def test_nothing_to_train_message():
    assert settings.nothing_to_train_message(5, 4) is None
    assert settings.nothing_to_train_message(4, 4) == ("nothing to train: epochs (4) <= epochs done (4); "
                                                 "raise epochs to continue")


# ------------------------------------------------------------------------------------------------
# 4, 7: MNIST content, unusable data_dir, downloads that cannot hang
# ------------------------------------------------------------------------------------------------

def test_unpacked_md5s_are_those_of_the_shared_copy(data_dir):
    for spec in mnist_data.MNIST_FILES.values():
        path = data_dir / "MNIST" / "raw" / spec.name
        if path.is_file():
            assert hashlib.md5(path.read_bytes()).hexdigest() == spec.md5, spec.name


def damage(root: Path, name: str, offset: int, fill: int, length: int | None = None) -> Path:
    """Overwrite the payload from `offset` with `fill` (header and size unchanged)."""
    path = root / "MNIST" / "raw" / name
    raw = bytearray(path.read_bytes())
    end = len(raw) if length is None else offset + length
    raw[offset:end] = bytes([fill]) * (end - offset)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("name, offset, fill, length, expected", [
    (TRAIN_IMAGES, 16, 0, None, "pixels are all 0"),
    (TRAIN_LABELS, 8, 200, None, "labels up to 200; MNIST labels are 0-9"),
    (TRAIN_LABELS, 8, 3, 1, "not the official content (md5"),  # one label changed to another digit
])
def test_wrong_content_with_the_right_header_is_refused(make_mnist_copy, name, offset, fill, length, expected):
    root = make_mnist_copy(plain=True, names=[name])
    path = damage(root, name, offset, fill, length)
    spec = next(s for s in mnist_data.MNIST_FILES.values() if s.name == name)
    with pytest.raises(errors.DataError) as info:
        mnist_data.read_mnist_file(path.parent, spec)
    msg = str(info.value)
    assert expected in msg and str(path) in msg and "Delete" in msg


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(errors.DataError) as info:
        mnist_data.load_mnist(tmp_path / "data", download=False)
    assert "is a file, not a directory" in str(info.value) and "data_dir" in str(info.value)


def test_directory_in_place_of_a_file(make_mnist_copy):
    root = make_mnist_copy(plain=True, names=[n for n in (TRAIN_LABELS,)])
    (root / "MNIST" / "raw" / TRAIN_IMAGES).mkdir()
    with pytest.raises(errors.DataError) as info:
        mnist_data.read_mnist_file(root / "MNIST" / "raw", mnist_data.MNIST_FILES["train_images"])
    assert "is a directory" in str(info.value) and TRAIN_IMAGES in str(info.value)


def test_unreadable_file_and_directory(make_mnist_copy, monkeypatch):
    root = make_mnist_copy(plain=True, names=[TRAIN_LABELS])
    raw = root / "MNIST" / "raw"

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # root ignores chmod, so refusing is simulated
    with pytest.raises(errors.DataError) as info:
        mnist_data.read_mnist_file(raw, mnist_data.MNIST_FILES["train_labels"])
    assert f"cannot read {raw / TRAIN_LABELS} (Permission denied)" in str(info.value)
    monkeypatch.setattr(gu.os, "listdir", lambda p: refuse(p))
    with pytest.raises(errors.DataError, match="cannot read the directory"):
        mnist_data.ensure_mnist(root, download=False)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (or trickles one byte at a time)."""

    def __init__(self, trickle: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.accepted, self.trickle, self.conns = 0, trickle, []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            if self.trickle:
                threading.Thread(target=self.drip, args=(conn,), daemon=True).start()

    def drip(self, conn):
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 10000000\r\n\r\n")
            while True:
                conn.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_mirror_that_never_answers_fails_fast_naming_it(tmp_path, monkeypatch):
    server = SilentServer()
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (server.url,))
    said = []
    started = time.monotonic()
    try:
        with pytest.raises(errors.DataError) as info:
            mnist_data.ensure_mnist(tmp_path / "d", download=True, timeout=1.0, report=said.append)
    finally:
        server.close()
    assert time.monotonic() - started < 5
    assert server.accepted == 1  # asked once, not once per file
    msg = str(info.value)
    assert f"{server.url}: did not answer within 1 s" in msg
    assert said[0] == f"downloading {mnist_data.MNIST_FILES['train_images'].name}.gz from {server.url} ..."
    assert not list((tmp_path / "d").rglob("*.part"))


def test_a_trickling_mirror_stops_at_the_deadline(tmp_path, monkeypatch):
    server = SilentServer(trickle=True)
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (server.url,))
    started = time.monotonic()
    try:
        with pytest.raises(errors.DataError) as info:
            mnist_data.ensure_mnist(tmp_path / "d", download=True, timeout=1.0, deadline_s=1.0, report=lambda s: None)
    finally:
        server.close()
    assert time.monotonic() - started < 5
    assert "download deadline" in str(info.value) and server.url in str(info.value)
    assert not list((tmp_path / "d").rglob("*.part"))


# ------------------------------------------------------------------------------------------------
# 6, 7: checkpoints: a full disk, missing keys
# ------------------------------------------------------------------------------------------------

class FullDiskFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_keeps_the_last_good_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, where):
    run = tmp_path / "my run"
    run.mkdir()
    path = runs.save_checkpoint(run / "checkpoint.pt", full_checkpoint(3))
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(gu.os, "fdopen", lambda *a, **k: FullDiskFile(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(gu.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as info:
        runs.save_checkpoint(path, full_checkpoint(4))
    monkeypatch.undo()
    assert isinstance(info.value, runs.DiskFullError) and info.value.errno == errno.ENOSPC
    msg = str(info.value)
    assert "epoch 4" in msg and f"{path} was not changed and still holds epoch 3" in msg
    assert runs.resume_command(path) in msg and "MB free" in msg
    assert runs.load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_disk_full_before_any_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(gu.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(runs.DiskFullError, match="no checkpoint was written"):
        runs.save_checkpoint(tmp_path / "checkpoint.pt", full_checkpoint(1))
    with pytest.raises(runs.DiskFullError, match="metrics.csv: the file was left as it was"):
        runs.write_metrics_csv(tmp_path / "metrics.csv", [{"epoch": 1}])
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_the_tag_but_missing_keys(tmp_path):
    ck = full_checkpoint(2)
    del ck["opt_D"], ck["rng"]
    path = runs.save_checkpoint(tmp_path / "checkpoint.pt", ck)
    with pytest.raises(errors.CheckpointError) as info:
        runs.load_checkpoint(path)
    assert "lacks opt_D, rng" in str(info.value) and str(path) in str(info.value)


def test_export_has_no_batch_limit(tmp_path):
    G = torch.nn.Sequential(torch.nn.Linear(2, 784), torch.nn.Tanh())
    exported = torch.export.load(str(runs.export_generator(G, 2, tmp_path / "g.pt2"))).module()
    assert exported(torch.randn(70_000, 2)).shape == (70_000, 1, 28, 28)  # above the old 65,536


# ------------------------------------------------------------------------------------------------
# 7: paths with spaces: the resume command and the Makefile
# ------------------------------------------------------------------------------------------------

def test_resume_command_survives_spaces_and_quotes():
    checkpoint = Path("runs/my run's/checkpoint.pt")
    words = shlex.split(runs.resume_command(checkpoint))  # as the user's shell reads it
    assert words[:2] == ["make", "run"] and words[2] == f"RUN_DIR={checkpoint.parent}"
    assert shlex.split(words[3].removeprefix("PARAMS=")) == ["-p", "resume", str(checkpoint)]  # as make's shell
    assert runs.resume_command(Path("runs/x/checkpoint.pt")) == 'make run RUN_DIR=runs/x PARAMS="-p resume runs/x/checkpoint.pt"'
    assert runs.resume_command(checkpoint) in runs.resume_message(checkpoint, 3)


def test_makefile_passes_run_dir_and_params_with_spaces(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than requirements.txt: nothing is installed
    fake = venv / "bin" / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    checkpoint = Path("runs/my run/checkpoint.pt")
    assignments = shlex.split(runs.resume_command(checkpoint))[2:]  # RUN_DIR=... PARAMS=... as the shell passes them
    out = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "run", f"VENV={venv}", *assignments],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "scripts/run_notebook.py", "Vanilla_GAN.ipynb", "-p", "run_dir", "runs/my run", "-p", "resume", str(checkpoint)]
    # Without RUN_DIR the runner picks the directory as the notebook does: a resumed checkpoint's own
    # (not a new runs/<date-time>/ beside it), else runs/<date-time>/.
    for params, expected in (([], ["scripts/run_notebook.py", "Vanilla_GAN.ipynb"]),
                             (['PARAMS=-p resume "runs/my run/checkpoint.pt"'],
                              ["scripts/run_notebook.py", "Vanilla_GAN.ipynb", "-p", "resume", str(checkpoint)])):
        out = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "run", f"VENV={venv}", *params],
                             capture_output=True, text=True, timeout=30, env={**os.environ, "RUN_DIR": ""})
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected, out.stderr


def test_make_jupyter_opens_the_notebook_and_allows_root_only_as_root(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than requirements.txt: nothing is installed
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO_ROOT), "jupyter", f"VENV={venv}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    command = out.stdout.strip().splitlines()[-1].split()
    assert command[:3] == [f"{venv}/bin/jupyter", "lab", "Vanilla_GAN.ipynb"]
    # JupyterLab refuses to start as root (Docker, many cloud machines) unless told it may.
    assert ("--allow-root" in command) == (os.getuid() == 0)


def test_runner_stopped_before_the_notebook_starts_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capfd):
    # A SIGTERM while the runner checks the run directory (before any kernel): the same report as a
    # stop later on, in-process so that the signal lands exactly there.
    import run_notebook
    monkeypatch.setattr(run_notebook, "refuse_taken_run_dir", lambda *args: os.kill(os.getpid(), signal.SIGTERM))
    handlers = {s: signal.getsignal(s) for s in run_notebook.STOP_SIGNALS}
    try:
        status = run_notebook.main([str(REPO_ROOT / "Vanilla_GAN.ipynb"), "-p", "run_dir", str(tmp_path / "run")])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    err = capfd.readouterr().err
    assert status == 128 + signal.SIGTERM
    assert "Stopped before the notebook started." in err and "nothing to resume" in err, err


# ------------------------------------------------------------------------------------------------
# 5: SIGTERM and a second interrupt, in-process
# ------------------------------------------------------------------------------------------------

def test_sigterm_raises_keyboardinterrupt_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with runs.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) is before


ORPHAN = """
import subprocess, sys, time
from pathlib import Path
if sys.argv[1] == "parent":  # starts the training process, then dies as papermill does on SIGTERM
    subprocess.Popen([sys.executable, __file__, "child", sys.argv[2]])
    while not Path(sys.argv[2], "training").exists():
        time.sleep(0.02)
    sys.exit(0)
sys.path.insert(0, {root!r})
from gan import runs
out = Path(sys.argv[2])

def roll_back():
    time.sleep(2)  # a slow save: longer than ipykernel's 1 s parent check would have allowed
    (out / "saved").write_text("epoch 3")
    return 3

with runs.rolled_back_when_stopped(roll_back, out / "checkpoint.pt"):
    (out / "training").touch()
    time.sleep(60)
"""


def test_a_process_whose_parent_dies_saves_before_it_goes(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN.format(root=str(REPO_ROOT)))
    subprocess.run([sys.executable, str(script), "parent", str(tmp_path)], timeout=60, check=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "saved").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "saved").read_text() == "epoch 3"


def test_ipykernels_parent_check_is_held_while_saving():
    held = runs._ParentPidHeld(12345)
    assert not (os.getppid() != held) and not (1 != held) and held  # the poller's two tests never fire
    assert int(held) == 12345 and (os.getppid() != int(held))


def test_outside_a_kernel_the_training_loops_guard_leaves_progress_bars_as_text():
    # tqdm.auto draws a notebook widget once ipykernel is imported; a script that trains (sweep.py,
    # benchmark.py) must keep its text bars, so the guard never imports ipykernel itself.
    script = ("import sys; from gan import runs\n"
              "with runs.interrupted_when_orphaned(): pass\n"
              "from tqdm.auto import tqdm\n"
              "for _ in tqdm(range(3), desc='bar-as-text'): pass\n"
              "print('ipykernel' in ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and "bar-as-text" in out.stderr and "3/3" in out.stderr


def test_interrupts_during_the_block_are_held_until_it_is_done():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    said, steps = [], []
    with pytest.raises(KeyboardInterrupt):
        with runs.interrupts_deferred(report=said.append) as held:
            for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), s)
                time.sleep(0.05)
                steps.append(s)  # each step still runs: the signal is held
    assert len(steps) == 3 and held == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]
    assert said == ["SIGINT and SIGTERM arrived while saving; held until the save was complete."]
    assert {s: signal.getsignal(s) for s in before} == before
    with runs.interrupts_deferred(reraise=False, report=said.append):  # only reported
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert len(said) == 2


# ------------------------------------------------------------------------------------------------
# 5: run_notebook.py on a tiny notebook with the training cell's shape, stopped at random moments
# ------------------------------------------------------------------------------------------------

TOY_PARAMETERS = '''run_dir = ""
epochs = 1000
epoch_seconds = 0.02
checkpoint_every = 1
rollback_wait = 0.0       # > 0: the rollback waits (at most this long) for the test's second signal
'''

TOY_SETUP = '''import time
from pathlib import Path
import torch
from gan import runs
run_path = Path(run_dir)
run_lock = runs.claim_run_dir(run_path)
runs.write_json(run_path / "config.json", {"notebook": "Vanilla_GAN.ipynb"})  # what marks a run of this project
checkpoint_path = run_path / "checkpoint.pt"
w = torch.zeros(256, 1024)  # 1 MB: a save takes a moment
history, epochs_done = [], 0

def snapshot(epoch):
    return {"config": {}, "epoch": epoch, "G": {"w": w.clone()}, "D": {}, "G_ema": {}, "opt_G": {},
            "opt_D": {}, "fixed_noise": torch.zeros(1), "rng": runs.rng_state(), "history": list(history)}

def roll_back_to(state):
    global w, history, epochs_done
    w, history, epochs_done = state["G"]["w"].clone(), list(state["history"]), state["epoch"]
    if rollback_wait:  # a slow disk: the test's second signal lands during the save
        (run_path / "saving").touch()
        deadline = time.monotonic() + rollback_wait
        while not (run_path / "second signal sent").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    runs.save_checkpoint(checkpoint_path, state)

last_good = snapshot(0)
'''

# w == epoch after each epoch and a half-way value in between: a checkpoint with a torn or unfinished
# epoch shows. completed.log lists the epochs whose snapshot was taken.
TOY_TRAINING = '''with runs.sigterm_as_interrupt():
    try:
        for epoch in range(epochs_done, epochs):
            w += 0.5
            time.sleep(epoch_seconds)
            w += 0.5
            history.append({"epoch": epoch + 1})
            epochs_done = epoch + 1
            last_good = snapshot(epochs_done)
            with open(run_path / "completed.log", "a") as log:
                log.write(f"{epochs_done}\\n")
            if epochs_done % checkpoint_every == 0:
                runs.save_checkpoint(checkpoint_path, last_good)
    except KeyboardInterrupt:
        with runs.interrupts_deferred(reraise=False):
            roll_back_to(last_good)
            print("Interrupted: the unfinished epoch was rolled back. " + runs.resume_message(checkpoint_path, epochs_done))
        raise
'''


@pytest.fixture(scope="module")
def toy_notebook(tmp_path_factory) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    cells = [new_code_cell(TOY_PARAMETERS, metadata={"tags": ["parameters"]}), new_code_cell(TOY_SETUP),
             new_code_cell(TOY_TRAINING), new_code_cell("print('after training')")]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    path = tmp_path_factory.mktemp("toy") / "toy.ipynb"
    nbformat.write(nb, path)
    return path


class Trial:
    """run_notebook.py on the toy notebook in a child process (own session, as a terminal's job)."""

    def __init__(self, notebook: Path, run_dir: Path, **params):
        self.run_dir, self.started = run_dir, time.monotonic()
        args = [sys.executable, str(RUNNER), str(notebook), "--cwd", str(REPO_ROOT), "--no-progress-bar",
                "-p", "run_dir", str(run_dir)]
        for name, value in params.items():
            args += ["-p", name, str(value)]
        self.proc = subprocess.Popen(args, cwd=REPO_ROOT, env={**os.environ, **kernel_env()}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.output = ""

    def completed(self) -> list[int]:
        log = self.run_dir / "completed.log"
        return [int(x) for x in log.read_text().split()] if log.is_file() else []

    def wait_until(self, predicate, timeout=180.0) -> bool:  # generous: three trials share 2 cores
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if predicate():
                return True
            time.sleep(0.005)
        return False

    def kernel_pid(self) -> int:
        kids = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if any("ipykernel" in part for part in p.cmdline())]
        assert len(kids) == 1, "expected one kernel under the runner"
        return kids[0].pid

    def finish(self, timeout=180.0) -> int:
        self.output, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode


def check_stopped_trial(trial: Trial, expected_rc: int) -> str:
    """Everything a stopped run must satisfy; returns one line for the report."""
    out = trial.output
    assert trial.proc.returncode == expected_rc, out
    for bad in ("Traceback", "zmq", "Aborted!", "IPKernelApp"):  # the kernel's own messages go to kernel.log
        assert bad not in out, f"{bad!r} on the terminal:\n{out}"
    assert not list(trial.run_dir.glob("*.tmp")), "a temporary file was left"
    checkpoint = trial.run_dir / "checkpoint.pt"
    if trial.completed():  # the kernel ran: what it wrote to its stderr is in the run directory
        assert (trial.run_dir / "kernel.log").is_file()
    if not checkpoint.is_file():
        assert "nothing to resume" in out, out
        return "stopped before the first checkpoint: 'nothing to resume'"
    ck = runs.load_checkpoint(checkpoint)
    epoch, done = ck["epoch"], trial.completed()
    last = done[-1] if done else 0
    assert epoch in (last, last + 1), f"checkpoint at epoch {epoch}, last completed epoch {last}"
    assert torch.all(ck["G"]["w"] == epoch), "the checkpoint holds a torn or unfinished epoch"
    assert [row["epoch"] for row in ck["history"]] == list(range(1, epoch + 1))
    reported = [int(n) for n in re.findall(r"after epoch (\d+)", out)]
    assert reported and set(reported) == {epoch}, f"reported {reported}, checkpoint epoch {epoch}"
    assert "Stopped" in out and runs.resume_command(checkpoint) in out  # on the terminal, quoted
    return f"checkpoint = last completed epoch {epoch}"


def run_trial(notebook: Path, base: Path, i: int, kind: str, delay: float) -> str:
    run_dir = base / f"run {i}"  # a space: the printed resume command must quote it
    params = {"rollback_wait": 60, "checkpoint_every": 1000} if "twice" in kind else {}
    trial = Trial(notebook, run_dir, **params)
    if kind == "runner SIGTERM during start-up":  # the runner is up (kernel.log is opened) and the kernel starting
        assert trial.wait_until(lambda: (run_dir / "kernel.log").exists()), f"trial {i}: the runner did not start"
        time.sleep(delay)
    else:
        assert trial.wait_until(lambda: trial.completed()), f"trial {i}: no epoch completed"
        time.sleep(delay)
    if kind.startswith("kernel"):
        target = trial.kernel_pid()
        send = lambda s: os.kill(target, s)  # noqa: E731
    else:
        send = lambda s: os.kill(trial.proc.pid, s)  # noqa: E731
    first = signal.SIGINT if "SIGINT" in kind.split(" then ")[0] else signal.SIGTERM
    send(first)
    if "twice" in kind:  # the second signal while the rollback saves: the kernel says when that is
        assert trial.wait_until(lambda: (run_dir / "saving").exists()), f"trial {i}: no rollback started"
        send(signal.SIGINT)
        time.sleep(0.5)  # for its handler to run (in the runner, or in the kernel, which waits for the file)
        (run_dir / "second signal sent").touch()
    trial.finish()
    if "twice" in kind:  # no checkpoint per epoch: only a rollback save that the second signal did not cut short writes one
        assert (run_dir / "checkpoint.pt").is_file(), f"trial {i}: the second signal cut the save short\n{trial.output}"
    expected = 130 if kind.startswith("kernel") else 128 + first
    line = check_stopped_trial(trial, expected)
    if kind == "runner SIGINT twice":
        assert "still waiting for the kernel to finish saving" in trial.output
    if kind.startswith("kernel SIGTERM"):
        assert "Stopped: the kernel was interrupted (SIGTERM received)" in trial.output
    if kind == "kernel SIGTERM then SIGINT twice":
        assert "SIGINT arrived while saving; held until the save was complete." in trial.output
    return f"trial {i:2d}: {kind}, {delay:.2f} s in -> rc {trial.proc.returncode}, {line}"


TRIALS = (["runner SIGTERM"] * 6 + ["runner SIGINT", "runner SIGINT twice", "kernel SIGTERM",
                                     "kernel SIGTERM then SIGINT twice", "runner SIGTERM during start-up"])


def test_runner_stops_safely_at_random_moments(toy_notebook, tmp_path):
    rng = random.Random(0)
    jobs = [(i, kind, rng.uniform(0.0, 0.4))
            for i, kind in enumerate(TRIALS, 1)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        report = list(pool.map(lambda job: run_trial(toy_notebook, tmp_path, *job), jobs))
    print("\n" + "\n".join(report))


def test_runner_finishes_and_refuses_a_finished_run_dir(toy_notebook, tmp_path):
    run_dir = tmp_path / "run"
    trial = Trial(toy_notebook, run_dir, epochs=2)
    assert trial.finish() == 0, trial.output
    assert "Done: results in" in trial.output and "after training" in trial.output
    executed = (run_dir / "toy.ipynb").read_bytes()
    again = Trial(toy_notebook, run_dir, epochs=3)  # no resume: refused before papermill writes anything
    assert again.finish() == 2
    assert "Not started: run_dir = " in again.output and "already holds a run" in again.output
    assert (run_dir / "toy.ipynb").read_bytes() == executed


def test_runner_refuses_a_missing_notebook_before_making_a_run_directory(tmp_path, capfd):
    import run_notebook
    run_dir = tmp_path / "run"
    handlers = {signum: signal.getsignal(signum) for signum in run_notebook.STOP_SIGNALS}
    try:
        assert run_notebook.main(["typo.ipynb", "-p", "run_dir", str(run_dir)]) == 2
    finally:  # main() installs its stop handlers first thing: give pytest's back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert "Not started: no notebook 'typo.ipynb'" in capfd.readouterr().err  # the runner writes to fd 2
    assert not run_dir.exists()


def test_claim_run_dir_creates_grids(tmp_path):
    lock = runs.claim_run_dir(str(tmp_path / "a" / "b"))
    path = tmp_path / "a" / "b"
    assert lock.run_dir == path and (path / "grids").is_dir()
    lock.release()


def test_resolve_run_dir_default_is_dated(tmp_path):
    path = runs.resolve_run_dir("", root=str(tmp_path / "runs"))
    assert path.parent == tmp_path / "runs" and not path.exists()  # resolving writes nothing
    assert len(path.name) == len("2024-01-01_00-00-00")


def test_claim_run_dir_unwritable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file, so nothing can be created below it (even as root)")
    target = blocker / "run"
    with pytest.raises(errors.ParameterError) as info:
        runs.claim_run_dir(str(target))
    assert "run_dir" in str(info.value) and str(target) in str(info.value)


def test_seed_everything_repeats():
    draws = []
    for _ in range(2):
        runs.seed_everything(42)
        draws.append((torch.randn(5), np.random.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0])
    assert np.array_equal(draws[0][1], draws[1][1])
    assert draws[0][2] == draws[1][2]
    runs.seed_everything(43)
    assert not torch.equal(torch.randn(5), draws[0][0])


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    state = runs.rng_state()
    a = torch.randn(10)
    torch.randn(100)  # move on
    runs.set_rng_state(state)
    assert torch.equal(torch.randn(10), a)
    # and through a checkpoint file
    runs.save_checkpoint(tmp_path / "c.pt", {"rng": state})
    torch.randn(7)
    runs.set_rng_state(runs.load_checkpoint(tmp_path / "c.pt", required_keys=("rng",))["rng"])
    assert torch.equal(torch.randn(10), a)


def test_any_error_in_an_epoch_rolls_back_to_the_last_good_epoch(tmp_path, capsys):
    rolled = []
    with pytest.raises(OSError, match="No space left"):
        with runs.rolled_back_when_stopped(lambda: rolled.append(3) or 3, tmp_path / "checkpoint.pt"):
            raise OSError(28, "No space left on device")
    assert rolled == [3] and "OSError in epoch 4: that epoch was rolled back" in capsys.readouterr().out

    def fails_too():
        raise OSError(28, "still full")

    with pytest.raises(MemoryError):  # the first error is the one that surfaces
        with runs.rolled_back_when_stopped(fails_too, tmp_path / "checkpoint.pt"):
            raise MemoryError()
    assert "rolling back after MemoryError failed too (OSError" in capsys.readouterr().out


def test_training_after_a_restore_leaves_the_restored_state_as_it_was():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    parts = {"net": net, "opt": opt}
    state = runs.snapshot({}, 1, parts, torch.zeros(1), [{"epoch": 1}])
    first = copy.deepcopy(state)
    history, epoch = runs.restore_training_state(state, parts)
    assert (history, epoch) == ([{"epoch": 1}], 1)
    history.append({"epoch": 2})  # the notebook trains on: its history and Adam's moments change
    opt.zero_grad()
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert state["history"] == [{"epoch": 1}]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state["opt"]["state"][0][key], first["opt"]["state"][0][key])


def test_rng_state_of_a_checkpoint_loaded_onto_the_gpu_is_restored_on_the_gpus_there_are(monkeypatch):
    torch.manual_seed(5)
    state = runs.rng_state()
    a = torch.randn(10)
    cuda_states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # saved on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    runs.set_rng_state({"cpu": _OnTheGpu(state["cpu"]), "cuda": [_OnTheGpu(s) for s in cuda_states]})
    assert torch.equal(torch.randn(10), a)
    assert restored == [(cuda_states[0], 0)]  # the one GPU here; the other's state has no device


def sample_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    return {
        "config": {"latent_dim": 100, "g_batchnorm": True, "lr_g": 2e-4, "g_loss": "non_saturating",
                   "resume": ""},
        "epoch": 3,
        "G": model.state_dict(),
        "D": model.state_dict(),
        "G_ema": model.state_dict(),
        "opt_G": opt.state_dict(),
        "opt_D": opt.state_dict(),
        "fixed_noise": torch.randn(64, 100),
        "rng": runs.rng_state(),
        "nested": {"a": {"b": [torch.arange(3), 1.5, None, "text"]}},
        "history": [{"epoch": 1, "d_loss": 1.2, "g_loss": 0.8}, {"epoch": 2, "d_loss": 1.1, "g_loss": float("nan")}],
    }


def test_checkpoint_round_trip(tmp_path):
    original = sample_checkpoint()
    path = runs.save_checkpoint(tmp_path / "checkpoint.pt", copy.deepcopy(original))
    assert path == tmp_path / "checkpoint.pt"
    loaded = runs.load_checkpoint(path)
    assert loaded["format"] == runs.CHECKPOINT_FORMAT
    del loaded["format"]
    assert_same(original, loaded)
    # it really is weights_only-loadable, without gan_utils
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_checkpoint_state_dicts_load_into_modules(tmp_path):
    original = sample_checkpoint()
    runs.save_checkpoint(tmp_path / "c.pt", original)
    loaded = runs.load_checkpoint(tmp_path / "c.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.load_state_dict(loaded["G"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["opt_G"])
    assert opt.state_dict()["state"][0]["step"].item() == 1


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(errors.CheckpointError, match="no such checkpoint"):
        runs.load_checkpoint(tmp_path / "nothing.pt")


def test_load_checkpoint_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(errors.CheckpointError) as info:
        runs.load_checkpoint(path)
    assert str(path) in str(info.value) and "not a readable checkpoint" in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_load_checkpoint_truncated(tmp_path, fraction):
    path = runs.save_checkpoint(tmp_path / "checkpoint.pt", sample_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(errors.CheckpointError) as info:
        runs.load_checkpoint(path)
    assert str(path) in str(info.value) and "checkpoint" in str(info.value)


def test_load_checkpoint_without_format_tag(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"epoch": 3, "G": {}}, path)
    with pytest.raises(errors.CheckpointError) as info:
        runs.load_checkpoint(path)
    assert "format tag" in str(info.value) and runs.CHECKPOINT_FORMAT in str(info.value)
    torch.save(torch.zeros(3), path)  # not even a dict
    with pytest.raises(errors.CheckpointError, match="format tag"):
        runs.load_checkpoint(path)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_checkpoint_never_runs_code(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    payload = {"format": runs.CHECKPOINT_FORMAT, "epoch": 1, "G": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(errors.CheckpointError) as info:
        runs.load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert str(path) in str(info.value)
    # control: the payload is live (an unrestricted unpickler does run it), so the check above means something
    if how == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("where, exc", [
    ("replace", OSError(28, "No space left on device")),
    ("fsync", OSError(5, "Input/output error")),
    ("fsync", KeyboardInterrupt()),
])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, where, exc):
    path = tmp_path / "metrics.csv"
    runs.atomic_write_bytes(path, b"old contents\n")
    monkeypatch.setattr(gu.os, where, fail(exc))
    with pytest.raises(type(exc)):
        runs.atomic_write_bytes(path, b"new contents that never land\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no .tmp left behind


def test_save_checkpoint_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = runs.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1, "w": torch.ones(3)})
    monkeypatch.setattr(gu.os, "replace", fail(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        runs.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    loaded = runs.load_checkpoint(path, required_keys=("epoch", "w"))
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp"))


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "f.json"
    runs.write_json(path, {"a": 1})
    runs.write_json(path, {"a": 2, "p": Path("/x")})
    import json
    assert json.loads(path.read_text()) == {"a": 2, "p": "/x"}


def test_epoch_grid_paths_numeric_order(tmp_path):
    (tmp_path / "grids").mkdir()
    for e in (10, 2, 1, 100):
        (tmp_path / "grids" / f"epoch_{e:03d}.png").write_bytes(b"")
    assert [p.name for p in runs.epoch_grid_paths(tmp_path)] == ["epoch_001.png", "epoch_002.png",
                                                               "epoch_010.png", "epoch_100.png"]


def test_divergence_and_resume_messages():
    config = {"lr_d": 0.5, "lr_g": 0.25, "beta1": 0.5, "batch_size": 64, "g_loss": "minimax"}
    msg = runs.divergence_message(7, 2, config, Path("/runs/x/checkpoint.pt"))
    assert "lr_d" in msg and "0.5" in msg and "lr_g" in msg and "0.25" in msg
    assert "epoch 3" in msg and "/runs/x/checkpoint.pt" in msg and "resume" in msg
    msg = runs.resume_message(Path("/runs/x/checkpoint.pt"), 4)
    assert "resume" in msg and "/runs/x/checkpoint.pt" in msg and "epoch 4" in msg


@pytest.mark.parametrize("batchnorm", [True, False])
def test_export_generator(tmp_path, batchnorm):
    torch.manual_seed(0)
    G = method.Generator(100, batchnorm=batchnorm)
    G.train()(torch.randn(32, 100))  # move BatchNorm's running statistics off their initial values
    path = runs.export_generator(G, 100, tmp_path / "generator.pt2")
    assert path.is_file() and G.training  # exported a copy: the model itself stays in train mode
    exported = torch.export.load(str(path)).module()
    for n in (1, 7):
        z = torch.randn(n, 100)
        out = exported(z)
        assert out.shape == (n, 1, 28, 28)
        assert out.min() >= -1 and out.max() <= 1
        with torch.no_grad():
            assert torch.allclose(out.reshape(n, 784), G.eval()(z), atol=1e-5)
        G.train()


def test_a_channels_last_generator_exports_without_warnings_and_stays_as_it_was(tmp_path):
    """DCGAN's convolutions train channels_last on a CPU; torch.export.save warns for each weight in
    that layout ("No complete tensor found in the group!", a stderr box in Jupyter)."""
    import warnings
    from gan import dcgan
    G = dcgan.Generator(16, 8, 32).to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = torch.export.load(str(runs.export_generator(G, 16, tmp_path / "g.pt2", (3, 32, 32)))).module()
    z = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(exported(z), G.eval()(z), atol=1e-5)
    assert not next(p for p in G.parameters() if p.dim() == 4).is_contiguous()  # the model keeps its layout


def test_metrics_csv_round_trip(tmp_path):
    history = [{"epoch": 1, "d_loss": 1.25, "g_loss": 0.5, "train_seconds": 3.0},
               {"epoch": 2, "d_loss": 1.0, "g_loss": 0.75, "train_seconds": 6.5, "fd": 12.5}]
    path = tmp_path / "metrics.csv"
    runs.write_metrics_csv(path, history)
    assert path.read_text().splitlines()[0] == "epoch,d_loss,g_loss,train_seconds,fd"
    rows = runs.read_metrics_csv(path)
    assert len(rows) == 2
    assert rows[1] == {"epoch": 2.0, "d_loss": 1.0, "g_loss": 0.75, "train_seconds": 6.5, "fd": 12.5}
    assert math.isnan(rows[0]["fd"])
    assert {k: v for k, v in rows[0].items() if k != "fd"} == history[0]
    # floats survive exactly (repr round trip)
    runs.write_metrics_csv(path, [{"x": 0.1 + 0.2, "y": 1 / 3}])
    assert runs.read_metrics_csv(path) == [{"x": 0.1 + 0.2, "y": 1 / 3}]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_get_ordinary_permissions(tmp_path, umask_022):
    # Run outputs (metrics, grids, checkpoints) should be readable like any file written with open():
    # 0o666 less the umask, not the 0o600 of a private temporary file.
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    runs.atomic_write_bytes(tmp_path / "atomic.txt", b"x")
    gu.save_grid(torch.zeros(4, 784), tmp_path / "grid.png")
    runs.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o644
    for name in ("atomic.txt", "grid.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, f"{name} is {oct((tmp_path / name).stat().st_mode & 0o777)}"


def adam_after_resume(param_layout, saved_layout, restore) -> torch.Tensor:
    """Two fused Adam steps on one 4-d weight; between them the optimizer is saved with its moments in
    `saved_layout` and loaded into a fresh one whose weight lies in `param_layout`, by `restore`."""
    w0, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(2)]
    w = torch.nn.Parameter(w0.contiguous(memory_format=saved_layout))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    w.grad = grads[0].contiguous(memory_format=saved_layout)
    opt.step()
    saved = opt.state_dict()
    resumed = torch.nn.Parameter(w.detach().contiguous(memory_format=param_layout))
    opt2 = torch.optim.Adam([resumed], lr=0.1, fused=True)
    restore(opt2, saved)
    resumed.grad = grads[1].contiguous(memory_format=param_layout)  # autograd's grads take the weight's layout
    opt2.step()
    return resumed.detach().contiguous()


def test_a_checkpoint_in_another_layout_resumes_adam_exactly():
    # A CPU checkpoint (channels_last) resumed on a GPU (usual layout), or one from before the layout
    # change resumed on a CPU: the moments must follow the weights, or fused Adam pairs wrong elements.
    def with_restore(opt, saved):
        runs.restore_training_state({"opt": saved, "rng": runs.rng_state(), "history": [], "epoch": 0}, {"opt": opt})

    for param_layout, saved_layout in ((torch.channels_last, torch.contiguous_format),
                                       (torch.contiguous_format, torch.channels_last)):
        torch.manual_seed(0)
        reference = adam_after_resume(saved_layout, saved_layout, torch.optim.Optimizer.load_state_dict)
        torch.manual_seed(0)
        resumed = adam_after_resume(param_layout, saved_layout, with_restore)
        torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)


def test_without_the_layout_fix_fused_adam_would_go_wrong():
    # Why lay_out_like_params exists: torch's fused Adam does not check that the layouts agree.
    torch.manual_seed(0)
    reference = adam_after_resume(torch.contiguous_format, torch.contiguous_format, torch.optim.Optimizer.load_state_dict)
    torch.manual_seed(0)
    mismatched = adam_after_resume(torch.channels_last, torch.contiguous_format, torch.optim.Optimizer.load_state_dict)
    assert (mismatched - reference).abs().max() > 1e-3
