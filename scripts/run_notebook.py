#!/usr/bin/env python3
"""Run Vanilla_GAN.ipynb headless (what `make run` calls), and stop it safely on Ctrl-C or SIGTERM.

    python scripts/run_notebook.py [NOTEBOOK] [-o OUTPUT] [-k KERNEL] [--cwd DIR] [-p NAME VALUE]...

papermill's own command line dies on the first Ctrl-C or SIGTERM (from `kill`, a job scheduler, a
closing terminal): a ZMQ traceback, "Aborted!", and the kernel is shut down while it may still be
saving. This runner executes the notebook with papermill in this process instead. On SIGINT,
SIGTERM or SIGHUP it interrupts the kernel, as Jupyter's stop button does (the training cell rolls
back to the last completed epoch and saves a checkpoint), waits for the kernel to finish that, and
exits with 128 + the signal's number, printing how to resume (read from the run directory). A second
signal only says that it is still waiting; a third kills the kernel without saving (the checkpoint
already on disk stays).

Parameters are papermill's `-p name value` pairs (values typed as papermill types them; a list such
as `-p d_hidden '[512, 256]'` too). run_dir defaults as in the notebook (the resumed checkpoint's
directory, else runs/<date-time>/) and is always passed to the notebook, so both agree; the executed
notebook goes to <run_dir>/<notebook> unless -o says otherwise. Before anything is written, a run
directory that holds another run or is in use by another process is refused
(runs.check_run_dir), so the executed notebook of a finished run is never overwritten. The
kernel process's own stderr (not the cells' output, which papermill shows) goes to
<run_dir>/kernel.log.

Exit status: 0 done; 1 a cell failed; 2 refused before starting; 128 + N stopped by signal N (130
when the kernel itself was interrupted).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KERNEL_LOG = "kernel.log"  # in the run directory: the kernel process's stderr (see Stopper.kernel_manager_class)
# Seconds to wait for a cell's last output after the kernel says the cell is done (nbclient's default, 4,
# aborts a run whose kernel is busy for a moment, e.g. a loaded 2-core machine or a stop being handled).
IOPUB_TIMEOUT = 60


def typed(value: str):
    """A `-p` value typed as papermill's command line types it (True/False/None, int, float, str), and
    a list in brackets read as JSON (papermill's own command line needs -y for a list)."""
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # the notebook's parameter check says what is wrong with it
    if value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def say(text: str) -> None:
    """Write to stderr with one system call: safe inside a signal handler (print is not: the
    interrupted code may be inside a write to the same stream), and silent if the terminal is gone."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode())
    except OSError:
        pass


class StopRequested(Exception):
    """A stop signal came while no cell was running: the next cell is not started."""


class Stopper:
    """Turns stop signals into a kernel interrupt (first), a note (second), a kill (third)."""

    def __init__(self):
        self.signals: list[int] = []
        self.kernel_managers: list = []
        self.cells_started = 0  # until a cell starts, the kernel may still be starting: no signal to it then

    def kernel_manager_class(self, kernel_log=None):
        """papermill's kernel manager, remembering itself here so that a signal can reach the kernel.

        With `kernel_log` (an open file), the kernel process's own stderr goes there, not to the terminal:
        its start-up warnings, and the tracebacks that ipykernel sometimes logs when its sockets close
        under it at shutdown after an interrupt (harmless, but alarming on the terminal). What the
        notebook's cells print, errors included, still comes through papermill."""
        from jupyter_client import AsyncKernelManager
        managers = self.kernel_managers

        class RecordedKernelManager(AsyncKernelManager):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                managers.append(self)

            async def start_kernel(self, **kw):
                if kernel_log is not None:
                    kw.setdefault("stderr", kernel_log)
                return await super().start_kernel(**kw)

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
            say(f"\n{name}: stopping. " + ("Interrupted the kernel: it rolls back to the last completed "
                                          "epoch and saves the checkpoint; waiting for it."
                                          if reached else "No cell is running; none will start."))
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
    args.parameters = {name: typed(value) for name, value in args.parameter}
    return args


def has_entries(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def refuse_taken_run_dir(run_dir: Path, parameters: dict) -> None:
    """runs.check_run_dir before anything is written (imported only when the directory has
    something in it: gan.runs imports torch, seconds that a fresh directory need not wait)."""
    if has_entries(run_dir):
        from gan import runs
        runs.check_run_dir(run_dir, str(parameters.get("resume") or ""),
                                 bool(parameters.get("overwrite", False)))


def resume_report(run_dir: Path) -> str:
    """How to continue, read from the run directory: its checkpoint and the epoch it holds."""
    from gan import runs
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        return (f"No checkpoint in {run_dir} yet: nothing to resume. Start again there with "
                f"`{runs.restart_command(run_dir)}`, or with another RUN_DIR.")
    try:
        epoch = runs.load_checkpoint(checkpoint)["epoch"]
    except runs.CheckpointError as exc:
        return f"The checkpoint cannot be resumed: {exc}"
    return runs.resume_message(checkpoint, epoch)


def execute(args, run_dir: Path, output: Path, stopper: Stopper) -> tuple[int, str]:
    """Run the notebook; return (exit status, what to tell the user)."""
    import papermill
    kernel_log = run_dir / KERNEL_LOG
    try:
        with open(kernel_log, "ab") as log:
            papermill.execute_notebook(
                args.notebook, str(output), parameters=args.parameters, kernel_name=args.kernel,
                log_output=True, progress_bar=not args.no_progress_bar, cwd=args.cwd, iopub_timeout=IOPUB_TIMEOUT,
                kernel_manager_class=stopper.kernel_manager_class(log), on_cell_start=stopper.before_cell)
    except papermill.PapermillExecutionError as exc:
        if stopper.signals:
            signum = stopper.signals[0]
            return 128 + signum, f"Stopped ({signal.Signals(signum).name}). " + resume_report(run_dir)
        if exc.ename == "KeyboardInterrupt":  # the kernel itself was interrupted or sent SIGTERM
            return 128 + signal.SIGINT, (f"Stopped: the kernel was interrupted ({exc.evalue or 'KeyboardInterrupt'}). "
                                         + resume_report(run_dir))
        return 1, f"A cell failed: {exc.ename}: {exc.evalue}\n{exc}"
    except StopRequested:
        signum = stopper.signals[0]
        return 128 + signum, f"Stopped ({signal.Signals(signum).name}). " + resume_report(run_dir)
    except Exception as exc:  # the kernel died (killed, out of memory), or it never started
        status = 128 + stopper.signals[0] if stopper.signals else 1
        return status, (f"The run ended abnormally: {type(exc).__name__}: {exc}\n"
                        f"The kernel's own messages are in {kernel_log}.\n" + resume_report(run_dir))
    if stopper.signals:  # the signal came as the last cell finished: the run is complete
        return 0, f"Done (the {signal.Signals(stopper.signals[0]).name} came too late to stop it)."
    return 0, f"Done: results in {run_dir}/"


def main(argv=None) -> int:
    stopper = Stopper()
    for signum in STOP_SIGNALS:  # first of all: a Ctrl-C from here on never gives a traceback
        signal.signal(signum, stopper.handle)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = args.parameters
    # The notebook's own rule (runs.resolve_run_dir), without importing torch for it.
    if params.get("run_dir"):
        run_dir = Path(str(params["run_dir"])).expanduser()
    elif params.get("resume"):
        run_dir = Path(os.path.dirname(os.path.abspath(os.path.expanduser(str(params["resume"])))))
    else:
        from datetime import datetime
        run_dir = Path("runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    params["run_dir"] = str(run_dir)
    output = Path(args.output) if args.output else run_dir / Path(args.notebook).name
    if not Path(args.notebook).is_file():  # before any directory is made for a run that cannot start
        say(f"Not started: no notebook {args.notebook!r} here (make run NOTEBOOK=... takes Vanilla_GAN.ipynb "
            "or DCGAN.ipynb, from the repository's root).")
        return 2
    if args.output and not output.parent.is_dir():
        say(f"Not started: the directory of -o {args.output!r} does not exist; create it or choose another.")
        return 2
    try:
        refuse_taken_run_dir(run_dir, params)
        run_dir.mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        say(f"Not started: {exc}")
        return 2
    if stopper.signals:
        say("Stopped before the notebook started. " + resume_report(run_dir))
        return 128 + stopper.signals[0]
    status, message = execute(args, run_dir, output, stopper)
    say(f"{message}\nExecuted notebook: {output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
