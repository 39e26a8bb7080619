"""Faults during training: a killed kernel (SIGKILL at chosen moments, some while a checkpoint is being
written), an interrupt (Ctrl-C / the stop button), and a diverging run. After each, the checkpoint on
disk must load and resuming must give exactly the run that was never disturbed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import papermill
import psutil
import pytest
import torch
import yaml

from gan import runs
from conftest import (NOTEBOOK, REPO_ROOT, cell_text, execute_cached, kernel_env, metrics_rows,
                      notebook_params, notebook_text, without_machine_columns)

# 4 short epochs (8 steps each), a checkpoint after every one (TINY_PARAMS), no final evaluation: the
# same run as test_notebook's straight 4-epoch run, so the session runs the undisturbed one only once.
FAULT_PARAMS = dict(epochs=4, eval_samples=0)


@pytest.fixture(scope="module")
def reference(notebook_runs):
    """The same run, never disturbed."""
    return notebook_runs(**FAULT_PARAMS).check()


def check_checkpoint(path: Path, reference_rows) -> tuple[dict, list[str]]:
    """Load the checkpoint (CheckpointError if torn or corrupt) and list how it departs from the
    undisturbed run: its history must be that run's first `epoch` rows, its weights finite."""
    ck = runs.load_checkpoint(path)
    epoch, problems = ck["epoch"], []
    if len(ck["history"]) != epoch:
        problems.append(f"epoch {epoch} but {len(ck['history'])} history rows")
    mine, theirs = without_machine_columns(ck["history"]), reference_rows[:epoch]
    for row, ref in zip(mine, theirs):
        if row != ref:
            diff = {k: (row.get(k), ref.get(k)) for k in ref if row.get(k) != ref.get(k)}
            problems.append(f"history row of epoch {int(ref['epoch'])} differs from the undisturbed run: "
                            + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in list(diff.items())[:3]))
            break
    for key in ("G", "D", "G_ema"):
        if not all(torch.isfinite(t).all() for t in ck[key].values() if t.is_floating_point()):
            problems.append(f"{key} has non-finite weights")
    return ck, problems


# ------------------------------------------------------------------------------------------------
# SIGKILL at chosen moments, then resume
# ------------------------------------------------------------------------------------------------

class NotebookProcess:
    """papermill's command line in a child process (own session), training into `run_dir`."""

    def __init__(self, workdir: Path, data_dir: Path, run_dir: Path, **params):
        workdir.mkdir(parents=True, exist_ok=True)
        full = notebook_params(workdir, data_dir, run_dir=str(run_dir), **{**FAULT_PARAMS, **params})
        params_file = workdir / "params.yaml"
        params_file.write_text(yaml.safe_dump(full))
        self.log = open(workdir / "papermill.log", "wb")
        self.run_dir = run_dir
        self.ckpt = run_dir / "checkpoint.pt"
        self.mtime0 = self.ckpt.stat().st_mtime_ns if self.ckpt.exists() else None
        self.tmps0 = set(self.tmp_files())
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "papermill", str(NOTEBOOK), str(workdir / "out.ipynb"), "-k", "python3",
             "-f", str(params_file), "--cwd", str(REPO_ROOT), "--no-progress-bar"],
            cwd=REPO_ROOT, env={**os.environ, **kernel_env()}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.kernel = None

    def tmp_files(self):
        if not self.run_dir.is_dir():
            return []
        return [e.name for e in os.scandir(self.run_dir) if e.name.startswith("checkpoint.pt.") and e.name.endswith(".tmp")]

    def ckpt_changed(self) -> bool:
        try:
            return self.ckpt.stat().st_mtime_ns != self.mtime0
        except FileNotFoundError:
            return False

    def new_tmp(self) -> bool:
        return bool(set(self.tmp_files()) - self.tmps0)

    def find_kernel(self):
        if self.kernel is None:
            try:
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    if any("ipykernel" in part for part in p.cmdline()):
                        self.kernel = p.pid
            except psutil.Error:
                pass
        return self.kernel

    def wait_for(self, predicate, timeout: float = 180.0) -> bool:
        """Poll every millisecond; False if the notebook ended (or timed out) first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.find_kernel()
            if predicate():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.001)
        return False

    def kill(self):
        """SIGKILL the kernel (the process that trains and writes) first, then papermill."""
        self.find_kernel()
        for pgid in (self.kernel, self.proc.pid):
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)
        if self.kernel is not None:  # SIGKILL is delivered asynchronously: wait until the kernel is gone
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.kernel_alive():
                time.sleep(0.01)
            assert not self.kernel_alive(), f"kernel {self.kernel} survived SIGKILL"
        self.log.close()

    def kernel_alive(self) -> bool:
        try:
            return psutil.Process(self.kernel).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def kill_trials():
    """(name, what the trial waits for before SIGKILL). The first starts afresh, the others resume."""
    return [
        ("right after the first checkpoint lands", lambda p: p.ckpt_changed(), 0.0),
        ("while a checkpoint is being written", lambda p: p.new_tmp(), 0.0),
        ("mid-epoch, 0.4 s after a checkpoint", lambda p: p.ckpt_changed(), 0.4),
        ("during start-up, 3 s after launch", lambda p: time.monotonic() - p.started > 3.0, 0.0),
        ("while a checkpoint is being written (again)", lambda p: p.new_tmp(), 0.0),
    ]


def test_sigkill_then_resume_equals_undisturbed_run(reference, data_dir, tmp_path):
    ref_rows = metrics_rows(reference.run_dir)
    assert len(ref_rows) == FAULT_PARAMS["epochs"]
    run_dir = tmp_path / "run"
    report, problems, last_epoch = [], [], 0
    for i, (name, condition, delay) in enumerate(kill_trials()):
        resume = {"resume": str(run_dir / "checkpoint.pt")} if i else {}
        proc = NotebookProcess(tmp_path / f"trial{i}", data_dir, run_dir, **resume)
        hit = proc.wait_for(lambda: condition(proc))
        if hit and delay:
            time.sleep(delay)
        tmp_sizes_at_kill = {n: (run_dir / n).stat().st_size for n in set(proc.tmp_files()) - proc.tmps0
                             if (run_dir / n).exists()}
        elapsed = time.monotonic() - proc.started
        proc.kill()
        assert hit, f"trial {i + 1} ({name}): the notebook ended before the kill; see {proc.log.name}"
        ck, trouble = check_checkpoint(run_dir / "checkpoint.pt", ref_rows)  # must load, always
        if ck["epoch"] < last_epoch:
            trouble.append(f"the checkpoint went back from epoch {last_epoch} to {ck['epoch']}")
        problems += [f"trial {i + 1}: {t}" for t in trouble]
        leftovers = sorted(set(proc.tmp_files()) - proc.tmps0)
        report.append(f"trial {i + 1}: killed {name} at {elapsed:.1f} s; checkpoint.pt loads, epoch "
                      f"{last_epoch} -> {ck['epoch']}; history {'differs' if trouble else 'matches'}; "
                      "torn temporary files left: "
                      + (", ".join(f"{n} ({tmp_sizes_at_kill.get(n, 0):,} B at kill)" for n in leftovers) or "none"))
        last_epoch = ck["epoch"]
    # the last resume runs to the end, in-process; it continues from the last saved epoch
    final = execute_cached(tmp_path / "final", data_dir, run_dir=str(run_dir),
                           resume=str(run_dir / "checkpoint.pt"), **FAULT_PARAMS)
    final.check()
    if f"after epoch {last_epoch}" not in notebook_text(final.nb):
        problems.append(f"the final run did not say it resumed after epoch {last_epoch}")
    rows = metrics_rows(run_dir)
    same_rows = [int(r["epoch"]) for r, ref in zip(rows, ref_rows) if r == ref]
    if rows != ref_rows:
        problems.append(f"final metrics.csv differs from the undisturbed run (epochs equal: {same_rows})")
    final_ck = runs.load_checkpoint(run_dir / "checkpoint.pt")
    ref_ck = runs.load_checkpoint(reference.run_dir / "checkpoint.pt")
    if final_ck["epoch"] != FAULT_PARAMS["epochs"]:
        problems.append(f"final checkpoint at epoch {final_ck['epoch']}")
    differing = [f"{key}.{n}" for key in ("G", "D", "G_ema") for n, v in ref_ck[key].items()
                 if not torch.equal(final_ck[key][n], v)]
    if differing:
        problems.append(f"final weights differ from the undisturbed run's ({len(differing)} tensors, e.g. {differing[0]})")
    report.append(f"final resume from epoch {last_epoch} to {FAULT_PARAMS['epochs']}: metrics.csv "
                  f"{'equals' if rows == ref_rows else 'DIFFERS from'} the undisturbed run's, final weights "
                  f"{'DIFFER' if differing else 'equal'}")
    print("\n".join(["", "kill trials:"] + report))
    assert not problems, "\n".join(report + ["problems:"] + problems)


# ------------------------------------------------------------------------------------------------
# Interrupt (KeyboardInterrupt in the kernel, as from the stop button)
# ------------------------------------------------------------------------------------------------

def kernels_of_this_process():
    return [p for p in psutil.Process().children(recursive=True)
            if any("ipykernel" in part for part in p.cmdline())]


def test_sigterm_to_plain_papermill_saves_the_last_epoch_before_the_kernel_goes(reference, data_dir, tmp_path):
    # What a scheduler or a multi-run engine sends: papermill dies at once, and the kernel, orphaned,
    # must save the epochs since its last checkpoint (here: none was due before epoch 100) first.
    run_dir = tmp_path / "run"
    proc = NotebookProcess(tmp_path / "work", data_dir, run_dir, epochs=40, checkpoint_every=100)
    # Epoch 3's grid, not epoch 2's: an epoch draws its grid before it is complete (snapshot taken),
    # so only the next epoch's grid shows that epoch 2 can no longer be rolled back.
    assert proc.wait_for(lambda: (run_dir / "grids" / "epoch_003.png").exists()), proc.log.name
    assert not proc.ckpt.exists()
    proc.proc.send_signal(signal.SIGTERM)
    proc.proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.kernel_alive():
        time.sleep(0.05)
    assert not proc.kernel_alive(), "the orphaned kernel did not shut down"
    ck, problems = check_checkpoint(proc.ckpt, without_machine_columns(metrics_rows(reference.run_dir)))
    assert 2 <= ck["epoch"] < 40 and not problems, problems
    assert len(runs.read_metrics_csv(run_dir / "metrics.csv")) == ck["epoch"]
    proc.log.close()
    assert "the kernel's parent process" in (tmp_path / "work" / "papermill.log").read_text()  # the kernel's stderr


def test_interrupt_saves_and_says_how_to_resume(reference, data_dir, tmp_path):
    ref_rows = metrics_rows(reference.run_dir)
    run_dir = tmp_path / "run"
    before = {p.pid for p in kernels_of_this_process()}
    result = {}
    worker = threading.Thread(target=lambda: result.update(run=execute_cached(
        tmp_path, data_dir, run_dir=str(run_dir), epochs=200, eval_samples=0)))
    worker.start()
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoint.pt").exists() and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    kernels = [p for p in kernels_of_this_process() if p.pid not in before]
    assert len(kernels) == 1, "expected the notebook's kernel among this process's children"
    kernels[0].send_signal(signal.SIGINT)  # what Jupyter's stop button does to a Python kernel
    worker.join(timeout=180)
    assert not worker.is_alive()
    run = result["run"]
    assert isinstance(run.error, papermill.PapermillExecutionError)
    assert run.error.ename == "KeyboardInterrupt"
    cell = next(c for c in run.nb.cells if c.cell_type == "code" and "for epoch in range(epochs_done, epochs)" in c.source)
    text = cell_text(cell)
    assert "Interrupted" in text and "resume" in text
    ck, problems = check_checkpoint(run_dir / "checkpoint.pt", ref_rows)
    assert not problems
    error = next(o for o in cell.outputs if o.output_type == "error")
    assert error.traceback == [f"KeyboardInterrupt: training stopped; epoch {ck['epoch']} is saved "
                               "(how to continue: above)"], "a traceback after the save message reads as a crash"
    assert 1 <= ck["epoch"] < 200
    assert str(run_dir / "checkpoint.pt") in text and f"after epoch {ck['epoch']}" in text
    assert not list(run_dir.glob("*.tmp")), "an interrupt left a temporary file"
    message = text[text.index("Interrupted"):].splitlines()[0]  # (after any progress-bar text on that line)
    print(f"\ninterrupt: checkpoint saved after epoch {ck['epoch']}; the notebook said: {message}")


# ------------------------------------------------------------------------------------------------
# Divergence
# ------------------------------------------------------------------------------------------------

def test_divergence_names_learning_rates_and_keeps_a_good_checkpoint(data_dir, tmp_path):
    # lr_d = 1e10 overflows D's weights in the first step: NaN losses in every seed we tried
    run = execute_cached(tmp_path, data_dir, lr_d=1e10, epochs=3, eval_samples=0)
    assert isinstance(run.error, papermill.PapermillExecutionError), "lr_d = 1e10 did not diverge"
    assert run.error.ename == "DivergenceError"
    text = str(run.error)
    assert "lr_d (now 10000000000.0)" in text and "lr_g (now " in text
    ck = runs.load_checkpoint(run.run_dir / "checkpoint.pt")
    assert ck["epoch"] == 0 and ck["history"] == []  # rolled back to before the first epoch
    for key in ("G", "D", "G_ema"):
        for name, t in ck[key].items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{key}.{name} is not finite"
    for key in ("opt_G", "opt_D"):
        for state in ck[key]["state"].values():
            assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    assert str(run.run_dir / "checkpoint.pt") in text and "resume" in text
