"""Run safety: one run per directory and one process per run, settings checked against the data,
MNIST verified by content, downloads that cannot hang, checkpoints that survive a full disk, and a
safe stop on SIGTERM or a second Ctrl-C, headless included (run_notebook.py, `make run`).

None of these runs Vanilla_GAN.ipynb: the notebook is being restructured, so the stop tests run a
tiny notebook written here with the training cell's shape (epochs, a snapshot per epoch, a
checkpoint, `except KeyboardInterrupt: roll back, save, raise`)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
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

import gan_metrics as gm
import gan_utils as gu
import mnist_data
import run_safety
from conftest import REPO_ROOT, kernel_env, listing

RUNNER = REPO_ROOT / "run_notebook.py"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def full_checkpoint(epoch: int, value: float | None = None) -> dict:
    """A checkpoint with every key load_checkpoint requires (tiny tensors)."""
    w = torch.full((4,), float(epoch if value is None else value))
    return {"config": {"latent_dim": 2}, "epoch": epoch, "G": {"w": w}, "D": {"w": w}, "G_ema": {"w": w},
            "opt_G": {}, "opt_D": {}, "fixed_noise": torch.zeros(2, 2), "rng": gu.rng_state(),
            "history": [{"epoch": e + 1} for e in range(epoch)]}


def finished_run(path: Path, epochs: int = 2) -> Path:
    """A directory as a finished run leaves it."""
    (path / "grids").mkdir(parents=True)
    run_safety.save_checkpoint(path / "checkpoint.pt", full_checkpoint(epochs))
    gu.write_json(path / "config.json", {"epochs": epochs})
    gu.write_metrics_csv(path / "metrics.csv", [{"epoch": e + 1} for e in range(epochs)])
    for e in range(epochs):
        (path / "grids" / f"epoch_{e + 1:03d}.png").write_bytes(b"png")
    (path / "Vanilla_GAN.ipynb").write_text("{}")
    return path


# ------------------------------------------------------------------------------------------------
# 1, 2: a directory holding a run is refused before anything changes; one process per directory
# ------------------------------------------------------------------------------------------------

def test_finished_run_is_refused_without_resume_and_nothing_changes(tmp_path):
    run = finished_run(tmp_path / "run")
    before = listing(run)
    for attempt in (run_safety.check_run_dir, run_safety.claim_run_dir):
        with pytest.raises(gu.ParameterError) as info:
            attempt(run)
        msg = str(info.value)
        assert str(run) in msg and "already holds a run" in msg
        assert f"resume = {str(run / 'checkpoint.pt')!r}" in msg and "make run RUN_DIR=" in msg
        assert "run_dir" in msg and "overwrite = True" in msg
        assert listing(run) == before and not (run / run_safety.LOCK_FILE).exists()


def test_resuming_a_run_in_its_own_directory_is_allowed(tmp_path):
    run = finished_run(tmp_path / "run")
    before = listing(run)
    with run_safety.claim_run_dir(run, resume=str(run / "checkpoint.pt")) as lock:
        assert lock.held and lock.run_dir == run
    after = listing(run)
    assert after.pop(run_safety.LOCK_FILE) > 0 and after == before


def test_resuming_another_run_into_a_directory_holding_a_run_is_refused(tmp_path):
    finished_run(tmp_path / "a")
    b = finished_run(tmp_path / "b")
    with pytest.raises(gu.ParameterError) as info:
        run_safety.check_run_dir(b, resume=str(tmp_path / "a" / "checkpoint.pt"))
    assert "another run" in str(info.value) and "is not its checkpoint" in str(info.value)


def test_overwrite_deletes_the_old_runs_files_only(tmp_path):
    run = finished_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    dead = spawn_and_reap()
    (run / f"checkpoint.pt.{dead}.abcd1234.tmp").write_bytes(b"torn")
    with run_safety.claim_run_dir(run, overwrite=True):
        left = sorted(listing(run))
    assert left == [run_safety.LOCK_FILE, "Vanilla_GAN.ipynb", "notes.txt"]


def test_overwrite_never_deletes_the_run_being_resumed(tmp_path):
    run = finished_run(tmp_path / "run")
    before = sorted(listing(run))
    with run_safety.claim_run_dir(run, resume=str(run / "checkpoint.pt"), overwrite=True):
        assert sorted(listing(run)) == sorted(before + [run_safety.LOCK_FILE])


def test_setup_cells_run_again_over_this_kernels_own_run_say_how_to_go_on(tmp_path):
    run = tmp_path / "run"
    with run_safety.claim_run_dir(run):
        gu.write_json(run / "config.json", {"epochs": 1})  # the run has started here
        for overwrite in (False, True):  # the advice to overwrite would delete the run open here
            with pytest.raises(gu.ParameterError, match=r"holds the run this kernel is training\. To continue it"):
                run_safety.check_run_dir(run, overwrite=overwrite)
        assert (run / "config.json").exists()


def test_the_command_to_start_again_is_accepted_where_a_run_stopped_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run dcgan"
    (run / "grids").mkdir(parents=True)
    gu.write_json(run / "config.json", {"notebook": "DCGAN.ipynb"})  # stopped in epoch 1: no checkpoint
    command = run_safety.restart_command(run)
    assert command == f"make run NOTEBOOK=DCGAN.ipynb RUN_DIR='{run}' PARAMS=\"-p overwrite True\""
    with pytest.raises(gu.ParameterError):
        run_safety.check_run_dir(run)  # the same command without overwrite is refused
    assert run_safety.check_run_dir(run, overwrite=True) == run


def test_new_directory_is_created_locked_with_our_pid(tmp_path):
    run = tmp_path / "new" / "run"
    assert run_safety.check_run_dir(run) == run and not run.exists()  # the check writes nothing
    lock = run_safety.claim_run_dir(run)
    assert (run / "grids").is_dir()
    assert (run / run_safety.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert run_safety.claim_run_dir(run) is lock  # the setup cell run again in the same kernel
    lock.release()
    assert not lock.held
    run_safety.claim_run_dir(run).release()


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(gu.ParameterError, match="is a file"):
        run_safety.claim_run_dir(tmp_path / "f")


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
import run_safety
lock = run_safety.claim_run_dir({run!r})
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
        for attempt in (run_safety.check_run_dir, run_safety.claim_run_dir):
            with pytest.raises(gu.ParameterError) as info:
                attempt(run)
            msg = str(info.value)
            assert str(run) in msg and f"process {holder.pid}" in msg and f"kill -INT {holder.pid}" in msg
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs; the OS releases the lock
        holder.wait()
    run_safety.claim_run_dir(run).release()


def test_a_probe_of_the_lock_at_that_moment_does_not_refuse_a_starting_run(tmp_path):
    # lock_holder (any process checking the directory) takes a shared lock for a moment; a run
    # claiming the directory just then must wait that moment out, not report it as in use.
    import fcntl
    run = tmp_path / "run"
    run_safety.claim_run_dir(run).release()  # the directory and its lock file, free again
    probe = os.open(run / run_safety.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    timer = threading.Timer(0.1, lambda: fcntl.flock(probe, fcntl.LOCK_UN))
    timer.start()
    try:
        run_safety.claim_run_dir(run).release()
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
        assert run_safety.remove_dead_temp_files(tmp_path / "checkpoint.pt", ".tmp") == [tmp_path / names["dead"]]
        # A save of this process removes what an interrupt left of its own earlier save, too.
        run_safety.save_checkpoint(tmp_path / "checkpoint.pt", full_checkpoint(1))
        assert sorted(p.name for p in tmp_path.glob("*.tmp")) == sorted(names[k] for k in ("live", "unknown"))
    finally:
        live.kill()
        live.wait()


def test_temporary_file_names_carry_the_writers_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(gu.os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    run_safety.atomic_write_bytes(tmp_path / "metrics.csv", b"x")
    assert re.fullmatch(rf"metrics\.csv\.{os.getpid()}\.[a-z0-9_]+\.tmp", seen[0])


def test_remove_grids_after(tmp_path):
    run = finished_run(tmp_path / "run", epochs=4)
    assert [p.name for p in run_safety.remove_grids_after(run, 2)] == ["epoch_003.png", "epoch_004.png"]
    assert [p.name for p in run_safety.epoch_grid_paths(run)] == ["epoch_001.png", "epoch_002.png"]


def test_resolve_run_dir_is_the_notebooks_rule(tmp_path):
    assert run_safety.resolve_run_dir("x/y") == Path("x/y")
    assert run_safety.resolve_run_dir("", str(tmp_path / "r" / "checkpoint.pt")) == tmp_path / "r"
    assert re.fullmatch(r"runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", str(run_safety.resolve_run_dir("")))


# ------------------------------------------------------------------------------------------------
# 3: settings against the data
# ------------------------------------------------------------------------------------------------

GOOD = dict(batch_size=64, d_steps=1, r1_gamma=0.5, r1_every=4, g_batchnorm=True, metrics_every=1,
            metrics_samples=2000, eval_samples=10000, train_subset=512)


def data_problems(n_train=512, **changes) -> str:
    with pytest.raises(gu.ParameterError) as info:
        gu.validate_against_data({**GOOD, **changes}, n_train)
    return str(info.value)


def test_good_settings_pass():
    gu.validate_against_data(GOOD, 512)
    gu.validate_against_data({**GOOD, "batch_size": 128, "train_subset": 0}, mnist_data.N_TRAIN)
    gu.validate_against_data({**GOOD, "r1_every": 100, "r1_gamma": 0.0}, 512)  # penalty off: any r1_every
    gu.validate_against_data({**GOOD, "metrics_samples": 1, "metrics_every": 0}, 512)  # no per-epoch scores
    gu.validate_against_data({**GOOD, "eval_samples": 0, "batch_size": 2, "r1_every": 3, "train_subset": 7}, 7)


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
    with pytest.raises(gu.ParameterError) as info:
        gu.validate_against_data({**dcgan, "batch_size": 1}, 512)
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
    below = gu.FD_MIN_SAMPLES - 1
    with pytest.raises(Exception):  # torch.cov of one sample is NaN; eigh then fails
        gm.frechet_distance_features(torch.randn(below, 8, generator=g), real)
    assert np.isfinite(gm.frechet_distance_features(torch.randn(gu.FD_MIN_SAMPLES, 8, generator=g), real))
    with pytest.raises(RuntimeError):
        gm.precision_recall(torch.randn(gu.KNN_MIN_SAMPLES - 1, 8, generator=g), real)
    assert all(np.isfinite(gm.precision_recall(torch.randn(gu.KNN_MIN_SAMPLES, 8, generator=g), real)))


def test_seed_range_is_numpys():
    check, allowed = gu.PARAMETER_RULES["seed"]
    assert check(2 ** 32 - 1) and not check(2 ** 32) and not check(-1)
    assert "0 to 2**32-1" in allowed
    gu.seed_everything(2 ** 32 - 1)  # the largest allowed seed really works
    with pytest.raises(ValueError):
        np.random.seed(2 ** 32)  # and the first refused one would not


def test_nothing_to_train_message():
    assert gu.nothing_to_train_message(5, 4) is None
    assert gu.nothing_to_train_message(4, 4) == ("nothing to train: epochs (4) <= epochs done (4); "
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
    with pytest.raises(mnist_data.DataError) as info:
        mnist_data.read_mnist_file(path.parent, spec)
    msg = str(info.value)
    assert expected in msg and str(path) in msg and "Delete" in msg


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(mnist_data.DataError) as info:
        mnist_data.load_mnist(tmp_path / "data", download=False)
    assert "is a file, not a directory" in str(info.value) and "data_dir" in str(info.value)


def test_directory_in_place_of_a_file(make_mnist_copy):
    root = make_mnist_copy(plain=True, names=[n for n in (TRAIN_LABELS,)])
    (root / "MNIST" / "raw" / TRAIN_IMAGES).mkdir()
    with pytest.raises(mnist_data.DataError) as info:
        mnist_data.read_mnist_file(root / "MNIST" / "raw", mnist_data.MNIST_FILES["train_images"])
    assert "is a directory" in str(info.value) and TRAIN_IMAGES in str(info.value)


def test_unreadable_file_and_directory(make_mnist_copy, monkeypatch):
    root = make_mnist_copy(plain=True, names=[TRAIN_LABELS])
    raw = root / "MNIST" / "raw"

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # root ignores chmod, so refusing is simulated
    with pytest.raises(mnist_data.DataError) as info:
        mnist_data.read_mnist_file(raw, mnist_data.MNIST_FILES["train_labels"])
    assert f"cannot read {raw / TRAIN_LABELS} (Permission denied)" in str(info.value)
    monkeypatch.setattr(gu.os, "listdir", lambda p: refuse(p))
    with pytest.raises(mnist_data.DataError, match="cannot read the directory"):
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
        with pytest.raises(mnist_data.DataError) as info:
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
        with pytest.raises(mnist_data.DataError) as info:
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
    path = run_safety.save_checkpoint(run / "checkpoint.pt", full_checkpoint(3))
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(gu.os, "fdopen", lambda *a, **k: FullDiskFile(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(gu.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as info:
        run_safety.save_checkpoint(path, full_checkpoint(4))
    monkeypatch.undo()
    assert isinstance(info.value, run_safety.DiskFullError) and info.value.errno == errno.ENOSPC
    msg = str(info.value)
    assert "epoch 4" in msg and f"{path} was not changed and still holds epoch 3" in msg
    assert run_safety.resume_command(path) in msg and "MB free" in msg
    assert run_safety.load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_disk_full_before_any_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(gu.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(run_safety.DiskFullError, match="no checkpoint was written"):
        run_safety.save_checkpoint(tmp_path / "checkpoint.pt", full_checkpoint(1))
    with pytest.raises(run_safety.DiskFullError, match="metrics.csv: the file was left as it was"):
        gu.write_metrics_csv(tmp_path / "metrics.csv", [{"epoch": 1}])
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_the_tag_but_missing_keys(tmp_path):
    ck = full_checkpoint(2)
    del ck["opt_D"], ck["rng"]
    path = run_safety.save_checkpoint(tmp_path / "checkpoint.pt", ck)
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.load_checkpoint(path)
    assert "lacks opt_D, rng" in str(info.value) and str(path) in str(info.value)


def test_export_has_no_batch_limit(tmp_path):
    G = torch.nn.Sequential(torch.nn.Linear(2, 784), torch.nn.Tanh())
    exported = torch.export.load(str(gu.export_generator(G, 2, tmp_path / "g.pt2"))).module()
    assert exported(torch.randn(70_000, 2)).shape == (70_000, 1, 28, 28)  # above the old 65,536


# ------------------------------------------------------------------------------------------------
# 7: paths with spaces: the resume command and the Makefile
# ------------------------------------------------------------------------------------------------

def test_resume_command_survives_spaces_and_quotes():
    checkpoint = Path("runs/my run's/checkpoint.pt")
    words = shlex.split(run_safety.resume_command(checkpoint))  # as the user's shell reads it
    assert words[:2] == ["make", "run"] and words[2] == f"RUN_DIR={checkpoint.parent}"
    assert shlex.split(words[3].removeprefix("PARAMS=")) == ["-p", "resume", str(checkpoint)]  # as make's shell
    assert run_safety.resume_command(Path("runs/x/checkpoint.pt")) == 'make run RUN_DIR=runs/x PARAMS="-p resume runs/x/checkpoint.pt"'
    assert run_safety.resume_command(checkpoint) in run_safety.resume_message(checkpoint, 3)


def test_makefile_passes_run_dir_and_params_with_spaces(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than requirements.txt: nothing is installed
    fake = venv / "bin" / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    checkpoint = Path("runs/my run/checkpoint.pt")
    assignments = shlex.split(run_safety.resume_command(checkpoint))[2:]  # RUN_DIR=... PARAMS=... as the shell passes them
    out = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "run", f"VENV={venv}", *assignments],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "run_notebook.py", "Vanilla_GAN.ipynb", "-p", "run_dir", "runs/my run", "-p", "resume", str(checkpoint)]
    # Without RUN_DIR the runner picks the directory as the notebook does: a resumed checkpoint's own
    # (not a new runs/<date-time>/ beside it), else runs/<date-time>/.
    for params, expected in (([], ["run_notebook.py", "Vanilla_GAN.ipynb"]),
                             (['PARAMS=-p resume "runs/my run/checkpoint.pt"'],
                              ["run_notebook.py", "Vanilla_GAN.ipynb", "-p", "resume", str(checkpoint)])):
        out = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "run", f"VENV={venv}", *params],
                             capture_output=True, text=True, timeout=30, env={**os.environ, "RUN_DIR": ""})
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected, out.stderr


def test_runner_types_values_as_papermill_and_reads_lists():
    sys.path.insert(0, str(REPO_ROOT))
    import run_notebook
    assert [run_notebook.typed(v) for v in ("3", "1e-3", "True", "None", "runs/x")] == [3, 1e-3, True, None, "runs/x"]
    assert run_notebook.typed("[512, 256]") == [512, 256]  # -p d_hidden '[512, 256]'
    assert run_notebook.typed("[512, 256") == "[512, 256"  # left as text: the notebook's check names it


def test_runner_stopped_before_the_notebook_starts_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capfd):
    # A SIGTERM while the runner checks the run directory (before any kernel): the same report as a
    # stop later on, in-process so that the signal lands exactly there.
    sys.path.insert(0, str(REPO_ROOT))
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
        with run_safety.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupts_during_the_block_are_held_until_it_is_done():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    said, steps = [], []
    with pytest.raises(KeyboardInterrupt):
        with run_safety.interrupts_deferred(report=said.append) as held:
            for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), s)
                time.sleep(0.05)
                steps.append(s)  # each step still runs: the signal is held
    assert len(steps) == 3 and held == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]
    assert said == ["SIGINT and SIGTERM arrived while saving; held until the save was complete."]
    assert {s: signal.getsignal(s) for s in before} == before
    with run_safety.interrupts_deferred(reraise=False, report=said.append):  # only reported
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
import gan_utils as gu
import run_safety
run_path = Path(run_dir)
run_lock = run_safety.claim_run_dir(run_path)
checkpoint_path = run_path / "checkpoint.pt"
w = torch.zeros(256, 1024)  # 1 MB: a save takes a moment
history, epochs_done = [], 0

def snapshot(epoch):
    return {"config": {}, "epoch": epoch, "G": {"w": w.clone()}, "D": {}, "G_ema": {}, "opt_G": {},
            "opt_D": {}, "fixed_noise": torch.zeros(1), "rng": gu.rng_state(), "history": list(history)}

def roll_back_to(state):
    global w, history, epochs_done
    w, history, epochs_done = state["G"]["w"].clone(), list(state["history"]), state["epoch"]
    if rollback_wait:  # a slow disk: the test's second signal lands during the save
        (run_path / "saving").touch()
        deadline = time.monotonic() + rollback_wait
        while not (run_path / "second signal sent").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    run_safety.save_checkpoint(checkpoint_path, state)

last_good = snapshot(0)
'''

# w == epoch after each epoch and a half-way value in between: a checkpoint with a torn or unfinished
# epoch shows. completed.log lists the epochs whose snapshot was taken.
TOY_TRAINING = '''with run_safety.sigterm_as_interrupt():
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
                run_safety.save_checkpoint(checkpoint_path, last_good)
    except KeyboardInterrupt:
        with run_safety.interrupts_deferred(reraise=False):
            roll_back_to(last_good)
            print("Interrupted: the unfinished epoch was rolled back. " + run_safety.resume_message(checkpoint_path, epochs_done))
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
    ck = run_safety.load_checkpoint(checkpoint)
    epoch, done = ck["epoch"], trial.completed()
    last = done[-1] if done else 0
    assert epoch in (last, last + 1), f"checkpoint at epoch {epoch}, last completed epoch {last}"
    assert torch.all(ck["G"]["w"] == epoch), "the checkpoint holds a torn or unfinished epoch"
    assert [row["epoch"] for row in ck["history"]] == list(range(1, epoch + 1))
    reported = [int(n) for n in re.findall(r"after epoch (\d+)", out)]
    assert reported and set(reported) == {epoch}, f"reported {reported}, checkpoint epoch {epoch}"
    assert "Stopped" in out and run_safety.resume_command(checkpoint) in out  # on the terminal, quoted
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
    sys.path.insert(0, str(REPO_ROOT))
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
