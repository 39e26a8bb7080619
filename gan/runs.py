"""Nothing lost: a run's directory, its checkpoints and what happens when it is stopped.

* Writing files safely: every file a run writes replaces the old one atomically, a full disk is
  reported with what was kept, and leftovers of killed writers are cleaned up.
* Run directories: one run per directory (a finished run is never overwritten by accident) and one
  process per directory (a lock that names its holder).
* How to continue: the command that resumes a run, in every message that needs it.
* Stopping safely: SIGTERM behaves like Ctrl-C, a kernel whose parent process dies saves before it
  goes, and a second interrupt cannot tear a save.
* Checkpoints: plain dicts (`snapshot`: the config, every part's state_dict, the fixed noise, the
  random-number state, the history), saved atomically, loaded with `weights_only` (no code runs);
  `restore_training_state` puts one back, `roll_back` also puts the files back, and
  `rolled_back_when_stopped` is the training loop's safety net (an interrupt, a NaN, any error).
* The run's other files: config.json and metrics.json (`write_json`), metrics.csv, generator.pt2.

The one piece of module-level state is the registry of run-directory locks this process holds (see
claim_run_dir).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import glob
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gan.errors import CheckpointError, DivergenceError, ParameterError
from gan.hardware import mps_available

try:  # POSIX: run directories are locked with flock; elsewhere they are not (see RunDirLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


# --------------------------------------------------------------------------------------------
# Writing files safely: atomic replacement, a full disk, leftovers of killed writers
# --------------------------------------------------------------------------------------------

def ordinary_file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask): mkstemp's files are 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class DiskFullError(OSError):
    """A write failed for lack of space (or quota); the message says which file was left as it was."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_owner(temp: Path, path: Path, suffix: str) -> int | None:
    """The PID in a temporary name `<name>.<pid>.<random><suffix>`; None for other names."""
    middle = temp.name[len(path.name) + 1:-len(suffix)]
    pid = middle.split(".", 1)[0]
    return int(pid) if pid.isdigit() and "." in middle else None


def remove_dead_temp_files(path: str | os.PathLike, suffix: str, this_process: bool = False) -> list[Path]:
    """Delete the temporary files beside `path` (`<name>.<pid>.<random><suffix>`, as
    new_file_replacing names them) whose process is gone, killed while writing. Those of live
    processes stay: they may be writing right now. This process's own go too if `this_process`: for
    a caller that has just written `path` and is its only writer here, such a file is what an
    interrupt left of an earlier write (one that struck between the file's creation and the cleanup
    that guards it). Returns what was deleted."""
    path = Path(path)
    stale = []
    for temp in path.parent.glob(f"{glob.escape(path.name)}.*{suffix}"):
        pid = _temp_owner(temp, path, suffix)
        if pid is None:
            continue
        if (this_process and pid == os.getpid()) or (pid != os.getpid() and not _pid_alive(pid)):
            temp.unlink(missing_ok=True)
            stale.append(temp)
    return stale


@contextlib.contextmanager
def new_file_replacing(path: Path, suffix: str):
    """Yield (file, its path): a new file beside `path`. When the block ends without an error, the
    file is flushed, fsynced, given ordinary permissions and renamed over `path`; on any error it is
    removed. So a crash leaves either the old file or the new one, never half of one.

    Same directory, so the rename is atomic (one filesystem); the directory is fsynced afterwards
    so the rename itself survives a power cut.
    """
    path = Path(path)
    # The PID in the name tells a later cleanup whether the writer is still alive.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, ordinary_file_mode())  # mkstemp makes 0o600; readable by others like any new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half.
    A full disk raises DiskFullError saying that the file was left as it was."""
    path = Path(path)
    try:
        with new_file_replacing(path, suffix=".tmp") as (f, _):
            f.write(data)
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(exc.errno, f"{exc.strerror} while writing {path}: the file was left as it "
                            f"was ({_free_space(path.parent)} free there). Free some space, or write "
                            "the run to another disk (run_dir).") from exc


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:,.1f} MB"
    except OSError:
        return "unknown space"


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_metrics_csv(path: str | os.PathLike, history: list[dict]) -> None:
    """Write the whole per-epoch history as CSV (atomically; columns = union of all keys)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """Read metrics.csv back as a list of dicts of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------------------------
# Run directories: one run per directory, one process per run directory
# --------------------------------------------------------------------------------------------

# What a run writes into its directory besides grids/epoch_*.png: any of them means the directory
# holds a run. The executed notebook (papermill writes it there before the run starts) and the
# lock file are not among them.
RUN_OUTPUTS = ("checkpoint.pt", "config.json", "metrics.csv", "metrics.json", "generator.pt2",
               "progress.gif", "losses.png", "quality.png", "real_vs_generated.png", "interpolation.png",
               "latent_directions.png")


LOCK_FILE = ".lock"


def resolve_run_dir(run_dir: str, resume: str = "", root: str = "runs") -> Path:
    """The notebook's rule for where a run writes: `run_dir`; else the resumed checkpoint's own
    directory; else runs/<date-time>/. Shared by the notebook and scripts/run_notebook.py so they agree."""
    if run_dir:
        return Path(run_dir).expanduser()
    if resume:
        return Path(os.path.dirname(os.path.abspath(Path(resume).expanduser())))
    return Path(root) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files of a run in `run_dir` (RUN_OUTPUTS, per-epoch grids); [] when there are none."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        return []
    return [path / n for n in RUN_OUTPUTS if (path / n).exists()] + epoch_grid_paths(path)


GRID_NAME = re.compile(r"epoch_(\d+)\.png")  # what end_of_epoch writes: epoch_007.png, not "epoch_007 copy.png"


def grid_epoch(path: Path) -> int | None:
    """The epoch of a grid this project wrote (grids/epoch_007.png -> 7); None for any other name."""
    match = GRID_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def epoch_grid_paths(run_dir: str | os.PathLike) -> list[Path]:
    """The per-epoch grid PNGs of a run, in epoch order. Other files in grids/ (a file manager's
    "epoch_002 copy.png", the user's own) are not the run's and are left alone."""
    grids = [p for p in Path(run_dir, "grids").glob("epoch_*.png") if grid_epoch(p) is not None]
    return sorted(grids, key=grid_epoch)


def _resumes_here(resume: str | os.PathLike, run_dir: Path) -> bool:
    """True when the `resume` checkpoint lies directly in `run_dir` (resuming that run where it is);
    False for resume = '' (a new run)."""
    if not resume:
        return False
    parent = Path(resume).expanduser().absolute().parent
    try:
        return parent.exists() and run_dir.exists() and os.path.samefile(parent, run_dir)
    except OSError:
        return False


NOTEBOOKS = ("Vanilla_GAN.ipynb", "DCGAN.ipynb")


def holds_project_run(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds a run of this project: its config.json (the first file a run writes)
    names one of the notebooks. A directory with files of the same names but no such config.json
    holds someone's own files, which no run may overwrite or delete."""
    try:
        config = json.loads(Path(run_dir, "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("notebook") in NOTEBOOKS


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _refuse_other_run(path: Path, resume: str, overwrite: bool) -> None:
    """ParameterError when `path` holds a run that this one would overwrite or mix its files into,
    or files of the names a run writes that are not a run's (overwrite never deletes those)."""
    files = run_files(path)
    if not files or _resumes_here(resume, path):
        return
    names = [str(f.relative_to(path)) for f in files]
    shown = _shown(names)
    if not holds_project_run(path):
        raise ParameterError(
            f"run_dir = {str(path)!r} holds files of the names a run writes ({shown}) that are not a run of "
            "this project (its config.json, if any, names no notebook of it): a run there would overwrite "
            "them, and overwrite = True deletes only a run's own files. Choose another run_dir ('' for "
            "runs/<date-time>/), or move those files away.")
    if overwrite:
        return
    replace = "or set overwrite = True, which deletes the old run's checkpoint, metrics and grids first"
    if resume:
        raise ParameterError(
            f"run_dir = {str(path)!r} already holds another run ({shown}), and resume = {str(resume)!r} "
            "is not its checkpoint: the two runs' files would mix. Resume in the checkpoint's own "
            f"directory (run_dir = '' does that) or in a new run_dir; {replace}.")
    checkpoint = path / "checkpoint.pt"
    cont = (f"set resume = {str(checkpoint)!r} (headless: {resume_command(checkpoint)})"
            if checkpoint.is_file() else "there is no checkpoint.pt to resume from")
    raise ParameterError(
        f"run_dir = {str(path)!r} already holds a run ({shown}); a new run there would overwrite its "
        f"checkpoint and mix its files into the new run's. To continue that run, {cont}; to start a "
        f"new run, choose another run_dir ('' for runs/<date-time>/); {replace}.")


def _refuse_older_checkpoint(path: Path, resume: str) -> None:
    """ParameterError when `resume` is a checkpoint in `path` other than the run's own latest one
    (a copy such as ck_epoch1.pt) and holds an earlier epoch: continuing there would delete the later
    epochs' grids, metrics rows and checkpoint."""
    latest = path / "checkpoint.pt"
    if not latest.is_file() or os.path.samefile(Path(resume).expanduser(), latest):
        return
    older, newer = saved_epoch(Path(resume).expanduser()), saved_epoch(latest)
    if older is None or newer is None or older >= newer:
        return
    branch = path.parent / f"{path.name}-from-epoch-{older}"
    raise ParameterError(
        f"resume = {str(resume)!r} holds epoch {older}, but this run's latest checkpoint, {latest}, holds "
        f"epoch {newer}: continuing here from epoch {older} would delete epochs {older + 1}-{newer} (their "
        f"grids, metrics rows and checkpoint). To branch from epoch {older}, give it a new directory: "
        f"run_dir = {str(branch)!r} (headless: RUN_DIR={shlex.quote(str(branch))}); to continue the run, "
        f"resume = {str(latest)!r}.")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _busy_message(path: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    stop = (f"stop it (`kill -INT {pid}` saves its checkpoint first; a Jupyter kernel that has the run "
            "open holds it until you shut that kernel down), " if pid else "stop it, ")
    return (f"run_dir = {str(path)!r} is in use: {who} is running there now (it holds "
            f"{path / LOCK_FILE}). Wait for it to finish, {stop}or choose another run_dir.")


# Locks this process holds, by directory: re-running the notebook's setup cell in the same kernel
# gets the lock it already has instead of being refused by itself. Weak, so a lock nobody keeps is
# released when it is garbage-collected.
_HELD_LOCKS = weakref.WeakValueDictionary()


def _lock_key(path: Path) -> str:
    return os.path.realpath(path)


def _own_lock(path: Path):
    lock = _HELD_LOCKS.get(_lock_key(path))
    return lock if lock is not None and lock.held and lock.pid == os.getpid() else None


def lock_holder(run_dir: str | os.PathLike) -> int | None:
    """The PID of another live process that holds `<run_dir>/.lock` (0 if its PID is unreadable),
    or None when the directory is free or this process holds it. Writes nothing."""
    path = Path(run_dir).expanduser()
    lock_path = path / LOCK_FILE
    if fcntl is None or not lock_path.is_file() or _own_lock(path) is not None:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        try:  # a shared lock conflicts with the holder's exclusive one; taken and dropped at once
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunDirLock:
    """This process's claim on a run directory: an exclusive flock on `<run_dir>/.lock`, which holds
    the PID. Keep it in a variable as long as the run writes there (the notebook: the kernel's
    lifetime). The OS drops the lock when the process ends, however it ends (SIGKILL included), so a
    crashed run never leaves a stale lock; release() drops it earlier. The file itself stays:
    deleting a lock file races with a process that has just opened it.
    """

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self.pid, self._fd = Path(run_dir), os.getpid(), fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.pid == os.getpid() and fcntl is not None:  # a forked child must not unlock its parent's lock
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self):
        return f"RunDirLock({str(self.run_dir)!r}, pid={self.pid}, held={self.held})"


def _flock_exclusive(fd: int, tries: int = 20, pause: float = 0.025) -> bool:
    """Take an exclusive flock on `fd` without blocking; False if another process holds the file.
    A few tries over half a second: lock_holder's probe takes a shared lock for a moment, which must
    not make a run that starts just then report the directory as in use."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(pause)
    return False


def _acquire_lock(path: Path) -> RunDirLock:
    """Lock `path` for this process or raise ParameterError naming the PID that holds it."""
    try:
        # O_NOFOLLOW: a link planted as .lock would otherwise have the PID written into its target.
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     ordinary_file_mode())
    except OSError as exc:
        raise ParameterError(f"run_dir = {str(path)!r} is not writable ({exc.strerror}): use a "
                             "directory you can write to, or '' for runs/<date-time>/") from None
    if fcntl is None:  # pragma: no cover - no flock on this platform: unlocked, as before
        os.close(fd)
        return RunDirLock(path, None)
    if not _flock_exclusive(fd):
        pid = _read_pid(fd)
        os.close(fd)
        raise ParameterError(_busy_message(path, pid)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = RunDirLock(path, fd)
    _HELD_LOCKS[_lock_key(path)] = lock
    return lock


# The repository's own files: a run writing there would put its files among the sources (the executed
# notebook over the notebook itself, at the root).
REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("gan", "scripts", "tests", "docs", "images", "weights", ".ci", ".git")


def _refuse_sources(path: Path) -> None:
    """ParameterError when `path` is the repository's root or inside one of its source folders."""
    real = Path(os.path.realpath(path))
    inside = [d for d in SOURCE_DIRS if real == REPOSITORY / d or (REPOSITORY / d) in real.parents]
    if real == REPOSITORY or inside:
        where = "the repository's root" if real == REPOSITORY else f"the repository's {inside[0]}/ folder"
        raise ParameterError(f"run_dir = {str(path)!r} is {where}: a run there would write its files (and "
                             "the executed notebook) among the sources. Use a directory of its own, e.g. "
                             "runs/<name>, or '' for runs/<date-time>/")


def _refuse_links(path: Path) -> None:
    """ParameterError when a name a run writes in `path` is a symbolic link: a run writes its own
    files, never through a link planted there to another file."""
    names = (LOCK_FILE, "grids", *RUN_OUTPUTS)
    links = [n for n in names if (path / n).is_symlink()]
    links += [str(p.relative_to(path)) for p in epoch_grid_paths(path) if p.is_symlink()]
    if links:
        raise ParameterError(f"run_dir = {str(path)!r} has symbolic links where a run writes its files "
                             f"({', '.join(links)}): a run never writes through a link. Remove them "
                             f"(e.g. `rm {shlex.quote(str(path / links[0]))}`), or choose another run_dir.")


def check_run_dir(run_dir: str | os.PathLike, resume: str = "", overwrite: bool = False) -> Path:
    """Refuse, before anything is written, a run directory that is a file, inside the repository's
    sources, has links planted where a run writes, is being written by another live process, or holds
    a run this one is not resuming (unless `overwrite`). Writes nothing, so it can run first;
    claim_run_dir() repeats the checks under the lock."""
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ParameterError(f"run_dir = {str(path)!r} is a file, not a directory: use a directory "
                             "path, or '' for runs/<date-time>/")
    _refuse_sources(path)
    if path.is_dir():
        _refuse_links(path)
    pid = lock_holder(path)
    if pid is not None:
        raise ParameterError(_busy_message(path, pid))
    if _resumes_here(resume, path):
        _refuse_older_checkpoint(path, resume)
    if _own_lock(path) is not None and run_files(path) and not _resumes_here(resume, path):
        # This kernel's own run, from an earlier run of the setup cells: overwrite = True would
        # delete the run that is open here.
        raise ParameterError(
            f"run_dir = {str(path)!r} holds the run this kernel is training. To continue it, change "
            "settings in a new cell and run the training cell (not the setup cells); to start a new "
            "run, restart the kernel first (Restart & Run All).")
    _refuse_other_run(path, resume, overwrite)
    return path


def claim_run_dir(run_dir: str | os.PathLike, resume: str = "", overwrite: bool = False) -> RunDirLock:
    """Make `run_dir` this run's own: create it (with grids/), lock it for this process, and check
    under the lock that it holds no run this one would overwrite; with `overwrite`, delete the old
    run's files first. Call it after the settings, the data and the checkpoint have all been
    checked, so a refused run has changed nothing. Returns the lock: keep it (see RunDirLock).

    `resume` is the resume parameter: a checkpoint inside `run_dir` continues that run there.
    """
    path = check_run_dir(run_dir, resume, overwrite)
    try:
        (path / "grids").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"run_dir = {str(path)!r} cannot be created ({exc.strerror}): use a "
                             "directory you can write to, or '' for runs/<date-time>/") from None
    lock = _own_lock(path)
    fresh = lock is None
    lock = lock or _acquire_lock(path)
    try:
        _refuse_other_run(path, resume, overwrite)  # again: nobody else can start there now
        if overwrite and not _resumes_here(resume, path):  # never the run being resumed
            clear_run_files(path)
        remove_dead_writers_files(path)  # what a killed run left half-written
    except BaseException:
        if fresh:
            lock.release()
        raise
    return lock


def clear_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete a run's files (RUN_OUTPUTS, grids, temporary files of dead processes) from `run_dir`;
    other files stay. Returns what was deleted."""
    path = Path(run_dir).expanduser()
    gone = run_files(path)
    for f in gone:
        f.unlink(missing_ok=True)
    return gone + remove_dead_writers_files(path)


def remove_dead_writers_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in `run_dir` (a checkpoint cut short by a
    kill is 20-40 MB); those of live processes stay. Returns what was deleted."""
    path = Path(run_dir).expanduser()
    gone = []
    for name in RUN_OUTPUTS:
        gone += remove_dead_temp_files(path / name, ".tmp")
    return gone


def remove_grids_after(run_dir: str | os.PathLike, epoch: int) -> list[Path]:
    """Delete grids/epoch_N.png for N > `epoch`: pictures of epochs that a resume or a rollback
    undid, which would otherwise appear in progress.gif. Returns what was deleted."""
    stale = [p for p in epoch_grid_paths(run_dir) if grid_epoch(p) > epoch]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------------------------
# How to continue a run: the commands the messages give
# --------------------------------------------------------------------------------------------

def _double_quoted(text: str) -> str:
    """`text` quoted for a POSIX shell, in double quotes where that is safe (easier to read)."""
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)


DEFAULT_NOTEBOOK = "Vanilla_GAN.ipynb"  # what `make run` runs unless NOTEBOOK= says otherwise


def notebook_of_run(run_dir: str | os.PathLike) -> str:
    """The notebook that wrote the run in `run_dir` (config.json's "notebook"; MNIST's by default)."""
    try:
        return json.loads(Path(run_dir, "config.json").read_text()).get("notebook", DEFAULT_NOTEBOOK)
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NOTEBOOK


def _make_run_in(run_dir: str | os.PathLike, notebook: str | None = None) -> str:
    """`make run [NOTEBOOK=...] RUN_DIR=...` for `notebook` (by default the one whose run is in
    `run_dir`), quoted."""
    notebook = notebook or notebook_of_run(run_dir)
    which = "" if notebook == DEFAULT_NOTEBOOK else f"NOTEBOOK={shlex.quote(notebook)} "
    return f"make run {which}RUN_DIR={shlex.quote(str(run_dir))}"


def _params(pairs: dict) -> str:
    """PARAMS="-p name value ..." for make: make passes PARAMS to the shell unquoted, so each value
    carries its own quotes (any path works, spaces too)."""
    text = " ".join(f"-p {name} {shlex.quote(str(value))}" for name, value in pairs.items())
    return f"PARAMS={_double_quoted(text)}"


def restart_command(run_dir: str | os.PathLike, notebook: str | None = None, parameters: dict | None = None) -> str:
    """The shell command that starts a run afresh in `run_dir`, deleting the files of the run that
    stopped there before its first checkpoint (overwrite: nothing to resume is lost). `parameters`
    are the ones the stopped run was started with (its dataset, its settings), so it starts again as
    it was; where a run writes is left out (RUN_DIR says it)."""
    kept = {k: v for k, v in (parameters or {}).items() if k not in ("run_dir", "overwrite", "resume")}
    return f"{_make_run_in(run_dir, notebook)} {_params({'overwrite': True, **kept})}"


def resume_command(checkpoint: str | os.PathLike, notebook: str | None = None) -> str:
    """The shell command that continues a run headless. The checkpoint holds the run's settings
    (its dataset included), which a resumed run keeps unless told otherwise, so it needs only
    resume; `notebook` is the checkpoint's run's (by default read from its config.json)."""
    checkpoint = Path(checkpoint)
    return f"{_make_run_in(checkpoint.parent, notebook)} {_params({'resume': checkpoint})}"


def resume_message(checkpoint: Path, epoch: int, notebook: str | None = None) -> str:
    """What a stop says: the epoch saved and how to continue, in Jupyter and headless (`notebook`:
    the one whose run it is, by default read from the run's config.json)."""
    checkpoint = Path(checkpoint)
    return (
        f"Saved {checkpoint} after epoch {epoch}. To continue: in Jupyter, run the training cell "
        f"again (or set resume = {str(checkpoint)!r} after a restart); headless, "
        f"`{resume_command(checkpoint, notebook)}` (papermill: `-p resume {shlex.quote(str(checkpoint))}`); "
        f"the run continues in {checkpoint.parent}."
    )


# --------------------------------------------------------------------------------------------
# Stopping safely: SIGTERM and a second interrupt
# --------------------------------------------------------------------------------------------

def _in_main_thread() -> bool:
    """Python lets only the main thread set signal handlers."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block, SIGTERM (what `kill`, a job scheduler or a closing terminal sends) raises
    KeyboardInterrupt in the main thread, as Ctrl-C does: the training cell's rollback-and-save path
    runs instead of the process dying with the unfinished epoch's work and no checkpoint. The
    previous handler is back after the block. Outside the main thread it does nothing."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ParentPidHeld(int):
    """ipykernel's parent poller (`ParentPollerUnix`) checks `os.getppid() != parent_pid` every second
    and ends the kernel at once (os._exit) when its parent is gone, with the run's unsaved epochs.
    While this value stands in for its parent_pid, that check never fires (the reflected __ne__ of an
    int subclass is tried first), so the kernel lives until interrupted_when_orphaned's save is done."""

    def __ne__(self, other):
        return False

    __hash__ = int.__hash__


def _ipykernel_parent_poller():
    """The running ipykernel's parent poller, or None (not in a kernel, or a kernel without one)."""
    # A kernel has imported ipykernel long before; importing it in a script would switch every later
    # tqdm.auto bar of that process to a notebook widget (tqdm looks for ipykernel's modules).
    if "ipykernel.kernelapp" not in sys.modules:
        return None
    try:
        from ipykernel.kernelapp import IPKernelApp
        from ipykernel.parentpoller import ParentPollerUnix
    except ImportError:
        return None
    poller = IPKernelApp.instance().poller if IPKernelApp.initialized() else None
    return poller if isinstance(poller, ParentPollerUnix) else None


@contextlib.contextmanager
def interrupted_when_orphaned(poll_seconds: float = 0.2):
    """Inside the block, a kernel whose parent (papermill, make run's runner, a multi-run engine's
    worker) exits or is killed is interrupted as SIGTERM would (the training cell rolls back to the
    last completed epoch and saves it) instead of being ended by ipykernel within a second, unsaved.
    ipykernel's own parent check is held during the block and back afterwards: then the orphaned
    kernel shuts down as it always did, its checkpoint saved. Outside the main thread it does nothing."""
    if not _in_main_thread():
        yield
        return
    parent, done = os.getppid(), threading.Event()
    poller = _ipykernel_parent_poller()
    if poller is not None:
        poller.parent_pid = _ParentPidHeld(poller.parent_pid)

    def watch():
        while not done.wait(poll_seconds):
            if os.getppid() != parent:
                say_to_log(f"the kernel's parent process (PID {parent}) is gone: saving the last completed "
                           "epoch before shutting down")
                # A real signal (not _thread.interrupt_main) also wakes a main thread that waits in C
                # code; sigterm_as_interrupt's handler then takes the save path.
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="parent-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        if poller is not None:
            poller.parent_pid = int(poller.parent_pid)


def say_to_log(text: str) -> None:
    """A line on the process's own stderr (a kernel's goes to kernel.log): still read when nobody
    reads the cells' output any more."""
    with contextlib.suppress(OSError, ValueError):
        sys.__stderr__.write(text + "\n")
        sys.__stderr__.flush()


@contextlib.contextmanager
def interrupts_deferred(reraise: bool = True, report: Callable[[str], None] = print):
    """Hold SIGINT and SIGTERM until the block ends: wrap the rollback's save in it, so that a
    second Ctrl-C (or a SIGTERM) cannot cut the checkpoint short and lose the last good epoch.

    Yields the list of signals held. After the block, a held signal is reported, and with `reraise`
    turned into KeyboardInterrupt (unless the block raised already); without it, only reported -- for
    a block that is followed by a `raise` anyway. The previous handlers are back after the block.
    Outside the main thread it holds nothing.
    """
    held = []
    if not _in_main_thread():
        yield held
        return
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        names = " and ".join(dict.fromkeys(signal.Signals(s).name for s in held))
        report(f"{names} arrived while saving; held until the save was complete.")
        if reraise:
            raise KeyboardInterrupt(f"{names} received (held during the save)")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "vanilla-gan-checkpoint/1"


# What the notebook's snapshot() puts in a checkpoint: a file without one of them cannot be resumed.
CHECKPOINT_KEYS = ("config", "epoch", "G", "D", "G_ema", "opt_G", "opt_D", "fixed_noise", "rng", "history")


def saved_epoch(path: Path) -> int | None:
    """The epoch of the checkpoint at `path`, or None when there is none or it cannot be read."""
    try:
        return load_checkpoint(path, required_keys=("epoch",))["epoch"]
    except (CheckpointError, KeyError, OSError):
        return None


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Save a plain-dict checkpoint atomically, stamped with this project's format tag.

    On a full disk the previous checkpoint stays, and the DiskFullError says which epoch it holds
    and how to resume from it once there is space.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except DiskFullError as exc:
        raise DiskFullError(exc.errno, _disk_full_message(path, checkpoint.get("epoch"))) from exc
    # Left by a process killed mid-write, or by an interrupt of this one's previous save (the
    # training loop is a checkpoint's only writer, so no save of this process is under way now).
    remove_dead_temp_files(path, ".tmp", this_process=True)
    return path


def _disk_full_message(path: Path, epoch) -> str:
    kept = saved_epoch(path)
    state = (f"{path} was not changed and still holds epoch {kept}, the last good checkpoint"
             if kept is not None else f"no checkpoint was written to {path}")
    then = (f"then resume from it: `{resume_command(path)}` (in Jupyter: set resume = {str(path)!r})"
            if kept is not None else "then start the run again")
    return (f"No space left on the device while saving the checkpoint of epoch {epoch}: {state}. "
            f"Free some space ({_free_space(path.parent)} free in {path.parent}), {then}.")


def load_checkpoint(path: str | os.PathLike, map_location="cpu", required_keys=CHECKPOINT_KEYS) -> dict:
    """Load a checkpoint with `weights_only=True` (opening it can never run code from it), and check
    that it holds `required_keys`: a tagged file without them would fail later with a bare KeyError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the `resume` parameter.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refused object: the pickle itself is broken
            raise CheckpointError(f"{path} is not a readable checkpoint of this project (its contents "
                                  "cannot be unpickled). Point `resume` at a checkpoint.pt written by "
                                  "Vanilla_GAN.ipynb.") from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain data, so it was refused "
            "without running any of it. Checkpoints of this project never do: point `resume` at a "
            "checkpoint.pt in a run directory of Vanilla_GAN.ipynb or DCGAN.ipynb."
        ) from None
    except Exception as exc:  # truncated zip, not a torch file at all
        raise CheckpointError(
            f"{path} is not a readable checkpoint of this project ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Point `resume` at a "
            "checkpoint.pt in a run directory of Vanilla_GAN.ipynb or DCGAN.ipynb."
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this project "
                              f"(no format tag {CHECKPOINT_FORMAT!r}); point `resume` at a "
                              "checkpoint.pt in a run directory of Vanilla_GAN.ipynb or DCGAN.ipynb.")
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is a checkpoint of this project but lacks {', '.join(missing)}: "
                              "it is incomplete or was written by other code, and cannot be resumed. "
                              "Point `resume` at another checkpoint.pt, or start afresh with resume=''.")
    return checkpoint


# --------------------------------------------------------------------------------------------
# Snapshots, rolling back, and the random numbers a resume restores
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (all devices') generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """PyTorch's generator states (CPU, every CUDA device, Apple's MPS), as tensors a checkpoint can
    hold: the noise a run draws on a GPU comes from that GPU's generator."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned. The states go back through the CPU: a checkpoint loaded
    with map_location=<the GPU> holds them on the GPU, where torch.set_rng_state refuses them."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the ones this machine has (the run
        # trains on one); set_rng_state_all would fail on the others.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
    if "mps" in state and mps_available():
        torch.mps.set_rng_state(state["mps"].cpu())


def divergence_message(step: int, epoch: int, config: dict, checkpoint: Path) -> str:
    return (
        f"Training diverged: a loss became NaN or inf in epoch {epoch + 1} (step {step}). The models "
        f"were rolled back to the last completed epoch, saved in {checkpoint}. Look at: lr_d "
        f"(now {config['lr_d']}) and lr_g (now {config['lr_g']}) -- halve them; beta1 "
        f"(now {config['beta1']}); batch_size (now {config['batch_size']}); "
        f"g_loss (now {config['g_loss']!r}; 'non_saturating' is the stable one). Then resume with "
        f"resume={str(checkpoint)!r}."
    )


def snapshot(config: dict, epoch: int, parts: dict, fixed_noise: torch.Tensor, history: list) -> dict:
    """Everything needed to continue exactly after `epoch`, as a plain dict (what checkpoint.pt holds:
    torch.load(weights_only=True) reads it): the settings, every part's state_dict, the fixed noise,
    the random-number state and the history. Deep copies, so later training cannot change it."""
    return copy.deepcopy({"config": config, "epoch": epoch, **{k: part.state_dict() for k, part in parts.items()},
                          "fixed_noise": fixed_noise, "rng": rng_state(), "history": history})


def restore_training_state(state: dict, parts: dict) -> tuple[list, int]:
    """Load a snapshot or checkpoint `state` into the training parts and the random-number
    generators; returns copies of its (history, epoch). Copies throughout: an optimizer's
    load_state_dict keeps the given state tensors as its own, so training would otherwise change
    `state`, and loading it again (a second rollback, the build cell run again) would be inexact."""
    for key, part in parts.items():
        part.load_state_dict(copy.deepcopy(state[key]))
        if isinstance(part, torch.optim.Optimizer):
            lay_out_like_params(part)
    set_rng_state(state["rng"])
    return copy.deepcopy(state["history"]), state["epoch"]


def lay_out_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each of the optimizer's state tensors its parameter's memory layout (strides). A model's
    load_state_dict keeps the model's layout, an optimizer's keeps the saved one; the fused Adam kernel
    reads a parameter and its moments element by element in memory order, so a checkpoint written in
    another layout (channels_last on a CPU, not on a GPU, or by an older version) would silently
    pair the wrong numbers. The values are unchanged."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def roll_back(state: dict, parts: dict, checkpoint_path: Path, run_path: Path) -> tuple[list, int]:
    """Put the models, the random numbers and the files back to the snapshot `state` (after an
    interrupt or a NaN): memory and disk then agree, and re-running the training cell continues from
    there. Returns the snapshot's (history, epoch) for the notebook's variables."""
    history, epoch = restore_training_state(state, parts)
    save_epoch(checkpoint_path, state)
    remove_grids_after(run_path, epoch)  # the unfinished epoch's grid, if it was written
    return history, epoch


def save_epoch(checkpoint_path: str | os.PathLike, state: dict) -> None:
    """Save the snapshot `state` as the run's checkpoint, then its history as metrics.csv beside it.
    In that order, so that however a run ends (a kill included) metrics.csv never holds an epoch that
    no checkpoint holds: its rows are what a resume continues from."""
    save_checkpoint(checkpoint_path, state)
    if state["history"]:
        write_metrics_csv(Path(checkpoint_path).parent / "metrics.csv", state["history"])


@contextlib.contextmanager
def rolled_back_when_stopped(roll_back_to_last_good: Callable[[], int], checkpoint_path: Path):
    """The training loop's safety net. Ctrl-C, the stop button or SIGTERM (KeyboardInterrupt), a NaN
    loss (DivergenceError) and any other error in an epoch (a full disk, out of memory) call
    `roll_back_to_last_good()` (it returns the epoch it went back to), with a second interrupt held
    until its save is done, then re-raise: re-running the training cell then trains the unfinished
    epoch once, not on top of its half. An interrupt also prints how to resume."""
    with sigterm_as_interrupt(), interrupted_when_orphaned():
        try:
            yield
        except KeyboardInterrupt as stop:
            with interrupts_deferred(reraise=False):
                epoch = roll_back_to_last_good()
                print("Interrupted: the unfinished epoch was rolled back. " + resume_message(checkpoint_path, epoch))
            # Re-raised so that Run All stops here and papermill reports the stop, but shown in Jupyter
            # as one line: IPython prints what _render_traceback_ returns instead of the traceback,
            # which would end deep in torch and read as a crash after a clean save.
            stop._render_traceback_ = lambda: [f"KeyboardInterrupt: training stopped; epoch {epoch} is saved "
                                               "(how to continue: above)"]
            raise
        except Exception as error:
            with interrupts_deferred(reraise=False):
                try:
                    epoch = roll_back_to_last_good()
                except Exception as failed:  # e.g. the disk is still full: the error above is the news
                    print(f"note: rolling back after {type(error).__name__} failed too ({type(failed).__name__}: "
                          f"{failed}); restart the kernel and resume from {checkpoint_path}.")
                else:
                    if not isinstance(error, DivergenceError):  # its message says which settings to look at
                        print(f"{type(error).__name__} in epoch {epoch + 1}: that epoch was rolled back. "
                              + resume_message(checkpoint_path, epoch))
            raise


# --------------------------------------------------------------------------------------------
# The trained generator, on its own
# --------------------------------------------------------------------------------------------

def export_generator(generator: torch.nn.Module, latent_dim: int, path: str | os.PathLike,
                     image_shape: tuple = (1, 28, 28)) -> Path:
    """Export the generator with torch.export (eval mode, dynamic batch) to a .pt2 file.

    Load it anywhere with `torch.export.load(path).module()`: noise (N, latent_dim) -> images
    (N, *image_shape) in [-1, 1], for any batch size N >= 1 (no upper bound: memory is the limit).
    """
    # Whatever the generator's output layout (flat 784 pixels for the MLP), (N, C, H, W) images:
    # the layout other tools expect.
    shape = (torch.nn.Flatten(), torch.nn.Unflatten(1, tuple(image_shape)))
    model = torch.nn.Sequential(copy.deepcopy(generator), *shape).cpu().eval()
    for tensor in [*model.parameters(), *model.buffers()]:
        # Plain contiguous weights (DCGAN's convolutions train channels_last on a CPU): torch.export.save
        # warns "No complete tensor found in the group!" for each weight stored in another layout.
        tensor.data = tensor.data.contiguous()
    example = torch.randn(4, latent_dim)
    batch = torch.export.Dim("batch", min=1)  # an upper bound would be a guard that fails above it
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
