"""Shared fixtures: where MNIST is, disposable copies of it to damage, and running the notebook.

MNIST is found through the GAN_DATA_DIR environment variable (default: data/ in the repository), a
directory holding MNIST/raw/ in torchvision's layout. Tests that need it are skipped with a clear
message when it is not there. The shared copy is only ever read: tests that damage files work on
copies in their own tmp_path.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "Vanilla_GAN.ipynb"
if str(REPO_ROOT) not in sys.path:  # `import gan_utils` from the repository root, wherever pytest runs
    sys.path.insert(0, str(REPO_ROOT))

import gan_utils  # noqa: E402

RAW_NAMES = [spec.name for spec in gan_utils.MNIST_FILES.values()]

# Tiny settings for notebook runs: 8 steps per epoch, seconds per run on a laptop CPU.
TINY_PARAMS = dict(train_subset=512, batch_size=64, epochs=2, metrics_samples=256, eval_samples=500,
                   log_every=2, checkpoint_every=1, device="cpu", seed=0)

# Columns of metrics.csv that measure the machine (wall time, memory), not the computation: ignored
# when runs are compared (train_seconds, eval_seconds, peak_rss_mb, ...).
MACHINE_COLUMN_SUFFIXES = ("_seconds", "_mb")


def is_machine_column(name: str) -> bool:
    return name.endswith(MACHINE_COLUMN_SUFFIXES)


def data_root_from_env() -> Path:
    """GAN_DATA_DIR (default "data"), relative paths taken from the repository root like the notebook."""
    path = Path(os.environ.get(gan_utils.DATA_DIR_ENV, "data")).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def mnist_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / n).is_file() or (raw / (n + ".gz")).is_file() for n in RAW_NAMES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory holding MNIST/raw/ (GAN_DATA_DIR); the test is skipped when MNIST isn't there."""
    root = data_root_from_env()
    if not mnist_present(root):
        pytest.skip(f"MNIST not found in {root / 'MNIST' / 'raw'} (need the four files "
                    f"{', '.join(RAW_NAMES)}, plain or .gz): set GAN_DATA_DIR to a directory holding "
                    "MNIST/raw/ in torchvision's layout")
    return root


@pytest.fixture
def make_mnist_copy(data_dir, tmp_path):
    """Factory: a private copy of MNIST/raw under tmp_path that a test may truncate or corrupt.

    make_mnist_copy(plain=True, gz=False, names=None) copies the unpacked files and/or the .gz files
    (those that exist in the shared copy) of `names` (default: all four) and returns the data root,
    i.e. the directory that holds MNIST/raw/. Files are copied, never linked, so damaging a copy can
    never reach the shared data.
    """
    counter = iter(range(1000))

    def make(plain: bool = True, gz: bool = False, names=None) -> Path:
        root = tmp_path / f"data{next(counter)}"
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        src = data_dir / "MNIST" / "raw"
        for name in names if names is not None else RAW_NAMES:
            wanted = ([name] if plain else []) + ([name + ".gz"] if gz else [])
            for fname in wanted:
                if not (src / fname).is_file():
                    pytest.skip(f"{src / fname} is not in the shared MNIST copy; this test needs it")
                shutil.copyfile(src / fname, raw / fname)  # copyfile: no read-only mode bits copied
        return root

    return make


def listing(directory: Path) -> dict:
    """{relative path: size} of every file below `directory`: compare before and after a failure."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Running the notebook
# --------------------------------------------------------------------------------------------

def kernel_env() -> dict:
    """Environment for notebook kernels: one OpenMP thread (the fastest for tiny runs on 2 cores,
    and it keeps concurrent trainings on the machine from fighting over cores)."""
    return {"OMP_NUM_THREADS": os.environ.get("GAN_TEST_THREADS", "1"), "PYTHONHASHSEED": "0"}


def notebook_params(tmp_path: Path, data_dir: Path, **params) -> dict:
    full = dict(TINY_PARAMS, data_dir=str(data_dir), run_dir=str(Path(tmp_path) / "run"))
    full.update(params)
    return full


def run_notebook(tmp_path, data_dir=None, output=None, **params):
    """Execute Vanilla_GAN.ipynb with papermill (tiny defaults, overridden by `params`) and return
    the executed notebook (a NotebookNode). Raises papermill.PapermillExecutionError when a cell
    fails; the executed notebook is written to `output` (default tmp_path/"executed.ipynb")."""
    import papermill

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    full = notebook_params(tmp_path, data_dir if data_dir is not None else data_root_from_env(), **params)
    output = Path(output) if output else tmp_path / "executed.ipynb"
    saved = {k: os.environ.get(k) for k in kernel_env()}
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
    try:
        return papermill.execute_notebook(str(NOTEBOOK), str(output), parameters=full,
                                          kernel_name="python3", cwd=str(REPO_ROOT), progress_bar=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cell_text(cell) -> str:
    """Everything a code cell printed (streams, results, errors), as one string."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") == "error":
            parts.append(out.get("ename", "") + ": " + out.get("evalue", "") + "\n" + "\n".join(out.get("traceback", [])))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def notebook_text(nb) -> str:
    return "\n".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-time and memory columns, for exact comparison between runs."""
    return without_machine_columns(gan_utils.read_metrics_csv(Path(run_dir) / "metrics.csv"))


def without_machine_columns(rows) -> list[dict]:
    return [{k: float(v) for k, v in row.items() if not is_machine_column(k)} for row in rows]


@dataclass
class NotebookRun:
    """One executed notebook: the notebook (also when a cell failed), its run directory, the
    papermill error (None when every cell ran) and how long it took."""

    nb: object
    run_dir: Path
    error: Exception | None
    seconds: float

    def check(self):
        """Fail the calling test with the notebook's own traceback if a cell raised."""
        if self.error is not None:
            pytest.fail(f"the notebook failed: {self.error}", pytrace=False)
        return self


def execute_cached(tmp: Path, data: Path, **params) -> NotebookRun:
    import nbformat
    import papermill

    started = time.perf_counter()
    output = tmp / "executed.ipynb"
    try:
        nb, error = run_notebook(tmp, data, output=output, **params), None
    except papermill.PapermillExecutionError as exc:
        nb, error = nbformat.read(output, as_version=4), exc
    return NotebookRun(nb, Path(params.get("run_dir") or tmp / "run"), error, time.perf_counter() - started)


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """Session cache of notebook runs: notebook_runs(**params) executes the notebook once per distinct
    set of parameters (tiny defaults, run_dir in a fresh temporary directory) and returns a
    NotebookRun. A failing cell does not raise here: tests that need the run call .check()."""
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            data = data_root_from_env()
            if not mnist_present(data):
                pytest.skip(f"MNIST not found under {data}; set GAN_DATA_DIR")
            cache[key] = execute_cached(tmp_path_factory.mktemp("nbrun"), data, **params)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_run(notebook_runs, data_dir) -> NotebookRun:
    """The default tiny run (2 epochs, seed 0, final evaluation on 500 samples), run once per session."""
    return notebook_runs()
