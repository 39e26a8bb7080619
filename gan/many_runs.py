"""Many runs of one notebook: which runs a set holds, what state each is in, and the table over them.

A set of runs is a grid of settings times seeds (`plan`); each run is the notebook itself run by
scripts/run_notebook.py into <out>/<setting>/seed_<k>/, the same directory `make run` would write.
scripts/run_many.py dispatches them (on Dask); this module is what that needs without an engine:

* `plan`: the runs, every setting checked by the notebook's own rules before any run starts;
* `state_of`: finished (skip it), stopped (resume it from its checkpoint), unstarted, or new;
* `run_one`: one run on a Dask worker (the runner as a subprocess, stopped by a Dask Event);
* `summarize`: per setting, mean ± sd (and n) of every final metric and of the training time to the
  quality levels, per-seed rows, as CSV and Markdown; `plot_bands` the per-epoch scores with bands.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gan import runs, settings
from gan.errors import ParameterError

SEED_DIR = "seed_{seed}"
POLL_SECONDS = 1.0  # how often a run's task looks for a stop
# The training time to these levels is part of the table: the score of MNIST's reference classifier,
# the FD of the colour notebook's (lower is better), as each notebook's own cells report them.
QUALITY_LEVELS = {"Vanilla_GAN.ipynb": ("score", (9.0,)), "DCGAN.ipynb": ("fd", (100.0, 50.0))}
ROW_NAMES = {"Vanilla_GAN.ipynb": "GAN (this run)", "DCGAN.ipynb": "DCGAN (this run)"}
# The columns of the table, in order, with how many decimals they are shown with.
METRIC_DIGITS = {"parzen_ll": 1, "fd": 2, "kid_mean": 4, "score": 2, "precision": 3, "recall": 3,
                 "min_share": 3, "max_share": 3, "nn_ratio": 2, "inception_fid": 2,
                 "inception_kid_mean": 4}


@dataclass
class PlannedRun:
    setting: str  # "defaults", or e.g. "lr_g=0.0004 batch_size=64"
    seed: int
    parameters: dict  # the -p values of this run (the grid's, the command's), seed included
    run_dir: Path
    notebook: str = "Vanilla_GAN.ipynb"
    epochs: int = 0  # the epochs it trains to (the notebook's default unless set)

    @property
    def name(self) -> str:
        return f"{self.setting}, seed {self.seed}"


@dataclass
class RunState:
    state: str  # "new", "unstarted" (a directory without a checkpoint), "stopped", "finished"
    epochs_done: int = 0
    note: str = ""


def parse_grid(items: list[str], rules: dict) -> dict[str, list]:
    """["lr_g=2e-4,4e-4", "batch_size=64"] -> {"lr_g": [0.0002, 0.0004], "batch_size": [64]}, each
    value typed by the notebook's rule for it (a path stays a string). A list value is written in
    brackets: "g_hidden=[256,512];[512,1024]" (';' separates list values)."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ParameterError(f"--grid {item!r}: write NAME=VALUE,VALUE (e.g. lr_g=2e-4,4e-4)")
        parts = values.split(";") if values.lstrip().startswith("[") else values.split(",")
        grid[name.strip()] = [settings.typed_parameter(name.strip(), v.strip(), rules) for v in parts]
    return grid


def setting_label(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "defaults"


def setting_dir(values: dict) -> str:
    """A directory name for a setting: its values, with no character a shell or a file system minds."""
    if not values:
        return "defaults"
    text = "_".join(f"{k}-{v}" for k, v in values.items())
    return "".join(c if c.isalnum() or c in "-_.+" else "" for c in text.replace(", ", "-").replace(",", "-"))


def plan(notebook: str, seeds: list[int], grid: dict[str, list], parameters: dict, out: Path) -> list[PlannedRun]:
    """Every run of the set: each combination of the grid's values, for each seed, with `parameters`
    (the command's -p values) under them. Each combination is checked by the notebook's rules now, so
    that a typo fails before any run starts, not in the tenth run."""
    rules = settings.rules_for(notebook)
    clashes = sorted({"seed", "run_dir", "resume", "overwrite"} & (set(grid) | set(parameters)))
    if clashes:
        raise ParameterError(f"{', '.join(clashes)} cannot be set for a set of runs: the seeds are --seeds, and each "
                             "run's directory, resume and overwrite are chosen per run (<out>/<setting>/seed_<k>/)")
    defaults = settings.notebook_defaults(rules)
    if "train_minutes" in defaults:  # every run trains its epochs: a set compared by seed cannot stop each where its machine's speed says
        parameters = {"train_minutes": 0, **parameters}
    planned = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        settings.validate_parameters({**parameters, **values}, rules)
        for seed in seeds:
            params = {**parameters, **values, "seed": seed}
            planned.append(PlannedRun(setting_label(values), seed, params,
                                      out / setting_dir(values) / SEED_DIR.format(seed=seed), Path(notebook).name,
                                      int(params.get("epochs", defaults["epochs"]))))
    return planned


def state_of(run: PlannedRun) -> RunState:
    """Where `run` stands on disk: finished (its metrics.json, or with eval_samples = 0 its checkpoint,
    holds every epoch), stopped (a checkpoint of fewer epochs: resume it), unstarted (a run's directory
    with no checkpoint yet: start it again), or new."""
    path = run.run_dir
    if not path.exists():
        return RunState("new")
    epochs = runs.saved_epoch(path / "checkpoint.pt")
    if epochs is None:
        return RunState("unstarted", 0, "no checkpoint yet")
    if epochs >= run.epochs:
        try:
            final = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            final = None
        if (final and final.get("epochs") == epochs) or run.parameters.get("eval_samples") == 0:
            return RunState("finished", epochs)
        return RunState("stopped", epochs, "trained, not yet evaluated")
    return RunState("stopped", epochs)


def runner_parameters(run: PlannedRun, state: RunState) -> dict:
    """The -p values that start, restart or resume `run` as its state asks."""
    params = {**run.parameters, "run_dir": str(run.run_dir)}
    if state.state == "stopped":
        params["resume"] = str(run.run_dir / "checkpoint.pt")
    elif state.state == "unstarted":
        params["overwrite"] = True  # only the run's own files, and none of them holds an epoch
    return params


def epochs_done(run_dir: Path) -> int:
    """Epochs a run has saved (rows of its metrics.csv, written after each checkpoint): the progress bar."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# The table over the runs
# --------------------------------------------------------------------------------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_row(run: PlannedRun) -> dict:
    """One run's final numbers: its metrics.json row (min and max class share added) and the training
    seconds to each quality level (None when never reached), read from its directory."""
    row = {"setting": run.setting, "seed": run.seed}
    try:
        final = json.loads((run.run_dir / "metrics.json").read_text())
        metrics = final["results"][ROW_NAMES[run.notebook]]
    except (OSError, ValueError, KeyError):
        metrics = {}
    row["evaluated"] = bool(metrics)
    row.update({k: v for k, v in metrics.items() if _finite(v)})
    shares = [v for k, v in metrics.items() if k.startswith("frac_") and _finite(v)]
    if shares:
        row["min_share"], row["max_share"] = min(shares), max(shares)
    try:
        history = runs.read_metrics_csv(run.run_dir / "metrics.csv")
    except OSError:
        history = []
    key, levels = QUALITY_LEVELS[run.notebook]
    for level in levels:
        first = next((h for h in history if key in h and (h[key] <= level if key == "fd" else h[key] >= level)), None)
        row[f"seconds_to_{key}_{level:g}"] = first["train_seconds"] if first else None
        row[f"epoch_to_{key}_{level:g}"] = int(first["epoch"]) if first else None
    if history:
        row["train_seconds"] = history[-1]["train_seconds"]
    return row


def mean_sd(values: list) -> tuple[float, float, int]:
    """(mean, sample sd, n) of the finite values; sd is nan for one value."""
    xs = [v for v in values if _finite(v)]
    if not xs:
        return math.nan, math.nan, 0
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return mean, sd, len(xs)


@dataclass
class Summary:
    rows: list[dict]  # one per run
    settings: dict = field(default_factory=dict)  # setting -> {column: (mean, sd, n)}
    columns: list[str] = field(default_factory=list)


def summarize(planned: list[PlannedRun]) -> Summary:
    rows = [run_row(r) for r in planned]
    columns = [c for c in METRIC_DIGITS if any(c in r for r in rows)]
    columns += sorted({c for r in rows for c in r if c.startswith(("seconds_to_", "epoch_to_"))})
    columns += ["train_seconds"] if any("train_seconds" in r for r in rows) else []
    table = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        table[setting] = {c: mean_sd([r.get(c) for r in mine]) for c in columns}
    return Summary(rows, table, columns)


def _shown(mean: float, sd: float, n: int, digits: int) -> str:
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def _digits(column: str) -> int:
    return METRIC_DIGITS.get(column, 0 if column.startswith(("seconds_to_", "epoch_to_", "train_")) else 2)


def markdown(summary: Summary) -> str:
    """Per setting: mean ± sd over its seeds (n: the runs with a final evaluation, of how many; a
    number from fewer runs says so), then a row per seed."""
    header = ["setting", "n"] + summary.columns
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for setting, cells in summary.settings.items():
        n = sum(1 for r in summary.rows if r["setting"] == setting and r["evaluated"])
        shown = [_shown(*cells[c], _digits(c)) + (f" (n={cells[c][2]})" if 0 < cells[c][2] != n else "")
                 for c in summary.columns]
        planned = sum(1 for r in summary.rows if r["setting"] == setting)
        lines.append("| " + " | ".join([setting, f"{n}/{planned}"] + shown) + " |")
    lines += ["", "| " + " | ".join(["setting", "seed"] + summary.columns) + " |",
              "|" + "|".join(["---"] * (len(summary.columns) + 2)) + "|"]
    for r in summary.rows:
        cells = [_shown(r[c], math.nan, 1, _digits(c)) if _finite(r.get(c)) else "-" for c in summary.columns]
        lines.append("| " + " | ".join([r["setting"], str(r["seed"])] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Summary, out: Path) -> dict[str, Path]:
    """<out>/runs.csv (a row per run), <out>/summary.csv (mean, sd, n per setting and column) and
    <out>/summary.md (both tables), each written atomically."""
    paths = {"runs": out / "runs.csv", "summary": out / "summary.csv", "markdown": out / "summary.md"}
    per_run = _csv([["setting", "seed"] + summary.columns] +
                   [[r["setting"], r["seed"]] + [r.get(c, "") if r.get(c) is not None else "" for c in summary.columns]
                    for r in summary.rows])
    per_setting = _csv([["setting", "column", "mean", "sd", "n"]] +
                       [[s, c, *cells[c]] for s, cells in summary.settings.items() for c in summary.columns])
    for key, text in (("runs", per_run), ("summary", per_setting), ("markdown", markdown(summary))):
        runs.atomic_write_bytes(paths[key], text.encode())
    return paths


def _csv(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=os.linesep).writerows(rows)
    return buffer.getvalue()


def plot_bands(planned: list[PlannedRun], path: Path) -> bool:
    """The per-epoch scores of each setting: the mean over its seeds with a band of ± one sd, for the
    score and FD (MNIST) or FD (colour). False when no run has per-epoch scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ("score", "fd") if planned and planned[0].notebook == "Vanilla_GAN.ipynb" else ("fd",)
    histories = {}
    for r in planned:
        try:
            histories.setdefault(r.setting, []).append(runs.read_metrics_csv(r.run_dir / "metrics.csv"))
        except OSError:
            pass
    if not any(h and keys[0] in h[0] for hs in histories.values() for h in hs):
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for setting, hs in histories.items():
            hs = [h for h in hs if h]  # a run that failed before its first epoch has no curve
            if not hs:
                continue
            n = max(len(h) for h in hs)  # a stopped run's curve counts for the epochs it has
            values = np.array([[row.get(key, math.nan) for row in h] + [math.nan] * (n - len(h)) for h in hs])
            count = np.isfinite(values).sum(0)
            mean = np.nanmean(values, 0)
            sd = np.array([np.nanstd(col, ddof=1) if k > 1 else 0.0 for col, k in zip(values.T, count)])
            epochs = np.arange(1, n + 1)
            ax.plot(epochs, mean, label=f"{setting} (n={len(hs)})")
            ax.fill_between(epochs, mean - sd, mean + sd, alpha=0.25)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        if key == "fd":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    runs.atomic_write_bytes(path, buffer.getvalue())
    return True


# --------------------------------------------------------------------------------------------
# One run, on a Dask worker: the runner as a subprocess, stopped with SIGTERM when asked.
# Here, not in scripts/run_many.py: a worker (and the scheduler) import it by name, so `gan` must be
# importable there (the repository on sys.path: start them in its root).
# --------------------------------------------------------------------------------------------

def runner_command(python: str, notebook: str, parameters: dict) -> list[str]:
    command = [python, str(runs.REPOSITORY / "scripts" / "run_notebook.py"), notebook, "--no-progress-bar"]
    for name, value in parameters.items():
        command += ["-p", name, str(value)]
    return command


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def runner_environment(worker_env) -> dict:
    """The worker's environment without what Dask's nanny set in it for its own process
    (`distributed.nanny.pre-spawn-environ`: one thread each for OpenMP, MKL and OpenBLAS, and
    MALLOC_TRIM_THRESHOLD_=65536, with which glibc hands memory back after every step: DCGAN.ipynb's
    step trained 525-733 images/s with it against 995-1,046 without). A run then takes what `make run`
    takes: the threads given, or else every core."""
    import dask

    dasks = {name: str(value) for name, value in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()}
    return {name: value for name, value in worker_env.items() if dasks.get(name) != value}


def run_one(command: list[str], log_path: str, threads: int | None, stop_event: str) -> dict:
    """Run one runner command to its end (on a Dask worker) with `threads` threads, its output in
    `log_path`; when the Dask Event `stop_event` is set, send it SIGTERM (it saves and exits). Returns
    the exit status, the seconds it took and, when it failed, the last lines of its output."""
    from distributed import Event

    threads_env = {name: str(threads) for name in THREAD_VARIABLES} if threads else {}
    env = {**runner_environment(os.environ), **threads_env}
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    started, stop, stopping = time.monotonic(), Event(stop_event), False
    with open(log_path, "ab") as log:
        # A session of its own: a Ctrl-C at the terminal reaches the driver, which stops each run
        # itself, not every process at once.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=runs.REPOSITORY,
                                   start_new_session=True)
        while process.poll() is None:
            if not stopping and stop.is_set():
                process.send_signal(signal.SIGTERM)
                stopping = True
            time.sleep(POLL_SECONDS)
    tail = ""
    if process.returncode != 0:
        with open(log_path, "rb") as log:
            tail = log.read()[-3000:].decode(errors="replace")
    return {"returncode": process.returncode, "seconds": time.monotonic() - started, "tail": tail,
            "stopped": stopping}
