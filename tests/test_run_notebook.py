"""scripts/run_notebook.py (what `make run` calls): -p values typed by the notebook's rules, every refusal
before anything is written, and an earlier run's files left byte for byte as they were when the notebook
refuses to start over them.

Refusals before any kernel starts call main() in this process (fast). Where a kernel must run, a tiny
notebook written here refuses or claims its run directory in its second cell: seconds per test, not the
training notebooks. Stops at random moments are tested in test_runs.py (Trial) and test_notebook_safety.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

import run_notebook
from gan import runs, settings
from conftest import REPO_ROOT

VANILLA = str(REPO_ROOT / "Vanilla_GAN.ipynb")  # only checked to exist: refused before any kernel runs it
DCGAN = str(REPO_ROOT / "DCGAN.ipynb")

REFUSES = 'from gan.errors import ParameterError\nraise ParameterError("refused by the notebook")\n'
# Claims the directory as the notebooks do, leaves a half-written checkpoint and dies as a kill would.
CLAIMS_AND_DIES = '''import os, signal
from gan import runs
lock = runs.claim_run_dir(run_dir)
with open(os.path.join(run_dir, f"checkpoint.pt.{os.getpid()}.half.tmp"), "wb") as f:
    f.write(b"cut short" * 1000)
print("claimed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


def tiny_notebook(path: Path, source: str) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    cells = [new_code_cell('run_dir = ""', metadata={"tags": ["parameters"]}), new_code_cell(source)]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, path)
    return path


def call_main(argv: list[str]) -> int:
    """run_notebook.main in this process; pytest's signal handlers are given back afterwards."""
    handlers = {s: signal.getsignal(s) for s in run_notebook.STOP_SIGNALS}
    try:
        return run_notebook.main([str(a) for a in argv])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def contents(directory: Path) -> dict:
    """{relative path: bytes} of every file below `directory`, hidden ones included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def finished_run(run_dir: Path, notebook: str = "Vanilla_GAN.ipynb") -> Path:
    """A run directory as a finished run leaves it: its record (the executed notebook, kernel.log) too."""
    run_dir.mkdir(parents=True)
    runs.write_json(run_dir / "config.json", {"notebook": notebook, "epochs": 2})
    config = {"latent_dim": 4, **({"g_width": 8} if notebook == "DCGAN.ipynb" else {})}
    runs.save_checkpoint(run_dir / "checkpoint.pt", {"config": config, "epoch": 2})
    (run_dir / "metrics.csv").write_text("epoch\n1\n2\n")
    (run_dir / notebook).write_text('{"the finished run": "with all its outputs"}')
    (run_dir / run_notebook.KERNEL_LOG).write_text("the finished run's kernel\n")
    return run_dir


# ------------------------------------------------------------------------------------------------
# 1: -p values for paths and names stay strings
# ------------------------------------------------------------------------------------------------

def test_paths_and_names_stay_strings_and_numbers_and_lists_are_parsed():
    args = run_notebook.parse_args([VANILLA, "-p", "run_dir", "2024_12_01", "-p", "seed", "7", "-p", "lr_d", "1e-3",
                                    "-p", "d_hidden", "[512, 256]", "-p", "g_batchnorm", "False"])
    assert args.parameters == {"run_dir": "2024_12_01", "seed": 7, "lr_d": 1e-3, "d_hidden": [512, 256],
                               "g_batchnorm": False}
    assert run_notebook.parse_args([VANILLA, "-p", "run_dir", "007"]).parameters == {"run_dir": "007"}
    dcgan = run_notebook.parse_args([DCGAN, "-p", "dataset", "2024", "-p", "image_size", "64"]).parameters
    assert dcgan == {"dataset": "2024", "image_size": 64}
    settings.validate_parameters(dcgan, settings.rules_for("DCGAN.ipynb"))  # a folder named 2024 is allowed


def test_run_dir_2024_12_01_is_that_directory_not_20241201(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    Path("2024_12_01").write_text("a file, so that the run is refused after its run_dir is resolved")
    assert call_main([DCGAN, "-p", "run_dir", "2024_12_01", "-p", "dataset", "2024"]) == 2
    err = capfd.readouterr().err
    assert "Not started: run_dir = '2024_12_01' is a file" in err and "dataset" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["2024_12_01"]


# ------------------------------------------------------------------------------------------------
# 2: a refused start leaves every file of the run directory as it was
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["-p", "overwrite", "1"], "overwrite = 1 is not allowed: use True or False"),
    (["-p", "resume", "{run}/checkpoint.pt", "-p", "epoch", "5"], "unknown parameter 'epoch' (did you mean 'epochs'?)"),
    ([], "already holds a run"),
])
def test_bad_parameters_or_a_taken_run_dir_are_refused_before_anything_is_written(tmp_path, capfd, extra, expected):
    run = finished_run(tmp_path / "run")
    before = contents(run)
    argv = [VANILLA, "-p", "run_dir", run] + [a.format(run=run) for a in extra]
    assert call_main(argv) == 2
    err = capfd.readouterr().err
    assert err.startswith("Not started: ") and expected in err, err
    assert contents(run) == before


def test_a_run_dir_that_is_a_file_is_refused_however_empty(tmp_path, capfd):
    path = tmp_path / "a file"
    path.write_bytes(b"")
    assert call_main([VANILLA, "-p", "run_dir", path]) == 2
    assert "is a file, not a directory" in capfd.readouterr().err
    assert path.read_bytes() == b""


def test_the_other_notebooks_checkpoint_is_refused_leaving_its_run_as_it_was(tmp_path, capfd):
    run = finished_run(tmp_path / "mnist run")
    before = contents(run)
    assert call_main([DCGAN, "-p", "resume", run / "checkpoint.pt"]) == 2
    err = capfd.readouterr().err
    assert "is a checkpoint of Vanilla_GAN.ipynb, not of DCGAN.ipynb" in err, err
    assert runs.resume_command(run / "checkpoint.pt", "Vanilla_GAN.ipynb") in err
    assert contents(run) == before


def test_a_link_planted_as_kernel_log_is_refused(tmp_path, capfd):
    run, target = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    target.write_text("not the run's\n")
    (run / run_notebook.KERNEL_LOG).symlink_to(target)
    assert call_main([VANILLA, "-p", "run_dir", run]) == 2
    assert "kernel.log is a symbolic link" in capfd.readouterr().err
    assert target.read_text() == "not the run's\n" and sorted(os.listdir(run)) == ["kernel.log"]


def notebook_over_an_earlier_run(tmp_path: Path, name: str, cells) -> tuple[Path, Path]:
    """A tiny notebook `name` of `cells`, and a run directory holding an earlier run's executed copy
    of it and kernel.log."""
    notebook = tiny_notebook(tmp_path / name, cells)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text('{"an earlier run": "its executed notebook"}')
    (run / run_notebook.KERNEL_LOG).write_text("the earlier run's kernel\n")
    return notebook, run


def test_a_refusal_by_the_notebook_over_earlier_files_leaves_them_byte_for_byte(tmp_path, capfd):
    notebook, run = notebook_over_an_earlier_run(tmp_path, "refuses.ipynb", REFUSES)
    before = contents(run)
    assert call_main([notebook, "--cwd", REPO_ROOT, "--no-progress-bar", "-p", "run_dir", run]) == 1
    err = capfd.readouterr().err
    assert "A cell failed: ParameterError: refused by the notebook" in err
    assert f"Executed notebook: not kept: {run} held files before this run" in err, err
    assert contents(run) == before  # no temporary file left either


def test_a_refusal_in_a_new_directory_keeps_the_executed_notebook_and_kernel_log(tmp_path, capfd):
    notebook = tiny_notebook(tmp_path / "refuses.ipynb", REFUSES)
    run = tmp_path / "new run"
    assert call_main([notebook, "--cwd", REPO_ROOT, "--no-progress-bar", "-p", "run_dir", run]) == 1
    assert f"Executed notebook: {run / 'refuses.ipynb'}\n" in capfd.readouterr().err
    assert sorted(os.listdir(run)) == ["kernel.log", "refuses.ipynb"]  # no hidden temporary file
    executed = json.loads((run / "refuses.ipynb").read_text())
    assert "refused by the notebook" in json.dumps(executed["cells"])


# ------------------------------------------------------------------------------------------------
# 3: the executed notebook never replaces the notebook run
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["-o itself", "-o a link to it", "run_dir its folder"])
def test_output_over_the_notebook_itself_is_refused(tmp_path, capfd, where):
    notebook = tiny_notebook(tmp_path / "source.ipynb", "print('hi')")
    (tmp_path / "link.ipynb").symlink_to(notebook)
    before = contents(tmp_path)
    argv = {"-o itself": ["-o", notebook, "-p", "run_dir", tmp_path / "run"],
            "-o a link to it": ["-o", tmp_path / "link.ipynb", "-p", "run_dir", tmp_path / "run"],
            "run_dir its folder": ["-p", "run_dir", tmp_path]}[where]
    assert call_main([notebook, *argv]) == 2
    err = capfd.readouterr().err
    assert err.startswith("Not started: ") and f"the notebook '{notebook}' itself" in err, err
    assert contents(tmp_path) == before and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 4: a run directory that cannot be written
# ------------------------------------------------------------------------------------------------

def test_a_read_only_run_dir_says_so_not_where_the_kernel_log_would_be(tmp_path, monkeypatch, capfd):
    def refused(*args, **kwargs):  # what mkstemp meets in a read-only directory (root ignores mode bits)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_notebook.tempfile, "mkstemp", refused)
    run = tmp_path / "read only"
    run.mkdir()
    assert call_main([VANILLA, "-p", "run_dir", run]) == 2
    err = capfd.readouterr().err
    assert f"Not started: run_dir = '{run}' is not writable (Permission denied): make it writable" in err, err
    assert "kernel.log" not in err and os.listdir(run) == []


# ------------------------------------------------------------------------------------------------
# 5: starting again after a stop before the first checkpoint: the same notebook and -p values
# ------------------------------------------------------------------------------------------------

def test_the_start_again_command_names_the_notebook_and_its_parameters(tmp_path, monkeypatch, capfd):
    # A SIGTERM while the runner checks the run directory: no checkpoint, so the command starts afresh.
    monkeypatch.setattr(run_notebook, "refuse_taken_run_dir", lambda *args: os.kill(os.getpid(), signal.SIGTERM))
    run = tmp_path / "photos run"
    assert call_main([DCGAN, "-p", "run_dir", run, "-p", "dataset", "/data/my photos", "-p", "epochs", "3"]) == 143
    err = capfd.readouterr().err
    command = runs.restart_command(run, "DCGAN.ipynb", {"dataset": "/data/my photos", "epochs": 3})
    assert "NOTEBOOK=DCGAN.ipynb" in command and "my photos" in command
    assert "nothing to resume" in err and f"`{command}`" in err, err


def test_make_commands_name_a_notebook_outside_the_repository_by_its_absolute_path(tmp_path, monkeypatch):
    assert run_notebook.notebook_for_make(DCGAN) == "DCGAN.ipynb"
    monkeypatch.chdir(tmp_path)
    assert run_notebook.notebook_for_make("DCGAN.ipynb") == str(tmp_path / "DCGAN.ipynb")  # another copy


# ------------------------------------------------------------------------------------------------
# 6: after the kernel died, no half-written temporary file stays; the run's own record is kept
# ------------------------------------------------------------------------------------------------

def test_a_killed_kernel_leaves_no_half_written_file_and_its_record_is_kept(tmp_path, capfd):
    notebook, run = notebook_over_an_earlier_run(tmp_path, "claims.ipynb", CLAIMS_AND_DIES)
    assert call_main([notebook, "--cwd", REPO_ROOT, "--no-progress-bar", "-p", "run_dir", run]) == 1
    err = capfd.readouterr().err
    assert "The run ended abnormally: DeadKernelError" in err, err
    assert f"The kernel's own messages are in {run / 'kernel.log'}." in err
    assert f"Executed notebook: {run / 'claims.ipynb'}\n" in err
    assert not list(run.glob("checkpoint.pt.*.tmp")) and not list(run.glob(".kernel.log.*"))
    assert sorted(os.listdir(run)) == [".lock", "claims.ipynb", "grids", "kernel.log"]
    assert "claimed" in (run / "claims.ipynb").read_text()  # this run's record replaced the earlier one
    assert (run / "kernel.log").read_text().startswith("the earlier run's kernel\n")  # appended to
