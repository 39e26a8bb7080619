"""Many runs of either notebook: seeds, or a grid of settings times seeds, dispatched by Dask.

    python scripts/run_many.py Vanilla_GAN.ipynb --seeds 5 --out runs/seeds
    python scripts/run_many.py DCGAN.ipynb --seeds 3 --grid lr_g=2e-4,4e-4 -p epochs 10 --out runs/lr
    python scripts/run_many.py Vanilla_GAN.ipynb --seeds 5 --out runs/seeds --scheduler tcp://head:8786

(`make runs SEEDS=5 OUT=runs/seeds` runs the first.) Each run is scripts/run_notebook.py, what `make run`
runs: the notebook itself, headless with papermill, into <out>/<setting>/seed_<k>/ with the whole run
contract (config.json, metrics.csv, metrics.json, checkpoints, the executed notebook); its terminal
output goes to <out>/logs/. Run the same command again and finished runs are skipped, stopped ones
resume from their checkpoints, and runs that never reached a checkpoint start again.

Without --scheduler the runs go to a Dask LocalCluster on this machine (no server to start): as many
runs at once as --workers (default: one per core), each with --threads threads (default: the cores
split between them), so that two runs on two cores do not fight over them. With --scheduler they go
to a Dask cluster (`dask scheduler` on one machine, `dask worker <address>` on each of the others; the
repository and the data at the same paths on every machine, as a shared file system gives them).

A failed run is reported with its error and does not stop the others. Ctrl-C (or SIGTERM) stops every
run safely: each runner is sent SIGTERM, its kernel saves the last completed epoch, and the command
prints how to continue. Then <out>/summary.md and .csv (mean ± sd of every final number per setting,
a row per seed), <out>/runs.csv and <out>/bands.png (per-epoch scores, mean ± sd) are written.

Exit status: 0 every run finished; 1 a run failed; 2 refused before starting; 130 stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # gan/ and gan_utils.py

STOP_EVENT = "gan-run-many-stop-{id}"  # a Dask Event each task watches: set, it stops its run


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The engine: a LocalCluster on this machine, or a cluster's scheduler
# --------------------------------------------------------------------------------------------

def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_cores(workers: int | None, threads: int | None, n_runs: int) -> tuple[int, int]:
    """(runs at once, threads each) on this machine: by default one run per core, one thread each (two
    1-thread runs on 2 cores finish sooner together than one after the other with 2 threads each),
    never more runs than there are."""
    n = cores()
    workers = max(1, min(workers or n, n_runs))
    return workers, max(1, threads or n // workers)


def connect(scheduler: str | None, workers: int):
    from distributed import Client, LocalCluster
    if scheduler:
        return Client(scheduler)
    # processes: each run's Python apart; one task per worker at a time; memory_limit 0: the runs'
    # own memory is the kernels' (child processes), which a worker's memory monitor must not judge.
    # The workers start with SIGINT ignored (a disposition that survives exec): a Ctrl-C at the terminal
    # reaches the whole process group, and only this driver may act on it, by stopping each run through
    # its task (a worker killed by it would leave its run going, unwatched, and restart it).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                               dashboard_address=":0", silence_logs=logging.ERROR)  # any free port: several at once
    finally:
        signal.signal(signal.SIGINT, previous)
    return Client(cluster)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", help="Vanilla_GAN.ipynb or DCGAN.ipynb")
    parser.add_argument("--seeds", default="5", help="a count (5: seeds 0-4) or a list (0,3,7) or a range (10-14)")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="a setting's values to try; several --grid make a product")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a setting for every run, as for make run")
    parser.add_argument("--out", default="", help="where the runs go (default runs/many_<date-time>)")
    parser.add_argument("--workers", type=int, default=None, help="runs at once on this machine (default: cores)")
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / workers)")
    parser.add_argument("--scheduler", default="", help="a Dask scheduler's address, e.g. tcp://head:8786")
    parser.add_argument("--no-progress-bar", action="store_true")
    return parser.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    """'5' -> 0..4; '0,3,7' -> [0, 3, 7]; '10-14' -> 10..14."""
    text = text.strip()
    try:
        if "," in text:
            return [int(s) for s in text.split(",")]
        if "-" in text[1:]:
            first, last = text.split("-", 1)
            return list(range(int(first), int(last) + 1))
        return list(range(int(text)))
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: a count (5), a list (0,3,7) or a range (10-14)") from None


def planned_runs(args):
    from datetime import datetime

    from gan import many_runs, settings
    rules = settings.rules_for(args.notebook)
    parameters = {name: settings.typed_parameter(name, text, rules) for name, text in args.parameter}
    out = Path(args.out or f"runs/many_{datetime.now():%Y-%m-%d_%H-%M-%S}").absolute()
    return many_runs.plan(args.notebook, parse_seeds(args.seeds), many_runs.parse_grid(args.grid, rules),
                          parameters, out), out


def log_path(out: Path, run) -> Path:
    return out / "logs" / f"{run.run_dir.parent.name}_{run.run_dir.name}.log"


class Progress:
    """A bar over every run's epochs, read from their metrics.csv files (written with each checkpoint)."""

    def __init__(self, planned, show: bool):
        from tqdm import tqdm
        from gan import many_runs
        self.planned, self.epochs_done = planned, many_runs.epochs_done
        self.bar = tqdm(total=sum(r.epochs for r in planned), desc="runs", unit="epoch", disable=not show,
                        file=sys.stderr)
        self.bar.postfix_counts = None

    def update(self, counts: dict) -> None:
        done = sum(min(self.epochs_done(r.run_dir), r.epochs) for r in self.planned)
        if counts != self.bar.postfix_counts:  # redrawn when something changed, not every poll
            self.bar.postfix_counts = counts
            self.bar.set_postfix(counts, refresh=done == self.bar.n)
        if done > self.bar.n:  # (update(0) would redraw the line every poll, filling logs)
            self.bar.update(done - self.bar.n)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def dispatch(client, planned, out: Path, threads: int, show_progress: bool) -> tuple[dict, bool]:
    """Submit every run that is not finished; wait for all, Ctrl-C or SIGTERM stopping them safely.
    Returns ({run name: outcome}, whether a stop was asked)."""
    from distributed import Event

    from gan import many_runs
    stop_name = STOP_EVENT.format(id=os.getpid())
    stop, outcomes, futures = Event(stop_name, client=client), {}, {}
    stop.clear()
    for run in planned:
        state = many_runs.state_of(run)
        if state.state == "finished":
            outcomes[run.name] = {"status": "finished before", "epochs": state.epochs_done}
            continue
        command = many_runs.runner_command(sys.executable, run.notebook, many_runs.runner_parameters(run, state))
        futures[run.name] = client.submit(many_runs.run_one, command, str(log_path(out, run)), threads, stop_name,
                                          key=f"run-{run.run_dir.parent.name}-{run.run_dir.name}-{os.getpid()}",
                                          pure=False)
        if state.state != "new":
            say(f"{run.name}: {state.state} ({state.epochs_done} epochs{', ' + state.note if state.note else ''}): "
                + ("resuming" if state.state == "stopped" else "starting again"))
    progress, stopped = Progress(planned, show_progress), False
    previous = signal.signal(signal.SIGTERM, interrupt)  # a scheduler's stop: as Ctrl-C
    try:
        while True:
            try:
                pending = [name for name, f in futures.items() if not f.done()]
                progress.update({"running/waiting": len(pending), "done": len(outcomes) + len(futures) - len(pending)})
                if not pending:
                    break
                time.sleep(many_runs.POLL_SECONDS)
            except KeyboardInterrupt:
                if stopped:
                    raise
                stopped = True
                say("\nstopping: each run saves its last completed epoch (Ctrl-C again to leave them running "
                    "unwatched)")
                stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.bar.close()
    for name, future in futures.items():
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 -- a worker lost, a task that could not run: that run's news only
            outcomes[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            continue
        code = result["returncode"]
        status = "finished" if code == 0 else "stopped" if result["stopped"] or code in (130, 143) else "failed"
        outcomes[name] = {"status": status, "returncode": code, "seconds": result["seconds"], "tail": result["tail"]}
    return outcomes, stopped


def report(planned, outcomes: dict, out: Path) -> None:
    for run in planned:
        o = outcomes.get(run.name, {"status": "not run"})
        line = f"{run.name}: {o['status']}"
        if "seconds" in o:
            line += f" ({o['seconds'] / 60:.1f} min)"
        if o["status"] == "failed":
            last = [t for t in (o.get("tail") or o.get("error", "")).splitlines() if t.strip()][-6:]
            line += f"; see {log_path(out, run)}:\n    " + "\n    ".join(last)
        say(line)


def write_results(planned, out: Path) -> None:
    from gan import many_runs
    summary = many_runs.summarize(planned)
    paths = many_runs.write_summary(summary, out)
    drawn = many_runs.plot_bands(planned, out / "bands.png")
    say(f"results: {paths['markdown']}, {paths['summary']}, {paths['runs']}" + (f", {out / 'bands.png'}" if drawn else ""))


def again_command(argv: list[str], out: Path) -> str:
    args = list(argv)
    if "--out" not in args:
        args += ["--out", str(out)]
    return shlex.join([sys.executable, "scripts/run_many.py", *args])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from gan import runs
    from gan.errors import ParameterError
    if Path(args.notebook).name not in runs.NOTEBOOKS or not (REPOSITORY / Path(args.notebook).name).is_file():
        say(f"Not started: {args.notebook!r} is not one of this repository's notebooks ({', '.join(runs.NOTEBOOKS)})")
        return 2
    try:
        planned, out = planned_runs(args)
    except ParameterError as exc:
        say(f"Not started: {exc}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    workers, threads = split_cores(args.workers, args.threads, len(planned))
    if args.scheduler:  # the cluster's workers decide how many at once; threads as their environment says
        threads = args.threads
    where = args.scheduler or f"this machine: {workers} at once, {threads} thread(s) each"
    say(f"{len(planned)} runs of {planned[0].notebook} into {out} ({where})")
    client = connect(args.scheduler, workers)
    try:
        outcomes, stopped = dispatch(client, planned, out, threads, not args.no_progress_bar)
    finally:
        client.close()
    report(planned, outcomes, out)
    write_results(planned, out)
    if stopped or any(o["status"] == "stopped" for o in outcomes.values()):
        say(f"Stopped. To continue (finished runs are skipped, stopped ones resume): {again_command(argv, out)}")
        return 130
    return 1 if any(o["status"] == "failed" for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
