#!/usr/bin/env python3
"""Run Vanilla_GAN.ipynb headless (what `make run` calls), and stop it safely on Ctrl-C or SIGTERM.

    python scripts/run_notebook.py [NOTEBOOK] [-o OUTPUT] [-k KERNEL] [--cwd DIR] [-p NAME VALUE]...

papermill's own command line dies on the first Ctrl-C or SIGTERM (from `kill`, a job scheduler, a
closing terminal): a ZMQ traceback, "Aborted!", and the kernel is shut down while it may still be
saving. This runner executes the notebook with papermill in this process instead. On SIGINT,
SIGTERM or SIGHUP it interrupts the kernel, as Jupyter's stop button does (the training cell rolls
back to the last completed epoch and saves a checkpoint), waits for the kernel to finish that, and
exits with 128 + the signal's number, printing how to resume (read from the run directory) or, before
the first checkpoint, how to start again (the same notebook and -p values). A second signal only says
that it is still waiting; a third kills the kernel without saving (the checkpoint already on disk
stays; the half-written temporary files of the killed kernel are deleted).

Parameters are `-p name value` pairs, each typed by the notebook's rule for it (settings.typed_parameter):
paths and names stay strings as typed (run_dir 2024_12_01, run_dir 007, dataset 2024), numbers and
lists in brackets are parsed (`-p d_hidden '[512, 256]'`). run_dir defaults as in the notebook (the
resumed checkpoint's directory, else runs/<date-time>/) and is always passed to the notebook, so both
agree; the executed notebook goes to <run_dir>/<notebook> unless -o says otherwise.

Nothing is written and no directory made until these pass (else "Not started: ..." and exit status 2):
the notebook exists; the output is not the notebook itself; for Vanilla_GAN.ipynb and DCGAN.ipynb,
every -p name and value is one of theirs (settings.validate_parameters) and a resumed checkpoint is
that notebook's; the run directory is free for this run (runs.check_run_dir: not a file, not among
the sources, no planted links, not in use, no other run unless overwrite); and it is writable.

A run never spoils an earlier run's record. papermill writes the executed notebook to a hidden
temporary file beside its destination, moved into place when the run ends. In a run directory that
held files before this run, the kernel's stderr (its start-up warnings and shutdown noise; the cells'
output comes through papermill) goes to a temporary file too, appended to <run_dir>/kernel.log at the
end; in a new or empty one, straight to kernel.log. Both are kept when the kernel claimed the
directory (its PID is in <run_dir>/.lock, runs.claim_run_dir) or the directory was new to this run
and no other run has claimed it since, and the kernel log also when the kernel died (it says why);
otherwise the notebook refused or stopped before taking over a directory that held files (or another
run took it over), and both temporary files are deleted: every earlier file there stays as it was.

Exit status: 0 done; 1 a cell failed (a refusal by the notebook itself included) or the kernel died;
2 refused before starting; 128 + N stopped by signal N (130 when the kernel itself was interrupted).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # gan/ and gan_utils.py

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KERNEL_LOG = "kernel.log"  # in the run directory: the kernel process's stderr (see Stopper.kernel_manager_class)
# Seconds to wait for a cell's last output after the kernel says the cell is done (nbclient's default, 4,
# aborts a run whose kernel is busy for a moment, e.g. a loaded 2-core machine or a stop being handled).
IOPUB_TIMEOUT = 60
PROJECT_NOTEBOOKS = ("Vanilla_GAN.ipynb", "DCGAN.ipynb")  # the notebooks whose parameter rules are known here
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def say(text: str) -> None:
    """Write to stderr with one system call: safe inside a signal handler (print is not: the
    interrupted code may be inside a write to the same stream), and silent if the terminal is gone."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode())
    except OSError:
        pass


class NotStarted(Exception):
    """The run is refused before anything is written; the message says why and what to do."""


class StopRequested(Exception):
    """A stop signal came while no cell was running: the next cell is not started."""


class Stopper:
    """Turns stop signals into a kernel interrupt (first), a note (second), a kill (third)."""

    def __init__(self):
        self.signals: list[int] = []
        self.kernel_managers: list = []
        self.kernel_pids: list[int] = []  # kept here: the provisioner forgets its PID once the kernel is gone
        self.cells_started = 0  # until a cell starts, the kernel may still be starting: no signal to it then

    def kernel_manager_class(self, kernel_log=None):
        """papermill's kernel manager, remembering itself here so that a signal can reach the kernel.

        With `kernel_log` (an open file), the kernel process's own stderr goes there, not to the terminal:
        its start-up warnings, and the tracebacks that ipykernel sometimes logs when its sockets close
        under it at shutdown after an interrupt (harmless, but alarming on the terminal). What the
        notebook's cells print, errors included, still comes through papermill."""
        from jupyter_client import AsyncKernelManager
        managers, pids = self.kernel_managers, self.kernel_pids

        class RecordedKernelManager(AsyncKernelManager):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                managers.append(self)

            async def start_kernel(self, **kw):
                if kernel_log is not None:
                    kw.setdefault("stderr", kernel_log)
                result = await super().start_kernel(**kw)
                pid = getattr(self.provisioner, "pid", None)
                if pid:
                    pids.append(pid)
                return result

        return RecordedKernelManager

    def signal_kernel(self, signum: int) -> bool:
        """Send `signum` to the kernel's process group, as jupyter_client's interrupt_kernel does."""
        provisioner = self.kernel_managers[-1].provisioner if self.kernel_managers else None
        pid, pgid = getattr(provisioner, "pid", None), getattr(provisioner, "pgid", None)
        try:
            if pgid:
                os.killpg(pgid, signum)
            elif pid:
                os.kill(pid, signum)
            else:
                return False
        except ProcessLookupError:
            return False
        return True

    def handle(self, signum, frame) -> None:
        self.signals.append(signum)
        name = signal.Signals(signum).name
        if len(self.signals) == 1:
            reached = self.cells_started > 0 and self.signal_kernel(signal.SIGINT)
            # The resume report needs gan.runs (torch: seconds to import): load it while the kernel saves.
            threading.Thread(target=importlib.import_module, args=("gan.runs",), daemon=True).start()
            what = ("Interrupted the kernel: it rolls back to the last completed epoch and saves the "
                    "checkpoint; waiting for it." if reached else "No cell is running; none will start.")
            say(f"\n{name}: stopping. {what}")
        elif len(self.signals) == 2:
            say(f"{name}: still waiting for the kernel to finish saving. Send it once more to kill "
                "the kernel without saving (the checkpoint already on disk stays).")
        else:
            self.signal_kernel(signal.SIGKILL)
            say(f"{name}: killed the kernel.")

    def before_cell(self, cell=None, cell_index=None, **kwargs) -> None:
        """nbclient's on_cell_start hook: a signal that came between cells stops the run there."""
        if self.signals:
            raise StopRequested(f"stopped before cell {cell_index}")
        self.cells_started += 1


# --------------------------------------------------------------------------------------------
# The command line, and every check before anything is written
# --------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", nargs="?", default="Vanilla_GAN.ipynb")
    parser.add_argument("-o", "--output", help="executed notebook (default: <run_dir>/<notebook name>)")
    parser.add_argument("-k", "--kernel", default="python3")
    parser.add_argument("--cwd", help="the kernel's working directory (default: this one)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    args.parameters = typed_parameters(args.notebook, args.parameter)
    return args


def typed_parameters(notebook: str, pairs) -> dict:
    """The `-p` pairs, each value typed by `notebook`'s rule for its name (a path stays a string)."""
    from gan import settings
    rules = settings.rules_for(notebook)
    return {name: settings.typed_parameter(name, text, rules) for name, text in pairs}


def is_project_notebook(notebook: str) -> bool:
    return Path(notebook).name in PROJECT_NOTEBOOKS


def notebook_for_make(notebook: str) -> str:
    """NOTEBOOK= for the printed make commands: the name for the repository's own notebooks (make
    runs in the root), else the path, absolute so that it works from anywhere."""
    path = Path(notebook)
    if is_project_notebook(notebook) and os.path.realpath(path) == os.path.realpath(REPOSITORY / path.name):
        return path.name
    return os.path.abspath(path)


def resolve_run_dir(parameters: dict) -> Path:
    from gan import runs
    return runs.resolve_run_dir(str(parameters.get("run_dir") or ""), str(parameters.get("resume") or ""))


def refuse_missing_notebook(notebook: str) -> None:
    if not Path(notebook).is_file():
        raise NotStarted(f"no notebook {notebook!r} here (make run NOTEBOOK=... takes Vanilla_GAN.ipynb "
                         "or DCGAN.ipynb, from the repository's root).")


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same real path, or hard links to one file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # `a` does not exist yet: a new file, not the notebook
        return False


def refuse_output_over_notebook(notebook: str, output: Path, chosen_by_o: bool) -> None:
    """The executed notebook must never replace the notebook it was run from."""
    if not same_file(output, Path(notebook)):
        return
    how = (f"-o {str(output)!r} is" if chosen_by_o
           else f"the run directory {str(output.parent)!r} holds it, so the executed notebook <run_dir>/"
                f"{output.name} would be")
    raise NotStarted(f"{how} the notebook {notebook!r} itself: running it would write the executed copy, "
                     "with every output, over the source. Choose another -o, or a run directory of its own "
                     "(RUN_DIR=runs/<name>, or none for runs/<date-time>/).")


def refuse_bad_parameters(notebook: str, parameters: dict) -> None:
    """settings.validate_parameters for the repository's notebooks (another notebook, such as a test's,
    has parameters these rules do not know; its own cells check them)."""
    if not is_project_notebook(notebook):
        return
    from gan import settings
    from gan.errors import ParameterError
    try:
        settings.validate_parameters(parameters, settings.rules_for(notebook))
    except ParameterError as exc:
        raise NotStarted(f"{exc}\n(-p NAME VALUE, in make run's PARAMS=\"-p NAME VALUE ...\")") from None


def refuse_other_notebooks_checkpoint(notebook: str, parameters: dict) -> None:
    """A checkpoint that this notebook cannot resume (the other notebook's, or not a checkpoint) is refused
    here, before the kernel would get as far as its run directory."""
    resume = str(parameters.get("resume") or "")
    if not resume or not is_project_notebook(notebook):
        return
    from gan import runs, settings
    from gan.errors import CheckpointError
    try:
        config = runs.load_checkpoint(resume, required_keys=("config",))["config"]
    except CheckpointError as exc:
        raise NotStarted(str(exc)) from None
    made_by, name = settings.notebook_of(config), Path(notebook).name
    if made_by != name:
        raise NotStarted(f"resume = {resume!r} is a checkpoint of {made_by}, not of {name}: resume it with "
                         f"{made_by}, `{runs.resume_command(resume, made_by)}`, or start afresh without resume.")


def refuse_output_dir_missing(args) -> None:
    if args.output and not Path(args.output).parent.is_dir():
        raise NotStarted(f"the directory of -o {args.output!r} does not exist; create it or choose another.")


def refuse_taken_run_dir(run_dir: Path, parameters: dict) -> None:
    """runs.check_run_dir (writes nothing), and no link planted as kernel.log (which the runner writes)."""
    from gan import runs
    from gan.errors import ParameterError
    try:
        runs.check_run_dir(run_dir, str(parameters.get("resume") or ""), parameters.get("overwrite") is True)
    except ParameterError as exc:
        raise NotStarted(str(exc)) from None
    if (run_dir / KERNEL_LOG).is_symlink():
        raise NotStarted(f"{run_dir / KERNEL_LOG} is a symbolic link: the runner never writes through one. "
                         "Remove it, or choose another RUN_DIR.")


def cannot_prepare_message(run_dir: Path, exc: OSError) -> str:
    """Why the run directory or the run's temporary files could not be made, and what to do."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"run_dir = {str(run_dir)!r} is not writable ({exc.strerror}): make it writable "
                f"(chmod u+w {shlex.quote(str(run_dir))}), or choose another RUN_DIR (none for runs/<date-time>/).")
    return f"run_dir = {str(run_dir)!r} could not be prepared for the run ({exc.strerror or exc})."


# --------------------------------------------------------------------------------------------
# The run's files: temporary until the run has shown that they are its own
# --------------------------------------------------------------------------------------------

@dataclass
class RunFiles:
    run_dir: Path
    output: Path  # where the executed notebook goes if it is kept
    held_files: bool  # the run directory had entries before this run: an earlier run's, or the user's
    notebook_temp: Path
    log_temp: Path | None  # None: the kernel's stderr goes straight to kernel.log (a directory new to this run)
    log: object  # the open file the kernel's stderr goes to


def has_entries(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def hidden_temp(directory: Path, name: str, suffix: str) -> Path:
    """A new hidden file in `directory` that no other process has (mkstemp: O_EXCL, so never a planted
    link's target); the PID in its name says whose it is."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=f".{name}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    return Path(path)


def open_kernel_log(run_dir: Path):
    """kernel.log opened to append, never through a link (O_NOFOLLOW: a planted link fails with ELOOP)."""
    fd = os.open(run_dir / KERNEL_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
    return os.fdopen(fd, "ab")


def prepare_run_files(run_dir: Path, output: Path) -> RunFiles:
    """Make the run directory and the run's temporary files; OSError when it cannot be written."""
    held_files = has_entries(run_dir)  # before this run adds anything
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook_temp = hidden_temp(output.parent, output.stem, ".ipynb")  # .ipynb: papermill warns on other names
    try:
        if held_files:
            log_temp = hidden_temp(run_dir, KERNEL_LOG, ".tmp")
            log = open(log_temp, "ab")
        else:
            log_temp, log = None, open_kernel_log(run_dir)
    except BaseException:
        notebook_temp.unlink(missing_ok=True)
        raise
    return RunFiles(run_dir, output, held_files, notebook_temp, log_temp, log)


def lock_pid(run_dir: Path) -> int | None:
    """The PID in <run_dir>/.lock: the process that last claimed the directory (runs.claim_run_dir)."""
    from gan import runs
    try:
        fd = os.open(run_dir / runs.LOCK_FILE, os.O_RDONLY | NO_FOLLOW)
    except OSError:
        return None
    try:
        return int(os.read(fd, 32).decode().strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def claimed_by_kernel(run_dir: Path, stopper: Stopper) -> bool:
    pid = lock_pid(run_dir)
    return pid is not None and pid in stopper.kernel_pids


def keep_notebook(files: RunFiles, claimed: bool) -> bool:
    """The executed notebook is kept when the kernel claimed the directory, or the directory was new to
    this run and nobody else has claimed it since (a run racing for it that won owns what is there)."""
    return claimed or (not files.held_files and lock_pid(files.run_dir) is None)


def append_kernel_log(files: RunFiles) -> Path:
    """The temporary kernel log appended to <run_dir>/kernel.log (never through a link); returns where
    the kernel's messages now are (the temporary file itself if kernel.log cannot be written)."""
    try:
        with open_kernel_log(files.run_dir) as log, open(files.log_temp, "rb") as temp:
            shutil.copyfileobj(temp, log)
    except OSError as exc:
        say(f"note: could not append the kernel's messages to {files.run_dir / KERNEL_LOG} "
            f"({exc.strerror or exc}); they stay in {files.log_temp}.")
        return files.log_temp
    files.log_temp.unlink(missing_ok=True)
    return files.run_dir / KERNEL_LOG


def settle_kernel_log(files: RunFiles, keep: bool) -> Path | None:
    """Close the kernel log and keep it (append the temporary one) or delete it; where it is, or None."""
    files.log.close()
    if files.log_temp is None:
        return files.run_dir / KERNEL_LOG
    if keep:
        return append_kernel_log(files)
    files.log_temp.unlink(missing_ok=True)
    return None


def settle_notebook(files: RunFiles, keep: bool) -> str:
    """Move the executed notebook into place, or delete it; what to tell the user about it."""
    from gan import runs
    if not keep:
        files.notebook_temp.unlink(missing_ok=True)
        return (f"not kept: {files.run_dir} held files before this run, and the run ended before the "
                "notebook claimed the directory, so they were left as they were (what the cells printed "
                "is above)")
    try:
        os.chmod(files.notebook_temp, runs.ordinary_file_mode())  # mkstemp makes 0o600; like any new file
        os.replace(files.notebook_temp, files.output)  # replaces a link at output, never its target
    except OSError as exc:
        return f"{files.notebook_temp} (it could not be moved to {files.output}: {exc.strerror or exc})"
    return str(files.output)


# --------------------------------------------------------------------------------------------
# Running, and what to tell the user
# --------------------------------------------------------------------------------------------

def resume_report(run_dir: Path, args) -> str:
    """How to continue, read from the run directory: its checkpoint and the epoch it holds; before the
    first checkpoint, how to start the same run (notebook, dataset, settings) again."""
    from gan import runs
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        again = runs.restart_command(run_dir, notebook_for_make(args.notebook), args.parameters)
        return (f"No checkpoint in {run_dir} yet: nothing to resume. Start again there with "
                f"`{again}`, or with another RUN_DIR.")
    try:
        epoch = runs.load_checkpoint(checkpoint)["epoch"]
    except runs.CheckpointError as exc:
        return f"The checkpoint cannot be resumed: {exc}"
    return runs.resume_message(checkpoint, epoch, notebook_for_make(args.notebook))


@dataclass
class Outcome:
    status: int
    message: str
    kernel_died: bool = False


def stopped(stopper: Stopper, run_dir: Path, args) -> Outcome:
    signum = stopper.signals[0]
    return Outcome(128 + signum, f"Stopped ({signal.Signals(signum).name}). " + resume_report(run_dir, args))


def execute(args, files: RunFiles, stopper: Stopper) -> Outcome:
    """Run the notebook into its temporary file; what happened."""
    import papermill
    try:
        papermill.execute_notebook(
            args.notebook, str(files.notebook_temp), parameters=args.parameters, kernel_name=args.kernel,
            log_output=True, progress_bar=not args.no_progress_bar, cwd=args.cwd, iopub_timeout=IOPUB_TIMEOUT,
            kernel_manager_class=stopper.kernel_manager_class(files.log), on_cell_start=stopper.before_cell)
    except papermill.PapermillExecutionError as exc:
        if stopper.signals:
            return stopped(stopper, files.run_dir, args)
        if exc.ename == "KeyboardInterrupt":  # the kernel itself was interrupted or sent SIGTERM
            why = exc.evalue or "KeyboardInterrupt"
            return Outcome(128 + signal.SIGINT, f"Stopped: the kernel was interrupted ({why}). "
                                                + resume_report(files.run_dir, args))
        return Outcome(1, f"A cell failed: {exc.ename}: {exc.evalue}\n{exc}")
    except StopRequested:
        return stopped(stopper, files.run_dir, args)
    except Exception as exc:  # the kernel died (killed, out of memory), or it never started
        status = 128 + stopper.signals[0] if stopper.signals else 1
        return Outcome(status, f"The run ended abnormally: {type(exc).__name__}: {exc}\n"
                               + resume_report(files.run_dir, args), kernel_died=True)
    if stopper.signals:  # the signal came as the last cell finished: the run is complete
        return Outcome(0, f"Done (the {signal.Signals(stopper.signals[0]).name} came too late to stop it).")
    return Outcome(0, f"Done: results in {files.run_dir}/")


def finish(files: RunFiles, outcome: Outcome, stopper: Stopper) -> str:
    """Keep or delete the run's temporary files and clean up after a dead kernel; the final message."""
    from gan import runs
    claimed = claimed_by_kernel(files.run_dir, stopper)
    keep = keep_notebook(files, claimed)
    if claimed:  # the kernel is gone now, so any temporary file with its PID is a half-written leftover
        runs.remove_dead_writers_files(files.run_dir)
    log = settle_kernel_log(files, keep or outcome.kernel_died)  # after a death the log is what says why
    message = outcome.message
    if outcome.kernel_died and log is not None:
        message += f"\nThe kernel's own messages are in {log}."
    return f"{message}\nExecuted notebook: {settle_notebook(files, keep)}"


def checked_start(args) -> tuple[Path, Path]:
    """(run directory, executed notebook's path) once every check before writing has passed; else
    NotStarted. The parameters then name the run directory, so the notebook and the runner agree."""
    params = args.parameters
    refuse_missing_notebook(args.notebook)
    run_dir = resolve_run_dir(params)
    params["run_dir"] = str(run_dir)
    output = Path(args.output) if args.output else run_dir / Path(args.notebook).name
    refuse_output_over_notebook(args.notebook, output, bool(args.output))
    refuse_bad_parameters(args.notebook, params)
    refuse_other_notebooks_checkpoint(args.notebook, params)
    refuse_output_dir_missing(args)
    refuse_taken_run_dir(run_dir, params)
    return run_dir, output


def main(argv=None) -> int:
    stopper = Stopper()
    for signum in STOP_SIGNALS:  # first of all: a Ctrl-C from here on never gives a traceback
        signal.signal(signum, stopper.handle)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_dir, output = checked_start(args)
    except NotStarted as exc:
        say(f"Not started: {exc}")
        return 2
    if stopper.signals:
        say("Stopped before the notebook started. " + resume_report(run_dir, args))
        return 128 + stopper.signals[0]
    try:
        files = prepare_run_files(run_dir, output)
    except OSError as exc:
        say(f"Not started: {cannot_prepare_message(run_dir, exc)}")
        return 2
    outcome = execute(args, files, stopper)
    say(finish(files, outcome, stopper))
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
